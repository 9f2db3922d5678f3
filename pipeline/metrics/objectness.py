"""How well collapse scores find the object (paper Fig. 4: "top patches outline objects").

A patch counts as *object* when at least half of its pixels lie inside the object mask
(``OBJECT_THRESHOLD``); the mask is cut into the same ``grid × grid`` patches as the latents
(a mask whose side is not a multiple of the grid is resized by nearest neighbour first).

Per image:
- ``top{f}``: the share of object patches among the first ``ceil(f·N)`` patches of the
  order, to compare with the share of object patches overall: a score that ignores the
  object gets about that share;
- ``auc``: ROC AUC of score vs object label by the rank (Mann-Whitney) formula, ties counted
  half; undefined (skipped) for an image whose patches are all object or all background.

Across images, at each patch position: ``pos_auc`` (:func:`position_auc`), which any order
that depends on position alone scores 0.5. :func:`compare` scores several orders of the same
images this way, side by side.
"""

from __future__ import annotations

import math
from typing import Sequence

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


# ----------------------------------------------------------------------------- side by side


def position_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean over patch positions of the AUC, across images, of score vs object at that position.

    Any order that depends on position alone ties every image at a position and scores 0.5;
    above 0.5 means the scores follow the object *within* a position, i.e. they know the image.
    Positions where every image is object (or none is) are skipped.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    per = [roc_auc(scores[:, p], labels[:, p]) for p in range(scores.shape[1])]
    per = [a for a in per if a is not None]
    return float(np.mean(per)) if per else None


def mean_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """(mean, half-width of the normal-approximation 95% interval) over independent samples."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    half = z * v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else float("nan")
    return float(v.mean()), float(half)


def compare(named_scores: dict[str, np.ndarray], labels: np.ndarray,
            fractions: Sequence[float] = FRACTIONS) -> dict[str, dict[str, float | None]]:
    """Score every order the same way: scores ``{name: [M, N]}``, labels bool ``[M, N]``.

    Per name: ``auc`` (mean per-image ROC AUC) with ``auc_ci`` (95% half-width over images),
    ``top{f}`` (object share in the first ``ceil(f·N)`` patches, ties broken by lower index as
    in :func:`pipeline.orders.pagerank.collapse_order`) and ``pos_auc`` (:func:`position_auc`).
    """
    labels = np.asarray(labels, bool)
    out: dict[str, dict[str, float | None]] = {}
    for name, scores in named_scores.items():
        scores = np.asarray(scores, np.float64)
        if scores.shape != labels.shape:
            raise ValueError(f"scores of {name!r} have shape {scores.shape}, labels {labels.shape}")
        orders = np.argsort(-scores, axis=-1, kind="stable")
        aucs = [a for a in (roc_auc(s, lab) for s, lab in zip(scores, labels)) if a is not None]
        auc, ci = mean_ci(aucs)
        row: dict[str, float | None] = {"auc": auc, "auc_ci": ci}
        for f in fractions:
            k = max(1, math.ceil(f * labels.shape[1]))
            row[f"top{int(round(f * 100))}"] = float(np.take_along_axis(labels, orders[:, :k], 1).mean())
        row["pos_auc"] = position_auc(scores, labels)
        out[name] = row
    return out
