"""Read throughput of the latent store: random batches of token grids, grids/s.

Writes a synthetic store (random moments, no tokenizer) of ``--n`` images of
``--grid``x``--grid`` tokens of ``--dim`` channels, then times random batches of ``--batch``:

- memory:        ``LatentStore.tokens(idx)`` after ``load()`` (the training path);
- memory+loader: ``DataLoader(TokenGridDataset, batch_size, shuffle)`` with ``--workers``;
- zarr:          ``LatentStore(in_memory=False).tokens(idx)`` through the chunk cache
                 (``--cache-mb``; 0 keeps one chunk, i.e. every batch decompresses afresh);
- zarr+loader:   the streamed training path (a split over the memory budget, ImageNet):
                 ``DataLoader(TokenGridDataset(in_memory=False))`` with ``--workers``.
Compare ``--rows-per-chunk 64`` with ``1``: a random row costs its whole chunk's decompression.

Target: >= 20,000 grids/s on the training path, so training never waits on data.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_store_read.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.latents.store import (DONE, MOMENTS, LatentStore, TokenGridDataset, create_store,
                                    num_units)

TARGET = 20_000


def make_store(path: Path, n: int, grid: int, dim: int, rows_per_chunk: int,
               rows_per_shard: int) -> None:
    root = create_store(
        path, keys=[f"k{i:07d}" for i in range(n)], labels=np.arange(n) % 1000, grid=grid,
        dim=dim, rows_per_chunk=rows_per_chunk, rows_per_shard=rows_per_shard,
        compression_level=3, fingerprint="bench",
        attrs={"tokenizer": {"kind": "synthetic"}, "source": {"kind": "synthetic"},
               "crop_size": grid * 16, "scale_factor": 0.2325,
               "classes": [str(c) for c in range(1000)]})
    rng = np.random.default_rng(0)
    arr = root[MOMENTS]
    for u in range(num_units(n, rows_per_shard)):
        s, e = u * rows_per_shard, min(n, (u + 1) * rows_per_shard)
        arr[s:e] = rng.standard_normal((e - s, *arr.shape[1:]), dtype=np.float32)
        root[DONE][u] = 1
    root.attrs["complete"] = True


def rate(fn, batches: int, batch: int) -> float:
    fn()  # warm-up (first load / first chunk reads are not what training sees)
    t = time.perf_counter()
    for _ in range(batches):
        fn()
    return batches * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--rows-per-chunk", type=int, default=64)
    ap.add_argument("--rows-per-shard", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-mb", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(1)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.zarr"
        t = time.perf_counter()
        make_store(path, args.n, args.grid, args.dim, args.rows_per_chunk, args.rows_per_shard)
        print(f"store: {args.n} x [2, {2 * args.dim}, {args.grid}, {args.grid}] float32 "
              f"({args.n * 2 * 2 * args.dim * args.grid ** 2 * 4 / 2**20:.0f} MiB raw), "
              f"written in {time.perf_counter() - t:.1f} s")

        def batch_idx() -> np.ndarray:
            return rng.integers(0, args.n, args.batch)

        mem = LatentStore(path, in_memory=True)
        t = time.perf_counter()
        mem.load()
        print(f"load into memory: {time.perf_counter() - t:.2f} s")
        results = {"memory": rate(lambda: mem.tokens(batch_idx()), args.batches, args.batch)}

        ds = TokenGridDataset(mem)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True,
                                             num_workers=args.workers, drop_last=True,
                                             persistent_workers=args.workers > 0)
        it = iter(loader)

        def next_batch() -> None:
            nonlocal it
            try:
                next(it)
            except StopIteration:
                it = iter(loader)
                next(it)

        results[f"memory+loader(w={args.workers})"] = rate(next_batch, args.batches, args.batch)

        direct = LatentStore(path, in_memory=False, cache_bytes=args.cache_mb << 20)
        results[f"zarr(cache={args.cache_mb}MiB)"] = rate(
            lambda: direct.tokens(batch_idx()), max(3, args.batches // 8), args.batch)

        # The path of a split over the memory budget (ImageNet): workers read rows from Zarr.
        streamed = TokenGridDataset(LatentStore(path, cache_bytes=args.cache_mb << 20), in_memory=False)
        loader = torch.utils.data.DataLoader(streamed, batch_size=args.batch, shuffle=True,
                                             num_workers=args.workers, drop_last=True,
                                             persistent_workers=args.workers > 0)
        it = iter(loader)
        results[f"zarr+loader(w={args.workers})"] = rate(next_batch, max(3, args.batches // 4), args.batch)

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"(wall clock; load average {load} on {os.cpu_count()} cores)")
    for name, r in results.items():
        ok = "meets" if r >= TARGET else "below"
        print(f"{name:>24}: {r:>10,.0f} grids/s  ({ok} the target of {TARGET:,} grids/s)")


if __name__ == "__main__":
    main()
