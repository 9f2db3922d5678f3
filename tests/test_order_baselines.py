"""Baseline orders, the side-by-side comparison, and the copy-mechanism probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.metrics import mechanism
from pipeline.metrics.objectness import compare, position_auc
from pipeline.metrics.selection import image_mean_l1, linear_neighbour_l1
from pipeline.orders import baselines


def test_position_only_orders_score_half_on_position_auc():
    rng = np.random.default_rng(0)
    labels = rng.uniform(size=(50, 16)) < 0.3
    fixed = baselines.centre_scores(50, 4)
    assert position_auc(fixed, labels) == pytest.approx(0.5)
    # Scores that follow the object within every position score 1.
    assert position_auc(labels + 0.1 * rng.uniform(size=labels.shape), labels) == pytest.approx(1.0)


def test_compare_scores_every_order_the_same_way():
    rng = np.random.default_rng(1)
    labels = rng.uniform(size=(40, 16)) < 0.25
    labels[:, 0] = True  # every image has an object patch and a background patch
    labels[:, 1] = False
    perfect = labels.astype(float)
    table = compare({"perfect": perfect, "inverse": -perfect,
                     "random": baselines.random_scores(40, 16, seed=3)}, labels)
    assert table["perfect"]["auc"] == pytest.approx(1.0)
    assert table["inverse"]["auc"] == pytest.approx(0.0)
    assert 0.35 < table["random"]["auc"] < 0.65
    n_obj = labels.sum(1)
    for f, k in ((10, 2), (50, 8)):  # ceil(f% of 16) patches; a perfect order fills them
        assert table["perfect"][f"top{f}"] == pytest.approx(np.mean(np.minimum(n_obj, k) / k))
    with pytest.raises(ValueError, match="shape"):
        compare({"bad": perfect[:, :8]}, labels)


def test_pixel_variance_and_token_saliency():
    img = np.zeros((1, 8, 8, 3), np.uint8)
    img[0, :4, 4:] = np.indices((4, 4)).sum(0)[..., None] * 20  # only the top-right patch varies
    s = baselines.pixel_variance_scores(img, 2)
    assert s.argmax() == 1 and (s[0, [0, 2, 3]] == 0).all()
    with pytest.raises(ValueError, match="patch grid"):
        baselines.pixel_variance_scores(img, 3)
    tok = np.zeros((1, 4, 2))
    tok[0, 2] = [3.0, 4.0]
    assert baselines.token_saliency_scores(tok).argmax() == 2


@pytest.mark.parametrize("mode", mechanism.MODES)
def test_mechanism_sources_hold_the_target_token(mode):
    grid = torch.randn(5, 4, 6, 6)
    mech = mechanism.apply(grid, mode).flatten(2).transpose(1, 2)  # [B, N, D]
    src = mechanism.sources(6, mode)
    assert torch.equal(mech, mech[:, src])
    assert (src != np.arange(36)).all() and (src[src] == np.arange(36)).all()


def test_mechanism_rejects_bad_input():
    with pytest.raises(ValueError, match="even grid"):
        mechanism.sources(5, "h_shift")
    with pytest.raises(ValueError, match="unknown copy mechanism"):
        mechanism.apply(torch.zeros(1, 4, 4), "diagonal")


class _Oracle:
    """A 'CoMAE' whose dependency rows put all weight on the true source (or on a fixed cell)."""

    def __init__(self, grid: int, cheat: bool) -> None:
        self.grid, self.cheat = grid, cheat

    def dependency_matrices(self, seq: torch.Tensor) -> torch.Tensor:
        B, N, _ = seq.shape
        A = torch.zeros(B, N, N)
        for b in range(B):
            if self.cheat:  # find the exact copy of each target among the other tokens
                d = torch.cdist(seq[b], seq[b])
                d.fill_diagonal_(float("inf"))
                A[b, torch.arange(N), d.argmin(-1)] = 1.0
            else:
                A[b, :, 0] = 1.0
                A[b, 0, 1] = 1.0
        return A


def test_precision_at_1_separates_an_oracle_from_a_position_prior():
    grids = torch.randn(8, 3, 4, 4)
    good = mechanism.precision_at_1(_Oracle(4, cheat=True), grids)
    bad = mechanism.precision_at_1(_Oracle(4, cheat=False), grids)
    assert good["precision_at_1"] == pytest.approx(1.0)
    assert bad["precision_at_1"] < 0.2
    assert good["chance"] == pytest.approx(1 / 15)


def test_reference_predictors():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(64, 3, 4, 4))
    # A smooth field: every token is the average of its neighbours plus little noise.
    smooth = base.repeat(2, axis=2).repeat(2, axis=3)  # [64, 3, 8, 8]
    seq = smooth.reshape(64, 3, 64).transpose(0, 2, 1)
    lin = linear_neighbour_l1(seq[:48], seq[48:], 8)
    assert lin < image_mean_l1(seq[48:])


def test_report_keys_and_streaming_mean():
    from pipeline.orders.report import mean_scores, report_keys

    keys = [f"k{i:03d}" for i in range(100)]
    assert report_keys(keys, 200) == keys
    picked = report_keys(keys, 5)
    assert len(picked) == 5 and picked[0] == "k000" and picked[-1] == "k099" and picked[2] == "k050"

    class Orders:  # the reader's interface: keys, num_tokens, scores(key), len()
        num_tokens = 4
        keys = ["a", "b", "c"]
        table = {"a": np.array([1.0, 0, 0, 0]), "b": np.array([0, 2.0, 0, 0]), "c": np.array([0, 0, 3.0, 3.0])}

        def scores(self, k):
            return self.table[k].astype(np.float32)

        def __len__(self):
            return 3

    assert np.allclose(mean_scores(Orders()), [1 / 3, 2 / 3, 1.0, 1.0])
