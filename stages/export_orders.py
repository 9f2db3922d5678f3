"""Stage ``export_orders``: dependency matrices → PageRank → collapse-order shards.

The matrices come from ``orders.estimator``: CoMAE (``data/comae/``, the paper) or the builder
critic (``data/critic/builder/``, :mod:`pipeline.orders.estimators`). Reads ``data/latents/{train,val}.zarr``; writes ``data/orders/{train,val}/``
(shards + manifest; class orders from train); the collapse order beside its baselines
(:mod:`pipeline.orders.report`) as headline figures in ``data/metrics/orders.json`` and in
full in ``data/reports/orders.json``; and a few Fig. 4/5 PNGs into ``data/plots/orders/``. torchrun-able: ranks write disjoint shards; rank 0 finishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Params, params_dict
from pipeline.paths import outputs
from pipeline.data.imageset import ImageSet
from pipeline.latents.store import LatentStore
from pipeline.tasks.estimators import load_estimator
from pipeline.orders.export import SplitResult, export_split
from pipeline.orders.report import format_table, mean_scores, order_report
from pipeline.orders.shards import CollapseOrders
from pipeline.orders.viz import show_orders
from pipeline.utils.device import pick_device
from pipeline.utils.dist import cleanup, init_distributed
from pipeline.utils.io import atomic_write_json

SPLITS = ("train", "val")
PLOT_IMAGES = 4


def _split_metrics(r: SplitResult) -> dict[str, Any]:
    return {"images": r.count, "shards": r.shards, "shards_computed": r.computed,
            "images_per_s": r.images_per_s, **r.stats}


NO_MASKS = ("no object masks in this image set, so the orders are not scored against objects "
            "(ImageNet: put Kaggle's LOC_<split>_solution.csv in data.root and its boxes become masks)")


def run(params: Params, data_dir: Path | str = Path("data")) -> None:
    data_dir = Path(data_dir)
    cfg = params.orders
    info = init_distributed()
    try:
        device = pick_device(info.local_rank)
        # the trained model is the source of truth (its config is recorded in the manifest);
        # DVC reruns train_comae / train_critic before this stage when their params change
        model, ident = load_estimator(cfg.estimator, data_dir, device, shares=cfg.critic_shares,
                                      seed=params.seed)
        results: dict[str, SplitResult] = {}
        for split in SPLITS:
            store = LatentStore(data_dir / "latents" / f"{split}.zarr", in_memory=None)
            model.check_store(store)
            results[split] = export_split(store, model, ident, cfg, data_dir / "orders" / split,
                                          split, device=device, class_orders=split == "train",
                                          info=info, estimator=cfg.estimator)
        if info.is_main:
            _finish(data_dir, params, results)
    finally:
        cleanup()


def _finish(data_dir: Path, params: Params, results: dict[str, SplitResult]) -> None:
    secs = sum(r.seconds for r in results.values())
    imgs = sum(r.images_computed for r in results.values())
    # Keys per second of this run's computed shards; with orders.flip = compute every key's
    # flipped latents go through CoMAE and PageRank too (twice the work per key).
    speed = imgs / secs if secs > 0 else None
    fixed = mean_scores(CollapseOrders(data_dir / "orders" / "train", verify=False))
    reports, skipped = {}, {}
    for split in SPLITS:
        orders = CollapseOrders(data_dir / "orders" / split, verify=False)
        images = ImageSet(data_dir / "images" / split)
        store = LatentStore(data_dir / "latents" / f"{split}.zarr", in_memory=None)
        reports[split] = order_report(orders, images, store, fixed, seed=params.seed,
                                      max_images=params.orders.report_images)
        if reports[split] is not None:
            print(format_table(reports[split], split), flush=True)
        else:
            skipped[split] = NO_MASKS
            print(f"[orders] {split}: {NO_MASKS}", flush=True)
    out = outputs("export_orders", data_dir)
    atomic_write_json(out.report, {
        "params": params_dict(params.orders), "images_per_s": speed,
        "splits": {s: _split_metrics(r) for s, r in results.items()}, "baselines": reports,
        "baselines_skipped": skipped})
    atomic_write_json(out.metrics,
                      headline(reports.get("val"), results["val"].stats, speed))
    for r in results.values():
        print(r.summary(), flush=True)
    show_orders(data_dir / "orders" / "train", data_dir / "images" / "train", count=PLOT_IMAGES,
                out=out.pictures)


def headline(report: dict[str, Any] | None, stats: dict[str, Any], speed: float | None
             ) -> dict[str, Any]:
    """The few val figures `dvc metrics show` prints: object AUC of the collapse order and of
    every baseline, the collapse order's position-stratified AUC and top-10% share, image
    specificity and flip consistency."""
    out: dict[str, Any] = {}
    if report is not None:
        table = report["table"]
        out.update({f"auc_{name}": row["auc"] for name, row in table.items()})
        out["auc_collapse_ci"] = table["collapse"]["auc_ci"]
        out["pos_auc_collapse"] = table["collapse"]["pos_auc"]
        out["top10_collapse"] = table["collapse"]["top10"]
        out["specificity_tau"] = report["specificity_tau"]
    flip = stats.get("flip_tau_computed_vs_mapped")
    out["flip_tau"] = flip.get("mean") if isinstance(flip, dict) else None
    out["images_per_s"] = speed
    return out


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("export-orders")
