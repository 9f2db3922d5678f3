"""KL-16 encode throughput at 256×256 on this machine (random weights: no checkpoint here).

Run from the repository root:

    .venv/bin/python bench/bench_encode.py --images 16 [--batch-size 8] [--threads N]

Every path encodes each image *and* its horizontal flip (what the latent store keeps, and
what MAR's ``main_cache.py`` does), on the same images in the same run:
  (a)  bf16 autocast + channels_last, batched  (the fast path where the CPU has native bf16)
  (a') fp32 + channels_last, batched            (the fast path where it does not: AVX2-only)
  (b)  exact: fp32, contiguous, batched
  (c) MAR-style reference: fp32, batch of one, encode image then flip, one ``np.savez`` per
      image into a temporary directory (as MAR's ``cache_latents`` writes ``.npz`` files).
"images/s" counts images (2 encodes each); "encodes/s" counts forward passes. Figures are
noisy when other processes share the CPU; run it on an idle machine for numbers to quote.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.tokenizers import KL16Tokenizer  # noqa: E402
from pipeline.utils.device import cpu_has_native_bf16  # noqa: E402


def encode_batched(tok: KL16Tokenizer, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """x[n,3,H,W] -> moments [n, 2 (image, flip), 32, H/16, W/16]."""
    out = []
    for xb in x.split(batch_size):
        both = torch.cat([xb, xb.flip(dims=[3])])  # [2b, 3, H, W]
        m = tok.encode_moments(both)
        out.append(torch.stack(m.chunk(2), dim=1))
    return torch.cat(out)


def encode_mar_style(tok: KL16Tokenizer, x: torch.Tensor, out_dir: Path) -> None:
    for i in range(x.shape[0]):
        img = x[i : i + 1]
        moments = tok.encode_moments(img)
        moments_flip = tok.encode_moments(img.flip(dims=[3]))
        np.savez(out_dir / f"{i:06d}.npz", moments=moments[0].numpy(),
                 moments_flip=moments_flip[0].numpy())


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="images per batch (x2 with flips)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = KL16Tokenizer()  # diffusers' random init; weights do not change the cost
    x = torch.rand(args.images, 3, args.size, args.size) * 2 - 1

    def run(precision: str, channels_last: bool) -> tuple[float, torch.Tensor]:
        tok.set_precision(precision, channels_last)
        encode_batched(tok, x[:1], 1)  # warm-up: oneDNN primitive creation, weight reorders
        t, m = timed(lambda: encode_batched(tok, x, args.batch_size))
        print(f"  {precision} channels_last={channels_last}: {t:.1f} s", file=sys.stderr, flush=True)
        return t, m

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the slow-bf16 warning: measuring it is the point
        t_bf16, m_bf16 = run("bf16", True)
    t_fast, m_fast = run("fp32", True)
    t_exact, m_exact = run("fp32", False)
    with tempfile.TemporaryDirectory() as tmp:  # (c) uses the exact fp32 setting
        t_ref, _ = timed(lambda: encode_mar_style(tok, x, Path(tmp)))
        print(f"  MAR-style: {t_ref:.1f} s", file=sys.stderr, flush=True)
        ref0 = np.load(Path(tmp) / "000000.npz")["moments"]
    tok.set_precision("auto", True)
    auto = "bf16" if tok.compute_dtype() == torch.bfloat16 else "fp32"

    n = args.images
    rows = [("(a) bf16 autocast + channels_last, batched", t_bf16),
            ("(a') fp32 + channels_last, batched", t_fast),
            ("(b) exact: fp32 contiguous, batched", t_exact),
            ("(c) MAR-style: fp32, batch 1, np.savez", t_ref)]
    print(f"\nKL-16 encode, {n} images of {args.size}x{args.size} (+ flips), batch "
          f"{args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU native bf16: {cpu_has_native_bf16()} -> precision 'auto' = {auto}")
    print(f"{'path':<44} {'seconds':>8} {'images/s':>9} {'encodes/s':>10} {'vs (c)':>7}")
    for name, t in rows:
        print(f"{name:<44} {t:8.2f} {n / t:9.2f} {2 * n / t:10.2f} {t_ref / t:6.2f}x")
    scale = m_exact.abs().max()
    for name, m in (("bf16 + channels_last", m_bf16), ("fp32 + channels_last", m_fast)):
        d = (m - m_exact).abs()
        print(f"max |exact fp32 - {name}| moments: {d.max():.3g} (mean {d.mean():.3g}; "
              f"max |moments| {scale:.3g})")
    print(f"max |batched fp32 - MAR-style fp32| (image 0): "
          f"{np.abs(m_exact[0, 0].numpy() - ref0).max():.3g}")
    best = min(t_bf16, t_fast)
    print(f"targets: fast/(c) >= 3x -> {t_ref / best:.2f}x; fast >= 4 images/s -> "
          f"{n / best:.2f} images/s ({2 * n / best:.2f} encodes/s)")


if __name__ == "__main__":
    main()
