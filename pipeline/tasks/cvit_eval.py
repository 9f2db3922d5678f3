"""CViT evaluation (paper Tab. 5, Fig. 8): accuracy of every Tab. 5 row at every mask ratio,
the cost of a forward pass with patches dropped, the table, CSV and figure ``eval_cvit``
writes, and the ViT as a feature extractor.

The rows and the drop policies are those of :mod:`pipeline.tasks.cvit`.
"""

from __future__ import annotations

import csv
import io
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from pipeline.metrics.curves import auc, kneedle, topk_correct
from pipeline.models.vit import VisionTransformer, vit_forward_flops
from pipeline.tasks.cvit import (
    ROWS, OrdersMismatchError, images_to_input, keep_first, num_keep, orders_tokenizer_fingerprint,
)
from pipeline.utils.device import autocast
from pipeline.utils.images import to_unit
from pipeline.utils.io import atomic_path


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


# ----------------------------------------------------------------------------- Tab. 5, Fig. 8


TABLE_RATIOS = (0.0, 0.3, 0.5, 0.78)  # the Tab. 5 columns


def table(curves: dict[str, dict[str, list[float]]], ratios: list[float]) -> dict[str, dict[str, Any]]:
    """Per row: top1@r / top5@r for the Tab. 5 ratios, AuC and knee of the top-1 curve."""
    out: dict[str, dict[str, Any]] = {}
    for row, c in curves.items():
        entry: dict[str, Any] = {}
        for r in TABLE_RATIOS:
            j = ratios.index(r)
            entry[f"top1@{ratio_label(r)}"] = round(c["top1"][j], 4)
            entry[f"top5@{ratio_label(r)}"] = round(c["top5"][j], 4)
        entry["AuC"] = round(auc(ratios, c["top1"]), 4)
        entry["knee"] = kneedle(ratios, c["top1"])
        out[row] = entry
    return out


def accuracy_csv(curves: dict[str, dict[str, list[float]]], ratios: list[float]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["mask_ratio", *ROWS])
    order = sorted(range(len(ratios)), key=lambda j: ratios[j])
    for j in order:
        w.writerow([ratios[j], *(f"{curves[row]['top1'][j]:.4f}" for row in ROWS)])
    return buf.getvalue()


def plot_fig8(path: Path, curves: dict[str, dict[str, list[float]]], ratios: list[float],
              rows: dict[str, dict[str, Any]], title: str) -> None:
    """Fig. 8: top-1 vs mask ratio, one line per row, knees marked, 78% shaded as in the paper."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(range(len(ratios)), key=lambda j: ratios[j])
    xs = [ratios[j] for j in order]
    fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=150)
    ax.axvspan(0.78, 1.0, color="0.92", zorder=0)
    ax.text(0.79, 0.03, ">78% masked", transform=ax.get_xaxis_transform(), fontsize=8, color="0.35")
    for row in ROWS:
        ys = [curves[row]["top1"][j] for j in order]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=row)
        knee = rows[row]["knee"]
        if knee is not None:
            ax.plot([knee], [curves[row]["top1"][ratios.index(knee)]], marker="x", markersize=8,
                    color=line.get_color())
    ax.set_xlabel("mask ratio")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


__all__ = ["TABLE_RATIOS", "accuracy_csv", "check_model_fits", "evaluate_rows", "measure_cost",
           "plot_fig8", "ratio_label", "table", "vit_features"]
