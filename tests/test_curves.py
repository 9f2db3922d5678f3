"""Top-k, AuC and Kneedle against curves worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.metrics.curves import auc, kneedle, topk_correct


def test_topk_correct_by_hand() -> None:
    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: rank 5 -> top-5 hit only
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: rank 6 -> miss
    ])
    assert topk_correct(logits, torch.tensor([0, 1, 0]), ks=(1, 5)) == {1: 1, 5: 2}
    # fewer classes than k: every row is a top-5 hit
    assert topk_correct(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), ks=(5,)) == {5: 4}
    with pytest.raises(ValueError):
        topk_correct(torch.randn(4, 3), torch.tensor([0, 1]))


def test_auc_is_the_mean_accuracy_over_the_ratio_span() -> None:
    # trapezoids: 0.3·90 + 0.69·(90 + 0)/2 = 27 + 31.05 = 58.05, over a span of 0.99
    assert auc([0.0, 0.3, 0.99], [90.0, 90.0, 0.0]) == pytest.approx(58.05 / 0.99)
    assert auc([0.0, 0.5, 1.0], [80.0, 60.0, 0.0]) == pytest.approx(50.0)
    assert auc([0.5, 0.0, 1.0], [60.0, 80.0, 0.0]) == pytest.approx(50.0)  # any point order
    assert auc([0.0, 0.99], [70.0, 70.0]) == pytest.approx(70.0)  # flat curve: its value
    with pytest.raises(ValueError):
        auc([0.0, 0.0], [1.0, 2.0])


def test_kneedle_finds_the_bend_of_a_concave_decreasing_curve() -> None:
    # x_n = x; y_n = (1, .98, .95, .8, 0); d = y_n - (1 - x_n) = (0, .23, .45, .55, 0):
    # maximum at x = 0.75, threshold .55 - 1·0.25 = .30 > d(1.0) = 0 -> knee 0.75
    assert kneedle([0, 0.25, 0.5, 0.75, 1.0], [100, 98, 95, 80, 0]) == pytest.approx(0.75)
    # flat until 0.6, then a straight fall: d(0.6) = 0.6 is the maximum
    xs = np.round(np.arange(0, 1.01, 0.1), 2)
    ys = np.where(xs <= 0.6, 1.0, 1.0 - (xs - 0.6) / 0.4)
    assert kneedle(xs, ys) == pytest.approx(0.6)
    # the default (non-uniform) grid: y_n = (acc - 5) / 78, x_n = x / 0.99, so
    # d(0.70) = 72/78 + 0.70/0.99 - 1 = 0.630, d(0.78) = 69/78 + 0.78/0.99 - 1 = 0.673,
    # d(0.85) = 50/78 + 0.85/0.99 - 1 = 0.500 -> knee 0.78; with 65.5 at 0.78 instead,
    # d(0.78) = 0.628 < d(0.70) and the knee moves to 0.70
    grid = [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.78, 0.85, 0.9, 0.95, 0.99]
    acc = [83, 83, 82.5, 82, 81.5, 81, 79.5, 77, 74, 55, 40, 20, 5]
    assert kneedle(grid, acc) == pytest.approx(0.78)
    acc[8] = 65.5
    assert kneedle(grid, acc) == pytest.approx(0.70)


def test_kneedle_has_no_knee_on_lines_convex_or_flat_curves() -> None:
    xs = np.linspace(0, 1, 11)
    assert kneedle(xs, 1 - xs) is None  # a straight line
    assert kneedle(xs, (1 - xs) ** 2) is None  # convex: drops first, then flattens
    assert kneedle(xs, np.ones_like(xs)) is None
    assert kneedle([0, 1], [1, 0]) is None


def test_kneedle_sensitivity_rejects_a_shallow_bump() -> None:
    # d = (0, 0.05, 0, 0) on a 4-point grid: the bump is smaller than S·mean Δx = 1/3
    x, y = [0, 1 / 3, 2 / 3, 1], [1.0, 1 - 1 / 3 + 0.05, 1 / 3, 0.0]
    assert kneedle(x, y, sensitivity=1.0) is None
    assert kneedle(x, y, sensitivity=0.1) == pytest.approx(1 / 3)
