"""The export's second estimator (``orders.estimator: critic``): the matrix it fills is the
one the docs define, a row's matrix depends on nothing but the image, and the set it writes
names it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import OrdersConfig
from pipeline.models.critic import Critic, CriticArch
from pipeline.orders.estimators import CriticGraph, EstimatorError
from pipeline.orders.export import export_split
from pipeline.orders.shards import CollapseOrders
from tests.orders_data import CFG, COMAE_ID, make_store, set_bytes, tiny_comae

SHARES = [0.25, 0.5]


def _graph(seed: int = 0) -> CriticGraph:
    torch.manual_seed(seed)
    critic = Critic(CriticArch(num_tokens=16, token_dim=4, dim=16, depth=1, heads=2)).eval()
    return CriticGraph(critic, SHARES, seed=7)


@torch.no_grad()
def test_matrix_is_the_mean_nll_drop_over_the_images_own_reveal_sets():
    graph = _graph()
    x = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))
    A = graph.dependency_matrices(x, chunk=7)  # a chunk that splits the passes unevenly
    for m in range(2):
        R = graph._reveal_sets(x[m])
        assert R.sum(1).tolist() == [4, 8]  # round(share * N) per set
        ref = torch.zeros(16, 16)
        for r in R:
            base = graph.critic.nll(x[m:m + 1], r[None])[0]
            for j in range(16):
                if r[j]:
                    continue
                rj = r.clone()
                rj[j] = True
                drop = (base - graph.critic.nll(x[m:m + 1], rj[None])[0]).clamp_min(0)
                ref[:, j] += drop * (~rj).float()  # i hidden, i != j
        ref /= len(SHARES)
        # one batched pass vs 33 single passes of the same float32 network: a few ulps of
        # NLLs ~1-3 nats, differenced
        torch.testing.assert_close(A[m], ref, rtol=0, atol=2e-5)
    assert (A >= 0).all() and A.diagonal(dim1=1, dim2=2).eq(0).all()


@torch.no_grad()
def test_a_rows_matrix_does_not_depend_on_its_batch():
    graph = _graph()
    x = torch.randn(5, 16, 4, generator=torch.Generator().manual_seed(2))
    together = graph.dependency_matrices(x)
    alone = torch.cat([graph.dependency_matrices(x[i:i + 1]) for i in (0, 1, 2, 3, 4)])
    # the reveal sets are the image's own; the network's batched kernels may round differently
    torch.testing.assert_close(together, alone, rtol=0, atol=2e-5)
    assert not torch.equal(graph._reveal_sets(x[0]), graph._reveal_sets(x[1]))


def test_export_with_the_critic_names_it_and_resumes_nothing_of_comae(tmp_path: Path) -> None:
    store = make_store(tmp_path / "lat.zarr", n=6)
    graph = _graph()
    ident = {"variant": "builder", "sha256": "e" * 64, "shares": SHARES, "seed": 7}
    export_split(store, tiny_comae(store.grid, store.dim), COMAE_ID, CFG, tmp_path / "o", "val")
    res = export_split(store, graph, ident, CFG, tmp_path / "o", "val", estimator="critic")
    assert res.computed == res.shards == 2  # CoMAE's shards in the folder are not reused
    co = CollapseOrders(tmp_path / "o")
    assert co.manifest["identity"]["estimator"] == "critic"
    assert co.manifest["identity"]["critic"] == ident and "comae" not in co.manifest["identity"]
    x = store.tokens([3]).flatten(2).transpose(1, 2)
    A = graph.dependency_matrices(x)[0].numpy()
    assert np.allclose(co.matrix(3), A, atol=1e-3)  # float16 storage, values < 1
    again = tmp_path / "again"
    export_split(store, graph, ident, CFG, again, "val", estimator="critic")
    assert set_bytes(again) == set_bytes(tmp_path / "o")


def test_shares_outside_the_unit_interval_are_refused_and_a_misfit_store_named(tmp_path: Path):
    with pytest.raises(ValueError, match="critic_shares"):
        OrdersConfig(critic_shares=[0.5, 1.0])
    store = make_store(tmp_path / "lat.zarr", n=2, grid=2)
    with pytest.raises(EstimatorError, match="4 tokens of 4 channels.*16 of 4"):
        _graph().check_store(store)

