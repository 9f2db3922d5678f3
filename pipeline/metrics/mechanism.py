"""A probe with known dependencies: token grids in which each patch's source is known.

Each grid is a real token grid with one *copy mechanism* applied in token space, chosen by the
image index (so a quarter of the images each):

* ``h_shift``: the right half repeats the left half, source of (r, c) is (r, c ± g/2);
* ``v_shift``: the bottom half repeats the top half, source (r ± g/2, c);
* ``h_mirror``: the right half mirrors the left half, source (r, g − 1 − c);
* ``v_mirror``: the bottom half mirrors the top half, source (g − 1 − r, c).

Every target's source holds exactly the target's token, so a selection that knows the image
puts its largest weight there. The mechanism differs between images and can only be read
from the other patches (f never sees the target), so a position prior scores at most 1/2
(it can back the two sources of one axis, not tell which applies). The score is precision@1:
the share of (image, target) rows whose largest non-target weight is the true source (chance
1/(N − 1)).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from pipeline.utils.device import module_device

MODES = ("h_shift", "v_shift", "h_mirror", "v_mirror")


def sources(grid: int, mode: str) -> np.ndarray:
    """int64[N]: the position whose token equals position n's under ``mode`` (an involution)."""
    if grid % 2:
        raise ValueError(f"the copy mechanism needs an even grid, got {grid}")
    r, c = np.divmod(np.arange(grid * grid), grid)
    h = grid // 2
    src = {"h_shift": (r, (c + h) % grid), "v_shift": ((r + h) % grid, c),
           "h_mirror": (r, grid - 1 - c), "v_mirror": (grid - 1 - r, c)}
    if mode not in src:
        raise ValueError(f"unknown copy mechanism {mode!r}; expected one of {MODES}")
    rr, cc = src[mode]
    return (rr * grid + cc).astype(np.int64)


def apply(grid_tokens: torch.Tensor, mode: str) -> torch.Tensor:
    """Copy the first half onto the second under ``mode``: tokens [..., D, g, g] -> same shape."""
    x = grid_tokens.clone()
    h = x.shape[-1] // 2
    if mode == "h_shift":
        x[..., :, h:] = x[..., :, :h]
    elif mode == "v_shift":
        x[..., h:, :] = x[..., :h, :]
    elif mode == "h_mirror":
        x[..., :, h:] = x[..., :, :h].flip(-1)
    elif mode == "v_mirror":
        x[..., h:, :] = x[..., :h, :].flip(-2)
    else:
        raise ValueError(f"unknown copy mechanism {mode!r}; expected one of {MODES}")
    return x


def mode_of(index: int) -> str:
    return MODES[index % len(MODES)]


class MechanismDataset(torch.utils.data.Dataset):
    """Wraps a token-grid dataset (``{"tokens", "tokens_flip", "index", ...}`` items): item i
    gets mechanism ``mode_of(i)`` on both its grid and its flipped grid."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._wrap(self.base[i])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._wrap(it) for it in self.base.__getitems__(indices)]

    @staticmethod
    def _wrap(item: dict[str, Any]) -> dict[str, Any]:
        mode = mode_of(int(item["index"]))
        return {**item, "tokens": apply(item["tokens"], mode),
                "tokens_flip": apply(item["tokens_flip"], mode)}


@torch.no_grad()
def precision_at_1(model: Any, grids: torch.Tensor, batch: int = 16) -> dict[str, float]:
    """Precision@1 of ``model.dependency_matrices`` rows against the true sources, for real
    token grids [M, D, g, g] turned into mechanism grids (image i gets ``mode_of(i)``)."""
    M, _, g, _ = grids.shape
    dev = module_device(model)
    hits = {m: [] for m in MODES}
    for s in range(0, M, batch):
        idx = range(s, min(M, s + batch))
        mech = torch.stack([apply(grids[i], mode_of(i)) for i in idx])
        A = model.dependency_matrices(mech.flatten(2).transpose(1, 2).contiguous().to(dev))
        A = A.float().cpu()  # [b, N, N]
        A.diagonal(dim1=1, dim2=2).fill_(-1.0)  # never the target itself
        best = A.argmax(-1).numpy()  # [b, N]
        for row, i in enumerate(idx):
            hits[mode_of(i)].append(best[row] == sources(g, mode_of(i)))
    per = {m: float(np.concatenate(v).mean()) for m, v in hits.items() if v}
    return {"precision_at_1": float(np.mean([np.concatenate(v).mean() for v in hits.values() if v])),
            **{f"p1_{m}": v for m, v in per.items()}, "chance": 1.0 / (g * g - 1)}


__all__ = ["MODES", "MechanismDataset", "apply", "mode_of", "precision_at_1", "sources"]
