"""Stage ``eval_cvit``: Tab. 5 and Fig. 8 on the ``val`` split, over ``cvit.seeds``, with controls.

For every seed s of ``cvit.seeds``, the fine-tuned models ``data/cvit/<variant>_s<s>`` are
tested at every mask ratio of ``cvit.eval.ratios``: the four rows of Tab. 5 (ViT, ViT+C, RViT,
CViT; see ``pipeline.tasks.cvit``) and eight controls (``pipeline.tasks.cvit_eval.CONTROLS``):
the same CViT model keeping first the patches of the fixed train-mean order, the centre, the
highest pixel variance, the highest token L1 norm (PSS; read from ``data/latents/val.zarr``), a
Halton sequence, or another image's collapse order; and the CViT trained on PSS's order
(``cvit_pss``) tested with it and with another image's. The random rows average
``cvit.eval.random_draws`` random drops per image.

The paper's claim in one figure: for every CViT row whose order ``score_orders`` scored
(``data/reports/order_scores.json``), top-1 at 78% dropped against the order's collapse-curve
value at 22% revealed, with Spearman's rho and its bootstrap interval
(``data/plots/cvit_order_quality.png``, ``order_quality`` in the report).

Each figure is the mean over seeds, with a 95% interval from a bootstrap over val images of
that seed-mean (``cvit.eval.bootstrap`` resamples) and the per-seed values; paired contrasts
(CViT against CViT-other first: the paper's claim under test) likewise. Per ratio, the FLOP
ratio and measured wall-time ratio of a forward pass with that many patches dropped; and the
honest cost of every row at 78% dropped (``order_cost``): that forward plus making its order
(``score_orders``' per-image FLOPs, plus the tokenizer's encoder, counted here, for orders read
from tokens), against the full ViT's forward.

Writes ``data/reports/cvit.json`` (per row: curves with intervals and per-seed values, the
Tab. 5 columns, AuC, knee; ``contrasts``; ``order_quality``; ``cost``; ``order_cost``; ``eval``), the headline
``data/metrics/cvit.json`` (:func:`headline`: AuC and top-1 at 78% dropped per row, each with
the half-width of its interval), ``data/plots/cvit_accuracy.csv`` (mask_ratio, the seed-mean
top-1 % of every row, then every row's interval bounds) and ``data/plots/cvit_fig8.png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pipeline.config import Params
from pipeline.paths import outputs
from pipeline.data.imageset import ImageSet
from pipeline.latents.store import LatentStore
from pipeline.orders.report import mean_scores
from pipeline.orders.shards import CollapseOrders
from pipeline.tasks.cvit import VARIANTS, CvitImageDataset, load_cvit, run_name, token_l1_orders
from pipeline.tasks.cvit_eval import (ALL_ROWS, EvalOrders, accuracy_csv, check_model_fits,
                                      evaluate_rows, format_costs, format_order_quality,
                                      format_table, measure_cost, order_costs, order_quality, plot_fig8,
                                      plot_order_quality, ratio_label, summarise)
from pipeline.tokenizers import latents_tokenizer
from pipeline.utils.device import flops_of, pick_device
from pipeline.utils.images import images_to_input
from pipeline.utils.io import atomic_write_json, atomic_write_text, read_json
from pipeline.utils.progress import progress


def run(params: Params, data_dir: Path | str = Path("data")) -> dict[str, Any]:
    data_dir = Path(data_dir)
    cfg = params.cvit
    ratios = [float(r) for r in cfg.eval.ratios]
    if len(set(ratios)) != len(ratios):
        raise ValueError(f"cvit.eval.ratios has duplicates: {ratios}")
    device = pick_device()
    # bf16 on a GPU; fp32 on CPU, where it is the exact (and on this CPU, the faster) path
    amp_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()

    images = ImageSet(data_dir / "images" / "val")
    orders = CollapseOrders(data_dir / "orders" / "val")
    dataset = CvitImageDataset(images, orders)
    fixed = mean_scores(CollapseOrders(data_dir / "orders" / "train"))  # the train-mean order
    pss, = token_l1_orders(LatentStore(data_dir / "latents" / "val.zarr", in_memory=None), images.keys)
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False,
                        num_workers=cfg.train.num_workers)
    per_seed: dict[str, list[dict[str, Any]]] = {row: [] for row in ALL_ROWS}
    weights: dict[str, dict[str, str]] = {}
    for seed in cfg.seeds:
        models = {}
        for v in VARIANTS:
            model, meta = load_cvit(data_dir / "cvit" / run_name(v, seed))
            check_model_fits(run_name(v, seed), model, meta, orders, images)
            models[v] = model.to(device)
            weights.setdefault(str(seed), {})[v] = meta["weights"]
        test_orders = EvalOrders(dataset.image_orders(), fixed, orders.grid, seed,
                                 cfg.eval.random_draws, token_orders=pss)
        bar = progress(total=len(dataset), desc=f"eval_cvit[s{seed}]", unit="img")
        scores = evaluate_rows(models, loader, ratios, test_orders, device, amp_dtype, progress=bar)
        bar.close()
        for row, s in scores.items():
            per_seed[row].append(s)
    summary = summarise(per_seed, ratios, list(cfg.seeds), cfg.eval.bootstrap, boot_seed=params.seed)
    scored_path = data_dir / "reports" / "order_scores.json"
    scored = read_json(scored_path) if scored_path.exists() else None
    not_scored = {"rows": {}, "skipped": f"{scored_path} not produced (run score_orders)"}
    quality = (order_quality(per_seed, ratios, scored, cfg.eval.bootstrap, params.seed)
               if scored is not None and 0.78 in ratios else
               not_scored if scored is None else {"rows": {}, "skipped": "0.78 is not among cvit.eval.ratios"})
    eval_s = time.perf_counter() - t0

    # Cost: the last seed's CViT model on one evaluation batch (every variant shares the arch).
    first = next(iter(DataLoader(dataset, batch_size=min(cfg.eval.batch_size, len(dataset)))))
    x = images_to_input(first["image"]).to(device)
    cost = measure_cost(models["cvit"], x, first["order"].to(device), ratios, amp_dtype=amp_dtype)
    cost_metrics: dict[str, Any] = {"batch": int(x.shape[0]), "num_patches": models["cvit"].num_patches}
    for r in ratios:
        lab = ratio_label(r)
        cost_metrics[f"kept@{lab}"] = cost[r]["kept"]
        cost_metrics[f"flop_ratio@{lab}"] = round(cost[r]["flop_ratio"], 5)
        cost_metrics[f"time_ratio@{lab}"] = round(cost[r]["time_ratio"], 5)

    arch = models["cvit"].arch
    costs = (order_costs(scored.get("costs", {}), tokenizer_flops(params, data_dir, x[:1]), arch)
             if scored is not None else not_scored)
    metrics = {**summary["rows"], "contrasts": summary["contrasts"], "order_quality": quality,
               "interval": summary["interval"],
               "ratios": ratios, "cost": cost_metrics, "order_cost": costs,
               "eval": {"images": len(dataset), "seeds": list(cfg.seeds),
                        "random_draws": cfg.eval.random_draws, "grid": arch.grid,
                        "patch_size": arch.patch_size, "img_size": arch.img_size,
                        "weights": weights, "wall_time_s": round(eval_s, 1)}}
    out = outputs("eval_cvit", data_dir)
    atomic_write_json(out.report, metrics)
    atomic_write_json(out.metrics, headline(metrics))
    atomic_write_text(out.curve, accuracy_csv(summary["rows"], ratios))
    plot_fig8(out.figure, summary["rows"], ratios,
              f"{len(dataset)} val images, seeds {list(cfg.seeds)}: mean, 95% bootstrap interval\n"
              f"ViT {arch.dim}x{arch.depth}, {arch.grid}x{arch.grid} patches of {arch.patch_size}px; "
              "dashed: controls (CViT with other orders; CViT[pss] trained on PSS)", chance=100.0 / len(images.classes))
    plot_order_quality(out.quality, quality, f"does a faster-collapsing order give a better CViT? "
                       f"{len(dataset)} val images, seeds {list(cfg.seeds)}")

    print(f"[cvit] mean over seeds {list(cfg.seeds)} [95% interval over {len(dataset)} val images]:",
          flush=True)
    print(format_table(summary), flush=True)
    print(format_order_quality(quality), flush=True)
    r78 = ratio_label(0.78)
    print(f"  forward at 78% dropped: {cost_metrics[f'flop_ratio@{r78}']:.3f} of the FLOPs, "
          f"{cost_metrics[f'time_ratio@{r78}']:.3f} of the time ({eval_s:.0f} s to evaluate)",
          flush=True)
    print(format_costs(costs), flush=True)
    return metrics


def tokenizer_flops(params: Params, data_dir: Path, image: torch.Tensor) -> float:
    """FLOPs of the tokenizer's encoder on one image [1, 3, H, W] in [-1, 1] (the stand-in
    patch tokenizer here, KL-16 in the full profile): what an order read from tokens pays
    before its own compute."""
    tokenizer = latents_tokenizer(params.tokenizer, data_dir / "latents", image.device)
    with torch.inference_mode():
        return float(flops_of(lambda: tokenizer.encode_moments(image)))


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The flat figures `dvc metrics show` prints (16): top-1 with 78% dropped of every row
    (Tab. 5 and the controls) and CViT's AuC, each mean over seeds; the claim under test, CViT
    with its own order minus the same model with another image's order at 78% dropped, with
    the half-width of its 95% interval (``_pm``); the rank correlation of order quality and
    CViT accuracy. Intervals of every figure, and every row's AuC, are in
    data/reports/cvit.json."""
    r78 = ratio_label(0.78)  # one of the Tab. 5 ratios every evaluation has
    out: dict[str, Any] = {f"top1@{r78}_{row}": report[row][f"top1@{r78}"] for row in ALL_ROWS}
    out["AuC_CViT"] = report["CViT"]["AuC"]
    claim = report["contrasts"]["CViT - CViT-other"]
    lo, hi = claim[f"top1@{r78}_ci"]
    out[f"own_minus_other@{r78}"] = claim[f"top1@{r78}"]
    out[f"own_minus_other@{r78}_pm"] = round((hi - lo) / 2, 4)
    out["order_quality_spearman"] = report.get("order_quality", {}).get("spearman")
    return out

if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("eval-cvit")
