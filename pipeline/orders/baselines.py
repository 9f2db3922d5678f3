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
* ``raster``: row by row, left to right (the AR generators' order).
* ``halton``: the 2-D Halton sequence (bases 2, 3) on the grid, each cell at its first visit
  (Halton-MaskGIT's fixed low-discrepancy order: early patches spread over the image).
* ``token_l1``: the L1 norm of a token (PSS, McDanel & Huynh: keep the patches whose
  embedding has the largest norm).
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


def order_scores(order: np.ndarray) -> np.ndarray:
    """Scores [N] under which ``order`` (positions, first revealed first) sorts first-to-last."""
    n = len(order)
    s = np.empty(n, np.float64)
    s[np.asarray(order)] = np.arange(n, 0, -1, dtype=np.float64)
    return s


def raster_scores(count: int, num_tokens: int) -> np.ndarray:
    return np.broadcast_to(-np.arange(num_tokens, dtype=np.float64), (count, num_tokens)).copy()


def _radical_inverse(i: int, base: int) -> float:
    f, r = 1.0, 0.0
    while i > 0:
        f /= base
        r += f * (i % base)
        i //= base
    return r


def halton_order(grid: int) -> np.ndarray:
    """The grid's cells in the order a 2-D Halton sequence (bases 2, 3) first visits them."""
    seen: list[int] = []
    taken = np.zeros(grid * grid, bool)
    i = 1
    while len(seen) < grid * grid:
        r = min(int(_radical_inverse(i, 2) * grid), grid - 1)
        c = min(int(_radical_inverse(i, 3) * grid), grid - 1)
        if not taken[r * grid + c]:
            taken[r * grid + c] = True
            seen.append(r * grid + c)
        i += 1
    return np.asarray(seen)


def halton_scores(count: int, grid: int) -> np.ndarray:
    return np.broadcast_to(order_scores(halton_order(grid)), (count, grid * grid)).copy()


def token_l1_scores(tokens: np.ndarray) -> np.ndarray:
    """tokens [M, N, D] -> ||e_i||_1 per token (PSS's patch-embedding norm)."""
    return np.abs(np.asarray(tokens, np.float64)).sum(-1)


__all__ = ["centre_scores", "halton_order", "halton_scores", "order_scores", "raster_scores",
           "token_l1_scores", "fixed_scores", "pixel_variance_scores", "random_scores",
           "token_saliency_scores"]
