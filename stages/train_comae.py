"""Stage ``train_comae``: train the Collapse Masked Autoencoder on ``data/latents/train.zarr``.

The shared trainer does resume, DDP (``torchrun -m stages.train_comae``), EMA and bf16; the
CoMAE task alternates f and g step by step. Writes ``data/comae/{model,model_ema}.safetensors``
+ ``config.json`` (read by :func:`pipeline.tasks.comae.load_comae`), the per-window curves
``data/plots/comae_train.csv`` (step, L_r, L_c, H_mask, tau, lr, items_per_s, ...) and
``..._epochs.csv``, and the final values in ``data/metrics/comae.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import Params
from pipeline.latents.store import LatentStore, TokenGridDataset
from pipeline.models.comae import CoMAE
from pipeline.tasks.comae import ComaeTask
from pipeline.models.layers import count_params
from pipeline.train.trainer import Trainer
from pipeline.utils.dist import cleanup, init_distributed


def run(params: Params, data_dir: Path | str = Path("data")) -> dict[str, Any]:
    data_dir = Path(data_dir)
    cfg = params.comae
    info = init_distributed()
    try:
        store = LatentStore(data_dir / "latents" / "train.zarr", in_memory=True)
        # The grid and token dim come from the store; a model is built for them (nothing
        # assumes 16x16x16), and the task re-checks every batch against the model.
        torch.manual_seed(params.seed)  # initial weights are a function of the seed
        model = CoMAE(cfg, store.grid, store.dim)
        model.check_store(store)
        task = ComaeTask(model, cfg, extra_config={"init_seed": params.seed})
        report = {"lambda": cfg.lambda_, "sigma": cfg.sigma,
                  "targets_per_image": cfg.targets_per_image, "params": count_params(model),
                  "grid": store.grid, "token_dim": store.dim}
        trainer = Trainer(task, TokenGridDataset(store), cfg.train, data_dir / "comae",
                          inputs={"latents": store.identity},
                          log_csv=data_dir / "plots" / "comae_train.csv",
                          metrics_json=data_dir / "metrics" / "comae.json", report=report,
                          desc="comae")
        final = trainer.fit()
        metrics = {**report, **final}
        if info.is_main:
            print(f"[comae] L_r {final.get('L_r', float('nan')):.4f}  L_c "
                  f"{final.get('L_c', float('nan')):.4f}  H_mask {final.get('H_mask', float('nan')):.3f}"
                  f"  tau {final.get('tau', float('nan')):.4f} after {final.get('train_steps')} steps "
                  f"({final.get('wall_time_s', 0):.0f} s, {final.get('items_per_s', 0):.0f} "
                  f"reconstructions/s) -> {data_dir / 'comae'}", flush=True)
        return metrics
    finally:
        cleanup()


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("train-comae")
