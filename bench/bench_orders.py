"""Benchmarks for the collapse-order export (issue: "Speed").

  .venv/bin/python bench/bench_orders.py [--quick] [--out bench/results/orders.json]

(a) PageRank alone: batched torch (float64) on 1024 random 256×256 matrices vs networkx. networkx
    is timed on a subset and extrapolated per matrix (said in the output); graph building is
    reported apart from ``nx.pagerank`` itself, and the speed-up is given against both.
    Two matrix families: uniform random (converges in a few iterations) and CoMAE-like
    polarised sparse weights (slower to converge), so the figure is not flattered.
(b) Whole export, images/s, in the same run: the batched export (all targets of
    ``images_per_batch`` images per CoMAE pass, bf16 where supported, torch PageRank) vs a
    reference that runs one target at a time in fp32 and networkx PageRank. A randomly
    initialised CoMAE at the default config, grid 16, dim 16 (N = 256).
(c) Peak memory (VmHWM over VmRSS at the start of the export, in fresh subprocesses) at two dataset
    sizes: it should stay flat, since one shard is in memory at a time.

The machine is shared (2 cores, other jobs running): treat figures as indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import networkx as nx
import numpy as np
import torch
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import OrdersConfig  # noqa: E402
from pipeline.latents.store import LatentStore, create_store  # noqa: E402
from pipeline.models.comae import CoMAE, ComaeArch  # noqa: E402
from pipeline.orders.export import collapse_order, export_split, to_sequences  # noqa: E402
from pipeline.utils.device import resolve_precision  # noqa: E402
from pipeline.orders.pagerank import kendall_tau, pagerank_torch  # noqa: E402
from pipeline.orders.shards import CollapseOrders  # noqa: E402



def nx_graph(A: np.ndarray) -> nx.DiGraph:
    G = nx.DiGraph()
    G.add_nodes_from(range(A.shape[0]))
    G.add_weighted_edges_from((int(i), int(j), float(A[i, j])) for i, j in zip(*np.nonzero(A)))
    return G


def nx_scores(A: np.ndarray, tol: float) -> np.ndarray:
    r = nx.pagerank(nx_graph(A), alpha=0.85, tol=tol, max_iter=1000)
    return np.array([r[i] for i in range(A.shape[0])])


# ----------------------------------------------------------------------------- (a)


def bench_pagerank(B: int, N: int, subset: int, tol: float) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for family in ("uniform", "polarised"):
        A = rng.random((B, N, N))
        if family == "polarised":
            A = (A ** 8) * (rng.random((B, N, N)) < 0.2)
        A[:, np.arange(N), np.arange(N)] = 0
        At = torch.from_numpy(A)
        t = time.perf_counter()
        scores = pagerank_torch(At, tol=tol)
        t_torch = time.perf_counter() - t
        t_build = t_pr = 0.0
        err = 0.0
        for b in range(subset):
            t = time.perf_counter()
            G = nx_graph(A[b])
            t_build += time.perf_counter() - t
            t = time.perf_counter()
            r = nx.pagerank(G, alpha=0.85, tol=tol, max_iter=1000)
            t_pr += time.perf_counter() - t
            err = max(err, float(np.abs(np.array([r[i] for i in range(N)]) - scores[b].numpy()).max()))
        per_pr, per_all = t_pr / subset, (t_pr + t_build) / subset
        out[family] = {
            "matrices": B, "N": N, "tol": tol,
            "torch_batched_s": t_torch, "torch_per_matrix_ms": 1e3 * t_torch / B,
            "networkx_subset": subset,
            "networkx_pagerank_per_matrix_s": per_pr,
            "networkx_with_graph_build_per_matrix_s": per_all,
            "networkx_extrapolated_s": per_pr * B,
            "speedup_vs_nx_pagerank": per_pr * B / t_torch,
            "speedup_vs_nx_incl_build": per_all * B / t_torch,
            "max_abs_diff_vs_networkx": err,
        }
    return out


# ----------------------------------------------------------------------------- (b)


def make_store(path: Path, n: int, grid: int, dim: int, seed: int = 0) -> LatentStore:
    rng = np.random.default_rng(seed)
    keys = [f"c{i % 4}/img_{i:06d}" for i in range(n)]
    keys.sort()
    create_store(path, keys=keys, labels=[int(k[1]) for k in keys], grid=grid, dim=dim,
                 rows_per_chunk=32, rows_per_shard=256, compression_level=1, fingerprint=f"bench-{n}",
                 attrs={"tokenizer": {"kind": "bench"}, "crop_size": grid * 16, "scale_factor": 1.0,
                        "classes": ["c0", "c1", "c2", "c3"], "source": {"kind": "bench"}})
    root = zarr.open_group(str(path), mode="r+")
    for s in range(0, n, 256):
        e = min(n, s + 256)
        root["moments"][s:e] = rng.standard_normal((e - s, 2, 2 * dim, grid, grid)).astype(np.float32)
    root.attrs["complete"] = True
    return LatentStore(path)


def default_comae(grid: int, dim: int) -> CoMAE:
    torch.manual_seed(0)
    return CoMAE(ComaeArch(grid, dim)).eval()


@torch.no_grad()
def reference_image(model: CoMAE, tokens: torch.Tensor, tol: float) -> np.ndarray:
    """One image the slow way: N separate fp32 passes, one target each, then networkx."""
    N = tokens.shape[1]
    A = np.zeros((N, N))
    for t in range(N):
        A[t] = model.select(tokens, torch.tensor([[t]]))[0, 0].double().numpy()
    np.fill_diagonal(A, 0)
    return collapse_order(nx_scores(A, tol))


def bench_export(n_fast: int, n_ref: int, grid: int, dim: int, ipb: int) -> dict:
    model = default_comae(grid, dim)
    cfg = OrdersConfig(images_per_batch=ipb, samples_per_shard=max(ipb, n_fast), save_matrix=False,
                       flip="compute")
    amp = resolve_precision(cfg.precision, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "lat.zarr", max(n_fast, n_ref), grid, dim)
        # The whole export path (latents in, shards + manifest out), flips computed too:
        # 2 dependency matrices per image, so it counts 2 images per stored key.
        t = time.perf_counter()
        export_split(store, model, {"bench": True}, cfg, Path(tmp) / "orders", "bench")
        t_fast = time.perf_counter() - t
        fast = CollapseOrders(Path(tmp) / "orders")
        t = time.perf_counter()
        ref_orders = [reference_image(model, to_sequences(store.tokens([i])), cfg.tol) for i in range(n_ref)]
        t_ref = time.perf_counter() - t
        taus = [kendall_tau(fast.order(i), o) for i, o in enumerate(ref_orders)]
    fast_ips, ref_ips = 2 * n_fast / t_fast, n_ref / t_ref
    return {"grid": grid, "dim": dim, "N": grid * grid, "comae": "default ComaeArch, random init",
            "images_per_batch": ipb, "precision": str(amp),
            "export_images": 2 * n_fast, "export_s": t_fast, "export_images_per_s": fast_ips,
            "reference_images": n_ref, "reference_s": t_ref, "reference_images_per_s": ref_ips,
            "speedup": fast_ips / ref_ips, "kendall_tau_export_vs_reference": taus}


# ----------------------------------------------------------------------------- (c)

MEM_CHILD = r"""
import sys, tempfile, time, json
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from bench.bench_orders import make_store, default_comae
from pipeline.config import OrdersConfig
from pipeline.orders.export import export_split

def status(field):  # kB -> MiB, from this process's own mm (ru_maxrss survives exec)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

n, grid, dim = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with tempfile.TemporaryDirectory() as tmp:
    store = make_store(Path(tmp) / "lat.zarr", n, grid, dim)
    model = default_comae(grid, dim)
    cfg = OrdersConfig(images_per_batch=16, samples_per_shard=32, save_matrix=True)
    # Reset the peak-RSS mark to the current RSS, so VmHWM afterwards is the export's peak.
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    t = time.perf_counter()
    export_split(store, model, {"bench": True}, cfg, Path(tmp) / "o", "bench", class_orders=True)
    dt = time.perf_counter() - t
    peak = status("VmHWM")
print(json.dumps({"images": n, "rss_before_mib": before, "peak_rss_mib": peak,
                  "growth_mib": peak - before, "seconds": dt}))
"""


def bench_memory(sizes: list[int], grid: int, dim: int) -> list[dict]:
    rows = []
    env = {**os.environ, "COP_NO_PROGRESS": "1"}
    for n in sizes:
        res = subprocess.run([sys.executable, "-c", MEM_CHILD, str(ROOT), str(n), str(grid), str(dim)],
                             capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--only", choices=["pagerank", "export", "memory"], action="append",
                    help="run only these parts (repeatable); results merge into --out")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "orders.json")
    args = ap.parse_args()
    os.environ.setdefault("COP_NO_PROGRESS", "1")
    q = args.quick
    parts = args.only or ["pagerank", "export", "memory"]
    report = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    report.update({"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                   "note": "shared 2-core CPU; networkx timed on a subset and extrapolated per matrix"})
    if "pagerank" in parts:
        report["pagerank"] = bench_pagerank(B=64 if q else 1024, N=256, subset=4 if q else 16, tol=1e-10)
        print(json.dumps(report["pagerank"], indent=1), flush=True)
    if "export" in parts:
        report["export"] = bench_export(n_fast=2 if q else 8, n_ref=1, grid=16, dim=16, ipb=2 if q else 4)
        print(json.dumps(report["export"], indent=1), flush=True)
    if "memory" in parts:
        report["memory"] = bench_memory([32, 64] if q else [32, 128], grid=8, dim=16)
        print(json.dumps(report["memory"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
