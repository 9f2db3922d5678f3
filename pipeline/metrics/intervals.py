"""Means over seeds with a 95% interval from a bootstrap over evaluation items (images).

Two sources of spread sit in a score like "CViT top-1 at 78% dropped": which images the val
split holds (≈ 3 points of standard error with 192 images, issue 12) and which seed trained
the model (5–7 points between seeds). The headline number is the mean over seeds; its interval
resamples images, with replacement, and recomputes that seed-mean on each resample (the same
resamples for every row, so two rows' intervals, and a paired difference, see the same
images). The seeds are few (2 by default), too few for an interval of their own: their values
are reported one by one beside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

LEVEL = 0.95


def resample_weights(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """[resamples, n]: each row the share of each of n items in one bootstrap resample
    (multinomial counts / n), so ``weights @ values`` is the resample's mean."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one item")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64) / n


def seed_mean_interval(per_seed: np.ndarray, weights: np.ndarray, level: float = LEVEL
                       ) -> dict[str, Any]:
    """per_seed [S, n, ...] item scores of S seeds -> mean over seeds and items, its
    percentile interval over the resamples in ``weights`` [B, n], and each seed's mean.

    Returns ``mean``, ``lo``, ``hi`` (shape ``...``; floats for 2-D input) and ``per_seed``
    ([S, ...]; a list of floats for 2-D input).
    """
    x = np.asarray(per_seed, np.float64)
    if x.ndim < 2 or x.shape[1] != weights.shape[1]:
        raise ValueError(f"per_seed must be [S, n, ...] with n = {weights.shape[1]}, got {x.shape}")
    tail = x.shape[2:]
    m = x.mean(axis=0).reshape(x.shape[1], -1)  # [n, K]: the seed-mean of every item
    boot = weights @ m  # [B, K]
    q = (1 - level) / 2 * 100
    lo, hi = np.percentile(boot, [q, 100 - q], axis=0)
    out = {"mean": m.mean(axis=0).reshape(tail), "lo": lo.reshape(tail), "hi": hi.reshape(tail),
           "per_seed": x.mean(axis=1)}
    if not tail:
        out = {k: (v.tolist() if k == "per_seed" else float(v)) for k, v in out.items()}
    return out


__all__ = ["LEVEL", "resample_weights", "seed_mean_interval"]
