"""Accuracy-vs-mask-ratio curves (paper Tab. 5, Fig. 8): top-k, AuC and the Kneedle knee.

- ``topk_correct``: how many of a batch have the label among the k best logits.
- ``auc``: the area under top-1 over the mask ratios (trapezoids over the evaluated grid),
  divided by the span of the grid, so it is the *mean* accuracy over 0–99% in the same unit as
  the accuracies (%, like the paper's AuC 72.19 for CViT next to its 83.11 top-1 at 0%).
- ``kneedle``: Satopää et al. (2011), "Finding a 'Kneedle' in a Haystack", for the curve the
  paper describes: concave and decreasing (accuracy holds, then collapses). Written here; the
  ``kneed`` package is not used.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def topk_hits(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, Tensor]:
    """{k: bool [B], whether each row's label is among its top-k logits}.

    With fewer classes than k, every row counts as correct for that k (top-5 over 3 classes
    is trivially 100%), which is what timm's ``accuracy`` gives with k clipped to the classes.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits [B, C] and labels [B] expected, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [B, kmax], best first
    hit = top == labels.unsqueeze(1)  # [B, kmax]
    return {k: hit[:, : min(k, kmax)].any(dim=1) for k in ks}


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """{k: number of rows whose label is among the top-k logits} (see :func:`topk_hits`)."""
    return {k: int(h.sum()) for k, h in topk_hits(logits, labels, ks).items()}


def auc(ratios: Sequence[float], values: Sequence[float]) -> float:
    """Mean of ``values`` over the ratio range: trapezoid area / (max ratio − min ratio)."""
    x = np.asarray(ratios, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError("auc needs two equally long 1-D sequences of at least 2 points")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"auc: mask ratios must be distinct, got {ratios}")
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return area / float(x[-1] - x[0])


def kneedle(x: Sequence[float], y: Sequence[float], sensitivity: float = 1.0) -> float | None:
    """The knee of a concave, decreasing curve by Kneedle, or None when it has none.

    1. Normalise: x_n, y_n in [0, 1] (min-max). No smoothing: the curves here are a handful of
       measured points, and a spline through them would invent shape.
    2. Difference curve. Kneedle measures how far the normalised curve lies above the
       diagonal through its ends; for a decreasing curve that is 1 − x_n: d = y_n − (1 − x_n).
       (This is the paper's concave-increasing d = y_n − x_n after flipping the curve.)
    3. Candidates are the local maxima of d with d > 0. Each gets the threshold
       T = d_max − S · mean(Δx_n); it is a knee if d falls below T before the next local
       maximum of d (or the end of the data): Satopää's detection rule, sensitivity S.
    4. Of the knees, return the x of the most pronounced one (largest d), so that a flat,
       noisy start cannot hide the real bend; None if no candidate has d > 0 or none passes.
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError("kneedle needs two equally long 1-D sequences")
    if len(xs) < 3:
        return None
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    if np.any(np.diff(xs) <= 0):
        raise ValueError(f"kneedle: x must be distinct, got {list(x)}")
    y_span = ys.max() - ys.min()
    if y_span == 0:
        return None  # a flat curve has no knee
    xn = (xs - xs[0]) / (xs[-1] - xs[0])
    yn = (ys - ys.min()) / y_span
    d = yn - (1.0 - xn)  # [n]: height above the diagonal from (0, 1) to (1, 0)
    n = len(d)
    maxima = [i for i in range(1, n - 1) if d[i] >= d[i - 1] and d[i] > d[i + 1]]
    step = float(np.mean(np.diff(xn)))
    knees: list[int] = []
    for a, m in enumerate(maxima):
        if d[m] <= 0:
            continue  # below the chord: convex there, not a knee of a concave curve
        threshold = d[m] - sensitivity * step
        nxt = maxima[a + 1] if a + 1 < len(maxima) else n
        # a knee if d drops below the threshold before the next local maximum (Satopää)
        if np.any(d[m + 1:nxt] < threshold):
            knees.append(m)
    if not knees:
        return None
    best = max(knees, key=lambda i: d[i])
    return float(xs[best])


__all__ = ["auc", "kneedle", "topk_correct", "topk_hits"]
