"""CViT speed: a ViT-B/16-width forward pass with 78% of the patches dropped vs none.

Same model, same process, same batch, interleaved repeats (so load changes on a shared CPU
hit both alike); fp32 and bf16 autocast. At 256² on a 16×16 grid, 78% dropped keeps 56 of
256 patches: 57 tokens instead of 257. The issue's target is >= 3.5x at ViT-B width.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_cvit.py [--batch 8] [--repeats 3]

Prints a table and writes ``bench/results/cvit.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pipeline.tasks.cvit import num_keep
from pipeline.models.vit import VIT_B16, VisionTransformer, VitArch, vit_forward_flops
from pipeline.utils.device import autocast


def time_forward(model: VisionTransformer, x: torch.Tensor, keep: torch.Tensor | None,
                 dtype: torch.dtype) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(x.device, dtype):
        model(x, keep)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.78)
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--depth", type=int, default=VIT_B16["depth"])
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 avoids OpenMP barrier stalls on a busy CPU")
    ap.add_argument("--out", type=Path, default=Path("bench/results/cvit.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    arch = VitArch.for_grid(args.img_size, args.grid, 1000, dim=VIT_B16["dim"], depth=args.depth,
                            heads=VIT_B16["heads"], mlp_ratio=VIT_B16["mlp_ratio"])
    model = VisionTransformer(arch).eval()
    N = arch.num_patches
    k = num_keep(args.ratio, N)
    x = torch.rand(args.batch, 3, args.img_size, args.img_size) * 2 - 1
    keep = torch.rand(args.batch, N).argsort(dim=1)[:, :k]  # which patches does not matter for time
    flop_ratio = vit_forward_flops(arch, N) / vit_forward_flops(arch, k)
    print(f"ViT width {arch.dim}, depth {arch.depth}, {args.img_size}² on a {args.grid}x{args.grid} "
          f"grid ({arch.patch_size}px patches), batch {args.batch}, torch threads "
          f"{torch.get_num_threads()}: {N} -> {k} patches ({args.ratio:.0%} dropped), "
          f"analytic FLOP speed-up {flop_ratio:.2f}x", flush=True)
    results = {"arch": arch.to_dict(), "batch": args.batch, "kept": k, "num_patches": N,
               "ratio": args.ratio, "threads": torch.get_num_threads(),
               "flop_speedup": flop_ratio, "precisions": {}}
    for name in args.precisions.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        time_forward(model, x, None, dtype)  # warm-up
        time_forward(model, x, keep, dtype)
        full, dropped = [], []
        for _ in range(args.repeats):
            full.append(time_forward(model, x, None, dtype))
            dropped.append(time_forward(model, x, keep, dtype))
        t_full, t_drop = statistics.median(full), statistics.median(dropped)
        speedup = t_full / t_drop
        results["precisions"][name] = {"full_s": t_full, "dropped_s": t_drop, "speedup": speedup,
                                       "full_all": full, "dropped_all": dropped}
        verdict = "PASS" if speedup >= 3.5 else "FAIL"
        print(f"  {name}: full {t_full * 1e3:8.1f} ms   {args.ratio:.0%} dropped "
              f"{t_drop * 1e3:8.1f} ms   speed-up {speedup:.2f}x  (target >= 3.5x: {verdict})",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
