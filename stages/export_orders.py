"""Stage ``export_orders``: CoMAE dependency matrices → PageRank → collapse-order shards.

Reads ``data/comae/`` and ``data/latents/{train,val}.zarr``; writes ``data/orders/{train,val}/``
(shards + manifest; class orders from train), ``data/metrics/orders.json`` (speed, flip and
top-k agreement, how well scores find the object) and a few Fig. 4/5 PNGs into
``data/plots/orders/``. torchrun-able: ranks write disjoint shards; rank 0 finishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Params, params_dict
from pipeline.data.imageset import ImageSet
from pipeline.latents.store import LatentStore
from pipeline.metrics.objectness import objectness
from pipeline.tasks.comae import load_comae
from pipeline.orders.export import SplitResult, export_split
from pipeline.orders.shards import CollapseOrders
from pipeline.orders.viz import show_orders
from pipeline.utils.device import pick_device
from pipeline.utils.dist import cleanup, init_distributed
from pipeline.utils.io import atomic_write_json

SPLITS = ("train", "val")
PLOT_IMAGES = 4


def comae_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What made the matrices: the exact weights file (by sha256) and its config."""
    return {"weights": info["weights"], "sha256": info["sha256"], "config": info["config"]}


def split_objectness(orders: CollapseOrders, images: ImageSet) -> dict[str, Any] | None:
    if not images.has_masks:
        return None

    def items():
        for key in orders.keys:
            mask = images.mask(images.index_of(key))
            if mask is not None:
                yield orders.order(key), orders.scores(key), mask

    return objectness(items(), orders.grid)


def _split_metrics(r: SplitResult) -> dict[str, Any]:
    return {"images": r.count, "shards": r.shards, "shards_computed": r.computed,
            "images_per_s": r.images_per_s, **r.stats}


def run(params: Params, data_dir: Path | str = Path("data")) -> None:
    data_dir = Path(data_dir)
    cfg = params.orders
    info = init_distributed()
    try:
        device = pick_device(info.local_rank)
        model, comae_info = load_comae(data_dir / "comae", expect=params.comae)
        model = model.to(device).eval()
        ident = comae_identity(comae_info)
        results: dict[str, SplitResult] = {}
        for split in SPLITS:
            store = LatentStore(data_dir / "latents" / f"{split}.zarr", in_memory=None)
            model.check_store(store)
            results[split] = export_split(store, model, ident, cfg, data_dir / "orders" / split,
                                          split, device=device, class_orders=split == "train",
                                          info=info)
        if info.is_main:
            _finish(data_dir, params, results)
    finally:
        cleanup()


def _finish(data_dir: Path, params: Params, results: dict[str, SplitResult]) -> None:
    metrics: dict[str, Any] = {"params": params_dict(params.orders),
                               "splits": {s: _split_metrics(r) for s, r in results.items()}}
    secs = sum(r.seconds for r in results.values())
    imgs = sum(r.images_computed for r in results.values())
    # Keys per second of this run's computed shards; with orders.flip = compute every key's
    # flipped latents go through CoMAE and PageRank too (twice the work per key).
    metrics["images_per_s"] = imgs / secs if secs > 0 else None
    metrics["objectness"] = {}
    for split in ("val", "train"):
        orders = CollapseOrders(data_dir / "orders" / split, verify=False)
        metrics["objectness"][split] = split_objectness(orders, ImageSet(data_dir / "images" / split))
    atomic_write_json(data_dir / "metrics" / "orders.json", metrics)
    show_orders(data_dir / "orders" / "train", data_dir / "images" / "train", count=PLOT_IMAGES,
                out=data_dir / "plots" / "orders")


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("export-orders")
