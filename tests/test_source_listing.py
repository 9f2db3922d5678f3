"""DVC sees the image source (issue 11): a folder or tar pattern whose files change reruns
``prepare``, through the ``list_source`` stage and prepare's own fingerprint."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import parse_params
from pipeline.data.build import prepare_images, summary
from pipeline.data.listing import source_listing
from tests.support import scratch_repo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("COP_NO_PROGRESS", "1")


def png(seed: int, size: int = 20) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root: Path, per_class: int = 2, val: bool = True) -> Path:
    for c in ("cat", "dog"):
        for i in range(per_class):
            for split in ("train", "val") if val else ("train",):
                p = root / split / c / f"{c}_{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(png(hash((c, i, split)) % 1000))
    return root


def folder_params(root: Path):
    return parse_params({"data": {"source": "imagefolder", "root": str(root), "crop_size": 16}})


def test_listing_sees_added_removed_changed_files(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs")
    cfg = folder_params(root).data
    first = source_listing(cfg)
    assert first["splits"]["train"]["files"] == 4 and source_listing(cfg) == first
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # not an input: ignored
    assert source_listing(cfg)["sha256"] == first["sha256"]
    new = root / "train" / "cat" / "cat_9.png"
    new.write_bytes(png(9))
    added = source_listing(cfg)
    assert added["splits"]["train"]["files"] == 5 and added["sha256"] != first["sha256"]
    new.write_bytes(png(10, size=21))  # same name, other bytes
    assert source_listing(cfg)["sha256"] != added["sha256"]
    new.unlink()
    assert source_listing(cfg)["sha256"] == first["sha256"]  # back to the same files
    shutil.rmtree(root / "val")
    assert source_listing(cfg)["splits"]["val"] is None
    assert source_listing(parse_params({}).data)["source"] == "synthetic"


def test_listing_of_tar_patterns(tmp_path: Path) -> None:
    for i in range(3):
        with tarfile.open(tmp_path / f"s-{i}.tar", "w") as tar:
            data = png(i)
            info = tarfile.TarInfo(f"k{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    def listing(pattern: str) -> dict:
        return source_listing(parse_params(
            {"data": {"source": "webdataset", "train_urls": pattern}}).data)

    two = listing(str(tmp_path / "s-{0..1}.tar"))
    three = listing(str(tmp_path / "s-{0..2}.tar"))
    assert two["splits"]["train"]["files"] == 2 and two["sha256"] != three["sha256"]
    assert listing((tmp_path / "s-{0..1}.tar").as_uri().replace("%7B", "{").replace("%7D", "}")
                   )["splits"]["train"]["bytes"] == two["splits"]["train"]["bytes"]
    os.utime(tmp_path / "s-1.tar", ns=(1, 1))  # a shard rewritten in place
    assert listing(str(tmp_path / "s-{0..1}.tar"))["sha256"] != two["sha256"]
    remote = listing("https://example.org/s-{0..1}.tar")["splits"]["train"]
    assert remote["remote"] == 2 and remote["files"] == 2


def test_prepare_rebuilds_when_the_folder_changed(tmp_path: Path, capsys) -> None:
    root = image_folder(tmp_path / "imgs")
    params = folder_params(root)
    out = tmp_path / "images"
    m = prepare_images(params, out)
    assert m["splits"]["train"]["count"] == 4
    (root / "train" / "dog" / "dog_7.png").write_bytes(png(77))
    (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    m = prepare_images(params, out)  # same params: a complete split is no longer trusted
    assert m["splits"]["train"]["count"] == 5
    text = summary(m)
    assert "prepare train: 5 images" in text and "1 skipped (1 not_an_image)" in text, text
    assert "prepare val: 4 images in 1 shards, 0 skipped" in text


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_reruns_prepare_when_an_image_is_added(tmp_path: Path) -> None:
    """The user's path: `dvc repro`, add a photo to data.root, `dvc repro` again."""
    photos = image_folder(tmp_path / "photos")
    repo = scratch_repo(tmp_path / "repo")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] = {"source": "imagefolder", "root": str(photos), "crop_size": 16}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "COP_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    env.pop("PYTHONPATH", None)
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "t"], repo, env)
    dvc = [sys.executable, "-m", "dvc"]

    def count() -> int:
        return json.loads((repo / "data/images/train/index.json").read_text())["count"]

    out = _run(dvc + ["repro", "prepare"], repo, env)
    assert count() == 4 and "prepare train: 4 images" in out, out
    out = _run(dvc + ["repro", "prepare"], repo, env)
    assert "Stage 'prepare' didn't change" in out, out  # listed again, nothing changed
    (photos / "train" / "cat" / "cat_new.png").write_bytes(png(123))
    out = _run(dvc + ["repro", "prepare"], repo, env)
    assert "Running stage 'prepare'" in out and count() == 5, out
    assert "Stage 'prepare' didn't change" in _run(dvc + ["repro", "prepare"], repo, env)
