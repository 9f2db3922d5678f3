"""The batched export: contents, flips, top-k metric, resume, fingerprint, 1 vs 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.orders import export as export_mod
from pipeline.orders.export import export_split
from pipeline.orders.pagerank import collapse_order, flip_permutation, pagerank_torch
from pipeline.orders.dataset import OrderedTokenDataset
from pipeline.orders.shards import CollapseOrders
from tests.orders_data import CFG, COMAE_ID, make_store, set_bytes, tiny_comae


def test_export_round_trip(tmp_path: Path) -> None:
    store = make_store(tmp_path / "lat.zarr", n=10)
    model = tiny_comae(store.grid, store.dim)
    res = export_split(store, model, COMAE_ID, CFG, tmp_path / "orders", "train", class_orders=True)
    assert (res.shards, res.computed) == (3, 3)
    co = CollapseOrders(tmp_path / "orders")
    assert len(co) == 10 and co.grid == 4 and co.num_tokens == 16 and co.keys == store.keys
    assert co.manifest["order_dtype"] == "uint8"
    # recompute image 5 independently, one image at a time, fp32
    tok = store.tokens([5]).flatten(2).transpose(1, 2)
    with torch.no_grad():
        A = model.dependency_matrices(tok)
    ref = collapse_order(pagerank_torch(A, tol=CFG.tol))[0].numpy()
    assert np.array_equal(co.order(5), ref) and np.array_equal(co.order(store.keys[5]), ref)
    assert co.scores(5).dtype == np.float32 and co.matrix(5).dtype == np.float16
    # matrices are stored in float16: 11-bit mantissa, 4.9e-4 at values up to 1
    assert np.allclose(co.matrix(5), A[0].numpy(), atol=1e-3)
    assert co.orders_for(store.keys[:3], flip=True).shape == (3, 16)
    # class orders: mean scores of the class's images
    lab = store.labels
    mean0 = np.mean([co.scores(i) for i in range(10) if lab[i] == 0], axis=0)
    assert np.allclose(co.class_scores[0], mean0, atol=1e-6)
    assert np.array_equal(co.class_orders[0], collapse_order(co.class_scores[0]))
    ds = OrderedTokenDataset(store, co)
    item = ds[4]
    assert torch.equal(item["tokens"], store.tokens([4])[0])
    assert torch.equal(item["order_flip"], torch.from_numpy(co.order(4, flip=True)))
    assert item["order"].dtype == torch.int64 and item["label"] == lab[4] and item["index"] == 4
    # flips computed from flipped latents; metric compares them with the mapped order
    assert res.stats["flip_tau_computed_vs_mapped"]["n"] == 10
    assert res.stats["topk_tau_vs_dense"] is None


def test_flip_map_and_topk_metric(tmp_path: Path) -> None:
    store = make_store(tmp_path / "lat.zarr", n=6)
    model = tiny_comae(store.grid, store.dim)
    cfg = CFG.model_copy(update={"flip": "map", "topk": 3, "save_matrix": False})
    res = export_split(store, model, COMAE_ID, cfg, tmp_path / "o", "val")
    co = CollapseOrders(tmp_path / "o")
    f = flip_permutation(4)
    assert np.array_equal(co.order(2, flip=True), f[co.order(2)])
    assert "matrix" not in co.fields and co.class_orders is None
    # "map" still measures the agreement on the first batch of each shard (3 + 2 images)
    assert res.stats["flip_tau_computed_vs_mapped"]["n"] == 5
    assert -1.0 <= res.stats["topk_tau_vs_dense"]["mean"] <= 1.0
    assert res.stats["topk_tau_vs_dense"]["n"] == 6


def test_resume_after_kill_and_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store(tmp_path / "lat.zarr", n=10)
    model = tiny_comae(store.grid, store.dim)
    export_split(store, model, COMAE_ID, CFG, tmp_path / "clean", "train", class_orders=True)

    real = export_mod.export_unit
    calls = []

    def dying(store, model, cfg, unit, out, *a):
        if len(calls) == 1:
            raise KeyboardInterrupt("killed")  # the second shard never gets written
        calls.append(unit)
        return real(store, model, cfg, unit, out, *a)

    monkeypatch.setattr(export_mod, "export_unit", dying)
    with pytest.raises(KeyboardInterrupt):
        export_split(store, model, COMAE_ID, CFG, tmp_path / "o", "train", class_orders=True)
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert sorted(p.name for p in (tmp_path / "o").glob("orders-*")) == ["orders-000000.tar"]
    monkeypatch.setattr(export_mod, "export_unit", real)
    res = export_split(store, model, COMAE_ID, CFG, tmp_path / "o", "train", class_orders=True)
    assert res.computed == 2  # resumed at the first missing shard
    assert set_bytes(tmp_path / "o") == set_bytes(tmp_path / "clean")
    # nothing to do when everything is there
    assert export_split(store, model, COMAE_ID, CFG, tmp_path / "o", "train", class_orders=True).computed == 0
    # a different CoMAE: the old shards are not reused
    res = export_split(store, model, {"sha256": "d" * 64}, CFG, tmp_path / "o", "train")
    assert res.computed == 3
    assert CollapseOrders(tmp_path / "o").manifest["identity"]["comae"] == {"sha256": "d" * 64}


WORKER = r"""
import os, sys, torch
sys.path.insert(0, os.getcwd())
from pipeline.utils.dist import init_distributed, cleanup
from pipeline.latents.store import LatentStore
from pipeline.orders.export import export_split
from tests.orders_data import CFG, COMAE_ID, tiny_comae
info = init_distributed("gloo")
store = LatentStore(sys.argv[1])
model = tiny_comae(store.grid, store.dim)
r = export_split(store, model, COMAE_ID, CFG, sys.argv[2], "train", class_orders=True, info=info)
print("computed", info.rank, r.computed)
cleanup()
"""


@pytest.mark.slow
def test_one_vs_two_processes_byte_identical(tmp_path: Path) -> None:
    store = make_store(tmp_path / "lat.zarr", n=14)
    model = tiny_comae(store.grid, store.dim)
    export_split(store, model, COMAE_ID, CFG, tmp_path / "one", "train", class_orders=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29500 + os.getpid() % 2000), "COP_NO_PROGRESS": "1"}
    cwd = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "lat.zarr"), str(tmp_path / "two")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "computed 0 2" in outs[0] and "computed 1 2" in outs[1]  # disjoint shards: 0,2 / 1,3
    assert set_bytes(tmp_path / "two") == set_bytes(tmp_path / "one")


def test_scipy_backend_gives_same_orders(tmp_path: Path) -> None:
    store = make_store(tmp_path / "lat.zarr", n=4)
    model = tiny_comae(store.grid, store.dim)
    cfg = CFG.model_copy(update={"save_matrix": False, "samples_per_shard": 8})
    export_split(store, model, COMAE_ID, cfg, tmp_path / "t", "val")
    export_split(store, model, COMAE_ID, cfg.model_copy(update={"backend": "scipy"}), tmp_path / "s", "val")
    a, b = CollapseOrders(tmp_path / "t"), CollapseOrders(tmp_path / "s")
    for i in range(4):
        assert np.array_equal(a.order(i), b.order(i))
        assert np.allclose(a.scores(i), b.scores(i), rtol=0, atol=1e-9)
