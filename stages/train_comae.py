"""Stage ``train_comae``: train the Collapse Masked Autoencoder on ``data/latents/train.zarr``.

The shared trainer does resume, DDP (``torchrun -m stages.train_comae``), EMA and bf16; the
CoMAE task alternates f and g step by step. Writes ``data/comae/{model,model_ema}.safetensors``
+ ``config.json`` (read by :func:`pipeline.models.comae.load_comae`), the per-window curves
``data/plots/comae_train.csv`` (step, L_r, L_c, H_mask, tau, lr, items_per_s, ...) and
``..._epochs.csv``, the headline figures in ``data/metrics/comae.json`` and the full record in
``data/reports/comae.json``. After training, the held-out diagnostics of
:mod:`pipeline.metrics.selection` (does the selection know the image?) run on the val split
and the histogram of w goes to ``data/plots/comae_w_hist.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import numpy as np

from pipeline.config import Params, params_dict
from pipeline.latents.store import LatentStore, TokenGridDataset
from pipeline.metrics.selection import format_selection, selection_report
from pipeline.models.comae import CoMAE, load_comae
from pipeline.models.comae_task import ComaeTask
from pipeline.models.layers import count_params
from pipeline.train.trainer import Trainer
from pipeline.utils.dist import cleanup, init_distributed
from pipeline.utils.io import atomic_write_json, write_csv

# Headline figures for `dvc metrics show`; everything else goes to data/reports/comae.json.
HEADLINE = ("L_r", "L_c", "H_mask", "tau", "train_steps", "wall_time_s")
VAL_HEADLINE = ("L_r_own", "L_r_mean_w", "L_r_clean", "w_gain", "w_gain_ci", "L_r_linear8",
                "H_mask_per_entry", "w_mid_share")


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
        task = ComaeTask(model, cfg)
        trainer = Trainer(task, TokenGridDataset(store), cfg.train, data_dir / "comae",
                          log_csv=data_dir / "plots" / "comae_train.csv", desc="comae",
                          on_config_mismatch="restart")
        final = trainer.fit()
        if not info.is_main:
            return final
        trained, _ = load_comae(data_dir / "comae")  # the weights export_orders will read
        val_path = data_dir / "latents" / "val.zarr"
        figures: dict[str, Any] = {}
        if val_path.exists():
            val = LatentStore(val_path, in_memory=True)
            figures, hist = selection_report(trained, store.tokens(np.arange(len(store))),
                                             val.tokens(np.arange(len(val))), seed=params.seed)
            write_csv(data_dir / "plots" / "comae_w_hist.csv", hist)
        metrics = {k: final.get(k) for k in HEADLINE}
        metrics.update({f"val_{k}": figures[k] for k in VAL_HEADLINE if k in figures})
        atomic_write_json(data_dir / "metrics" / "comae.json", metrics)
        atomic_write_json(data_dir / "reports" / "comae.json", {
            "params": params_dict(cfg), "model_params": count_params(model), "grid": store.grid,
            "token_dim": store.dim, "train": final, "val": figures})
        print(f"[comae] L_r {final.get('L_r', float('nan')):.4f}  L_c "
              f"{final.get('L_c', float('nan')):.4f}  H_mask {final.get('H_mask', float('nan')):.3f}"
              f"  tau {final.get('tau', float('nan')):.4f} after {final.get('train_steps')} steps "
              f"({final.get('wall_time_s', 0):.0f} s, {final.get('items_per_s', 0):.0f} "
              f"reconstructions/s) -> {data_dir / 'comae'}", flush=True)
        if figures:
            print(format_selection(figures), flush=True)
        return metrics
    finally:
        cleanup()


if __name__ == "__main__":
    from pipeline.cli import stage_entry

    stage_entry("train-comae")
