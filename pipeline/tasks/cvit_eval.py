"""CViT evaluation (paper Tab. 5, Fig. 8): accuracy of every Tab. 5 row at every mask ratio,
the cost of a forward pass with patches dropped, and the ViT as a feature extractor.

The rows and the drop policies are those of :mod:`pipeline.tasks.cvit`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from pipeline.metrics.curves import topk_correct
from pipeline.models.vit import VisionTransformer, vit_forward_flops
from pipeline.tasks.cvit import (
    ROWS, OrdersMismatchError, images_to_input, keep_first, num_keep, orders_tokenizer_fingerprint,
)
from pipeline.utils.device import autocast
from pipeline.utils.images import to_unit


def check_model_fits(name: str, model: VisionTransformer, meta: dict[str, Any], orders: Any,
                     images: Any) -> None:
    """A trained variant must match the evaluation data: patch grid, image size, classes and
    the tokenizer its training orders came from."""
    arch = model.arch
    if arch.grid != orders.grid:
        raise OrdersMismatchError(
            f"model {name!r} has a {arch.grid}x{arch.grid} patch grid ({arch.img_size}px / "
            f"{arch.patch_size}px patches), the orders in {orders.path} a "
            f"{orders.grid}x{orders.grid} grid: retrain it on these orders")
    if arch.img_size != images.crop_size:
        raise OrdersMismatchError(f"model {name!r} takes {arch.img_size}px images, "
                                  f"{images.path} holds {images.crop_size}px crops")
    if arch.num_classes != len(images.classes):
        raise OrdersMismatchError(f"model {name!r} has {arch.num_classes} classes, "
                                  f"{images.path} {len(images.classes)}")
    trained_on = meta.get("task", {}).get("orders_tokenizer")
    here = orders_tokenizer_fingerprint(orders)
    if trained_on != here:
        tok = orders.tokenizer_identity or {}
        raise OrdersMismatchError(
            f"model {name!r} was trained with collapse orders of tokenizer identity "
            f"{str(trained_on)[:12]}, the orders in {orders.path} come from tokenizer "
            f"{tok.get('kind')!r} (identity {here[:12]}): evaluate with orders of the same tokenizer")


# ----------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate_rows(models: dict[str, VisionTransformer], loader: Iterable[dict[str, Tensor]],
                  ratios: list[float], device: torch.device, amp_dtype: torch.dtype = torch.float32,
                  rows: dict[str, tuple[str, str]] = ROWS, progress: Any = None,
                  ) -> dict[str, dict[str, list[float]]]:
    """Top-1/top-5 (%) of every Tab. 5 row at every mask ratio, in one pass over the data.

    Each batch is decoded once and run through every (model, drop, ratio).
    Returns {row: {"top1": [per ratio], "top5": [per ratio]}}.
    """
    hits = {r: np.zeros((2, len(ratios)), np.int64) for r in rows}
    seen = 0
    for batch in loader:
        x = images_to_input(batch["image"]).to(device)
        labels = batch["label"].to(device)
        drops = {"collapse": batch["order"].to(device), "random": batch["random_order"].to(device)}
        seen += len(labels)
        for j, ratio in enumerate(ratios):
            for row, (variant, drop) in rows.items():
                model = models[variant]
                k = num_keep(ratio, model.num_patches)
                with autocast(device, amp_dtype):
                    logits = model(x, keep_first(drops[drop], k))
                c = topk_correct(logits.float(), labels, ks=(1, 5))
                hits[row][0, j] += c[1]
                hits[row][1, j] += c[5]
        if progress is not None:
            progress.update(len(labels))
    if seen == 0:
        raise ValueError("the evaluation set is empty")
    return {row: {"top1": (100.0 * h[0] / seen).tolist(), "top5": (100.0 * h[1] / seen).tolist()}
            for row, h in hits.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_cost(model: VisionTransformer, images: Tensor, orders: Tensor, ratios: list[float],
                 repeats: int = 5, amp_dtype: torch.dtype = torch.float32,
                 ) -> dict[float, dict[str, float]]:
    """Per mask ratio: analytic FLOP ratio and measured wall-time ratio against the full sequence.

    ``images`` [B, 3, H, W] on the model's device, ``orders`` [B, N]. Wall times are medians
    over ``repeats`` rounds; each round times every ratio once, interleaved, so drifting
    machine load (a shared CPU) hits all ratios alike.
    """
    device = images.device
    N = model.num_patches
    ks = sorted({num_keep(r, N) for r in ratios} | {N})

    def run(k: int) -> float:
        keep = keep_first(orders, k)
        _sync(device)
        t0 = time.perf_counter()
        with autocast(device, amp_dtype):
            model(images, keep)
        _sync(device)
        return time.perf_counter() - t0

    for k in ks:  # warm-up: allocator, kernels, caches
        run(k)
    times: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            times[k].append(run(k))
    med = {k: statistics.median(v) for k, v in times.items()}
    full_flops = vit_forward_flops(model.arch, N)
    out = {}
    for r in ratios:
        k = num_keep(r, N)
        out[r] = {"kept": k, "flop_ratio": vit_forward_flops(model.arch, k) / full_flops,
                  "time_ratio": med[k] / med[N], "time_s": med[k]}
    return out


def ratio_label(ratio: float) -> str:
    """0.78 -> "78": metric names like Tab. 5's T1@78% (no dots: DVC flattens keys on dots)."""
    pct = round(ratio * 100, 6)
    return str(int(pct)) if pct == int(pct) else str(pct).replace(".", "_")


@torch.no_grad()
def vit_features(vit: VisionTransformer, images_u8: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logit [cls] features [n, D] and logits [n, C] of the ViT on uint8 images [n, H, W, 3]."""
    feats, logits = [], []
    dev = next(vit.parameters()).device
    for s in range(0, len(images_u8), batch):
        x = to_unit(images_u8[s:s + batch]).to(dev) * 2 - 1  # the ViT reads [-1, 1]
        h = vit.forward_features(x)
        feats.append(vit.forward_head(h, pre_logits=True).float().cpu())
        logits.append(vit.forward_head(h).float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


__all__ = ["check_model_fits", "evaluate_rows", "measure_cost", "ratio_label", "vit_features"]
