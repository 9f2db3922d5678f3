"""Stage ``pretrain_mar``: MAR trained in random order, as the published MAR is -> ``data/pretrain_mar/``.

It learns from the pretrain pool's latents (``data/latents/pretrain.zarr``; ``train.zarr``
when there is none), with no collapse orders, for ``cmar.pretrain.steps``. Every
``train_cmar`` variant (CMAR, the MAR baseline, CMAR ascending) fine-tunes from these
weights for the same number of steps, as the paper fine-tunes MAR-B into CMAR. With
``cmar.model.pretrained`` (MAR-B's checkpoint, full profile) the published weights play this part
and this stage trains nothing; it records that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.paths import outputs
from pipeline.data.imageset import pretrain_split
from pipeline.latents.store import LatentStore, TokenGridDataset
from pipeline.tasks.cmar import CmarDataset, CmarTask, build_cmar
from pipeline.train.stage import TrainingStage
from pipeline.utils.io import atomic_write_json, atomic_write_text

HEADLINE = ("loss", "train_steps", "wall_time_s", "items_per_s", "train_images")


def run(params: Params, data_dir: Path | str = Path("data")) -> dict[str, Any]:
    data_dir = Path(data_dir)
    # random orders only: the order keys of train_cmar play no part (nor enter the stored config)
    cfg = params.cmar.model_copy(update={"order": "random", "direction": "descending",
                                         "random_order_share": 1.0})
    out = outputs("pretrain_mar", data_dir)
    out_dir = out.run
    if cfg.model.pretrained:
        # nothing to train, but every declared output is written (dvc repro stops otherwise)
        record = {"published": str(cfg.model.pretrained), "train_steps": 0}
        atomic_write_json(out_dir / "published.json", record)
        atomic_write_json(out.report, record)
        atomic_write_json(out.metrics, record)
        for curve in (out.curve, out.curve_epochs):
            atomic_write_text(curve, "step,loss\n")  # no training, no curve
        print(f"[pretrain_mar] cmar.model.pretrained is set: the CMAR variants start from {cfg.model.pretrained}")
        return record
    with TrainingStage("pretrain_mar", data_dir, HEADLINE) as stage:
        store = LatentStore(pretrain_split(data_dir / "latents", ".zarr"), in_memory=None)
        model, _ = build_cmar(cfg, store, seed=params.seed)
        task = CmarTask(model, cfg, store.scale_factor, extra_config={"stage": "pretrain_mar"})
        dataset = CmarDataset(TokenGridDataset(store), with_moments=cfg.model.posterior_sample)
        final = stage.fit(task, dataset, cfg.pretrain, inputs={"latents": store.identity},
                          report={"train_images": len(store)}, desc="pretrain_mar")
        stage.say(f"[pretrain_mar] loss {final.get('loss', float('nan')):.4f} after "
                  f"{final.get('train_steps')} steps on {len(store)} latents -> {out_dir}")
    return stage.metrics


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("pretrain-mar")
