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
``pretrained.json``, the full record ``data/reports/cvit_train_<variant>.json`` and the
headline figures ``data/metrics/cvit_train_<variant>.json`` (:data:`HEADLINE`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.data.imageset import ImageSet
from pipeline.models.layers import count_params
from pipeline.orders.shards import CollapseOrders
from pipeline.tasks.cvit import (
    TRAIN_DROP, VARIANTS, CvitImageDataset, CvitTask, build_vit, orders_tokenizer_fingerprint,
)
from pipeline.train.trainer import Trainer
from pipeline.utils.dist import cleanup, init_distributed
from pipeline.utils.io import atomic_write_json

# Headline figures for `dvc metrics show`; the rest is in data/reports/cvit_train_<variant>.json.
HEADLINE = ("loss", "acc", "train_steps", "wall_time_s", "items_per_s")


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
        model, pre = build_vit(params, images.crop_size, orders.grid, len(images.classes))
        task = CvitTask(model, variant, cfg.max_mask_ratio, orders_tokenizer_fingerprint(orders),
                        extra_config={"pretrained_sha256": pre.get("pretrained_sha256"),
                                      "init_seed": params.seed})
        out_dir = data_dir / "cvit" / variant
        report = {"variant": variant, "drop": TRAIN_DROP[variant], "params": count_params(model),
                  "grid": model.arch.grid, "patch_size": model.arch.patch_size}
        trainer = Trainer(task, dataset, cfg.train, out_dir,
                          inputs={"images": images.identity, "orders": orders.identity},
                          log_csv=out_dir / "train_log.csv", report=report,
                          metrics_json=data_dir / "reports" / f"cvit_train_{variant}.json",
                          desc=f"cvit[{variant}]")
        final = trainer.fit()
        metrics = {**report, **final}
        if info.is_main:
            atomic_write_json(out_dir / "pretrained.json", pre)
            atomic_write_json(data_dir / "metrics" / f"cvit_train_{variant}.json",
                              {k: final.get(k) for k in HEADLINE})
            print(f"[cvit] {variant}: loss {final.get('loss', float('nan')):.4f}, train acc "
                  f"{final.get('acc', float('nan')):.3f} after {final.get('train_steps')} steps "
                  f"({final.get('wall_time_s', 0):.0f} s) -> {out_dir}", flush=True)
        return metrics
    finally:
        cleanup()


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("train-cvit")
