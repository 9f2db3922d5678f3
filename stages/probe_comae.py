"""Stage ``probe_comae``: can this CoMAE configuration find known dependencies?

Trains a CoMAE with the configured architecture and losses on the train latents turned into
copy-mechanism grids (:mod:`pipeline.metrics.mechanism`: half of each grid copies the other
half, shifted or mirrored, the mechanism differing between images), for ``comae_probe.steps``
steps, then scores its val dependency rows by precision@1 against the true sources. Writes
``data/comae_probe/`` (the probe model) and ``data/metrics/comae_probe.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.paths import outputs
from pipeline.latents.store import LatentStore, TokenGridDataset, spaced_rows
from pipeline.metrics.mechanism import MechanismDataset, precision_at_1
from pipeline.tasks.comae import build_comae, load_comae
from pipeline.train.trainer import Trainer
from pipeline.utils.device import pick_device
from pipeline.utils.dist import cleanup, init_distributed
from pipeline.utils.io import atomic_write_json


def run(params: Params, data_dir: Path | str = Path("data")) -> dict[str, Any]:
    data_dir = Path(data_dir)
    cfg = params.comae
    out = outputs("probe_comae", data_dir)
    info = init_distributed()
    try:
        store = LatentStore(data_dir / "latents" / "train.zarr", in_memory=None)
        train_cfg = cfg.train.model_copy(update={"steps": params.comae_probe.steps})
        cfg = cfg.model_copy(update={"train": train_cfg})  # schedules follow the probe's length
        task = build_comae(cfg, store, params.seed, probe="copy-mechanism")
        trainer = Trainer(task, MechanismDataset(TokenGridDataset(store)), cfg.train,
                          out.run, inputs={"latents": store.identity},
                          desc="comae probe")
        final = trainer.fit()
        if not info.is_main:
            return final
        probe, _ = load_comae(out.run)
        # held-out val grids when the split exists (the DVC route without val scores train)
        split = "val" if (data_dir / "latents" / "val.zarr").exists() else "train"
        grids = LatentStore(data_dir / "latents" / f"{split}.zarr")
        probe.to(pick_device())
        scores = precision_at_1(probe, grids.tokens(spaced_rows(len(grids), params.comae_probe.images)))
        # names of their own: `dvc exp show` prefixes a key two metrics files share with the
        # file's path, and train_comae's L_r is the one an experiment table shows
        metrics = {**scores, "probe_L_r": final.get("L_r"), "probe_steps": final.get("train_steps"),
                   "probe_wall_time_s": final.get("wall_time_s")}
        atomic_write_json(out.metrics, metrics)
        print(f"[comae probe] copy-mechanism precision@1 on {split} {scores['precision_at_1']:.3f} "
              f"(chance {scores['chance']:.3f}; a position prior scores <= 0.5) after "
              f"{final.get('train_steps')} steps", flush=True)
        return metrics
    finally:
        cleanup()


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("probe-comae")
