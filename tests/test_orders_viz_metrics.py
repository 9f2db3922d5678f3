"""Objectness metrics (hand-checked and brute-force) and the Fig. 4/5 PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.metrics.objectness import compare, patch_labels, roc_auc
from pipeline.orders.export import export_split
from pipeline.orders.shards import CollapseOrders
from pipeline.orders.viz import fig4, show_orders
from tests.orders_data import CFG, COMAE_ID, make_store, tiny_comae


def test_patch_labels_half_rule() -> None:
    m = np.zeros((8, 8), bool)
    m[0:4, 0:4] = True  # patch 0 of a 2x2 grid: all object
    m[4:6, 4:8] = True  # patch 3: exactly half -> object
    m[0:1, 4:8] = True  # patch 1: a quarter -> background
    assert patch_labels(m, 2).tolist() == [True, False, False, True]
    assert patch_labels(np.ones((10, 10), bool), 4).all()  # not a multiple: resized


def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 40).astype(float)  # many ties
    y = rng.random(40) < 0.4
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
    assert roc_auc(s, y) == pytest.approx(brute)
    assert roc_auc(s, np.ones(40, bool)) is None


def test_top_share_and_aggregate() -> None:
    lab = np.array([[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]], bool)
    scores = np.array([[9.0, 7, 6, 10, 5, 4, 3, 2, 1, 0]])  # order 3, 0, 1, 2, 4, ...
    row = compare({"s": scores}, lab)["s"]
    assert row["top10"] == 1.0 and row["top25"] == pytest.approx(2 / 3) and row["top50"] == 0.4
    assert row["auc"] == 1.0


def test_pngs(tmp_path: Path) -> None:
    store = make_store(tmp_path / "lat.zarr", n=9)
    export_split(store, tiny_comae(store.grid, store.dim), COMAE_ID, CFG,
                 tmp_path / "o", "train", class_orders=True)
    co = CollapseOrders(tmp_path / "o")
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    p = fig4(img, co.order(0), co.grid, tmp_path / "f4.png")
    paths = show_orders(co, None, out=tmp_path / "plots")
    assert [x.name for x in paths] == ["fig5_classes.png"]
    for q in (p, *paths):
        with Image.open(q) as im:
            assert im.format == "PNG" and min(im.size) > 100


def _raw_folder_for(keys: list[str], root: Path) -> Path:
    """Raw photos named like the set's keys (c0/img_0000 -> root/c0/img_0000.png), 48x40 px."""
    rng = np.random.default_rng(1)
    for k in keys:
        (root / k).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(root / f"{k}.png")
    return root


def test_show_defaults_outside_dvc_outputs_split_from_manifest_raw_folder(tmp_path: Path, monkeypatch) -> None:
    """`cop orders show` (issue 11): default output outside data/, the manifest's split picks
    data/images/<split>, a raw folder works too, and an 8x8 grid gets a 16-patch path."""
    import matplotlib.axes
    from typer.testing import CliRunner

    from stages.cli import app
    from pipeline.config import DataConfig
    from pipeline.data.build import prepare_source
    from pipeline.orders.viz import path_length

    monkeypatch.setenv("COP_NO_PROGRESS", "1")
    monkeypatch.chdir(tmp_path)
    store = make_store(tmp_path / "lat.zarr", n=4, grid=8, dim=4)
    torch_model = tiny_comae(store.grid, store.dim)
    export_split(store, torch_model, COMAE_ID, CFG, tmp_path / "data/orders/val", "val")
    raw = _raw_folder_for(store.keys, tmp_path / "photos")
    prepare_source(raw, tmp_path / "data/images/val", DataConfig(crop_size=64), split="val")
    lines: list[int] = []
    real_plot = matplotlib.axes.Axes.plot

    def plot(self, x, *a, **k):
        lines.append(len(x))
        return real_plot(self, x, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    r = CliRunner().invoke(app, ["orders", "show", "--orders", "data/orders/val", "--count", "2"])
    assert r.exit_code == 0, r.output
    written = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "orders-pictures").rglob("*.png"))
    assert written == ["orders-pictures/val/fig4_c0_img_0000.png", "orders-pictures/val/fig4_c2_img_0002.png",
                       "orders-pictures/val/fig5_classes.png"], written
    assert not (tmp_path / "data/plots").exists()
    assert lines == [16, 16] and path_length(256) == 64  # a quarter of the grid, as the paper's 64/256
    # a raw image folder, cropped as the latents were (crop size from the manifest)
    paths = show_orders(tmp_path / "data/orders/val", raw, keys=[store.keys[1]], out=tmp_path / "raw", top=5)
    assert [p.name for p in paths] == [f"fig4_{store.keys[1].replace('/', '_')}.png", "fig5_classes.png"]
    assert lines[-1] == 5
    with pytest.raises(KeyError, match="no image for key"):
        show_orders(tmp_path / "data/orders/val", tmp_path / "data/orders", keys=[store.keys[0]], out=tmp_path / "x")
