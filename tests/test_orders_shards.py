"""The shard set as untrusted input: hashes, permutations, dtypes, pickle, member names, identity."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.orders.dataset import OrderedTokenDataset
from pipeline.orders.export import export_split
from pipeline.orders.shards import (
    CollapseOrders,
    OrderSample,
    ShardError,
    order_dtype,
    shard_bytes,
)
from pipeline.utils.io import sha256_bytes
from tests.orders_data import CFG, COMAE_ID, make_store, tiny_comae
from tests.support import tar_bytes


@pytest.fixture()
def exported(tmp_path: Path) -> tuple[Path, object]:
    store = make_store(tmp_path / "lat.zarr", n=6)
    model = tiny_comae(store.grid, store.dim)
    export_split(store, model, COMAE_ID, CFG, tmp_path / "orders", "train", class_orders=True)
    return tmp_path / "orders", store


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _rewrite(out: Path, name: str, members: list[tuple[str, bytes]]) -> None:
    """Replace a shard and *re-sign* it in the manifest, as a malicious publisher could."""
    data = tar_bytes(members)
    (out / name).write_bytes(data)
    m = json.loads((out / "manifest.json").read_text())
    for s in m["shards"]:
        if s["name"] == name:
            s["sha256"], s["bytes"] = sha256_bytes(data), len(data)
    (out / "manifest.json").write_text(json.dumps(m))


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    b = io.BytesIO()
    np.save(b, arr, allow_pickle=allow_pickle)
    return b.getvalue()


def test_order_dtype_and_deterministic_tar() -> None:
    assert order_dtype(64) == np.uint8 and order_dtype(256) == np.uint8
    assert order_dtype(257) == np.uint16 and order_dtype(1024) == np.uint16
    s = [OrderSample("a/b", {"order": np.arange(4, dtype=np.uint8), "scores": np.ones(4, np.float32)})]
    assert shard_bytes(s) == shard_bytes(s)
    with tarfile.open(fileobj=io.BytesIO(shard_bytes(s))) as tar:
        m = tar.getmembers()
    assert [x.name for x in m] == ["a/b.order.npy", "a/b.scores.npy"]
    assert all(x.mtime == 0 and x.uid == 0 and x.uname == "" for x in m)


def test_tampered_shard_named(exported) -> None:
    out, _ = exported
    raw = bytearray((out / "orders-000001.tar").read_bytes())
    raw[700] ^= 0xFF
    (out / "orders-000001.tar").write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="orders-000001.tar"):
        CollapseOrders(out)


def test_bad_permutation_refused(exported) -> None:
    out, _ = exported
    members = _members(out / "orders-000000.tar")
    name, data = next((n, d) for n, d in members if n.endswith(".order.npy"))
    bad = np.load(io.BytesIO(data)).copy()
    bad[1] = bad[0]  # a duplicate index: not a permutation
    _rewrite(out, "orders-000000.tar", [(n, _npy(bad) if n == name else d) for n, d in members])
    co = CollapseOrders(out)  # the hash matches the re-signed manifest...
    with pytest.raises(ShardError, match="not a permutation"):
        co.order(0)  # ...but the content check still refuses it


def test_wrong_dtype_refused(exported) -> None:
    out, _ = exported
    members = _members(out / "orders-000000.tar")
    swap = [(n, _npy(np.load(io.BytesIO(d)).astype(np.int64)) if n.endswith(".order.npy") else d)
            for n, d in members]
    _rewrite(out, "orders-000000.tar", swap)
    with pytest.raises(ShardError, match="uint8"):
        CollapseOrders(out).order(1)


def test_pickle_refused(exported) -> None:
    out, _ = exported
    members = _members(out / "orders-000000.tar")
    evil = _npy(np.array([{"x": 1}], dtype=object), allow_pickle=True)
    swap = [(n, evil if n.endswith(".scores.npy") else d) for n, d in members]
    _rewrite(out, "orders-000000.tar", swap)
    with pytest.raises(ShardError, match="plain .npy"):
        CollapseOrders(out).scores(0)


def test_member_names_never_paths(exported, tmp_path: Path) -> None:
    out, _ = exported
    members = _members(out / "orders-000000.tar")
    _rewrite(out, "orders-000000.tar", members + [("../../escape.order.npy", members[0][1])])
    with pytest.raises(ShardError, match="unexpected member"):
        CollapseOrders(out).order(0)
    assert not (tmp_path.parent / "escape.order.npy").exists()


def test_identity_mismatch_refused_unless_override(exported, tmp_path: Path) -> None:
    out, store = exported
    co = CollapseOrders(out)
    co.check_compatible(store)
    other = make_store(tmp_path / "other.zarr", n=6, tokenizer={"kind": "kl16", "sha256": "b" * 64})
    with pytest.raises(ShardError, match="re-export orders") as err:
        co.check_compatible(other)
    assert "kl16" in str(err.value) and "allow_mismatch=True" in str(err.value)
    with pytest.raises(ShardError):
        OrderedTokenDataset(other, co)
    co.check_compatible(other, allow_mismatch=True)
    assert len(OrderedTokenDataset(other, co, allow_mismatch=True)) == 6
    with pytest.raises(ShardError):
        CollapseOrders(out, expected_identity=other.identity["tokenizer"])
    CollapseOrders(out, expected_identity=other.identity["tokenizer"], allow_mismatch=True)
    small = make_store(tmp_path / "g2.zarr", n=2, grid=2)
    with pytest.raises(ShardError, match="grid"):
        co.check_compatible(small, allow_mismatch=True)


def test_unfinished_set_refused(exported) -> None:
    out, _ = exported
    (out / "manifest.json").unlink()
    with pytest.raises(ShardError, match="unfinished"):
        CollapseOrders(out)
