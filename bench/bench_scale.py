"""What the full profile costs at ImageNet scale: FLOPs per unit of work, per stage, projected.

For each heavy stage the script builds the full profile's network (``--profile``, default
``profiles/full.yaml``) and counts the FLOPs of one unit of its work with
``torch.utils.flop_counter`` (on the meta device: nothing is computed), then multiplies by the
number of units ImageNet asks for (1,281,167 train and 50,000 val images; the profile's steps,
batch sizes, seeds and sample counts) and projects the wall-clock on 1 and 8 GPUs from
``--peak-tflops`` x ``--utilisation`` (defaults: an H100's 989 dense bf16 TFLOP/s at 40%).
Those two are assumptions, printed beside every projection.

``--measure`` also times one unit of three stages (KL-16 encode, one dependency matrix, ViT
forward at 78% dropped) on this machine (bf16 on a GPU, fp32 on a CPU) and prints the achieved
TFLOP/s beside the assumed rate, so the assumption can be checked where a GPU is lent.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_scale.py            # analytic only
    .venv/bin/python bench/bench_scale.py --measure                    # + one unit timed here

Backward passes are counted as twice the forward (the usual 3x for a training step);
CoMAE's alternating steps run both halves forward and one backward, counted as 3x too (an
upper bound). MAR sampling is counted analytically per iteration (encoder on the visible
tokens + buffer, decoder on all, both doubled by CFG, the diffusion MLP on each token it
samples for ``num_sampling_steps`` steps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import load_params
from pipeline.models.layers import attention_flops

TRAIN, VAL, CLASSES = 1_281_167, 50_000, 1000
GRID, DIM = 16, 16  # KL-16 at 256²


@dataclass
class Stage:
    name: str
    unit: str
    flops: float  # per unit
    units: float
    note: str = ""
    run_unit: Callable[[torch.device], None] | None = None  # one unit, for --measure

    @property
    def total(self) -> float:
        return self.flops * self.units


def count(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        return build().eval()


def kl16_stage(p) -> Stage:
    from pipeline.tokenizers.kl16 import build_kl16_model

    model = on_meta(build_kl16_model)
    enc = count(lambda: model.encode(torch.empty(1, 3, 256, 256, device="meta")))
    flips = 2
    return Stage("extract_latents", "image encode", enc, (TRAIN + VAL) * flips,
                 "KL-16 encoder at 256², every image and its flip")


def comae_stages(p) -> list[Stage]:
    from pipeline.models.comae import CoMAE
    from pipeline.tasks.comae import comae_arch

    cfg = p.comae
    model = CoMAE(comae_arch(cfg, GRID, DIM)).eval()  # CPU: its index tables need real tensors
    N, T, k = GRID * GRID, cfg.targets_per_image, 4
    # both passes are linear in the number of (image, target) sequences: count k, scale up
    tokens = torch.randn(1, N, DIM)
    targets = torch.arange(k).unsqueeze(0)
    eps = torch.randn(1, k, N - 1, DIM)
    with torch.no_grad():
        fwd = count(lambda: model(tokens, targets, eps)) * T / k
        dep = count(lambda: model._select_seq(tokens, torch.zeros(k, dtype=torch.long),
                                              torch.arange(k))) * N / k
    flips = 2 if p.orders.flip == "compute" else 1
    train = Stage("train_comae", "image (x targets)", 3 * fwd, cfg.train.steps * cfg.train.batch_size,
                  f"{T} targets per image; {cfg.train.steps:,} steps x {cfg.train.batch_size}")
    export = Stage("export_orders", "image", dep, (TRAIN + VAL) * flips,
                   f"{N} target passes of f per image (one dependency matrix)"
                   + (", and its flip" if flips == 2 else ""))
    return [train, export]


def critic_stages(p) -> list[Stage]:
    from pipeline.models.critic import Critic
    from pipeline.tasks.critic import critic_arch

    N = GRID * GRID
    out, per_pass = [], {}
    for variant in ("scorer", "builder"):
        model = on_meta(lambda: Critic(critic_arch(getattr(p.critic, variant), N, DIM)))
        tokens = torch.empty(1, N, DIM, device="meta")
        revealed = torch.zeros(1, N, dtype=torch.bool, device="meta")
        with torch.no_grad():
            per_pass[variant] = count(lambda: model(tokens, revealed))
        t = p.critic.train
        out.append(Stage(f"train_critic@{variant}", "image", 3 * per_pass[variant], t.steps * t.batch_size,
                         f"{t.steps:,} steps x {t.batch_size}"))
    s = p.critic.score
    orders_scored = 18  # the orders score_orders compares (both critics score them)
    passes = s.images * (orders_scored * (s.points + 1)) * (per_pass["scorer"] + per_pass["builder"])
    passes += s.images * N * per_pass["builder"]  # confidence orders: N passes per image
    passes += s.greedy_images * N * (N + 1) / 2 * per_pass["builder"]  # greedy: N²/2 passes
    out.append(Stage("score_orders", "run", passes, 1,
                     f"{s.images} val images x ~{orders_scored} orders x {s.points} points, "
                     f"greedy on {s.greedy_images}"))
    return out


def vit_stages(p) -> list[Stage]:
    from pipeline.models.vit import VitArch
    from pipeline.tasks.cvit import cosine_mask_ratio
    from pipeline.models.vit import vit_forward_flops

    m = p.cvit.model
    arch = VitArch.for_grid(256, GRID, CLASSES, dim=m.dim, depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio)
    N = GRID * GRID
    full = vit_forward_flops(arch, N)
    # the masked variants draw a ratio per step: mean kept tokens under the cosine schedule
    mean_ratio = sum(cosine_mask_ratio((i + 0.5) / 1000, p.cvit.max_mask_ratio) for i in range(1000)) / 1000
    dropped = vit_forward_flops(arch, max(1, round(N * (1 - mean_ratio))))
    t, seeds = p.cvit.train, len(p.cvit.seeds)
    per_run = t.steps * t.batch_size
    # forward + backward (3x), averaged over ViT (all tokens) and RViT, CViT (tokens dropped)
    train = Stage("train_cvit", "image", 3 * (full + dropped + dropped) / 3, 3 * per_run * seeds,
                  f"ViT, RViT, CViT x {seeds} seeds, {t.steps:,} steps x {t.batch_size}; "
                  f"mean ratio {mean_ratio:.2f} dropped in RViT/CViT")
    ratios = len(p.cvit.eval.ratios)
    evals = Stage("eval_cvit", "val image", sum(vit_forward_flops(arch, max(1, round(N * (1 - r))))
                                               for r in p.cvit.eval.ratios) * 8 * seeds, VAL,
                  f"{ratios} ratios x 8 rows x {seeds} seeds")
    return [train, evals]


def mar_stages(p) -> list[Stage]:
    m = p.cmar.model
    N = GRID * GRID
    buf = m.buffer_size
    t = p.cmar.train
    masked = round(N * (m.mask_ratio_min + 1.0) / 2)  # mean of MAR's truncated ratio, ~
    mlp = 2 * m.diffloss_d * (2 * m.diffloss_w * m.diffloss_w * 2)  # res blocks: 2 linears w x 2w-ish
    fwd = (attention_flops(N - masked + buf, m.enc_dim, m.enc_depth) + attention_flops(N + buf, m.dec_dim, m.dec_depth)
           + masked * m.diffusion_batch_mul * mlp)
    train = Stage("train_cmar", "image", 3 * fwd, 3 * t.steps * t.batch_size,
                  f"CMAR, MAR, CMAR-asc x {t.steps:,} steps x {t.batch_size} (analytic)")
    s = p.cmar.sample
    steps = int("".join(ch for ch in str(s.num_sampling_steps) if ch.isdigit()) or 100)
    cfg_mul = 2 if s.cfg != 1.0 else 1
    per_image, still = 0.0, N
    for it in range(s.num_iter):
        nxt = max(0, min(still - 1, int(math.floor(N * math.cos(math.pi / 2 * (it + 1) / s.num_iter)))))
        if it == s.num_iter - 1:
            nxt = 0
        per_image += cfg_mul * (attention_flops(N - still + buf, m.enc_dim, m.enc_depth)
                                + attention_flops(N + buf, m.dec_dim, m.dec_depth))
        per_image += cfg_mul * (still - nxt) * steps * mlp / 2
        still = nxt
    rows = 6
    samples = CLASSES * s.samples_per_class
    return [train, Stage("eval_cmar", "sample", per_image, rows * samples,
                         f"{rows} rows x {samples:,} samples, {s.num_iter} iterations, CFG, "
                         f"{steps} diffusion steps (analytic; KL-16 decode and Inception not counted)")]


def measure(p, device: torch.device, repeats: int) -> list[dict]:
    """Seconds for one unit of the three stages that dominate a GPU's day at ImageNet scale
    outside training (encode, export) and CViT's forward, on ``device`` (bf16 autocast on
    CUDA, fp32 on CPUs), with the FLOPs of that unit: the achieved rate."""
    from pipeline.models.comae import CoMAE
    from pipeline.models.vit import VisionTransformer, VitArch
    from pipeline.tasks.comae import comae_arch
    from pipeline.tokenizers.kl16 import build_kl16_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = 16 if device.type == "cuda" else 1
    kl16 = build_kl16_model().eval().to(device)
    comae = CoMAE(comae_arch(p.comae, GRID, DIM)).eval().to(device)
    m = p.cvit.model
    vit = VisionTransformer(VitArch.for_grid(256, GRID, CLASSES, dim=m.dim, depth=m.depth, heads=m.heads,
                                             mlp_ratio=m.mlp_ratio)).eval().to(device)
    images = torch.randn(batch, 3, 256, 256, device=device)
    tokens = torch.randn(batch, GRID * GRID, DIM, device=device)
    keep = torch.rand(batch, GRID * GRID, device=device).argsort(1)[:, :round(0.22 * GRID * GRID)]
    jobs = {
        "extract_latents (KL-16 encode)": lambda: kl16.encode(images).latent_dist.mean,
        "export_orders (dependency matrix)": lambda: comae.dependency_matrices(tokens, dtype=dtype),
        "eval_cvit (ViT forward, 78% dropped)": lambda: vit(images, keep),
    }
    out = []
    for name, job in jobs.items():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            flops = count(job)
            job()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(repeats):
                job()
            if device.type == "cuda":
                torch.cuda.synchronize()
            secs = (time.perf_counter() - t) / repeats
        out.append({"job": name, "batch": batch, "seconds_per_image": secs / batch,
                    "tflops": flops / secs / 1e12, "dtype": str(dtype).removeprefix("torch.")})
    return out


def hours(flops: float, rate: float) -> float:
    return flops / rate / 3600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="profiles/full.yaml")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--utilisation", type=float, default=0.40, help="assumed fraction of peak reached")
    ap.add_argument("--measure", action="store_true", help="also time one unit of three stages here")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/scale.json")
    args = ap.parse_args()
    p = load_params(args.profile)
    stages = [kl16_stage(p), *comae_stages(p), *critic_stages(p), *vit_stages(p), *mar_stages(p)]
    rate = args.peak_tflops * 1e12 * args.utilisation
    cpu = platform.processor() or platform.machine()
    print(f"profile {args.profile}; ImageNet {TRAIN:,} train + {VAL:,} val; projection at "
          f"{args.peak_tflops:.0f} TFLOP/s x {args.utilisation:.0%} = {rate / 1e12:.0f} TFLOP/s per GPU "
          f"(assumed, not measured); counted on {cpu}, torch {torch.__version__}")
    head = f"{'stage':22s} {'unit':18s} {'GFLOP/unit':>12s} {'units':>14s} {'PFLOP':>10s} {'1 GPU h':>9s} {'8 GPU h':>9s}"
    print(head)
    rows = []
    for s in stages:
        h = hours(s.total, rate)
        print(f"{s.name:22s} {s.unit:18s} {s.flops / 1e9:12.2f} {s.units:14,.0f} {s.total / 1e15:10.1f} "
              f"{h:9.1f} {h / 8:9.1f}  {s.note}")
        rows.append({"stage": s.name, "unit": s.unit, "gflop_per_unit": s.flops / 1e9, "units": s.units,
                     "pflop": s.total / 1e15, "gpu_hours_1": h, "gpu_hours_8": h / 8, "note": s.note})
    total = sum(s.total for s in stages)
    print(f"{'total':22s} {'':18s} {'':>12s} {'':>14s} {total / 1e15:10.1f} {hours(total, rate):9.1f} "
          f"{hours(total, rate) / 8:9.1f}")
    measured = []
    if args.measure:
        from pipeline.utils.device import pick_device

        dev = pick_device()
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu
        measured = measure(p, dev, args.repeats)
        print(f"measured on {name} (load {os.getloadavg()[0]:.1f}), one unit each:")
        for m in measured:
            print(f"  {m['job']:40s} {m['seconds_per_image']:9.4f} s/image  {m['tflops']:7.3f} TFLOP/s "
                  f"({m['dtype']}, batch {m['batch']}; {m['tflops'] * 1e12 / rate:.1%} of the assumed rate)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"profile": args.profile, "peak_tflops": args.peak_tflops,
                                          "utilisation": args.utilisation, "rows": rows,
                                          "measured": measured, "load": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
