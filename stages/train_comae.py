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

from pipeline.config import Params
from pipeline.paths import outputs
from pipeline.latents.store import LatentStore, TokenGridDataset, spaced_rows
from pipeline.metrics.selection import format_selection, selection_report
from pipeline.models.layers import count_params
from pipeline.tasks.comae import build_comae, load_comae
from pipeline.train.stage import TrainingStage
from pipeline.utils.device import pick_device
from pipeline.utils.io import write_csv

# Headline figures for `dvc metrics show`; the rest is in data/reports/comae.json.
HEADLINE = ("L_r", "L_c", "H_mask", "tau", "train_steps", "wall_time_s",
            "val_L_r_own", "val_L_r_mean_w", "val_L_r_clean", "val_w_gain", "val_w_gain_ci",
            "val_L_r_linear8", "val_H_mask_per_entry", "val_w_mid_share")


def run(params: Params, data_dir: Path | str = Path("data")) -> dict[str, Any]:
    data_dir = Path(data_dir)
    cfg = params.comae
    with TrainingStage("train_comae", data_dir, HEADLINE) as stage:
        store = LatentStore(data_dir / "latents" / "train.zarr", in_memory=None)
        # The grid and token dim come from the store; a model is built for them (nothing
        # assumes 16x16x16), and the task re-checks every batch against the model.
        task = build_comae(cfg, store, params.seed)
        report = {"lambda": cfg.lambda_, "sigma": cfg.sigma,
                  "targets_per_image": cfg.targets_per_image, "params": count_params(task.model),
                  "grid": store.grid, "token_dim": store.dim}
        final = stage.fit(task, TokenGridDataset(store), cfg.train, report=report,
                          inputs={"latents": store.identity}, desc="comae")
        if stage.is_main:
            print(f"[comae] L_r {final.get('L_r', float('nan')):.4f}  L_c "
                  f"{final.get('L_c', float('nan')):.4f}  H_mask {final.get('H_mask', float('nan')):.3f}"
                  f"  tau {final.get('tau', float('nan')):.4f} after {final.get('train_steps')} steps "
                  f"({final.get('wall_time_s') or 0:.0f} s, {final.get('items_per_s', 0):.0f} "
                  f"reconstructions/s) -> {stage.out.run}", flush=True)
            stage.record(val=_val_diagnostics(data_dir, store, params.seed, cfg.report_images))
    return stage.metrics


def _val_diagnostics(data_dir: Path, train: LatentStore, seed: int, cap: int) -> dict[str, Any]:
    """Selection diagnostics of the weights export_orders will read, on at most ``cap``
    evenly spaced val images (the linear reference fitted on as many train images), on the
    training device."""
    val_path = data_dir / "latents" / "val.zarr"
    if not val_path.exists():
        return {}
    out = outputs("train_comae", data_dir)
    trained, _ = load_comae(out.run)
    trained.to(pick_device())
    val = LatentStore(val_path)
    figures, hist = selection_report(trained, train.tokens(spaced_rows(len(train), cap)),
                                     val.tokens(spaced_rows(len(val), cap)), seed=seed)
    figures["images"] = min(len(val), cap)
    write_csv(out.w_hist, hist)
    print(format_selection(figures), flush=True)
    return figures


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("train-comae")
