"""Every trainer starts over when what it trains on changed (issue: switching the data and
running ``dvc repro`` resumed a finished checkpoint and trained 0 steps).

DVC keeps a ``persist: true`` output when it re-runs a stage, so the old checkpoints are still
there: each stage records the identity of its inputs (latent store; image set and orders) and
the trainer must not resume a run made from other inputs.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

from pipeline.config import parse_params
from pipeline.data.imageset import ImageSet
from tests.cvit_data import make_data_dir, make_pretrain_inputs, make_store

TRAIN = {"steps": 2, "batch_size": 4, "ckpt_every": 2, "log_every": 1, "precision": "fp32"}
PARAMS = parse_params({
    "comae": {"enc_dim": 16, "enc_depth": 1, "enc_heads": 2, "dec_dim": 16, "dec_depth": 1,
              "dec_heads": 2, "head_layers": 1, "targets_per_image": 4, "train": TRAIN},
    "cvit": {"model": {"dim": 16, "depth": 1, "heads": 2}, "train": TRAIN,
             "pretrain": {"eval_every": 1, "train": TRAIN}},
    "cmar": {"model": {"enc_dim": 16, "enc_depth": 1, "enc_heads": 2, "dec_dim": 16, "dec_depth": 1,
                       "dec_heads": 2, "buffer_size": 2, "diffloss_d": 1, "diffloss_w": 16},
             "train": {**TRAIN, "ema": 0.9}, "pretrain": TRAIN},
})
STAGES = [("train_comae", "comae", {}), ("pretrain_vit", "pretrain_vit", {}),
          ("train_cvit", "cvit/cvit_s0", {"variant": "cvit", "seed": 0}),
          ("pretrain_mar", "pretrain_mar", {}), ("train_cmar", "cmar/cmar", {"variant": "cmar"})]
# fine-tuning starts from each folder's own pretrained model
PRETRAIN = {"train_cvit": "pretrain_vit", "train_cmar": "pretrain_mar"}


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Two data folders of the same shape whose images differ (another generation seed)."""
    dirs = []
    for seed in (0, 1):
        data = make_data_dir(tmp_path_factory.mktemp(f"seed{seed}"), seed=seed)
        make_store(data / "latents" / "train.zarr", ImageSet(data / "images" / "train"), grid=4)
        make_pretrain_inputs(data)  # the judge pretrain_vit distils from
        dirs.append(data)
    return dirs[0], dirs[1]


def _steps_this_run(out: Path) -> int:
    return json.loads((out / "config.json").read_text())["final"]["steps_this_run"]


@pytest.mark.parametrize("stage, out, kw", STAGES, ids=[s[0] for s in STAGES])
def test_trainer_starts_over_when_its_inputs_change(data_dirs, stage, out, kw, capsys) -> None:
    old, new = data_dirs
    if stage in PRETRAIN:
        for d in data_dirs:
            importlib.import_module(f"stages.{PRETRAIN[stage]}").run(PARAMS, data_dir=d)
    run = importlib.import_module(f"stages.{stage}").run
    run(PARAMS, data_dir=old, **kw)
    assert _steps_this_run(old / out) == 2
    run(PARAMS, data_dir=old, **kw)  # nothing changed: the finished run is reused
    assert _steps_this_run(old / out) == 0
    saved = json.loads((old / out / "config.json").read_text())["inputs"]
    assert saved and all(v for v in saved.values())  # the identities it was trained on

    shutil.copytree(old / out, new / out)  # what DVC leaves in place when the data changed
    capsys.readouterr()
    run(PARAMS, data_dir=new, **kw)
    assert _steps_this_run(new / out) == 2
    said = [ln for ln in capsys.readouterr().out.splitlines() if "starting over" in ln]
    assert len(said) == 1 and "other inputs (inputs." in said[0], said
