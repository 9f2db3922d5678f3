"""``load_trained``: the one reader of a finished run, for every model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.train.checkpoint import CheckpointError, load_trained


def build(task: dict) -> nn.Module:
    return nn.Sequential(nn.Linear(task["width"], 2), nn.LayerNorm(2))


def finished_run(path: Path, state: dict, task: dict | None = None) -> Path:
    path.mkdir(parents=True)
    task = task or {"kind": "toy", "width": 3}
    (path / "config.json").write_text(json.dumps({"task": task, "inputs": {"latents": {"fingerprint": "abc"}}}))
    save_file(state, str(path / "model.safetensors"))
    return path


def test_load_trained_rebuilds_from_the_stored_arch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = build({"width": 3})
    model, run = load_trained(finished_run(tmp_path / "ok", ref.state_dict()), build, kind="toy")
    assert not model.training and all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert run.inputs == {"latents": {"fingerprint": "abc"}} and len(run.sha256()) == 64


@pytest.mark.parametrize("change, said", [
    ("drop", r"missing \['0.bias'\]"),
    ("extra", r"unexpected \['extra'\]"),
    ("shape", r"wrong shapes \['0.weight \(2, 4\) != \(2, 3\)'\]"),
    ("nan", r"NaN/inf weights in \['1.weight'\]"),
    ("kind", "does not hold a toy model .*'judge'"),
])
def test_load_trained_refuses_what_does_not_fit(tmp_path: Path, change: str, said: str) -> None:
    state = {k: v.clone() for k, v in build({"width": 3}).state_dict().items()}
    task = None
    if change == "drop":
        del state["0.bias"]
    elif change == "extra":
        state["extra"] = torch.zeros(1)
    elif change == "shape":
        state["0.weight"] = torch.zeros(2, 4)
    elif change == "nan":
        state["1.weight"][0] = float("nan")
    else:
        task = {"kind": "judge", "width": 3}
    with pytest.raises(CheckpointError, match=said):
        load_trained(finished_run(tmp_path / change, state, task), build, kind="toy")
