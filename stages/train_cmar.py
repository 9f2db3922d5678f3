"""Stage ``train_cmar``: (fine-)train MAR in collapse order -> ``data/cmar/``.

Inputs: the train latents (``data/latents/train.zarr``) joined with their collapse orders
(``data/orders/train``, the flipped orders included). With ``cmar.pretrained`` (MAR's
``checkpoint-last.pth``) the model starts from that checkpoint (``cmar.pretrained_key``,
default the EMA weights MAR evaluates) and fine-tunes; otherwise it trains from scratch at
the configured (small, by default) size. The shared trainer does resume, DDP (torchrun),
EMA and bf16. Writes ``data/cmar/{model,model_ema}.safetensors``, ``config.json``,
``mar.json`` (the architecture the eval stage rebuilds), ``data/metrics/cmar_train.json`` and
``data/plots/cmar_train.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import CmarConfig, Params, params_dict
from pipeline.latents.store import LatentStore
from pipeline.tasks.cmar import CmarDataset, CmarTask, train_config
from pipeline.models.mar import MAR, build_mar, load_mar_checkpoint
from pipeline.orders.shards import CollapseOrders, OrderedTokenDataset
from pipeline.train.trainer import Trainer
from pipeline.utils.dist import cleanup, init_distributed
from pipeline.utils.io import atomic_write_json, sha256_file

ARCH_FILE = "mar.json"


def mar_arch(cfg: CmarConfig, grid: int, token_dim: int, num_classes: int) -> dict[str, Any]:
    """What :func:`pipeline.models.mar.build_mar` needs, stored beside the weights."""
    return {"grid": grid, "token_dim": token_dim, "num_classes": num_classes,
            "cmar": train_config(cfg)}


def build_model(cfg: CmarConfig, store: LatentStore) -> tuple[MAR, dict[str, Any]]:
    """The model for this store; a MAR checkpoint, if given, is loaded before any training.

    MAR's released models embed 1000 classes whatever the data set; a pretrained checkpoint
    keeps its class count so its ``class_emb`` loads (labels must still be < 1000).
    """
    info: dict[str, Any] = {"pretrained": None}
    num_classes = len(store.classes)
    if cfg.pretrained:
        from pipeline.models.mar import read_mar_checkpoint

        state = read_mar_checkpoint(cfg.pretrained, cfg.pretrained_key)
        if "class_emb.weight" in state:
            num_classes = int(state["class_emb.weight"].shape[0])
        if len(store.classes) > num_classes:
            raise ValueError(f"the data has {len(store.classes)} classes, the MAR checkpoint "
                             f"embeds {num_classes}")
    model = build_mar(cfg, store.grid, store.dim, num_classes)
    if cfg.pretrained:
        missing = load_mar_checkpoint(model, cfg.pretrained, cfg.pretrained_key, cfg.allow_missing_keys)
        info = {"pretrained": str(cfg.pretrained), "pretrained_sha256": sha256_file(cfg.pretrained),
                "pretrained_key": cfg.pretrained_key, "missing_keys": missing}
    return model, info


def run(params: Params, data_dir: Path | str = Path("data")) -> None:
    data_dir = Path(data_dir)
    cfg = params.cmar
    info = init_distributed()
    try:
        store = LatentStore(data_dir / "latents" / "train.zarr", in_memory=True)
        orders = CollapseOrders(data_dir / "orders" / "train")
        # Bad input, before any work: orders for another grid (or tokenizer) than the latents.
        ordered = OrderedTokenDataset(store, orders)
        if cfg.sample_order == "class" and orders.class_orders is None:
            raise ValueError(f"{orders.path} has no class-level orders; eval needs them for "
                             "cmar.sample_order=class")
        model, pre = build_model(cfg, store)
        if orders.grid != model.grid:
            raise ValueError(f"orders are for a {orders.grid}x{orders.grid} grid, the model has "
                             f"{model.grid}x{model.grid}")
        arch = mar_arch(cfg, store.grid, store.dim, model.num_classes)
        task = CmarTask(model, cfg, store.scale_factor,
                        extra_config={"pretrained_sha256": pre.get("pretrained_sha256"),
                                      "latents": store.identity, "orders": orders.manifest.get("identity")})
        dataset = CmarDataset(ordered, with_moments=cfg.posterior_sample)
        out_dir = data_dir / "cmar"
        trainer = Trainer(task, dataset, cfg.train, out_dir,
                          log_csv=data_dir / "plots" / "cmar_train.csv",
                          metrics_json=data_dir / "metrics" / "cmar_train.json", desc="cmar",
                          on_config_mismatch="restart")
        final = trainer.fit()
        if info.is_main:
            atomic_write_json(out_dir / ARCH_FILE, {**arch, "pretrained": pre,
                                                    "train": params_dict(cfg.train)})
            print(f"[cmar] loss {final.get('loss', float('nan')):.4f} after {final.get('train_steps')} steps "
                  f"-> {out_dir}", flush=True)
    finally:
        cleanup()


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("train-cmar")
