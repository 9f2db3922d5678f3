"""Stage ``eval_cvit``: Tab. 5 and Fig. 8 on the ``val`` split.

For every row of Tab. 5 (ViT, ViT+C, RViT, CViT; see ``pipeline.tasks.cvit``) and every
mask ratio of ``cvit.eval_ratios``: top-1 / top-5 (%). Per row, AuC (mean top-1 over the
ratio span, trapezoids) and the Kneedle knee of the top-1 curve. Per ratio, the FLOP ratio
and the measured wall-time ratio of a forward pass with that many patches dropped against the
full sequence (the CViT model, one evaluation batch).

Random test-time drops are seeded by (``seed``, image index): ViT and RViT see the same ones.

Writes ``data/reports/cvit.json`` (one block per row with the Tab. 5 columns, plus ``cost``
and ``eval``), the headline figures ``data/metrics/cvit.json`` (:func:`headline`: AuC and
top-1 at 78% dropped per row, the cost at 78%), ``data/plots/cvit_accuracy.csv`` (mask_ratio, ViT, ViT+C, RViT, CViT: top-1 %) and
``data/plots/cvit_fig8.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pipeline.config import Params
from pipeline.data.imageset import ImageSet
from pipeline.orders.shards import CollapseOrders
from pipeline.tasks.cvit import VARIANTS, CvitImageDataset, images_to_input, load_cvit
from pipeline.tasks.cvit_eval import (accuracy_csv, check_model_fits, evaluate_rows, measure_cost,
                                      plot_fig8, ratio_label, table)
from pipeline.utils.device import pick_device
from pipeline.utils.io import atomic_write_json, atomic_write_text
from pipeline.utils.progress import progress

def run(params: Params, data_dir: Path | str = Path("data")) -> dict[str, Any]:
    data_dir = Path(data_dir)
    cfg = params.cvit
    ratios = [float(r) for r in cfg.eval_ratios]
    if len(set(ratios)) != len(ratios):
        raise ValueError(f"cvit.eval_ratios has duplicates: {ratios}")
    device = pick_device()
    # bf16 on a GPU; fp32 on CPU, where it is the exact (and on this CPU, the faster) path
    amp_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    images = ImageSet(data_dir / "images" / "val")
    orders = CollapseOrders(data_dir / "orders" / "val")
    dataset = CvitImageDataset(images, orders, random_seed=params.seed)
    models, metas = {}, {}
    for v in VARIANTS:
        model, meta = load_cvit(data_dir / "cvit" / v)
        check_model_fits(v, model, meta, orders, images)
        models[v], metas[v] = model.to(device), meta

    loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False,
                        num_workers=cfg.train.num_workers)
    bar = progress(total=len(dataset), desc="eval_cvit", unit="img")
    curves = evaluate_rows(models, loader, ratios, device, amp_dtype, progress=bar)
    bar.close()
    rows = table(curves, ratios)

    # Cost: the CViT model on one evaluation batch (all variants share the architecture).
    first = next(iter(DataLoader(dataset, batch_size=min(cfg.eval_batch_size, len(dataset)))))
    x = images_to_input(first["image"]).to(device)
    cost = measure_cost(models["cvit"], x, first["order"].to(device), ratios, amp_dtype=amp_dtype)
    cost_metrics: dict[str, Any] = {"batch": int(x.shape[0]), "num_patches": models["cvit"].num_patches}
    for r in ratios:
        lab = ratio_label(r)
        cost_metrics[f"kept@{lab}"] = cost[r]["kept"]
        cost_metrics[f"flop_ratio@{lab}"] = round(cost[r]["flop_ratio"], 5)
        cost_metrics[f"time_ratio@{lab}"] = round(cost[r]["time_ratio"], 5)

    arch = models["cvit"].arch
    metrics = {**rows, "cost": cost_metrics,
               "eval": {"images": len(dataset), "grid": arch.grid, "patch_size": arch.patch_size,
                        "img_size": arch.img_size, "weights": {v: metas[v]["weights"] for v in VARIANTS}}}
    atomic_write_json(data_dir / "reports" / "cvit.json", metrics)
    atomic_write_json(data_dir / "metrics" / "cvit.json", headline(metrics))
    atomic_write_text(data_dir / "plots" / "cvit_accuracy.csv", accuracy_csv(curves, ratios))
    plot_fig8(data_dir / "plots" / "cvit_fig8.png", curves, ratios, rows,
              f"{len(dataset)} val images, ViT {arch.dim}x{arch.depth}, "
              f"{arch.grid}x{arch.grid} patches of {arch.patch_size}px")

    r78 = ratio_label(0.78)
    print("[cvit] top-1 @0 / @78 / AuC / knee:", flush=True)
    for row, e in rows.items():
        print(f"  {row:6s} {e['top1@0']:6.2f} / {e[f'top1@{r78}']:6.2f} / {e['AuC']:6.2f} / "
              f"{e['knee']}", flush=True)
    print(f"  forward at 78% dropped: {cost_metrics[f'flop_ratio@{r78}']:.3f} of the FLOPs, "
          f"{cost_metrics[f'time_ratio@{r78}']:.3f} of the time", flush=True)
    return metrics


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The flat figures `dvc metrics show` prints: AuC and top-1 with 78% of the patches
    dropped for every row, full-image top-1 of the ViT, the forward cost at 78%."""
    r78 = ratio_label(0.78)  # one of the Tab. 5 ratios every evaluation has
    rows = [r for r in report if isinstance(report[r], dict) and "AuC" in report[r]]
    out: dict[str, Any] = {f"AuC_{r}": report[r]["AuC"] for r in rows}
    out.update({f"top1@{r78}_{r}": report[r][f"top1@{r78}"] for r in rows})
    out["top1@0_ViT"] = report["ViT"]["top1@0"]
    out[f"flop_ratio@{r78}"] = report["cost"][f"flop_ratio@{r78}"]
    out[f"time_ratio@{r78}"] = report["cost"][f"time_ratio@{r78}"]
    out["images"] = report["eval"]["images"]
    return out


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("eval-cvit")
