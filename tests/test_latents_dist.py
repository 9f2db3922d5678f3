"""The extract_latents stage, 1 process in-process vs 2 processes under torchrun (gloo):
identical tokenizer, identical store bytes, a report and metrics; a rerun resumes everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import load_params
from pipeline.latents.store import LatentStore
from stages.extract_latents import fit_indices, run
from test_latents import make_imageset, shard_bytes
from tests.support import free_port

REPO = Path(__file__).resolve().parents[1]
PARAMS = {
    "tokenizer": {"kind": "patch", "patch_size": 8, "dim": 16, "fit_images": 8, "batch_size": 3,
                  "precision": "fp32", "channels_last": False},
    "latents": {"rows_per_chunk": 2, "rows_per_shard": 4, "compression_level": 3},
}


def _workdir(root: Path) -> Path:
    make_imageset(root / "data" / "images" / "train", n=12, seed=0, split="train")
    make_imageset(root / "data" / "images" / "val", n=5, seed=1, split="val")  # 2 units, 1 partial
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return root


@pytest.mark.slow
def test_one_and_two_processes_give_identical_stores(tmp_path):
    one, two = _workdir(tmp_path / "one"), _workdir(tmp_path / "two")
    run(load_params(one / "params.yaml"), data_dir=one / "data")

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(torch.get_num_threads()), "COP_NO_PROGRESS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "stages.extract_latents", "--params", "params.yaml"]
    proc = subprocess.run(cmd, cwd=two, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]

    for split in ("train", "val"):
        a, b = one / "data" / "latents" / f"{split}.zarr", two / "data" / "latents" / f"{split}.zarr"
        assert shard_bytes(a) == shard_bytes(b), split
        assert LatentStore(a).identity == LatentStore(b).identity
    tok_a, tok_b = (d / "data" / "latents" / "tokenizer" / "model.safetensors" for d in (one, two))
    assert tok_a.read_bytes() == tok_b.read_bytes()

    report = json.loads((two / "data" / "latents" / "report.json").read_text())
    assert report["world"] == 2
    assert report["splits"]["train"]["rows_encoded"] == 12
    assert report["splits"]["val"]["rows"] == 5 and report["splits"]["val"]["units"] == 2
    assert report["skipped_inputs"]["train"]["count"] == 0
    metrics = json.loads((two / "data" / "metrics" / "extract_latents.json").read_text())
    assert (metrics["train_images"], metrics["val_images"], metrics["grid"], metrics["dim"]) \
        == (12, 5, 4, 16)

    # A rerun of the finished stage encodes nothing and changes no byte.
    before = shard_bytes(one / "data" / "latents" / "train.zarr")
    run(load_params(one / "params.yaml"), data_dir=one / "data")
    metrics = json.loads((one / "data" / "metrics" / "extract_latents.json").read_text())
    assert metrics["images_encoded"] == 0 and metrics["units_resumed"] == 5
    assert shard_bytes(one / "data" / "latents" / "train.zarr") == before


def test_fit_indices_cover_the_classes():
    assert fit_indices(10, 4) == [0, 3, 6, 9]
    assert fit_indices(3, 8) == [0, 1, 2]
    assert fit_indices(0, 8) == []
