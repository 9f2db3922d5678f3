"""How well collapse scores find the object (paper Fig. 4: "top patches outline objects").

A patch counts as *object* when at least half of its pixels lie inside the object mask
(``OBJECT_THRESHOLD``); the mask is cut into the same ``grid × grid`` patches as the latents
(a mask whose side is not a multiple of the grid is resized by nearest neighbour first).

Per image:
- ``top_share[f]``: the share of object patches among the first ``ceil(f·N)`` patches of the
  collapse order, to compare with ``area_share`` (the share of object patches overall): a
  score that ignores the object gets ``top_share ≈ area_share``;
- ``auc``: ROC AUC of score vs object label by the rank (Mann-Whitney) formula, ties counted
  half; undefined (skipped) for an image whose patches are all object or all background.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy.stats import rankdata

OBJECT_THRESHOLD = 0.5
FRACTIONS = (0.10, 0.25, 0.50)


def patch_labels(mask: np.ndarray, grid: int) -> np.ndarray:
    """bool[N] (row-major): patch is object when ≥ ``OBJECT_THRESHOLD`` of its pixels are."""
    mask = np.asarray(mask).astype(bool)
    H, W = mask.shape
    if H % grid or W % grid:  # nearest-neighbour resize to a multiple of the grid
        side_h, side_w = max(grid, H // grid * grid), max(grid, W // grid * grid)
        rows = (np.arange(side_h) * H // side_h).clip(0, H - 1)
        cols = (np.arange(side_w) * W // side_w).clip(0, W - 1)
        mask = mask[rows][:, cols]
        H, W = mask.shape
    frac = mask.reshape(grid, H // grid, grid, W // grid).mean(axis=(1, 3))
    return (frac >= OBJECT_THRESHOLD).reshape(-1)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """P(score of a random object patch > that of a random background patch), ties = ½."""
    labels = np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(scores, np.float64))  # average ranks for ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def top_share(order: np.ndarray, labels: np.ndarray, fractions: Sequence[float] = FRACTIONS) -> dict[str, float]:
    labels = np.asarray(labels, bool)
    N = labels.size
    return {f"{f:g}": float(labels[np.asarray(order)[: max(1, math.ceil(f * N))]].mean()) for f in fractions}


def objectness(items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], grid: int,
               fractions: Sequence[float] = FRACTIONS) -> dict[str, object]:
    """Aggregate over ``(order, scores, mask)`` triples: means over images of each figure.

    ``lift[f]`` = mean top share / mean area share (> 1: the order front-loads the object).
    """
    shares: dict[str, list[float]] = {f"{f:g}": [] for f in fractions}
    area: list[float] = []
    aucs: list[float] = []
    for order, scores, mask in items:
        lab = patch_labels(mask, grid)
        area.append(float(lab.mean()))
        for k, v in top_share(order, lab, fractions).items():
            shares[k].append(v)
        a = roc_auc(scores, lab)
        if a is not None:
            aucs.append(a)
    if not area:
        return {"images": 0}
    mean_area = float(np.mean(area))
    top = {k: float(np.mean(v)) for k, v in shares.items()}
    return {
        "images": len(area),
        "object_patch_threshold": OBJECT_THRESHOLD,
        "area_share": mean_area,
        "top_share": top,
        "lift": {k: (v / mean_area if mean_area > 0 else None) for k, v in top.items()},
        "auc_mean": float(np.mean(aucs)) if aucs else None,
        "auc_images": len(aucs),
    }
