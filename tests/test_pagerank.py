"""PageRank: torch (batched) and scipy implementations against networkx, and order rules."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.orders.pagerank import (
    PageRankNotConverged,
    collapse_order,
    flip_permutation,
    kendall_tau,
    pagerank_scipy,
    pagerank_torch,
    ranks_of,
    sparsify_topk,
)

TOL = 1e-13  # tight, so the comparison measures the implementations, not the stopping rule


def nx_pagerank(A: np.ndarray, damping=0.85, teleport=None, dangling=None) -> np.ndarray:
    N = A.shape[0]
    G = nx.DiGraph()
    G.add_nodes_from(range(N))
    G.add_weighted_edges_from((int(i), int(j), float(A[i, j])) for i, j in zip(*np.nonzero(A)))
    as_dict = (lambda v: None if v is None else {i: float(v[i]) for i in range(N)})
    r = nx.pagerank(G, alpha=damping, personalization=as_dict(teleport), dangling=as_dict(dangling),
                    tol=TOL, max_iter=10_000)
    return np.array([r[i] for i in range(N)])


def random_graphs(B: int, N: int, seed: int, polarised: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    A = rng.random((B, N, N))
    if polarised:  # CoMAE-like: most weights near 0, a few near 1, plus sparse structure
        A = (A ** 8) * (rng.random((B, N, N)) < 0.2)
    A[:, np.arange(N), np.arange(N)] = 0.0
    A[:, rng.choice(N, size=3, replace=False), :] = 0.0  # dangling rows
    return A


@pytest.mark.parametrize("polarised", [False, True])
def test_torch_and_scipy_match_networkx(polarised: bool) -> None:
    A = random_graphs(4, 40, seed=1 + polarised, polarised=polarised)
    got_t = pagerank_torch(torch.from_numpy(A), tol=TOL, max_iter=10_000).numpy()
    for b in range(A.shape[0]):
        ref = nx_pagerank(A[b])
        assert np.abs(got_t[b] - ref).max() <= 1e-9
        assert np.abs(pagerank_scipy(A[b], tol=TOL, max_iter=10_000) - ref).max() <= 1e-9
        assert np.abs(pagerank_scipy(sp.csr_array(A[b]), tol=TOL, max_iter=10_000) - ref).max() <= 1e-9
    assert np.allclose(got_t.sum(-1), 1.0)


def test_personalised_teleport_dangling_and_damping() -> None:
    rng = np.random.default_rng(7)
    A = random_graphs(3, 30, seed=3)
    tele = rng.random((3, 30)) * (rng.random((3, 30)) < 0.5)
    tele[:, 0] += 0.1  # at least one positive entry
    dang = rng.random(30)
    got = pagerank_torch(torch.from_numpy(A), damping=0.7, teleport=torch.from_numpy(tele), tol=TOL,
                         max_iter=10_000).numpy()
    got_d = pagerank_torch(torch.from_numpy(A), damping=0.7, teleport=torch.from_numpy(tele),
                           dangling=torch.from_numpy(dang), tol=TOL, max_iter=10_000).numpy()
    for b in range(3):
        # networkx sends dangling mass by the personalisation unless told otherwise: so do we.
        ref = nx_pagerank(A[b], 0.7, teleport=tele[b])
        assert np.abs(got[b] - ref).max() <= 1e-9
        assert np.abs(pagerank_scipy(A[b], 0.7, teleport=tele[b], tol=TOL, max_iter=10_000) - ref).max() <= 1e-9
        ref_d = nx_pagerank(A[b], 0.7, teleport=tele[b], dangling=dang)
        assert np.abs(got_d[b] - ref_d).max() <= 1e-9
        assert np.abs(got_d[b] - ref).max() > 1e-6  # the dangling vector really changed it


def test_all_dangling_graph_is_teleport() -> None:
    A = torch.zeros(1, 5, 5)
    assert torch.allclose(pagerank_torch(A)[0], torch.full((5,), 0.2, dtype=torch.float64))
    tele = torch.tensor([1.0, 0, 0, 0, 3.0])
    assert torch.allclose(pagerank_torch(A, teleport=tele)[0], (tele / 4).double())


def test_batch_composition_does_not_change_scores() -> None:
    # A loose tol makes the stopping step visible: each graph must stop on its own criterion
    # (BLAS may still round a batch of 1 differently from a batch of 6 in the last bit).
    A = torch.from_numpy(random_graphs(6, 24, seed=5, polarised=True))
    full = pagerank_torch(A, tol=1e-4)
    for b in range(6):
        assert torch.allclose(pagerank_torch(A[b : b + 1], tol=1e-4)[0], full[b], rtol=0, atol=1e-15)


def test_not_converged_raises_and_bad_input_refused() -> None:
    A = torch.from_numpy(random_graphs(2, 16, seed=9, polarised=True))
    with pytest.raises(PageRankNotConverged):
        pagerank_torch(A, tol=1e-30, max_iter=3)
    with pytest.raises(PageRankNotConverged):
        pagerank_scipy(A[0].numpy(), tol=1e-30, max_iter=3)
    with pytest.raises(ValueError):
        pagerank_torch(-A)
    with pytest.raises(ValueError):
        pagerank_torch(A, damping=1.0)


def test_exported_like_matrix_matches_networkx() -> None:
    """A dependency matrix as CoMAE emits it: (1+tanh)/2 weights, bf16-rounded, zero diagonal."""
    from tests.orders_data import tiny_model_matrices

    A = tiny_model_matrices()
    got = pagerank_torch(A, tol=TOL, max_iter=10_000).numpy()
    for b in range(A.shape[0]):
        ref = nx_pagerank(A[b].double().numpy())
        assert np.abs(got[b] - ref).max() <= 1e-9


def test_collapse_order_ties_to_lower_index() -> None:
    s = np.array([0.1, 0.3, 0.3, 0.05, 0.3])
    assert collapse_order(s).tolist() == [1, 2, 4, 0, 3]
    assert collapse_order(torch.from_numpy(s)).tolist() == [1, 2, 4, 0, 3]
    o = collapse_order(np.random.default_rng(0).random((3, 10)))
    assert (np.sort(o, -1) == np.arange(10)).all()
    assert (np.take_along_axis(ranks_of(o), o, -1) == np.arange(10)).all()


def test_sparsify_topk_and_kendall() -> None:
    A = np.array([[0.0, 0.5, 0.5, 0.2], [0.9, 0.0, 0.1, 0.8], [0.0, 0.0, 0.0, 0.0], [1, 2, 3, 0.0]])
    s = sparsify_topk(A, 2)
    assert s.tolist() == [[0, 0.5, 0.5, 0], [0.9, 0, 0, 0.8], [0, 0, 0, 0], [0, 2, 3, 0]]
    assert np.array_equal(sparsify_topk(torch.from_numpy(A), 2).numpy(), s)
    assert sparsify_topk(A, None) is A
    # top-k inside PageRank equals PageRank of the sparsified matrix, on both backends
    R = random_graphs(1, 20, seed=4)[0]
    ref = nx_pagerank(sparsify_topk(R, 5))
    assert np.abs(pagerank_scipy(R, topk=5, tol=TOL, max_iter=10_000) - ref).max() <= 1e-9
    assert np.abs(pagerank_torch(torch.from_numpy(R), topk=5, tol=TOL, max_iter=10_000).numpy() - ref).max() <= 1e-9
    o = np.arange(10)
    assert kendall_tau(o, o) == pytest.approx(1.0)
    assert kendall_tau(o, o[::-1]) == pytest.approx(-1.0)


def test_flip_permutation() -> None:
    f = flip_permutation(3)
    assert f.tolist() == [2, 1, 0, 5, 4, 3, 8, 7, 6]
    assert (f[f] == np.arange(9)).all()


def _bad_graphs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.random((6, 6))
    np.fill_diagonal(base, 0)
    nan, inf, neg, overflow = base.copy(), base.copy(), base.copy(), base.copy()
    nan[2, 3] = np.nan
    inf[4, 1] = np.inf
    neg[0, 5] = -0.1
    overflow[1, :2] = 1.5e308  # every entry finite, the row's sum is not
    return {"nan": nan, "inf": inf, "negative": neg, "overflow": overflow}


@pytest.mark.parametrize("kind", ["nan", "inf", "negative", "overflow"])
@pytest.mark.parametrize("topk", [None, 2])  # sparsifying must not hide a NaN it drops
def test_both_backends_reject_non_finite_input_alike(kind: str, topk: int | None) -> None:
    A = _bad_graphs()[kind]
    with pytest.raises(ValueError, match="A must be finite and non-negative") as e_torch:
        pagerank_torch(torch.from_numpy(A), topk=topk)
    with pytest.raises(ValueError, match="A must be finite and non-negative") as e_dense:
        pagerank_scipy(A, topk=topk)
    with pytest.raises(ValueError, match="A must be finite and non-negative") as e_sparse:
        pagerank_scipy(sp.csr_array(A), topk=topk)
    assert str(e_torch.value) == str(e_dense.value) == str(e_sparse.value)
