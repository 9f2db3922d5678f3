"""Stage ``train_cvit`` (foreach vit, rvit, cvit): train one ViT variant of Tab. 5 -> ``data/cvit/<variant>/``.

- ``vit``:  full images (the ViT / ViT+C rows);
- ``rvit``: a cosine-scheduled share of random patches dropped;
- ``cvit``: the same share of the lowest collapse ranks dropped (the first k of the order kept).

Inputs: the train images (``data/images/train``) joined by key with their collapse orders
(``data/orders/train``, flipped orders included; every variant checks them, so all three
models share one patch grid). The ViT's patch size is image size / latent grid; with
``cvit.pretrained`` (timm ViT-B/16 weights) it starts from those, pos_embed resized.
The shared trainer does resume, DDP (torchrun), EMA and bf16. Writes
``data/cvit/<variant>/{model,model_ema}.safetensors``, ``config.json``, ``train_log.csv``,
``pretrained.json`` and ``data/metrics/cvit_train_<variant>.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import Params
from pipeline.data.imageset import ImageSet
from pipeline.tasks.cvit import (
    TRAIN_DROP, VARIANTS, CvitImageDataset, CvitTask, orders_tokenizer_fingerprint,
)
from pipeline.models.layers import count_params
from pipeline.models.vit import VisionTransformer, VitArch, load_pretrained
from pipeline.orders.shards import CollapseOrders
from pipeline.train.trainer import Trainer
from pipeline.utils.dist import cleanup, init_distributed
from pipeline.utils.io import atomic_write_json, sha256_file


def build_model(params: Params, crop_size: int, grid: int, num_classes: int,
                ) -> tuple[VisionTransformer, dict[str, Any]]:
    """The variant's ViT on the latent grid, from timm weights when ``cvit.pretrained`` is set."""
    cfg = params.cvit
    arch = VitArch.for_grid(crop_size, grid, num_classes, dim=cfg.dim, depth=cfg.depth,
                            heads=cfg.heads, mlp_ratio=cfg.mlp_ratio)
    torch.manual_seed(params.seed)  # the same initial weights for every variant
    model = VisionTransformer(arch)
    info: dict[str, Any] = {"pretrained": None}
    if cfg.pretrained:
        report = load_pretrained(model, cfg.pretrained, allow_missing_keys=cfg.allow_missing_keys)
        print(f"[cvit] pretrained {cfg.pretrained}: {report.summary()}", flush=True)
        info = {"pretrained": str(cfg.pretrained), "pretrained_sha256": sha256_file(cfg.pretrained),
                "loaded": len(report.loaded), "missing": report.missing,
                "unexpected": report.unexpected, "dropped": report.dropped,
                "reinitialized": report.reinitialized,
                "pos_embed_resized": report.pos_embed_resized}
    return model, info


def run(params: Params, variant: str = "cvit", data_dir: Path | str = Path("data")) -> dict[str, Any]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown CViT variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    data_dir = Path(data_dir)
    cfg = params.cvit
    info = init_distributed()
    try:
        images = ImageSet(data_dir / "images" / "train")
        orders = CollapseOrders(data_dir / "orders" / "train")
        # Bad input stops here, before any work: missing orders, another grid or image size.
        uses_orders = TRAIN_DROP[variant] == "collapse"
        dataset = CvitImageDataset(images, orders if uses_orders else None,
                                   check_orders=orders)
        model, pre = build_model(params, images.crop_size, orders.grid, len(images.classes))
        task = CvitTask(model, variant, cfg.max_mask_ratio, orders_tokenizer_fingerprint(orders),
                        extra_config={"pretrained_sha256": pre.get("pretrained_sha256"),
                                      "init_seed": params.seed})
        out_dir = data_dir / "cvit" / variant
        metrics_path = data_dir / "metrics" / f"cvit_train_{variant}.json"
        trainer = Trainer(task, dataset, cfg.train, out_dir, log_csv=out_dir / "train_log.csv",
                          desc=f"cvit[{variant}]", on_config_mismatch="restart")
        final = trainer.fit()
        metrics = {"variant": variant, "drop": TRAIN_DROP[variant], "params": count_params(model),
                   "grid": model.arch.grid, "patch_size": model.arch.patch_size, **final}
        if info.is_main:
            atomic_write_json(out_dir / "pretrained.json", pre)
            atomic_write_json(metrics_path, metrics)
            print(f"[cvit] {variant}: loss {final.get('loss', float('nan')):.4f}, train acc "
                  f"{final.get('acc', float('nan')):.3f} after {final.get('train_steps')} steps "
                  f"({final.get('wall_time_s', 0):.0f} s) -> {out_dir}", flush=True)
        return metrics
    finally:
        cleanup()


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("train-cvit")
