"""Stage ``score_orders``: every order scored by the paper's criterion, beside its cost and object AUC.

Reveal an order's first k patches, and measure with the ``scorer`` critic (``data/critic/scorer``)
the uncertainty of the patches still hidden: an order that collapses the image drives it down
fast (:mod:`pipeline.tasks.order_scores` lists the orders). Reads the val collapse orders
(``data/orders/val``; the train split's for the fixed order), the val latents and images, and
the exported orders' estimator (``data/comae``, or the builder critic with ``orders.estimator:
critic``; to time them). Writes the full record
``data/reports/order_scores.json`` (curves, areas, values at 22% and 50% revealed, paired
differences against random and the best cheap order, costs, object AUC, the builder critic's
scores and the two critics' agreement), the mean curves ``data/plots/collapse_curves.csv`` and
``.png``, and the headline ``data/metrics/order_scores.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Params
from pipeline.data.imageset import ImageSet
from pipeline.latents.store import LatentStore
from pipeline.metrics.collapse import reveal_grid
from pipeline.metrics.objectness import compare, patch_labels
from pipeline.orders.baselines import order_scores
from pipeline.tasks.estimators import load_estimator
from pipeline.orders.export import compute, to_sequences
from pipeline.orders.report import mean_scores, report_keys
from pipeline.orders.shards import CollapseOrders
from pipeline.paths import outputs
from pipeline.tasks.critic import load_critic
from pipeline.tasks.order_scores import (
    CRITIC_BUILT, agreement, build_orders, format_table, plot_curves, score,
    summarise,
)
from pipeline.utils.device import flops_of, pick_device
from pipeline.utils.io import atomic_write_json, write_csv

COMAE_TIMING_IMAGES = 16


def run(params: Params, data_dir: Path | str = Path("data")) -> dict[str, Any]:
    data_dir = Path(data_dir)
    cfg = params.critic.score
    torch.manual_seed(params.seed)
    out = outputs("score_orders", data_dir)
    orders = CollapseOrders(data_dir / "orders" / "val")
    store = LatentStore(data_dir / "latents" / "val.zarr")  # reads only the scored rows
    images = ImageSet(data_dir / "images" / "val")
    keys = report_keys(orders.keys, cfg.images)
    row_of = {k: i for i, k in enumerate(store.keys)}
    device = pick_device()
    tokens = to_sequences(store.tokens(np.asarray([row_of[k] for k in keys]))).float().to(device)
    N = tokens.shape[1]
    img_rows = [images.index_of(k) for k in keys]
    pixels = np.stack([images.image(i) for i in img_rows])
    scorer, scorer_meta = load_critic(data_dir / "critic" / "scorer", device)
    builder, builder_meta = load_critic(data_dir / "critic" / "builder", device)
    matrices = (np.stack([orders.matrix(k) for k in keys])
                if "matrix" in orders.fields else None)
    built = build_orders(
        collapse_scores=np.stack([orders.scores(k) for k in keys]).astype(np.float64),
        matrices=matrices, tokens=tokens, pixels=pixels,
        fixed=mean_scores(CollapseOrders(data_dir / "orders" / "train", verify=False)),
        builder=builder, greedy_images=cfg.greedy_images, seed=params.seed)
    built["collapse"].update(_export_cost(data_dir, tokens[:COMAE_TIMING_IMAGES], params, device))
    ks = reveal_grid(N, cfg.points)
    raw, adjusted, l1 = score(built, tokens, scorer, ks, cfg.batch_size)
    summary = summarise(raw, ks, N, cfg.bootstrap, params.seed)
    # each hidden token against its own blind NLL: what revealing told about it
    gain = summarise(adjusted, ks, N, cfg.bootstrap, params.seed)
    errors = summarise(l1, ks, N, cfg.bootstrap, params.seed)
    second_raw, _, _ = score({n: o for n, o in built.items() if n not in CRITIC_BUILT}, tokens,
                          builder, ks, cfg.batch_size)
    second = summarise(second_raw, ks, N, cfg.bootstrap, params.seed)
    neither = [n for n in summary["area"] if n not in CRITIC_BUILT]
    auc = _object_auc(images, img_rows, built, N)
    costs = {n: {k: o.get(k) for k in ("seconds", "flops", "built_by")} for n, o in built.items()}
    record = {"images": len(keys), "num_tokens": N, "ks": ks, "scorer": scorer_meta.get("task"),
              "builder": builder_meta.get("task"), "scorer_sha256": scorer_meta["sha256"],
              "builder_sha256": builder_meta["sha256"], "summary": summary,
              "builder_scores": second, "adjusted": gain, "l1": errors, "agreement": agreement(summary, second, neither),
              "costs": costs, "object_auc": auc,
              # per image, for eval_cvit's order-quality figure (its bootstrap resamples images)
              "per_image_at22": {n: np.round(c[:, ks.index(int(round(0.22 * N)))], 6).tolist()
                                 for n, c in raw.items() if len(c) == len(keys)}}
    atomic_write_json(out.report, record)
    write_csv(out.curve, [{"k": k, "revealed": k / N, **{n: c[j] for n, c in summary["curves"].items()}}
                          for j, k in enumerate(ks)])
    plot_curves(out.figure, summary["curves"], ks, N,
                f"collapse curves (raw), {len(keys)} val images, scorer critic",
                greedy_images=summary.get("greedy_subset", {}).get("images", 0))
    print(format_table(summary, costs, auc, "scorer"), flush=True)
    print(format_table(gain, costs, auc, "scorer", measure="adjusted"), flush=True)
    print(format_table(errors, costs, auc, "scorer", measure="l1"), flush=True)
    print(f"critic agreement (Spearman of the areas, scorer vs builder, {len(neither)} orders): "
          f"{record['agreement']['spearman']:.3f}", flush=True)
    atomic_write_json(out.metrics, _headline(summary, gain, record["agreement"]["spearman"]))
    return record


def _export_cost(data_dir: Path, tokens: torch.Tensor, params: Params, device: torch.device
                 ) -> dict[str, Any]:
    """Seconds and FLOPs per image of the exported orders (the estimator's N x N matrix +
    PageRank), measured."""
    cfg = params.orders
    model, _ = load_estimator(cfg.estimator, data_dir, device, shares=cfg.critic_shares,
                              seed=params.seed)
    run = lambda: compute(model, tokens, cfg, device, torch.float32)  # noqa: E731
    run()  # warm-up
    t0 = time.perf_counter()
    run()
    secs = (time.perf_counter() - t0) / len(tokens)
    return {"seconds": secs, "flops": flops_of(run) / len(tokens), "built_by": cfg.estimator}


def _object_auc(images: ImageSet, rows: list[int], built: dict[str, dict[str, Any]], N: int
                ) -> dict[str, float | None]:
    if not images.has_masks:
        return {}
    grid = int(round(N ** 0.5))
    labels = np.stack([patch_labels(images.mask(i), grid) for i in rows])
    named = {n: np.stack([order_scores(o) for o in b["orders"]]) for n, b in built.items()}
    return {n: compare({n: s}, labels[:len(s)])[n]["auc"] for n, s in named.items()}


def _headline(raw: dict[str, Any], adjusted: dict[str, Any], spearman: float) -> dict[str, Any]:
    """A dozen figures: the collapse order's areas and paired differences, the best cheap
    order, the greedy reference, the critics' agreement."""
    area, best = raw["area"], raw["best_cheap"]
    d = lambda summ, ref: summ["area"]["collapse"].get(f"vs_{ref}")  # noqa: E731
    greedy = raw.get("greedy_subset", {})
    return {
        "area_collapse": area["collapse"]["mean"], "area_random": area["random"]["mean"],
        "best_cheap": best, "area_best_cheap": area[best]["mean"],
        "collapse_vs_random": d(raw, "random")["mean"],
        "collapse_vs_random_lo": d(raw, "random")["lo"], "collapse_vs_random_hi": d(raw, "random")["hi"],
        "collapse_vs_best_cheap": d(raw, "best_cheap")["mean"],
        "adjusted_collapse_vs_random": d(adjusted, "random")["mean"],
        "adjusted_collapse_vs_random_lo": d(adjusted, "random")["lo"],
        "adjusted_collapse_vs_random_hi": d(adjusted, "random")["hi"],
        "greedy_vs_random": greedy.get("greedy_vs_random", {}).get("mean"),
        "collapse_share_of_greedy_gain": greedy.get("share_of_greedy_gain", {}).get("collapse"),
        "critic_agreement_spearman": spearman,
    }

if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("score-orders")
