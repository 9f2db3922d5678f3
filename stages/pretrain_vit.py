"""Stage ``pretrain_vit``: the ViT every CViT variant fine-tunes from -> ``data/pretrain_vit/``.

The ViT of ``cvit.model.dim/depth/heads/mlp_ratio`` on the latent grid, trained on full images of
the pretrain pool (``data/images/pretrain``; ``train`` when there is none), no orders,
distilled from the judge (``pipeline.tasks.cvit_pretrain``); with ``cvit.pretrain.stem_from_judge``
its conv stem starts as the judge's first layers (kept frozen with ``cvit.model.freeze_stem``). Val top-1 every
``cvit.pretrain.eval_every`` steps is the learning curve ``data/plots/pretrain_vit_val.csv``.
Writes ``data/pretrain_vit/{model.safetensors, config.json, eval_log.csv}``, the full record
``data/reports/pretrain_vit.json`` and the headline ``data/metrics/pretrain_vit.json``.

With ``cvit.model.pretrained`` set (the published timm ViT-B, full profile) it trains nothing:
``data/pretrain_vit/published.json`` records the weights that stand in, and train_cvit loads them.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Params
from pipeline.paths import outputs
from pipeline.data.imageset import ImageSet, pretrain_split
from pipeline.latents.store import LatentStore
from pipeline.models.layers import count_params
from pipeline.models.vit import VisionTransformer
from pipeline.tasks.cvit import PUBLISHED_RECORD, freeze_stem, published_record, vit_arch
from pipeline.tasks.cvit_pretrain import ImageCache, VitDistillTask, load_judge_stem, top1
from pipeline.tasks.judge import ImageLabelDataset, load_judge
from pipeline.train.stage import TrainingStage
from pipeline.utils.io import atomic_write_json, atomic_write_text, sha256_file

HEADLINE = ("val_top1", "teacher_val_top1", "train_steps", "train_images", "wall_time_s")


def run(params: Params, data_dir: Path | str = Path("data")) -> dict[str, Any]:
    data_dir = Path(data_dir)
    cfg = params.cvit.pretrain
    out = outputs("pretrain_vit", data_dir)
    out_dir, curve_csv = out.run, out.curve
    if params.cvit.model.pretrained:
        return _published(params, data_dir, out_dir, curve_csv)
    (out_dir / PUBLISHED_RECORD).unlink(missing_ok=True)  # a record of another configuration
    with TrainingStage("pretrain_vit", data_dir, HEADLINE) as stage:
        images = ImageSet(pretrain_split(data_dir / "images"))
        val = ImageCache(ImageSet(data_dir / "images" / "val"))
        judge, judge_meta = load_judge(data_dir / "judge")
        torch.manual_seed(params.seed)
        model = VisionTransformer(vit_arch(params, images.crop_size, _grid(data_dir),
                                           len(images.classes)))
        if cfg.stem_from_judge:
            load_judge_stem(model, judge)
        if params.cvit.model.freeze_stem:
            freeze_stem(model)
        task = VitDistillTask(model, judge, cfg.distill, cfg.temperature, cfg.max_shift,
                              extra_config={"init_seed": params.seed,
                                            "stem_from_judge": cfg.stem_from_judge,
                                            "frozen_stem": params.cvit.model.freeze_stem})
        report = {"params": count_params(model), "train_split": images.path.name,
                  "train_images": len(images), "val_images": len(val),
                  "grid": model.arch.grid, "patch_size": model.arch.patch_size}
        # the declared curve is the val learning curve, not the per-window training log
        final = stage.fit(task, ImageLabelDataset(images), cfg.train, report=report,
                          inputs={"images": images.identity,
                                  "teacher": sha256_file(data_dir / "judge" / judge_meta["weights"])},
                          desc="pretrain_vit", log_csv=None,
                          evaluate=lambda m: {"val_top1": top1(m, val)},
                          eval_every=cfg.eval_every, eval_csv=curve_csv)
        if stage.is_main:
            curve = _read_curve(out_dir / "eval_log.csv")
            teacher = top1(judge, val)
            stage.record(val_top1=curve[-1]["val_top1"] if curve else None,
                         teacher_val_top1=teacher, val_curve=curve)
            points = ", ".join(f"{c['val_top1']:.3f}@{c['step']:.0f}" for c in curve)
            stage.say(f"[pretrain_vit] val top-1 {points} (judge {teacher:.3f}, chance "
                      f"{1 / len(images.classes):.3f}) in {final.get('wall_time_s') or 0:.0f} s "
                      f"-> {out_dir}")
    return stage.metrics


def _grid(data_dir: Path) -> int:
    """The latent grid (what the collapse orders index), read from the latent store."""
    return LatentStore(data_dir / "latents" / "train.zarr").grid


def _read_curve(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _published(params: Params, data_dir: Path, out_dir: Path, curve_csv: Path) -> dict[str, Any]:
    rec = published_record(params)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("config.json", "model.safetensors", "model_ema.safetensors", "eval_log.csv"):
        (out_dir / stale).unlink(missing_ok=True)  # a ViT trained here under other params
    atomic_write_json(out_dir / PUBLISHED_RECORD, rec)
    atomic_write_text(curve_csv, "step,val_top1\n")  # no training, no curve
    metrics = {**rec, "val_top1": None, "teacher_val_top1": None, "train_steps": 0,
               "train_images": 0, "wall_time_s": 0.0}
    out = outputs("pretrain_vit", data_dir)
    atomic_write_json(out.report, metrics)
    atomic_write_json(out.metrics, {k: metrics.get(k) for k in HEADLINE})
    print(f"[pretrain_vit] cvit.model.pretrained is set: the published weights {rec['published']} "
          "are the pretrained ViT; nothing trained", flush=True)
    return metrics


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("pretrain-vit")
