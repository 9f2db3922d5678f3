"""Objectness metrics (hand-checked and brute-force) and the Fig. 4/5 PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.metrics.objectness import objectness, patch_labels, roc_auc, top_share
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
    lab = np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 0], bool)
    order = np.array([3, 0, 1, 2, 4, 5, 6, 7, 8, 9])
    assert top_share(order, lab) == {"0.1": 1.0, "0.25": pytest.approx(2 / 3), "0.5": 0.4}
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # grid 2: patch 0 is object
    rep = objectness([(np.array([0, 1, 2, 3]), np.array([4.0, 3, 2, 1]), mask)], grid=2)
    assert rep["area_share"] == 0.25 and rep["auc_mean"] == 1.0 and rep["lift"]["0.25"] == 4.0


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
