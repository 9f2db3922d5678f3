"""Stage ``train_comae``: train the Collapse Masked Autoencoder on ``data/latents/train.zarr``.

The shared trainer does resume, DDP (``torchrun -m stages.train_comae``), EMA and bf16; the
CoMAE task alternates f and g step by step. Writes ``data/comae/{model,model_ema}.safetensors``
+ ``config.json`` (read by :func:`pipeline.tasks.comae.load_comae`), the per-window curves
``data/plots/comae_train.csv`` (step, L_r, L_c, H_mask, tau, lr, items_per_s, ...) and
``data/plots/comae_train_epochs.csv``, the full record in ``data/reports/comae.json`` and the headline figures in
``data/metrics/comae.json``. After training, the held-out diagnostics of
:mod:`pipeline.metrics.selection` (does the selection know the image?) run on the val split
and the histogram of w goes to ``data/plots/comae_w_hist.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Params
from pipeline.paths import outputs
from pipeline.latents.store import LatentStore, TokenGridDataset
from pipeline.metrics.selection import format_selection, selection_report
from pipeline.models.layers import count_params
from pipeline.tasks.comae import build_comae, load_comae
from pipeline.train.trainer import Trainer
from pipeline.utils.dist import cleanup, init_distributed
from pipeline.utils.io import atomic_write_json, read_json, write_csv

# Headline figures for `dvc metrics show`; the rest is in data/reports/comae.json.
HEADLINE = ("L_r", "L_c", "H_mask", "tau", "train_steps", "wall_time_s")
VAL_HEADLINE = ("L_r_own", "L_r_mean_w", "L_r_clean", "w_gain", "w_gain_ci", "L_r_linear8",
                "H_mask_per_entry", "w_mid_share")


def run(params: Params, data_dir: Path | str = Path("data")) -> dict[str, Any]:
    data_dir = Path(data_dir)
    out = outputs("train_comae", data_dir)
    cfg = params.comae
    info = init_distributed()
    try:
        store = LatentStore(data_dir / "latents" / "train.zarr", in_memory=True)
        # The grid and token dim come from the store; a model is built for them (nothing
        # assumes 16x16x16), and the task re-checks every batch against the model.
        task = build_comae(cfg, store, params.seed)
        model = task.model
        report = {"lambda": cfg.lambda_, "sigma": cfg.sigma,
                  "targets_per_image": cfg.targets_per_image, "params": count_params(model),
                  "grid": store.grid, "token_dim": store.dim}
        record = out.report
        trainer = Trainer(task, TokenGridDataset(store), cfg.train, out.run,
                          inputs={"latents": store.identity}, log_csv=out.curve,
                          metrics_json=record, report=report, desc="comae")
        final = trainer.fit()
        if not info.is_main:
            return final
        print(f"[comae] L_r {final.get('L_r', float('nan')):.4f}  L_c "
              f"{final.get('L_c', float('nan')):.4f}  H_mask {final.get('H_mask', float('nan')):.3f}"
              f"  tau {final.get('tau', float('nan')):.4f} after {final.get('train_steps')} steps "
              f"({final.get('wall_time_s', 0):.0f} s, {final.get('items_per_s', 0):.0f} "
              f"reconstructions/s) -> {out.run}", flush=True)
        figures = _val_diagnostics(data_dir, store, params.seed)
        atomic_write_json(record, {**read_json(record), "val": figures})
        metrics = {k: final.get(k) for k in HEADLINE}
        metrics.update({f"val_{k}": figures[k] for k in VAL_HEADLINE if k in figures})
        atomic_write_json(out.metrics, metrics)
        return metrics
    finally:
        cleanup()


def _val_diagnostics(data_dir: Path, train: LatentStore, seed: int) -> dict[str, Any]:
    """Selection diagnostics of the weights export_orders will read, on the val split."""
    val_path = data_dir / "latents" / "val.zarr"
    if not val_path.exists():
        return {}
    out = outputs("train_comae", data_dir)
    trained, _ = load_comae(out.run)
    val = LatentStore(val_path, in_memory=True)
    figures, hist = selection_report(trained, train.tokens(np.arange(len(train))),
                                     val.tokens(np.arange(len(val))), seed=seed)
    write_csv(out.w_hist, hist)
    print(format_selection(figures), flush=True)
    return figures


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("train-comae")
