"""The step-indexed data stream and randomness of the trainer.

Everything random in training is a function of ``(seed, step)``: :class:`StepBatchSampler`
gives the dataset rows of each step's global batch, :class:`StepContext` draws a task's noise
row by row from generators keyed by (seed, step, draw, global row), and the trainer reseeds the global
RNG from :func:`step_seed` before every step. So a resumed run replays the same steps and W
processes see the numbers of one.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


_M64 = (1 << 64) - 1


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers, by splitmix64 rounds: nearby tuples give unrelated seeds."""
    z = 0
    for p in parts:
        z = (z + (p & _M64) + 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        z ^= z >> 31
    return z >> 1


class StepContext:
    """What a task needs to know about the current step, and its source of randomness.

    ``rand``/``randn``/``randint``/``randperm`` return ``[rows, *shape]`` for this rank's rows
    of the global batch. Row ``r`` of draw ``k`` comes from its own generator, seeded by
    ``(seed, step, k, r)`` and created on the step's device: results do not depend on the
    number of processes, and no process draws (or moves) numbers for rows it does not hold,
    so the cost per step follows the local batch, not the global one.
    """

    def __init__(self, step: int, rows: Tensor, global_batch: int, device: torch.device,
                 seed: int, dtype: torch.dtype) -> None:
        self.step = step
        self.rows = rows
        self.global_batch = global_batch
        self.device = device
        self.dtype = dtype  # autocast dtype (float32 when off)
        self._key = _mix(seed, step)
        self._draws = 0
        self._gen = torch.Generator(device=device)

    def _per_row(self, draw) -> Tensor:
        """Stack ``draw(generator)`` over this rank's rows, each with its own seeded generator."""
        key, self._draws = _mix(self._key, self._draws), self._draws + 1
        out = [draw(self._gen.manual_seed(_mix(key, int(r)))) for r in self.rows.tolist()]
        if not out:
            raise ValueError("a step with no rows on this rank")
        return torch.stack(out)

    def uniform(self) -> float:
        """One number in [0, 1) for the whole step, the same on every rank (e.g. a mask ratio)."""
        key, self._draws = _mix(self._key, self._draws), self._draws + 1
        return float(torch.rand((), generator=torch.Generator().manual_seed(key)))

    def rand(self, *shape: int) -> Tensor:
        return self._per_row(lambda g: torch.rand(shape, generator=g, device=self.device))

    def randn(self, *shape: int) -> Tensor:
        return self._per_row(lambda g: torch.randn(shape, generator=g, device=self.device))

    def randint(self, high: int, *shape: int) -> Tensor:
        return self._per_row(lambda g: torch.randint(high, shape, generator=g, device=self.device))

    def randperm(self, n: int) -> Tensor:
        """An independent random permutation of ``range(n)`` per row: [rows, n]."""
        return self._per_row(lambda g: torch.randperm(n, generator=g, device=self.device))


class StepBatchSampler(Sampler[list[int]]):
    """Dataset indices of this rank's share of the global batch at each step.

    The stream is an endless sequence of seeded permutations (one per epoch); the global batch
    at step s is positions [s·B, (s+1)·B) of it, and rank r holds the contiguous slots
    [r·B/W, (r+1)·B/W). Depends only on (seed, step), never on how the run was interrupted.
    """

    def __init__(self, n: int, global_batch: int, seed: int, start_step: int, end_step: int,
                 rank: int = 0, world: int = 1) -> None:
        if global_batch % world:
            raise ValueError(f"batch_size {global_batch} must be divisible by the {world} processes")
        if n == 0:
            raise ValueError("the training dataset is empty")
        self.n, self.B, self.seed = n, global_batch, seed
        self.start, self.end = start_step, end_step
        self.per_rank = global_batch // world
        self.lo = rank * self.per_rank
        self._perm_cache: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: torch.randperm(
                self.n, generator=torch.Generator().manual_seed(step_seed(self.seed, -1 - epoch)))}
        return self._perm_cache[epoch]

    def global_indices(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.B, (step + 1) * self.B):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            yield self.global_indices(step)[self.lo:self.lo + self.per_rank]

    def __len__(self) -> int:
        return self.end - self.start
