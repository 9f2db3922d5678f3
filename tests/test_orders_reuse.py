"""Reusing a published collapse-order set, as the README says: the maker pushes it with DVC (or
publishes a folder), a user imports it into another repository and opens it with
``CollapseOrders``, which refuses it against latents of another tokenizer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.orders.export import export_split
from pipeline.orders.fetch import fetch_orders, publish_orders
from pipeline.orders.shards import CollapseOrders, ShardError
from tests.orders_data import CFG, COMAE_ID, TOKENIZER, make_store, set_bytes, tiny_comae


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture()
def made(tmp_path: Path) -> Path:
    store = make_store(tmp_path / "lat.zarr", n=9)
    export_split(store, tiny_comae(store.grid, store.dim), COMAE_ID, CFG, tmp_path / "made", "train",
                 class_orders=True)
    return tmp_path / "made"


def test_dvc_push_then_import_elsewhere(made: Path, tmp_path: Path):
    dvc = [sys.executable, "-m", "dvc"]
    maker, user, remote = tmp_path / "maker", tmp_path / "user", tmp_path / "remote"
    for repo in (maker, user):
        repo.mkdir()
        _run(["git", "init", "-q"], repo)
        _run(dvc + ["init", "-q"], repo)
    # The maker: the set is a tracked output (export_orders' data/orders), pushed to a remote.
    shutil.copytree(made, maker / "data" / "orders" / "train")
    _run(dvc + ["add", "data/orders"], maker)
    _run(dvc + ["remote", "add", "-d", "published", str(remote)], maker)
    _run(dvc + ["push", "data/orders"], maker)
    _run(["git", "add", "-A"], maker)
    _run(["git", "commit", "-qm", "orders"], maker)
    shutil.rmtree(maker / ".dvc" / "cache")  # what the user gets comes from the remote

    # The user: import one split into their own repository (this one has data/), then open it.
    (user / "data").mkdir()
    _run(dvc + ["import", str(maker), "data/orders/train", "-o", "data/orders-imagenet"], user)
    got = user / "data" / "orders-imagenet"
    assert set_bytes(got) == set_bytes(made)
    orders = CollapseOrders(got, expected_identity=TOKENIZER)
    assert len(orders) == 9 and orders.class_orders is not None
    assert (user / "data" / "orders-imagenet.dvc").exists()  # `dvc update` can follow the maker
    other = {**TOKENIZER, "kind": "kl16", "sha256": "b" * 64}
    with pytest.raises(ShardError, match="tokenizer"):
        CollapseOrders(got, expected_identity=other)
    CollapseOrders(got, expected_identity=other, allow_mismatch=True)  # told otherwise: opens


def test_publish_a_folder_that_fetch_accepts(made: Path, tmp_path: Path):
    logs: list[str] = []
    out = publish_orders(made, tmp_path / "www" / "orders", log=logs.append)
    assert set_bytes(out) == set_bytes(made) and "manifest.json" in logs[-1]
    assert set_bytes(fetch_orders((out / "manifest.json").as_uri(), tmp_path / "fetched")) == set_bytes(made)
    with pytest.raises(FileNotFoundError, match="manifest"):
        publish_orders(tmp_path / "www", tmp_path / "again")
