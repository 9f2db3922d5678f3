"""Is it CoMAE's estimator or the PageRank idea? Orders from a dependency graph the builder
critic estimates (``orders.estimator: critic``, :mod:`pipeline.orders.estimators`), ranked by
PageRank exactly as CoMAE's, scored by the scorer critic, and read out other ways.

``A[i, j]`` = how much revealing patch j lowers the builder's NLL of hidden patch i, averaged
over random reveal sets (shares ``--shares`` of the tokens). Then PageRank (damping 0.85) as
the export does, in-degree (column sums: how much j helps the
others) and out-degree. Scored like ``score_orders`` (area under the scorer's collapse curve;
paired 95% bootstrap interval vs random over images), beside random, PSS (token L1) and
CoMAE's exported order. Reads a finished run's ``data/`` (critics, val latents and orders).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/critic_pagerank.py            # ~1 min at 64 px
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.latents.store import LatentStore
from pipeline.metrics.collapse import collapse_curves, curve_area, reveal_grid
from pipeline.orders import baselines
from pipeline.orders.pagerank import collapse_order, pagerank_torch
from pipeline.orders.report import report_keys
from pipeline.orders.shards import CollapseOrders
from pipeline.tasks.critic import load_critic
from pipeline.tasks.order_scores import nll_fn


def spread(first: np.ndarray, grid: int) -> float:
    """Mean over images and revealed patches of the distance to the nearest other revealed one."""
    yx = np.stack([first // grid, first % grid], -1).astype(np.float64)  # [M, k, 2]
    d = np.linalg.norm(yx[:, :, None] - yx[:, None], axis=-1)
    d[:, np.arange(first.shape[1]), np.arange(first.shape[1])] = np.inf
    return float(d.min(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    orders = CollapseOrders(f"{args.data}/orders/val")
    store = LatentStore(f"{args.data}/latents/val.zarr")
    keys = report_keys(orders.keys, args.images)
    row_of = {k: i for i, k in enumerate(store.keys)}
    tokens = store.tokens(np.asarray([row_of[k] for k in keys])).flatten(2).transpose(1, 2).contiguous()
    M, N, _ = tokens.shape
    scorer, _ = load_critic(f"{args.data}/critic/scorer", "cpu")
    builder, _ = load_critic(f"{args.data}/critic/builder", "cpu")

    t = time.perf_counter()
    A = torch.cat([CriticGraph(builder, args.shares, args.seed).dependency_matrices(t, chunk=4096)
                   for t in tokens.split(16)]).double()
    secs = (time.perf_counter() - t) / M
    pr = pagerank_torch(A + 1e-9, damping=0.85).numpy()  # + eps: no all-zero (dangling) rows
    cands = {
        "random": collapse_order(baselines.random_scores(M, N, args.seed)),
        "token_l1 (PSS)": collapse_order(baselines.token_l1_scores(tokens.double().numpy())),
        "collapse (CoMAE, exported)": collapse_order(np.stack([orders.scores(k) for k in keys])),
        "critic PageRank": collapse_order(pr),
        "critic PageRank, ascending": collapse_order(pr)[:, ::-1].copy(),
        "critic in-degree": collapse_order(A.sum(1).numpy()),
        "critic out-degree": collapse_order(A.sum(2).numpy()),
    }
    ks = reveal_grid(N, 16)
    scorer_nll = nll_fn(scorer)
    areas = {name: curve_area(collapse_curves(scorer_nll, tokens, torch.from_numpy(np.ascontiguousarray(o)), ks),
                              ks) for name, o in cands.items()}
    rng = np.random.default_rng(args.seed)
    idx = rng.integers(0, M, (1000, M))
    k = max(2, round(0.22 * N))
    print(f"{M} val images, N = {N}; area under the scorer's collapse curve (lower: collapses faster); "
          f"spread: mean distance (in patches) from each of the first {k} revealed to its nearest other")
    for name, a in areas.items():
        d = a - areas["random"]
        lo, hi = np.percentile(d[idx].mean(1), [2.5, 97.5])
        print(f"  {name:28s} {a.mean():.4f}  vs random {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]  "
              f"spread {spread(cands[name][:, :k], int(round(N ** 0.5))):.2f}")
    print(f"critic dependencies: {secs * 1000:.0f} ms per image ({len(args.shares) * (N + 1)} builder passes)")


if __name__ == "__main__":
    main()
