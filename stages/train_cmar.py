"""Stage ``train_cmar`` (foreach cmar, mar, cmar_asc): fine-tune MAR -> ``data/cmar/<variant>/``.

Variants (:data:`pipeline.tasks.cmar.CMAR_VARIANTS`), each from the same ``pretrain_mar``
weights for the same ``cmar.train.steps``: ``cmar`` in collapse order (``cmar.order`` /
``cmar.direction``: descending, the paper's CMAR), ``mar`` in random order (the baseline),
``cmar_asc`` in ascending collapse order (Tab. 4).

Inputs: the train latents (``data/latents/train.zarr``) joined with their collapse orders
(``data/orders/train``, the flipped orders included). The model starts from ``pretrain_mar``
(``data/pretrain_mar``), or with ``cmar.model.pretrained`` from MAR's ``checkpoint-last.pth``
(``cmar.model.pretrained_key``, default the EMA weights MAR evaluates). The shared trainer
does resume, DDP (torchrun), EMA and bf16. Outputs (:data:`pipeline.paths.OUTS`):
``data/cmar/<variant>/`` ({model,model_ema}.safetensors, ``config.json`` that
:func:`pipeline.tasks.cmar.load_cmar` rebuilds the model from, ``pretrained.json``,
``train_log.csv``), the full record ``data/reports/cmar_train_<variant>.json`` and the headline
figures ``data/metrics/cmar_train_<variant>.json`` (:data:`HEADLINE`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.latents.store import LatentStore
from pipeline.orders.dataset import OrderedTokenDataset
from pipeline.orders.shards import CollapseOrders
from pipeline.tasks.cmar import CmarDataset, CmarTask, build_cmar, variant_config
from pipeline.train.stage import TrainingStage
from pipeline.utils.io import atomic_write_json

# Headline figures for `dvc metrics show`; the rest is in data/reports/cmar_train_<variant>.json.
HEADLINE = ("loss", "train_steps", "wall_time_s", "items_per_s")


def run(params: Params, variant: str = "cmar", data_dir: Path | str = Path("data")) -> dict[str, Any]:
    data_dir = Path(data_dir)
    cfg = variant_config(params.cmar, variant)
    with TrainingStage("train_cmar", data_dir, HEADLINE, variant=variant) as stage:
        store = LatentStore(data_dir / "latents" / "train.zarr", in_memory=None)
        orders = CollapseOrders(data_dir / "orders" / "train")
        # Bad input, before any work: orders for another grid (or tokenizer) than the latents.
        ordered = OrderedTokenDataset(store, orders)
        model, pre = build_cmar(cfg, store, init=None if cfg.model.pretrained else data_dir / "pretrain_mar",
                                seed=params.seed)
        if orders.grid != model.grid:
            raise ValueError(f"orders are for a {orders.grid}x{orders.grid} grid, the model has "
                             f"{model.grid}x{model.grid}")
        task = CmarTask(model, cfg, store.scale_factor,
                        extra_config={"pretrained_sha256": pre.get("pretrained_sha256")})
        final = stage.fit(task, CmarDataset(ordered, with_moments=cfg.model.posterior_sample),
                          cfg.train, inputs={"latents": store.identity, "orders": orders.identity},
                          desc=f"cmar[{variant}]")
        if stage.is_main:
            atomic_write_json(stage.out.run / "pretrained.json", pre)
            stage.say(f"[cmar] {variant}: loss {final.get('loss', float('nan')):.4f} after "
                      f"{final.get('train_steps')} steps -> {stage.out.run}")
    return stage.metrics


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("train-cmar")
