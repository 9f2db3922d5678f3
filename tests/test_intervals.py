"""Mean over seeds with a bootstrap interval over images, and AuC as a per-image quantity."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics.curves import auc
from pipeline.metrics.intervals import resample_weights, seed_mean_interval
from pipeline.tasks.cvit_eval import auc_weights


def test_resample_weights_are_bootstrap_shares() -> None:
    w = resample_weights(50, 300, seed=1)
    assert w.shape == (300, 50) and np.allclose(w.sum(1), 1.0)
    assert np.allclose(w * 50, np.round(w * 50))  # counts / n
    assert np.array_equal(w, resample_weights(50, 300, seed=1))


def test_seed_mean_and_its_interval() -> None:
    w = resample_weights(4, 200)
    same = np.ones((2, 4))  # every image right under both seeds: no spread at all
    out = seed_mean_interval(same, w)
    assert out == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "per_seed": [1.0, 1.0]}
    per_seed = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], float)
    out = seed_mean_interval(per_seed, w)
    assert out["mean"] == pytest.approx(0.375) and out["per_seed"] == [0.5, 0.25]
    assert 0.0 <= out["lo"] < out["mean"] < out["hi"] <= 1.0  # image seed-means 1, .5, 0, 0
    curves = np.stack([per_seed, 1 - per_seed], axis=-1)  # [S, n, 2]: two ratios at once
    out = seed_mean_interval(curves, w)
    assert out["mean"].tolist() == pytest.approx([0.375, 0.625]) and out["per_seed"].shape == (2, 2)


def test_interval_width_matches_the_binomial_standard_error() -> None:
    rng = np.random.default_rng(0)
    n, p = 768, 0.6
    hits = (rng.random((2, n)) < p).astype(float)
    out = seed_mean_interval(hits, resample_weights(n, 2000, seed=2))
    se = np.sqrt(hits.mean(0).var() / n)  # of the seed-mean over images
    assert out["hi"] - out["lo"] == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_auc_is_linear_in_the_curve() -> None:
    ratios = [0.0, 0.3, 0.5, 0.78, 0.99]
    w = auc_weights(ratios)
    curve = np.array([90.0, 80.0, 60.0, 40.0, 20.0])
    assert curve @ w == pytest.approx(auc(ratios, curve))
    per_image = np.random.default_rng(0).random((10, 5))
    assert (per_image @ w).mean() == pytest.approx(auc(ratios, per_image.mean(0)))
