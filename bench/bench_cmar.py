"""CMAR speed on this machine: training steps/s and sampling images/s at the default size,
and the sampling cost per image as the number of autoregressive steps grows.

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.bench_cmar [--quick] [--out bench/cmar.json]

- train: the CMAR task's loss + backward + AdamW step on a global batch of the default size
  (params.yaml's cmar section, an 8x8 grid of 16-dim tokens, 6 classes), fp32 and bf16 autocast;
- sample: images/s of ``sample_tokens`` at the default num_iter / CFG / diffusion steps;
- AR steps: seconds per image for num_iter 16, 64, 256 on a 16x16 grid (256 tokens, as KL-16
  at 256 px) with the default widths; the cost grows with the steps because every step runs
  the encoder and decoder over the whole sequence (the diffusion head's cost is per token,
  so it does not grow).
Synthetic inputs: the numbers are about compute, not quality.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_params
from pipeline.tasks.cmar import CmarTask, build_mar
from pipeline.train.trainer import StepContext
from pipeline.utils.device import autocast


def fake_batch(B: int, D: int, grid: int, classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    N = grid * grid
    order = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    mean = torch.randn(B, D, grid, grid, generator=g)
    mom = torch.cat([mean, torch.full_like(mean, -4.0)], 1)
    return {"tokens": mean, "tokens_flip": mean.flip(-1), "order": order, "order_flip": order.flip(1),
            "moments": mom, "moments_flip": mom.flip(-1),
            "label": torch.randint(0, classes, (B,), generator=g), "index": torch.arange(B)}


def bench_train(cfg, grid: int, D: int, classes: int, steps: int, dtype: torch.dtype) -> float:
    model = build_mar(cfg, grid, D, classes)
    task = CmarTask(model, cfg, scale_factor=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B = cfg.train.batch_size
    batch = fake_batch(B, D, grid, classes)
    model.train()
    times = []
    for step in range(steps + 2):
        t0 = time.perf_counter()
        torch.manual_seed(step)
        ctx = StepContext(step, torch.arange(B), B, torch.device("cpu"), 0, dtype)
        with autocast(torch.device("cpu"), dtype):
            loss, _ = task.loss(model, batch, ctx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return 1.0 / float(np.median(times[2:]))  # the first two steps warm up


@torch.no_grad()
def bench_sample(cfg, grid: int, D: int, classes: int, n: int, num_iter: int) -> float:
    """Seconds per image."""
    model = build_mar(cfg, grid, D, classes, cfg.sample.num_sampling_steps).eval()
    N = grid * grid
    labels = torch.arange(n) % classes
    orders = torch.stack([torch.randperm(N) for _ in range(n)])
    g = torch.Generator().manual_seed(0)
    model.sample_tokens(labels[:2], orders[:2], num_iter=min(2, N), cfg=cfg.sample.cfg, generator=g)  # warm-up
    t0 = time.perf_counter()
    model.sample_tokens(labels, orders, num_iter=num_iter, cfg=cfg.sample.cfg,
                        cfg_schedule=cfg.sample.cfg_schedule, temperature=cfg.sample.temperature,
                        generator=g)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--quick", action="store_true", help="fewer steps/images (a smoke run)")
    ap.add_argument("--out", default="bench/cmar.json")
    args = ap.parse_args()
    params = load_params(args.params)
    cfg = params.cmar
    grid = params.data.crop_size // params.tokenizer.patch_size
    D, classes = params.tokenizer.dim, params.data.synthetic.num_classes
    steps = 3 if args.quick else 10
    n = 8 if args.quick else 32  # = cmar.sample.eval_batch_size by default
    res: dict = {"threads": torch.get_num_threads(), "grid": grid, "token_dim": D,
                 "batch_size": cfg.train.batch_size, "num_iter": cfg.sample.num_iter,
                 "cfg": cfg.sample.cfg, "num_sampling_steps": cfg.sample.num_sampling_steps}
    res["train_steps_per_s_fp32"] = bench_train(cfg, grid, D, classes, steps, torch.float32)
    res["train_steps_per_s_bf16"] = bench_train(cfg, grid, D, classes, steps, torch.bfloat16)
    s = bench_sample(cfg, grid, D, classes, n, cfg.sample.num_iter)
    res["sample_images_per_s"] = 1.0 / s
    print(json.dumps(res, indent=2), flush=True)
    # AR-step scaling on a 256-token grid (KL-16's 16x16), a batch of n/2 images
    res["ar_steps_grid"] = 16
    res["sample_s_per_image_by_ar_steps"] = {}
    for k in (16, 64, 256):
        res["sample_s_per_image_by_ar_steps"][str(k)] = bench_sample(cfg, 16, D, classes, n // 2, k)
        print(f"num_iter {k}: {res['sample_s_per_image_by_ar_steps'][str(k)]:.3f} s/image", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
