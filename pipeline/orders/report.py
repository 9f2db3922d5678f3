"""The collapse order beside its baselines, for one split of an exported shard set.

:func:`order_report` reads the split's collapse scores, its images (object masks, pixels) and
its latents, builds the baselines of :mod:`pipeline.orders.baselines` for the same images and
scores them all with :func:`pipeline.metrics.objectness.compare`. It also measures *image
specificity*: how far each image's order is from the one fixed order (mean Kendall τ; 1 means
the collapse order is a position prior).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pipeline.metrics.objectness import compare, mean_ci, patch_labels
from pipeline.orders import baselines
from pipeline.orders.pagerank import collapse_order, kendall_tau

BASELINES = ("random", "fixed", "centre", "pixel_variance", "token_saliency")


def mean_scores(orders: Any) -> np.ndarray:
    """Mean collapse scores per position over every key of a shard set, float64 [N], one
    image at a time (a full ImageNet split of scores would not fit in memory)."""
    total = np.zeros(orders.num_tokens, np.float64)
    for k in orders.keys:
        total += orders.scores(k)
    return total / max(len(orders), 1)


def report_keys(keys: Sequence[str], max_images: int) -> list[str]:
    """At most ``max_images`` keys, evenly spaced over the (class-sorted) key list."""
    keys = list(keys)
    if len(keys) <= max_images:
        return keys
    return [keys[i] for i in np.linspace(0, len(keys) - 1, max_images).round().astype(int)]


def order_report(orders: Any, images: Any, store: Any, fixed: np.ndarray, seed: int = 0,
                 max_images: int = 4096) -> dict[str, Any] | None:
    """The collapse order of a shard set beside its baselines (see :func:`score_table`),
    on at most ``max_images`` of its images (``orders.report_images``).

    ``orders``: a :class:`~pipeline.orders.shards.CollapseOrders`; ``images``: the split's
    :class:`~pipeline.data.imageset.ImageSet` (None or without masks: no report); ``store``:
    its :class:`~pipeline.latents.store.LatentStore`; ``fixed``: the fixed order's scores [N]
    (the train split's mean collapse scores).
    """
    if images is None or not images.has_masks:
        return None
    keys = report_keys(orders.keys, max_images)
    collapse = np.stack([orders.scores(k) for k in keys]).astype(np.float64)
    return score_table(collapse, keys, images, store, fixed, seed)


def score_table(collapse: np.ndarray, keys: Sequence[str], images: Any, store: Any,
                fixed: np.ndarray, seed: int = 0) -> dict[str, Any] | None:
    """Table ``{order name: {auc, auc_ci, top10, top25, top50, pos_auc}}`` plus specificity
    for collapse scores ``[M, N]`` of ``keys``, whose masks and pixels come from ``images``
    and tokens from ``store``; None when an image has no mask."""
    rows = [images.index_of(k) for k in keys]
    masks = [images.mask(i) for i in rows]
    if any(m is None for m in masks):
        return None
    M, N = collapse.shape
    grid = int(round(N ** 0.5))
    labels = np.stack([patch_labels(m, grid) for m in masks])
    pixels = np.stack([images.image(i) for i in rows])
    row_of = {k: i for i, k in enumerate(store.keys)}
    toks = store.tokens(np.asarray([row_of[k] for k in keys])).flatten(2).transpose(1, 2).numpy()
    named = {
        "collapse": collapse,
        "random": baselines.random_scores(M, N, seed),
        "fixed": baselines.fixed_scores(M, fixed),
        "centre": baselines.centre_scores(M, grid),
        "pixel_variance": baselines.pixel_variance_scores(pixels, grid),
        "token_saliency": baselines.token_saliency_scores(toks),
    }
    table = compare(named, labels)
    fixed_order = collapse_order(np.asarray(fixed, np.float64))
    taus = [kendall_tau(collapse_order(s), fixed_order) for s in collapse]
    tau, tau_ci = mean_ci(taus)
    return {"images": M, "area_share": float(labels.mean()), "table": table,
            "specificity_tau": tau, "specificity_tau_ci": tau_ci}


def format_table(report: dict[str, Any], split: str) -> str:
    """The report as aligned text for the console and the closing notes."""
    lines = [f"collapse order vs baselines ({split}, {report['images']} images, object area "
             f"{report['area_share']:.1%}; mean Kendall tau to the fixed order "
             f"{report['specificity_tau']:.3f}):",
             f"  {'order':<16}{'object AUC':>16}{'top10%':>8}{'top25%':>8}{'top50%':>8}{'pos AUC':>9}"]
    table = report["table"]  # the collapse order first, whatever order a JSON round trip left
    for name, r in sorted(table.items(), key=lambda kv: kv[0] != "collapse"):
        pos = "n/a" if r["pos_auc"] is None else f"{r['pos_auc']:.3f}"
        lines.append(f"  {name:<16}{r['auc']:>9.3f} ±{r['auc_ci']:.3f}{r['top10']:>8.3f}"
                     f"{r['top25']:>8.3f}{r['top50']:>8.3f}{pos:>9}")
    return "\n".join(lines)


__all__ = ["BASELINES", "format_table", "mean_scores", "order_report", "report_keys", "score_table"]
