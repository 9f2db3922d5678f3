"""Trivial orders to hold the collapse order against (issue: "a result is a figure beside its
baseline"). Each returns patch scores ``float64 [M, N]`` (higher = earlier in the order), so
every order is scored by exactly the same code (:func:`pipeline.metrics.objectness.compare`).

* ``random``: i.i.d. uniform scores from a fixed seed: what knowing nothing scores.
* ``fixed``: one order for every image, the train split's mean collapse scores per position:
  what a position prior *learned from the same data* scores.
* ``centre``: minus the distance of a patch to the image centre (a hand-made position prior).
* ``pixel_variance``: per-patch pixel variance summed over RGB (cheap contrast saliency).
* ``token_saliency``: distance of a token to the image's mean token (cheap saliency in the
  space CoMAE sees).
"""

from __future__ import annotations

import numpy as np


def random_scores(count: int, num_tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(count, num_tokens))


def centre_scores(count: int, grid: int) -> np.ndarray:
    r, c = np.divmod(np.arange(grid * grid), grid)
    d = np.hypot(r - (grid - 1) / 2, c - (grid - 1) / 2)
    return np.broadcast_to(-d, (count, grid * grid)).copy()


def fixed_scores(count: int, mean_scores: np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.asarray(mean_scores, np.float64), (count, mean_scores.size)).copy()


def pixel_variance_scores(images: np.ndarray, grid: int) -> np.ndarray:
    """images uint8 [M, H, W, 3] with H, W multiples of ``grid`` -> [M, grid*grid]."""
    M, H, W, C = images.shape
    if H % grid or W % grid:
        raise ValueError(f"images of {H}x{W} px do not split into a {grid}x{grid} patch grid")
    p = images.astype(np.float64).reshape(M, grid, H // grid, grid, W // grid, C)
    return p.var(axis=(2, 4)).sum(-1).reshape(M, grid * grid)


def token_saliency_scores(tokens: np.ndarray) -> np.ndarray:
    """tokens [M, N, D] -> ||e_i - mean_j e_j|| per token."""
    t = np.asarray(tokens, np.float64)
    return np.linalg.norm(t - t.mean(axis=1, keepdims=True), axis=-1)


__all__ = ["centre_scores", "fixed_scores", "pixel_variance_scores", "random_scores",
           "token_saliency_scores"]
