"""The critic and the collapse criterion (issue 19): what it measures, and that it can fail."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.metrics.collapse import (
    collapse_curves, confidence_orders, curve_area, greedy_orders, hidden_mean, paired_summary,
    positions_first,
    reveal_grid,
)
from pipeline.metrics.intervals import resample_weights
from pipeline.models.critic import Critic, CriticArch, token_nll
from pipeline.orders.baselines import halton_order, order_scores
from pipeline.orders.pagerank import collapse_order
from pipeline.tasks.critic import CriticTask, random_reveal
from tests.support import step_ctx


def _critic(**kw) -> Critic:
    torch.manual_seed(0)
    return Critic(CriticArch(num_tokens=16, token_dim=4, dim=32, depth=2, heads=4, **kw))


def test_hidden_values_never_reach_the_critic():
    critic = _critic().eval()
    x = torch.randn(2, 16, 4)
    revealed = torch.rand(2, 16) < 0.4
    y = torch.where(revealed[..., None], x, torch.randn_like(x) * 100)
    for a, b in zip(critic(x, revealed), critic(y, revealed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same inputs reach the network


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_nll_is_the_distributions_log_prob(likelihood):
    x, loc, log_scale = torch.randn(3, 5, 4), torch.randn(3, 5, 4), torch.randn(3, 5, 4) * 0.3
    dist = (torch.distributions.Normal if likelihood == "gaussian" else torch.distributions.Laplace)(
        loc, log_scale.exp())
    # float32 evaluations of the same formula: agreement to a few float32 ulps of values ~1-5
    torch.testing.assert_close(token_nll(x, loc, log_scale, likelihood),
                               -dist.log_prob(x).mean(-1), rtol=1e-5, atol=1e-5)


def test_reveal_grid_holds_the_operating_points():
    ks = reveal_grid(64, 16)
    assert ks[0] == 0 and ks[-1] == 60 and 14 in ks and 32 in ks and ks == sorted(set(ks))


def test_random_reveal_draws_every_count_and_hides_one_at_least():
    revealed = random_reveal(step_ctx(rows=4000), 8)
    counts = revealed.sum(1)
    assert counts.max() <= 7 and set(counts.tolist()) == set(range(8))


# A toy world: token 0 ("the key") decides every other token; revealing it makes the rest
# certain (NLL 0), otherwise each hidden token costs 1 nat. An order that reveals the key
# first must have the lowest curve, greedy must find it, and the curve must tell orders apart.
def _key_nll(x: torch.Tensor, revealed: torch.Tensor) -> torch.Tensor:
    known = revealed[:, :1].float()
    return (1.0 - known).expand(-1, x.shape[1]).clone()


def test_collapse_curve_rewards_revealing_the_key_first():
    M, N = 6, 16
    x = torch.zeros(M, N, 2)
    first = torch.arange(N).expand(M, N)  # the key first
    last = torch.arange(N).flip(0).expand(M, N)  # the key last
    ks = reveal_grid(N, 4)
    good, bad = (collapse_curves(_key_nll, x, o, ks) for o in (first, last))
    assert (good[:, 1:] == 0).all() and (bad == 1).all()  # k >= 1: the key is known in `first`
    assert (curve_area(good, ks) < curve_area(bad, ks)).all()


def test_greedy_finds_the_key_and_confidence_follows_the_scale():
    x = torch.zeros(2, 16, 2)
    assert greedy_orders(_key_nll, x)[:, 0].tolist() == [0, 0]
    u = torch.linspace(1, 0, 16)  # the critic is surest of the last position
    order = confidence_orders(lambda t, r: u.expand(len(t), -1), x)
    assert order[0].tolist() == list(range(15, -1, -1))


def test_adjusted_curve_does_not_reward_revealing_hard_tokens_first():
    """Independent tokens of unequal difficulty (token i costs i nats whatever is revealed):
    no order tells anything about the rest. The raw curve still prefers hard-first (it drops
    because hard tokens leave the mean); the adjusted one is 0 for every order."""
    M, N = 3, 16
    cost = torch.arange(N, dtype=torch.float64).expand(M, N)
    nll = lambda x, r: cost.to(x.dtype)  # noqa: E731
    x = torch.zeros(M, N, 1)
    ks = reveal_grid(N, 4)
    hard_first, easy_first = torch.arange(N).flip(0).expand(M, N), torch.arange(N).expand(M, N)
    raw = {n: collapse_curves(nll, x, o, ks) for n, o in (("hard", hard_first), ("easy", easy_first))}
    assert (curve_area(raw["hard"], ks) < curve_area(raw["easy"], ks)).all()
    for name, o in (("hard", hard_first), ("easy", easy_first)):
        adjusted = raw[name] - hidden_mean(cost.numpy(), o.numpy(), ks)
        np.testing.assert_allclose(adjusted, 0.0, atol=1e-12)  # float64 sums of small integers


def test_hidden_mean_is_the_mean_over_what_the_order_hides():
    rng = np.random.default_rng(0)
    v, o = rng.normal(size=(4, 16)), np.stack([rng.permutation(16) for _ in range(4)])
    ks = [0, 3, 15]
    want = [[v[m, o[m, k:]].mean() for k in ks] for m in range(4)]
    # float64 cumulative sums of 16 terms against direct means: rounding ~1e-15
    np.testing.assert_allclose(hidden_mean(v, o, ks), want, rtol=1e-12, atol=1e-12)


def test_positions_first_reveals_exactly_k():
    o = torch.stack([torch.randperm(16) for _ in range(3)])
    r = positions_first(o, 5)
    assert r.sum(1).tolist() == [5, 5, 5]
    assert all(r[i, o[i, :5]].all() for i in range(3))


def test_paired_difference_interval_excludes_zero_only_for_a_real_gap():
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.3, 200)  # image-to-image spread shared by both orders
    areas = {"random": base, "better": base - 0.05 + rng.normal(0, 0.01, 200),
             "same": base + rng.normal(0, 0.01, 200)}
    s = paired_summary(areas, resample_weights(200, 500, 0), {"random": "random"})
    assert s["better"]["vs_random"]["hi"] < 0  # paired: the shared spread cancels
    assert s["same"]["vs_random"]["lo"] < 0 < s["same"]["vs_random"]["hi"]


def test_halton_order_spreads_the_first_patches():
    o = halton_order(8)
    assert sorted(o.tolist()) == list(range(64))
    quadrant = [(int(i) // 8 // 4) * 2 + int(i) % 8 // 4 for i in o[:16]]
    # low discrepancy: the first 16 patches split 3-5 per quadrant (raster puts all in two)
    assert all(3 <= quadrant.count(q) <= 5 for q in range(4)), quadrant
    assert (collapse_order(order_scores(o)) == o).all()


def test_critic_learns_to_use_what_is_revealed():
    """Images whose tokens all equal one random vector: after training, revealing a quarter of
    the tokens must lower the NLL of the rest well below what the critic says with nothing
    revealed (a critic that ignores its context fails this)."""
    torch.manual_seed(0)
    critic = Critic(CriticArch(num_tokens=16, token_dim=4, dim=32, depth=2, heads=4))
    task = CriticTask(critic)
    opt = torch.optim.AdamW(critic.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)

    def batch(n: int) -> dict[str, torch.Tensor]:
        grid = torch.randn(n, 4, 1, 1, generator=gen).expand(n, 4, 4, 4).contiguous()
        return {"tokens": grid, "tokens_flip": grid.flip(-1)}

    for step in range(300):
        loss, _ = task.loss(critic, batch(32), step_ctx(step, rows=32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    critic.eval()
    x = batch(64)["tokens"].flatten(2).transpose(1, 2)
    some = (torch.arange(16) % 4 == 0).expand(64, 16)
    with torch.no_grad():
        seen = critic.nll(x, some)[:, ~some[0]].mean()
        blind = critic.nll(x, torch.zeros_like(some))[:, ~some[0]].mean()
    # a standard normal channel costs 0.5 log(2 pi e) = 1.42 nats blind; a copy, far less.
    # 1 nat of gap is a wide margin (measured: see the assertion message when it fails).
    assert blind > 1.0 and seen < blind - 1.0, (float(seen), float(blind))
    assert math.isfinite(float(seen))
