"""`cop orders compute IMAGES --out DIR`: orders for a folder or tar pattern of your own images
with a trained CoMAE and the saved tokenizer, no DVC graph, no val split (issue 11)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from stages.cli import app
from pipeline.config import ComaeConfig, OrdersConfig
from pipeline.data.imageset import ImageSet
from pipeline.models.comae import CoMAE
from pipeline.tasks.comae import comae_arch, stored_config
from pipeline.tasks.orders import ComputeError, compute_orders
from pipeline.orders.pagerank import collapse_order, pagerank_torch
from pipeline.orders.shards import CollapseOrders
from pipeline.tokenizers import PatchTokenizer, load_tokenizer

GRID, PATCH, DIM = 4, 8, 6
CFG = OrdersConfig(images_per_batch=4, samples_per_shard=4, precision="fp32")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("COP_NO_PROGRESS", "1")


def photo(seed: int, h: int = 45, w: int = 60) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def trained(tmp_path: Path) -> dict[str, Path]:
    """What a finished `dvc repro` leaves: data/latents/tokenizer and data/comae."""
    rng = np.random.default_rng(0)
    tok = PatchTokenizer(PATCH, DIM).fit(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    tok.save(tmp_path / "data/latents/tokenizer")
    torch.manual_seed(0)
    cfg = ComaeConfig(enc_dim=16, enc_depth=1, enc_heads=2, dec_dim=16, dec_depth=1, dec_heads=2,
                      head_layers=1)
    model = CoMAE(comae_arch(cfg, GRID, DIM))
    (tmp_path / "data/comae").mkdir(parents=True)
    (tmp_path / "data/comae/config.json").write_text(json.dumps({"task": stored_config(cfg, GRID, DIM)}))
    save_file(model.state_dict(), str(tmp_path / "data/comae/model.safetensors"))
    return {"comae": tmp_path / "data/comae", "tokenizer": tmp_path / "data/latents/tokenizer"}


def my_photos(root: Path) -> Path:
    """A user's folder: a few photos loose, a few in an album, one broken file; no val."""
    for i in range(3):
        (root / f"IMG_{i:04d}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (root / f"IMG_{i:04d}.jpg").write_bytes(photo(i))
    (root / "holiday").mkdir()
    for i in range(3, 5):
        (root / "holiday" / f"beach.{i}.jpg").write_bytes(photo(i, 80, 50))
    (root / "holiday" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return root


def test_compute_folder_then_resume(tmp_path: Path, trained: dict[str, Path]) -> None:
    photos = my_photos(tmp_path / "photos")
    out = tmp_path / "my-orders"
    lines: list[str] = []
    res = compute_orders(photos, out, comae=trained["comae"], tokenizer=trained["tokenizer"],
                         training_latents=None, orders_cfg=CFG, log=lines.append)
    assert res.images == 5 and res.skipped == {"not_an_image": 1}, (res, lines)
    co = CollapseOrders(out)  # the same shard format and manifest as export_orders
    assert len(co) == 5 and co.grid == GRID and co.manifest["split"] == "images"
    assert co.manifest["classes"] == ["holiday", "(unfiled)"]
    assert co.keys == sorted(co.keys) and "holiday/beach_3" in co.keys
    assert co.class_orders is not None
    # the order is the PageRank of the CoMAE's matrix on the tokens of the cropped image
    imgs = ImageSet(out / ".compute/images")
    assert imgs.crop_size == GRID * PATCH
    tok = load_tokenizer(trained["tokenizer"])
    x = torch.from_numpy(imgs.image(0).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    z = tok.encode_moments(x)[:, :DIM] * tok.scale_factor
    from pipeline.tasks.comae import load_comae

    model, _ = load_comae(trained["comae"])
    A = model.dependency_matrices(z.flatten(2).transpose(1, 2))
    assert np.array_equal(co.order(0), collapse_order(pagerank_torch(A, tol=CFG.tol))[0].numpy())
    text = "\n".join(lines)
    assert "prepared 5 images (32 px center crops)" in text and "skipped 1: 1 not_an_image" in text
    listed = out / ".compute/images/skipped.jsonl"  # the log says where each skip is explained
    assert f"(each file and why: {listed})" in text
    skip = json.loads(listed.read_text())
    assert skip["source"].endswith("broken.jpg") and "BytesIO" not in skip["detail"], skip
    assert skip["detail"] == "no image format recognised in 13 bytes starting b'\\xff\\xd8 not r'"
    assert "orders of 5 images in 2 shards" in text and "images/s" in text
    # a rerun reuses everything; a new photo redoes the work for the new set
    before = (out / "orders-000000.tar").read_bytes()
    again = compute_orders(photos, out, comae=trained["comae"], tokenizer=trained["tokenizer"],
                           training_latents=None, orders_cfg=CFG)
    assert again.export.computed == 0 and (out / "orders-000000.tar").read_bytes() == before
    (photos / "IMG_0009.jpg").write_bytes(photo(9))
    assert compute_orders(photos, out, comae=trained["comae"], tokenizer=trained["tokenizer"],
                          training_latents=None, orders_cfg=CFG).images == 6
    assert len(CollapseOrders(out)) == 6


def test_compute_tar_pattern_without_labels(tmp_path: Path, trained: dict[str, Path]) -> None:
    for s in range(2):
        with tarfile.open(tmp_path / f"part-{s}.tar", "w") as tar:
            for i in range(2):
                data = photo(10 * s + i)
                info = tarfile.TarInfo(f"s{s}_{i}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "o"
    res = compute_orders(str(tmp_path / "part-{0..1}.tar"), out, comae=trained["comae"],
                         tokenizer=trained["tokenizer"], training_latents=None, orders_cfg=CFG)
    assert res.images == 4 and CollapseOrders(out).keys == ["s0_0", "s0_1", "s1_0", "s1_1"]


def test_cli_and_tokenizer_check(tmp_path: Path, trained: dict[str, Path], monkeypatch) -> None:
    photos = my_photos(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)  # data/comae and data/latents/tokenizer are the defaults
    r = CliRunner().invoke(app, ["orders", "compute", str(photos), "--out", "mine"])
    assert r.exit_code == 0, r.output
    assert "orders of 5 images" in r.output and "cop orders show --orders mine" in r.output
    assert len(CollapseOrders(tmp_path / "mine")) == 5
    # the CoMAE's training latents say another tokenizer: refused, naming both
    from tests.orders_data import make_store

    make_store(tmp_path / "data/latents/train.zarr", n=2, grid=GRID, dim=DIM)
    with pytest.raises(ComputeError, match="not the one of .*train.zarr"):
        compute_orders(photos, tmp_path / "x", comae=trained["comae"], tokenizer=trained["tokenizer"])


def test_missing_source_is_named(tmp_path: Path, capsys, monkeypatch) -> None:
    """A path that is not there is a typo to fix, not a 'bad shard' to skip."""
    from stages.cli import main

    monkeypatch.delenv("COP_DEBUG", raising=False)  # another test's --debug sets it

    for source, said in [(tmp_path / "nope", f"{tmp_path / 'nope'} does not exist: give a folder"),
                         (tmp_path / "part-{0..2}.tar", "none of the 3 tars of")]:
        with pytest.raises(SystemExit) as exit_:
            main(["orders", "compute", str(source), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and said in err and "(hint: check the path" in err, err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()  # nothing written
