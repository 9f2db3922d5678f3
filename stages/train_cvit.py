"""Stage ``train_cvit`` (matrix: variant x seed): fine-tune one ViT variant of Tab. 5 with one
seed -> ``data/cvit/<variant>_s<seed>/``.

- ``vit``:  full images (the ViT / ViT+C rows);
- ``rvit``: a cosine-scheduled share of random patches dropped;
- ``cvit``: the same share of the lowest collapse ranks dropped (the first k of the order kept);
- ``cvit_pss``: the same share dropped by PSS's order (smallest latent-token L1 norm first;
  read from ``data/latents/train.zarr``, the flipped image's from its flipped latents).

Every variant starts from the same weights, ``data/pretrain_vit`` (stage ``pretrain_vit``:
a ViT distilled from the judge on full images, or the published timm ViT-B it records when
``cvit.model.pretrained`` is set), as the paper fine-tunes one pretrained ViT. ``--seed`` decides
the run: it replaces ``seed`` and ``cvit.train.seed`` (data order, flips, drop ratios and
random drops; any weights the start leaves initialised).

Inputs: the train images (``data/images/train``) joined by key with their collapse orders
(``data/orders/train``, flipped orders included; every variant checks them, so all models
share one patch grid). The shared trainer does resume, DDP (torchrun), EMA and bf16. Writes
``data/cvit/<variant>_s<seed>/{model,model_ema}.safetensors``, ``config.json``,
``train_log.csv``, ``pretrained.json``, the full record
``data/reports/cvit_train_<variant>_s<seed>.json`` and the headline figures
``data/metrics/cvit_train_<variant>_s<seed>.json`` (:data:`HEADLINE`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.data.imageset import ImageSet
from pipeline.latents.store import LatentStore
from pipeline.models.layers import count_params
from pipeline.orders.shards import CollapseOrders
from pipeline.tasks.cvit import (
    TRAIN_DROP, VARIANTS, CvitImageDataset, CvitTask, build_vit, orders_tokenizer_fingerprint,
    run_name, run_params, token_l1_orders,
)
from pipeline.train.stage import TrainingStage
from pipeline.utils.io import atomic_write_json

# Headline figures for `dvc metrics show`; the rest is in data/reports/cvit_train_<run>.json.
HEADLINE = ("loss", "acc", "train_steps", "wall_time_s", "items_per_s")


def run(params: Params, variant: str = "cvit", seed: int = 0,
        data_dir: Path | str = Path("data")) -> dict[str, Any]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown CViT variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    data_dir = Path(data_dir)
    params = run_params(params, seed)
    cfg = params.cvit
    name = run_name(variant, seed)
    with TrainingStage("train_cvit", data_dir, HEADLINE, name=name) as stage:
        images = ImageSet(data_dir / "images" / "train")
        orders = CollapseOrders(data_dir / "orders" / "train")
        # Bad input stops here, before any work: missing orders, another grid or image size.
        drop = TRAIN_DROP[variant]
        tables, inputs = None, {}
        if drop == "token_l1":  # PSS: the token-norm order of each image and of its flip
            store = LatentStore(data_dir / "latents" / "train.zarr", in_memory=None)
            tables = token_l1_orders(store, images.keys, flips=(False, True))
            inputs = {"latents": store.identity}
        dataset = CvitImageDataset(images, orders if drop == "collapse" else None,
                                   check_orders=orders, order_tables=tables)
        model, pre = build_vit(params, images.crop_size, orders.grid, len(images.classes),
                               data_dir / "pretrain_vit")
        task = CvitTask(model, variant, cfg.max_mask_ratio, orders_tokenizer_fingerprint(orders),
                        extra_config={"pretrained_sha256": pre.get("pretrained_sha256"),
                                      "start": pre["start"], "init_seed": params.seed,
                                      "frozen_stem": pre["frozen_stem"]})
        report = {"variant": variant, "seed": seed, "drop": TRAIN_DROP[variant],
                  "params": count_params(model), "grid": model.arch.grid,
                  "patch_size": model.arch.patch_size, "start": pre["start"]}
        final = stage.fit(task, dataset, cfg.train, report=report, desc=f"cvit[{name}]",
                          inputs={"images": images.identity, "orders": orders.identity,
                                  "start": pre.get("pretrained_sha256"), **inputs})
        if stage.is_main:
            atomic_write_json(stage.out.run / "pretrained.json", pre)
            stage.say(f"[cvit] {name}: loss {final.get('loss', float('nan')):.4f}, train acc "
                      f"{final.get('acc', float('nan')):.3f} after {final.get('train_steps')} steps "
                      f"({final.get('wall_time_s') or 0:.0f} s) -> {stage.out.run}")
    return stage.metrics


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("train-cvit")
