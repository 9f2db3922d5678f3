"""The collapse criterion: how fast revealing patches in an order lowers the uncertainty of the rest.

``nll(tokens [B, N, D], revealed bool [B, N]) -> [B, N]`` is a critic's negative
log-likelihood of every token given the revealed ones (nats per channel,
:class:`pipeline.models.critic.Critic`). An order's *collapse curve* for one image is, at each
reveal count k, the mean NLL of the N - k tokens the order has not revealed yet. At a given k
every order hides the same number of tokens, so that mean and the sum rank orders alike; the
mean is plotted because it stays in one unit along the curve. Its *area* is the trapezoid mean
over the reveal grid (the mean NLL over the reveal range, in nats per channel).

Two orders are built from a critic, never the one that scores them:

* ``confidence_orders`` (OAR-style): reveal next the hidden token the critic is most sure of
  (smallest predicted scale, no look at its value): N passes per image.
* ``greedy_orders`` (KPP-style): reveal next the token whose revealing most lowers the NLL of
  the tokens still hidden, with their values known: an upper reference, N²/2 passes per image.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

NllFn = Callable[[Tensor, Tensor], Tensor]


def reveal_grid(num_tokens: int, points: int, extra: tuple[float, ...] = (0.22, 0.5)) -> list[int]:
    """Reveal counts k: ``points`` evenly from 0 to N - N/points, plus the counts of the
    ``extra`` shares revealed (0.22: CViT's operating point; 0.5)."""
    ks = set(np.linspace(0, num_tokens - num_tokens / points, points).round().astype(int).tolist())
    ks |= {int(round(s * num_tokens)) for s in extra}
    return sorted(k for k in ks if 0 <= k < num_tokens)


def positions_first(orders: Tensor, k: int) -> Tensor:
    """bool [B, N]: the first k positions of each order (int [B, N]) revealed."""
    revealed = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    revealed.scatter_(1, orders[:, :k], True)
    return revealed


@torch.no_grad()
def collapse_curves(nll: NllFn, tokens: Tensor, orders: Tensor, ks: list[int],
                    batch_size: int = 256) -> np.ndarray:
    """float64 [M, len(ks)]: per image and reveal count, the mean NLL of the hidden tokens.

    tokens [M, N, D]; orders int [M, N] (position revealed first, second, ...). ``nll`` may
    return C measures per token, [B, N, C]: then the result is [M, len(ks), C]."""
    M, N = orders.shape
    if tokens.shape[:2] != (M, N):
        raise ValueError(f"orders {tuple(orders.shape)} do not match tokens {tuple(tokens.shape)}")
    out: np.ndarray | None = None
    for s in range(0, M, batch_size):
        x, o = tokens[s:s + batch_size], orders[s:s + batch_size].to(tokens.device)
        for j, k in enumerate(ks):
            revealed = positions_first(o, k)
            per = nll(x, revealed)
            hidden = (~revealed).to(per.dtype)
            if per.dim() == 3:
                hidden = hidden[..., None]
            if out is None:
                out = np.empty((M, len(ks), *per.shape[2:]), np.float64)
            out[s:s + len(x), j] = ((per * hidden).sum(1) / hidden.sum(1)).double().cpu().numpy()
    assert out is not None
    return out


def hidden_mean(values: np.ndarray, orders: np.ndarray, ks: list[int]) -> np.ndarray:
    """float64 [M, len(ks)]: the mean of per-token ``values`` [M, N] over the tokens each
    order [M, N] still hides after k reveals (no critic pass: a cumulative sum along the order).

    With ``values`` each token's NLL with nothing revealed, ``curves - hidden_mean(...)`` is the
    *adjusted* curve: what the revealed patches told about the rest, blind to which tokens
    are left. The raw curve also drops when an order reveals the hardest tokens first,
    because they leave the mean."""
    v = np.take_along_axis(np.asarray(values, np.float64), np.asarray(orders), axis=1)
    tail = v[:, ::-1].cumsum(axis=1)[:, ::-1]  # tail[:, k] = sum of the values from place k on
    N = v.shape[1]
    return np.stack([tail[:, k] / (N - k) for k in ks], axis=1)


def curve_area(curves: np.ndarray, ks: list[int]) -> np.ndarray:
    """[M]: trapezoid mean of each curve over the reveal grid (mean NLL over the range)."""
    x = np.asarray(ks, np.float64)
    return np.trapezoid(curves, x, axis=1) / (x[-1] - x[0])


@torch.no_grad()
def confidence_orders(scale_fn: Callable[[Tensor, Tensor], Tensor], tokens: Tensor) -> Tensor:
    """OAR-style: ``scale_fn(tokens, revealed) -> [B, N]`` the critic's predicted uncertainty
    (mean log-scale); reveal next the hidden token it is surest of. int64 [M, N]."""
    M, N, _ = tokens.shape
    revealed = torch.zeros(M, N, dtype=torch.bool, device=tokens.device)
    order = torch.empty(M, N, dtype=torch.long, device=tokens.device)
    rows = torch.arange(M, device=tokens.device)
    for t in range(N):
        u = scale_fn(tokens, revealed).float().masked_fill(revealed, float("inf"))
        pick = u.argmin(1)
        order[:, t] = pick
        revealed[rows, pick] = True
    return order.cpu()


@torch.no_grad()
def greedy_orders(nll: NllFn, tokens: Tensor, batch_size: int = 256) -> Tensor:
    """KPP-style greedy: at each step reveal the token that leaves the lowest mean NLL over the
    tokens still hidden after it. One image at a time, all candidates of a step batched.
    int64 [M, N]."""
    M, N, _ = tokens.shape
    order = torch.empty(M, N, dtype=torch.long)
    for m in range(M):
        revealed = torch.zeros(N, dtype=torch.bool, device=tokens.device)
        for t in range(N):
            cand = (~revealed).nonzero().flatten()
            if len(cand) == 1:
                order[m, t] = cand[0]
                break
            best, best_val = -1, float("inf")
            for s in range(0, len(cand), batch_size):
                c = cand[s:s + batch_size]
                r = revealed.expand(len(c), N).clone()
                r[torch.arange(len(c), device=r.device), c] = True
                per = nll(tokens[m:m + 1].expand(len(c), -1, -1), r)
                hidden = (~r).to(per.dtype)
                val = (per * hidden).sum(1) / hidden.sum(1)
                i = int(val.argmin())
                if float(val[i]) < best_val:
                    best, best_val = int(c[i]), float(val[i])
            order[m, t] = best
            revealed[best] = True
    return order


def paired_summary(areas: dict[str, np.ndarray], weights: np.ndarray,
                   against: dict[str, str], level: float = 0.95) -> dict[str, dict]:
    """Per order: mean, percentile interval over the bootstrap ``weights`` [B, M], and for each
    ``against`` label -> reference order, the paired difference (order - reference) with its
    interval (negative: the order collapses the image faster)."""
    q = (1 - level) / 2 * 100
    out = {}
    for name, a in areas.items():
        boot = weights @ a
        lo, hi = np.percentile(boot, [q, 100 - q])
        row = {"mean": float(a.mean()), "lo": float(lo), "hi": float(hi)}
        for label, ref in against.items():
            if ref == name or ref not in areas:
                continue
            d = a - areas[ref]
            dlo, dhi = np.percentile(weights @ d, [q, 100 - q])
            row[f"vs_{label}"] = {"ref": ref, "mean": float(d.mean()), "lo": float(dlo),
                                  "hi": float(dhi)}
        out[name] = row
    return out


__all__ = ["collapse_curves", "confidence_orders", "curve_area", "greedy_orders", "hidden_mean",
           "paired_summary", "positions_first", "reveal_grid"]
