"""PageRank on CoMAE dependency graphs, and the collapse order it induces (SPEC, Sec. 3.2/6).

Conventions (identical to ``networkx.pagerank`` on a DiGraph with edge i→j of weight A_ij):

- a walker at i steps to j with probability ``A_ij / Σ_k A_ik`` (P is column-stochastic when
  written as ``r = P r``);
- a row of A that sums to 0 is *dangling*: its walker jumps by the dangling distribution,
  which defaults to the teleport vector (uniform unless personalised), as networkx does;
- ``r ← c (Pᵀ-step of r + dangling mass · d) + (1 − c) β``, starting from uniform, stopping
  per graph when the L1 change drops below ``N · tol`` (networkx's criterion), at most
  ``max_iter`` iterations (then an error, as networkx raises).

Two implementations: ``pagerank_torch`` runs a batch of dense graphs at once in float64
(float64 so the result agrees with networkx to 1e-9 and orders do not flip on rounding);
``pagerank_scipy`` runs one graph, dense or ``scipy.sparse``, mirroring networkx step by step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scipy.stats import kendalltau


class PageRankNotConverged(RuntimeError):
    """Power iteration hit ``max_iter`` before the tolerance (networkx raises here too)."""


# One message for both backends: NaN/inf in A, or a row whose float64 sum overflows, would
# otherwise end in "did not converge" (NaN) or in scores that do not sum to 1 (inf).
BAD_INPUT = "A must be finite and non-negative (NaN, inf, a negative entry or a row whose sum overflows)"


def _check_row_sums(row_sums: Any, min_entry: Any) -> None:
    """Reject bad A from its float64 row sums (NaN/inf in a row make its sum non-finite) and
    its smallest entry: cheaper than a full ``isfinite`` pass over A."""
    if not bool(np.isfinite(np.asarray(row_sums)).all()) or bool(min_entry < 0):
        raise ValueError(BAD_INPUT)


# ----------------------------------------------------------------------------- helpers


def _normalise(v: torch.Tensor, what: str) -> torch.Tensor:
    if (v < 0).any():
        raise ValueError(f"{what} must be non-negative")
    s = v.sum(-1, keepdim=True)
    if (s == 0).any():
        raise ValueError(f"{what} must have a positive entry")
    return v / s


def sparsify_topk(A: torch.Tensor | np.ndarray, k: int | None) -> torch.Tensor | np.ndarray:
    """Keep the k largest entries of every row of A (the patches each target relies on most).

    Ties go to the lower column index (stable sort) so the result is deterministic.
    ``k=None`` or ``k >= N`` returns A unchanged.
    """
    if k is None or k >= A.shape[-1]:
        return A
    if k < 1:
        raise ValueError(f"topk must be >= 1, got {k}")
    if isinstance(A, np.ndarray):
        keep = np.argsort(-A, axis=-1, kind="stable")[..., :k]
        out = np.zeros_like(A)
        np.put_along_axis(out, keep, np.take_along_axis(A, keep, -1), -1)
        return out
    keep = torch.argsort(-A, dim=-1, stable=True)[..., :k]
    return torch.zeros_like(A).scatter_(-1, keep, A.gather(-1, keep))


# ----------------------------------------------------------------------------- torch


@torch.no_grad()
def pagerank_torch(
    A: torch.Tensor,
    damping: float = 0.85,
    teleport: torch.Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int = 1000,
    topk: int | None = None,
    dangling: torch.Tensor | None = None,
) -> torch.Tensor:
    """PageRank of a batch of dense graphs: ``A[B, N, N]`` (or ``[N, N]``) → ``float64[B, N]``.

    ``teleport``/``dangling``: ``[N]`` or ``[B, N]`` non-negative weights (normalised here);
    ``dangling`` defaults to ``teleport``. Each graph stops on its own criterion, so a score
    does not depend on which other graphs share its batch.
    """
    if not 0.0 < damping < 1.0:
        raise ValueError(f"damping must lie in (0, 1), got {damping}")
    single = A.dim() == 2
    if single:
        A = A[None]
    if A.dim() != 3 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be [B, N, N], got {tuple(A.shape)}")
    # A private float64 copy: normalised in place below, the caller's tensor is untouched.
    A = A.detach().to(torch.float64, copy=True)
    out_w = A.sum(-1, keepdim=True)  # [B, N, 1]
    # Checked before sparsifying, which could drop a NaN and hide it.
    _check_row_sums(out_w.cpu().numpy(), A.amin().item() if A.numel() else 0.0)
    if topk is not None:
        A = sparsify_topk(A, topk)
        out_w = A.sum(-1, keepdim=True)
    B, N, _ = A.shape
    dev = A.device

    p = (torch.full((B, N), 1.0 / N, dtype=torch.float64, device=dev) if teleport is None
         else _normalise(teleport.to(dev, torch.float64).expand(B, N), "teleport"))
    d = p if dangling is None else _normalise(dangling.to(dev, torch.float64).expand(B, N), "dangling")

    is_dangling = (out_w == 0).transpose(1, 2).to(torch.float64)  # [B, 1, N]
    P = A.div_(out_w.masked_fill_(out_w == 0, 1.0))  # row-stochastic; dangling rows stay 0
    del A
    # Row-vector form x ← x P: no transposed copy of the batch (at 1024×256×256 float64 the
    # copy costs more than the few iterations random graphs need).
    tele = (1.0 - damping) * p[:, None, :]  # [B, 1, N]
    d = d[:, None, :]
    scores = torch.empty(B, N, dtype=torch.float64, device=dev)
    # Working set: graphs still iterating. Converged graphs are frozen (their final vector is
    # already in ``scores``) and dropped from the set once they are a quarter of it, so the
    # copy of their matrices is paid rarely, not every iteration.
    ids = torch.arange(B, device=dev)
    x = torch.full((B, 1, N), 1.0 / N, dtype=torch.float64, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_iter):
        dangling_mass = (x * is_dangling).sum(-1, keepdim=True)  # [B, 1, 1]
        xn = damping * (torch.bmm(x, P) + dangling_mass * d) + tele
        err = (xn - x).abs().sum(dim=(1, 2))
        newly = ~done & (err < N * tol)
        scores[ids[newly]] = xn[newly, 0]
        done |= newly
        if done.all():
            return scores[0] if single else scores
        x = torch.where(done[:, None, None], x, xn)
        if int(done.sum()) * 4 >= done.numel():
            keep = ~done
            P, x, tele, d, is_dangling = P[keep], x[keep], tele[keep], d[keep], is_dangling[keep]
            ids, done = ids[keep], done[keep]
    raise PageRankNotConverged(
        f"PageRank did not converge in {max_iter} iterations for {int((~done).sum())} of {B} "
        f"graphs (tol={tol}); raise orders.max_iter or tol"
    )


# ----------------------------------------------------------------------------- scipy


def pagerank_scipy(
    A: Any,
    damping: float = 0.85,
    teleport: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 1000,
    topk: int | None = None,
    dangling: np.ndarray | None = None,
) -> np.ndarray:
    """PageRank of one graph given as a dense ``[N, N]`` array or a ``scipy.sparse`` matrix."""
    if not 0.0 < damping < 1.0:
        raise ValueError(f"damping must lie in (0, 1), got {damping}")
    M = sp.csr_array(A, dtype=np.float64)
    N = M.shape[0]
    if M.shape != (N, N):
        raise ValueError(f"A must be square, got {M.shape}")
    # Checked before sparsifying, which could drop a NaN and hide it.
    with np.errstate(over="ignore", invalid="ignore"):  # reported just below, as ValueError
        row_sums = M.sum(axis=1)
    _check_row_sums(row_sums, M.data.min() if M.nnz else 0.0)
    if topk is not None:
        M = sp.csr_array(sparsify_topk(M.toarray(), topk))
    S = np.asarray(M.sum(axis=1)).ravel()
    inv = np.zeros_like(S)
    inv[S != 0] = 1.0 / S[S != 0]
    M = sp.csr_array(sp.dia_array((inv[None, :], [0]), shape=(N, N)) @ M)

    def norm(v: np.ndarray | None, what: str) -> np.ndarray | None:
        if v is None:
            return None
        v = np.asarray(v, dtype=np.float64)
        if (v < 0).any() or v.sum() == 0:
            raise ValueError(f"{what} must be non-negative with a positive entry")
        return v / v.sum()

    p = norm(teleport, "teleport")
    p = np.full(N, 1.0 / N) if p is None else p
    dw = norm(dangling, "dangling")
    dw = p if dw is None else dw
    is_dangling = np.flatnonzero(S == 0)

    x = np.full(N, 1.0 / N)
    for _ in range(max_iter):
        last = x
        x = damping * (x @ M + x[is_dangling].sum() * dw) + (1.0 - damping) * p
        if np.abs(x - last).sum() < N * tol:
            return x
    raise PageRankNotConverged(f"PageRank did not converge in {max_iter} iterations (tol={tol})")


# ----------------------------------------------------------------------------- orders


def collapse_order(scores: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Patch indices by descending score; ties go to the lower index (stable sort of −score)."""
    if isinstance(scores, np.ndarray):
        return np.argsort(-scores, axis=-1, kind="stable")
    return torch.argsort(-scores, dim=-1, stable=True)


def ranks_of(order: np.ndarray) -> np.ndarray:
    """Inverse permutation along the last axis: ``ranks[order[r]] = r``."""
    order = np.asarray(order).astype(np.int64)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(order.shape[-1]), order.shape), -1)
    return ranks


def kendall_tau(order_a: np.ndarray, order_b: np.ndarray) -> float:
    """Kendall τ between two orders of the same N patches (1 = identical, −1 = reversed)."""
    tau = kendalltau(ranks_of(order_a), ranks_of(order_b)).statistic
    return float(tau)


def flip_permutation(grid: int) -> np.ndarray:
    """Token index of each token's mirror under a horizontal flip: (r, c) → (r, grid−1−c)."""
    n = np.arange(grid * grid)
    return (n // grid) * grid + (grid - 1 - n % grid)
