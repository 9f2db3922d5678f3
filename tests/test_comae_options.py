"""CoMAE options beyond the paper: the selection budget and the shuffled decoder selection."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ComaeConfig, TrainConfig
from pipeline.models.comae import CoMAE, PointerHead, budget_shift
from pipeline.models.layers import rope_2d_tables
from pipeline.tasks.comae import ComaeTask, arch_mismatch, comae_arch, stored_config
from tests.support import step_ctx, tiny_comae_cfg


def _model(cfg: ComaeConfig) -> CoMAE:
    return CoMAE(comae_arch(cfg, 4, 8))


def _cfg(**kw) -> ComaeConfig:
    return tiny_comae_cfg(targets_per_image=3, **kw)


@pytest.mark.parametrize("budget", [0.05, 0.3, 0.9])
def test_budget_fixes_the_mean_selection(budget):
    torch.manual_seed(0)
    model = _model(_cfg(budget=budget))
    w = model.select(torch.randn(3, 16, 8), torch.tensor([[0, 5, 9], [1, 2, 15], [7, 8, 3]]))
    assert (w[torch.arange(3)[:, None], torch.arange(3), torch.tensor([[0, 5, 9], [1, 2, 15], [7, 8, 3]])] == 0).all()
    # the shift: 40 bisection halvings and a Newton step, exact to fp32 resolution of the mean (~1e-7)
    assert torch.allclose(w.sum(-1) / 15, torch.full((3, 3), budget), atol=1e-5)


def test_budget_gradient_respects_the_constraint():
    logits = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    tgt = torch.tensor([0, 3, 9, 5])
    w = (1 + torch.tanh(logits - budget_shift(logits, tgt, 0.2))) / 2
    keep = torch.ones_like(w, dtype=torch.bool).scatter(1, tgt[:, None], False)
    (w * keep).sum().backward()  # the total kept weight is fixed: no gradient through it
    # exactly 0 in exact arithmetic; fp32 leaves rounding of the 15-term sum (~1e-7)
    assert logits.grad.abs().max() < 1e-6


def test_budget_is_an_architecture_field():
    with pytest.raises(ValueError):
        ComaeConfig(budget=1.5)


def test_w_shuffle_moves_weights_but_never_onto_the_target():
    torch.manual_seed(0)
    cfg = _cfg(w_shuffle=1.0)
    model = _model(cfg)
    task = ComaeTask(model, cfg)
    seen = {}

    def spy(noised, targets, frozen=False):
        seen["noised"] = noised
        return torch.zeros(*targets.shape, 8, requires_grad=True)

    model.reconstruct = spy
    ctx = step_ctx(0, 2)
    batch = {"tokens": torch.randn(2, 8, 4, 4), "tokens_flip": torch.randn(2, 8, 4, 4)}
    task.loss(model, batch, ctx)  # step 0 = a decoder step: every row shuffled
    assert seen["noised"].shape == (2, 3, 15, 8)
    # The model's permutation keeps the target in place.
    targets = torch.tensor([[0, 5, 9]])
    perm = model.shuffle_perm(targets, torch.rand(1, 3, 15))
    assert (perm.gather(2, targets.unsqueeze(-1)).squeeze(-1) == targets).all()
    assert (perm.sort(-1).values == torch.arange(16)).all()


def test_budget_anneals_from_start_to_budget():
    cfg = _cfg(budget=0.1, budget_start=0.9, budget_anneal=0.5,
               train=TrainConfig(steps=100))
    task = ComaeTask(_model(cfg), cfg)
    assert task.budget_at(0) == pytest.approx(0.9)
    assert task.budget_at(25) == pytest.approx(0.5)
    assert task.budget_at(50) == pytest.approx(0.1) and task.budget_at(99) == pytest.approx(0.1)
    constant = ComaeTask(_model(_cfg(budget=0.2)), _cfg(budget=0.2))
    assert constant.budget_at(0) == constant.budget_at(99) == 0.2
    # The model reads the budget it is passed (the task's annealed value while training), its
    # configured budget otherwise.
    model = task.model
    w = model.select(torch.randn(1, 16, 8), torch.tensor([[3]]), budget=0.6)
    # as above: the shift is exact to fp32 resolution
    assert w.sum().item() / 15 == pytest.approx(0.6, abs=1e-5)


def _pointer_logits(head: PointerHead, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    rope = rope_2d_tables(pos, torch.ones(pos.shape[:2], dtype=torch.bool), h.shape[-1])
    return head(h[:, 0], h[:, 1:], rope)


def test_pointer_scores_content_by_displacement():
    """A pointer logit depends on the patch's content and its offset from the target's cell:
    moving the whole grid leaves every logit unchanged, reordering the sequence reorders the
    logits (no slot is special), and the same content at another offset scores differently."""
    torch.manual_seed(0)
    head = PointerHead(16)
    h = torch.randn(1, 5, 16)  # [cls] + 4 kept patches
    pos = torch.tensor([[[2, 2], [2, 3], [1, 2], [3, 3], [0, 0]]])
    ref = _pointer_logits(head, h, pos)
    assert ref.shape == (1, 4)
    torch.testing.assert_close(_pointer_logits(head, h, pos + torch.tensor([3, 1])), ref)
    # swap two patches' sequence slots, each keeping its content and cell
    swapped_h, swapped_pos = h[:, [0, 4, 2, 3, 1]], pos[:, [0, 4, 2, 3, 1]]
    torch.testing.assert_close(_pointer_logits(head, swapped_h, swapped_pos), ref[:, [3, 1, 2, 0]])
    # the same content at another offset scores differently
    moved = pos.clone()
    moved[0, 1] = torch.tensor([0, 4])
    assert not torch.allclose(_pointer_logits(head, h, moved)[0, 0], ref[0, 0])


def test_pointer_head_is_an_architecture_field():
    a = stored_config(_cfg(), 4, 8)
    b = stored_config(_cfg(select_head="pointer"), 4, 8)
    assert arch_mismatch(a, b) == ["comae.select_head: 'linear' != 'pointer'"]
    # a config.json written before the option existed reads as the paper's head
    old = {**a, "comae": {k: v for k, v in a["comae"].items() if k != "select_head"}}
    assert arch_mismatch(old, a) == [] and arch_mismatch(old, b) != []
    with pytest.raises(ValueError):
        ComaeConfig(select_head="softmax")
