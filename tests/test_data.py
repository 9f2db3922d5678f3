"""Crop, synthetic set, prepared-shard format, reader, resume, torchrun split, CLI.

Tiny sizes throughout (3 classes x 4-5 images at 32 px). Source ingest (image folders with
bad inputs, webdataset tars) lives in test_data_sources.py.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.config import Params, parse_params
from pipeline.data import build
from pipeline.data.build import fingerprint, prepare_images
from pipeline.data.crop import center_crop_arr, center_crop_mask, to_model_input
from pipeline.data.imageset import FORMAT, ImageSet
from pipeline.data.synthetic import (MAX_CLASSES, SHAPES, TEXTURES, _frame, class_names, class_pair, render,
                                     shape_mask)
from pipeline.utils.dist import DistInfo


def tiny_params(**data) -> Params:
    raw = {"source": "synthetic", "crop_size": 32, "shard_size": 4,
           "synthetic": {"num_classes": 3, "train_per_class": 4, "val_per_class": 2, "image_size": 40}}
    raw.update(data)
    return parse_params({"seed": 0, "data": raw})


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- crop


def test_center_crop_box_halving_and_center_offset():
    # 16x8 image of constant 4x4 blocks: two BOX halvings give exactly the block values (4x2),
    # the BICUBIC step is the identity (short side already 2), the crop takes columns 1..2.
    blocks = np.array([[10, 20, 30, 40], [50, 60, 70, 80]], np.uint8)
    img = Image.fromarray(np.kron(blocks, np.ones((4, 4), np.uint8)), "L")
    out = center_crop_arr(img, 2)
    np.testing.assert_array_equal(out, [[20, 30], [60, 70]])


def test_center_crop_matches_the_recipe_step_by_step():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    # 300x200 -> crop 64: one halving (100 >= 128 is false after it) to 150x100, bicubic to
    # short side 64: (round(150 * 0.64), 64) = (96, 64), center crop offset x = (96 - 64) // 2.
    expect = np.asarray(img.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC))[:, 16:80]
    out = center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expect)


def test_center_crop_upsamples_small_images_and_mask_follows():
    img = Image.fromarray(np.full((3, 5), 77, np.uint8), "L")
    out = center_crop_arr(img, 6)  # bicubic up to 10x6, crop x offset 2
    assert out.shape == (6, 6) and (out == 77).all()
    mask = np.zeros((40, 60), bool)
    mask[:, 30:] = True  # right half
    m = center_crop_mask(mask, 20)  # 60x40 -> halve to 30x20 -> crop x 5..25: right half again
    assert m.shape == (20, 20) and m[:, 10:].all() and not m[:, :10].any()


def test_to_model_input_range_and_layout():
    a = np.zeros((2, 4, 5, 3), np.uint8)
    a[0, 1, 2] = (255, 0, 128)
    x = to_model_input(a)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    assert x[0, :, 1, 2].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=1e-6)
    assert x[1].min() == -1.0
    assert to_model_input([a[0], a[1]]).shape == (2, 3, 4, 5)
    assert to_model_input(a[0]).shape == (1, 3, 4, 5)
    with pytest.raises(TypeError):
        to_model_input(a.astype(np.float32))


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_classes_are_distinct_pairs():
    pairs = [class_pair(c) for c in range(MAX_CLASSES)]
    assert len(set(pairs)) == MAX_CLASSES == len(SHAPES) * len(TEXTURES)
    first = pairs[: len(SHAPES)]  # the default classes differ in shape AND texture
    assert len({s for s, _ in first}) == len({t for _, t in first}) == len(SHAPES)
    names = class_names(12)
    assert names == sorted(names) and len(set(names)) == 12


def test_synthetic_shapes_differ_in_the_same_pose():
    f = _frame(64, 32, 32, 24, 0.3, 1.0, 1.0)
    masks = {s: shape_mask(s, f) for s in SHAPES}
    for a in SHAPES:
        assert 0.02 < masks[a].mean() < 0.6, a
        for b in SHAPES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.8, (a, b, iou)


def test_synthetic_render_is_a_pure_function_of_its_arguments():
    order = [(c, j) for c in range(3) for j in range(3)]
    first = {k: render(*k, "train", 32, 7) for k in order}
    again = {k: render(*k, "train", 32, 7) for k in reversed(order)}
    for k in order:
        np.testing.assert_array_equal(first[k][0], again[k][0])
        np.testing.assert_array_equal(first[k][1], again[k][1])
    assert not np.array_equal(render(0, 0, "train", 32, 7)[0], render(0, 0, "val", 32, 7)[0])
    assert not np.array_equal(render(0, 0, "train", 32, 7)[0], render(0, 0, "train", 32, 8)[0])


def _edge_ratio(img: np.ndarray, mask: np.ndarray) -> float:
    """Mean colour gradient on the mask boundary / mean gradient over the image."""
    x = img.astype(np.float64)
    g = np.zeros(mask.shape)
    g[:, :-1] += np.abs(np.diff(x, axis=1)).sum(-1)
    g[:-1, :] += np.abs(np.diff(x, axis=0)).sum(-1)
    edge = np.zeros(mask.shape, bool)
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    return g[edge].mean() / g.mean()


def test_synthetic_masks_align_with_the_objects():
    # The clutter is as contrasted as the object (noise blobs in its colours), so the mask's
    # boundary is not much sharper than the image on average; it must beat a shifted mask.
    ratios, shifted = [], []
    for c in range(8):
        img, mask = render(c, 1, "train", 64, 0)
        assert 0.02 < mask.mean() < 0.5
        ratios.append(_edge_ratio(img, mask))
        shifted.append(_edge_ratio(img, np.roll(mask, 3, axis=1)))
        assert ratios[-1] > shifted[-1]
    assert np.mean(ratios) > 1.2 * np.mean(shifted), (ratios, shifted)


# ----------------------------------------------------------------------------- prepared set


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "images"
    import os

    os.environ["COP_NO_PROGRESS"] = "1"
    prepare_images(tiny_params(), out)
    return out


def test_prepared_set_layout_and_index(built: Path):
    ds = ImageSet(built / "train")
    assert len(ds) == 12 and ds.crop_size == 32 and ds.has_masks
    assert ds.classes == class_names(3)
    assert ds.keys == sorted(ds.keys) and ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    index = json.loads((built / "train" / "index.json").read_text())
    assert index["format"] == FORMAT and index["count"] == 12
    assert [s["count"] for s in index["shards"]] == [4, 4, 4]
    assert index["fingerprint"] == fingerprint(tiny_params())
    assert (built / "train" / "skipped.jsonl").read_text() == ""
    assert not (built / "train" / ".parts").exists()
    assert len(ImageSet(built / "val")) == 6


def test_random_access_equals_sequential_tar_content(built: Path):
    import webdataset as wds

    ds = ImageSet(built / "train")
    urls = [str(built / "train" / f"shard-{i:06d}.tar") for i in range(3)]
    seq = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in seq] == ds.keys
    for i in [5, 0, 11, 3, 7]:  # out of order
        s = seq[i]
        np.testing.assert_array_equal(ds.image(i), np.asarray(Image.open(io.BytesIO(s["png"]))))
        np.testing.assert_array_equal(ds.mask(i), np.asarray(Image.open(io.BytesIO(s["mask.png"]))) > 127)
        assert int(s["cls"]) == ds.labels[i]
        assert ds.index_of(s["__key__"]) == i
    img = ds.image(4)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and ds.mask(4).dtype == bool
    # the mask of a prepared (cropped) image still sits on the object's edges
    assert _edge_ratio(ds.image(4), ds.mask(4)) > 1.2
    with pytest.raises(KeyError, match="not in"):
        ds.index_of("nope")
    with pytest.raises(IndexError):
        ds.image(12)


def test_reader_is_picklable_and_checks_the_format(built: Path, tmp_path: Path):
    ds = ImageSet(built / "train")
    ds.image(0)  # opens a handle: it must not travel
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._files == {}
    np.testing.assert_array_equal(clone.image(9), ds.image(9))
    bad = tmp_path / "old"
    bad.mkdir()
    index = json.loads((built / "train" / "index.json").read_text())
    index["format"] = "cop-images/0"
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="cop-images/0"):
        ImageSet(bad)
    with pytest.raises(FileNotFoundError, match="cop prepare"):
        ImageSet(tmp_path / "missing")


def test_tar_headers_are_fixed(built: Path):
    with tarfile.open(built / "train" / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["00_star_stripes/train_000000.png",
                                             "00_star_stripes/train_000000.cls",
                                             "00_star_stripes/train_000000.mask.png"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


def test_same_params_give_identical_bytes_and_ranks_split_the_work(built: Path, tmp_path: Path, monkeypatch):
    again = tmp_path / "again"
    prepare_images(tiny_params(), again)
    assert tree_bytes(again) == tree_bytes(built)
    # torchrun emulation: two ranks as threads meeting at a shared barrier
    import threading
    from concurrent.futures import ThreadPoolExecutor

    gate = threading.Barrier(2, timeout=60)
    monkeypatch.setattr(build, "barrier", gate.wait)
    ranked = tmp_path / "ranked"
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(prepare_images, tiny_params(), ranked, DistInfo(rank=r, world=2)) for r in (0, 1)]
        metrics = [f.result() for f in futures]
    assert metrics[0] == metrics[1]
    assert tree_bytes(ranked) == tree_bytes(built)


def test_resume_after_a_kill_equals_an_uninterrupted_run(built: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "images"
    real = build.build_shard
    calls = []

    def dies_on_third(job, tick=None):
        calls.append(job.path.name)
        if len(calls) == 3:
            (job.path.parent / f".{job.path.name}.x1y2.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt("killed")
        return real(job, tick)

    monkeypatch.setattr(build, "build_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_images(tiny_params(), out)
    train = out / "train"
    assert not (train / "index.json").exists() and (train / ".shard-000002.tar.x1y2.tmp").exists()
    done = {p.name: p.stat().st_mtime_ns for p in train.glob("shard-*.tar")}
    assert sorted(done) == ["shard-000000.tar", "shard-000001.tar"]

    monkeypatch.setattr(build, "build_shard", real)
    resumed = []
    monkeypatch.setattr(build, "build_shard", lambda job, tick=None: resumed.append(job.path.name) or real(job, tick))
    prepare_images(tiny_params(), out)
    assert resumed == ["shard-000002.tar", "shard-000000.tar", "shard-000001.tar"]  # train resumes, val builds
    assert {p.name: p.stat().st_mtime_ns for p in train.glob("shard-*.tar") if p.name in done} == done
    assert tree_bytes(out) == tree_bytes(built)

    # a complete set is left alone; a different fingerprint clears and rebuilds
    resumed.clear()
    prepare_images(tiny_params(), out)
    assert resumed == []
    (out / "train" / "stray.txt").write_text("old")
    changed = tiny_params(crop_size=24)
    prepare_images(changed, out)
    assert not (out / "train" / "stray.txt").exists()
    assert ImageSet(out / "train").crop_size == 24
    assert (out / ".fingerprint").read_text().strip() == fingerprint(changed)


def test_cop_prepare_cli(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    raw = {"seed": 0, "data": {"source": "synthetic", "crop_size": 16, "synthetic": {
        "num_classes": 2, "train_per_class": 3, "val_per_class": 1, "image_size": 16}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["prepare", "--params", "params.yaml", "-S", "data.shard_size=2"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "data" / "reports" / "prepare.json").read_text())
    assert record["splits"]["train"]["count"] == 6 and record["splits"]["val"]["count"] == 2
    assert record["splits"]["train"]["shards"] == 3 and record["num_classes"] == 2
    assert record["splits"]["train"]["skipped_by_reason"] == {}
    # the declared metrics file holds the headline figures only, flat
    metrics = json.loads((tmp_path / "data" / "metrics" / "prepare.json").read_text())
    assert metrics == {"train_count": 6, "train_skipped": 0, "val_count": 2, "val_skipped": 0,
                       "num_classes": 2, "crop_size": 16}
    assert len(ImageSet(tmp_path / "data" / "images" / "val")) == 2


def test_worker_processes_write_the_same_bytes(built: Path, tmp_path: Path):
    out = tmp_path / "pooled"
    prepare_images(tiny_params(num_workers=2), out)  # spawn pool over the 3 + 2 shards
    assert tree_bytes(out) == tree_bytes(built)
