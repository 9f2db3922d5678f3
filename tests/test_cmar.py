"""CMAR task: training masks the lowest-ranked patches, random-order share, flips, sampling
orders, a short run through the shared trainer, and the eval helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import CmarConfig
from pipeline.models.mar import MAR, mask_by_order
from pipeline.tasks.cmar import (CmarTask, build_mar, generate, sampling_orders,
                                 to_mar_orders, train_config)
from pipeline.train.trainer import StepContext
from tests.support import step_ctx, tiny_cmar_cfg

GRID, DIM, B, C = 4, 4, 8, 3
N = GRID * GRID


def cmar_cfg(sample: dict | None = None, **kw) -> CmarConfig:
    return tiny_cmar_cfg(sample, batch_size=B, **kw)


class Spy(nn.Module):
    """Records what the task hands to MAR.forward."""

    def __init__(self, model: MAR) -> None:
        super().__init__()
        self.model = model
        self.calls: list[dict] = []

    def forward(self, tokens, labels, orders, num_masked, **kw):
        self.calls.append(dict(tokens=tokens, labels=labels, orders=orders, num_masked=num_masked, **kw))
        return self.model(tokens, labels, orders, num_masked, **kw)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    # the flipped image's order: the mirrored patch positions (any distinct permutation works)
    col = order % GRID
    order_flip = order - col + (GRID - 1 - col)
    mean = torch.randn(B, DIM, GRID, GRID, generator=g)
    return {"tokens": mean * 0.5, "tokens_flip": mean.flip(-1) * 0.5, "order": order,
            "order_flip": order_flip, "label": torch.randint(0, C, (B,), generator=g),
            "moments": torch.cat([mean, torch.full_like(mean, -60.0)], 1),  # ~zero variance
            "moments_flip": torch.cat([mean.flip(-1), torch.full_like(mean, -60.0)], 1),
            "index": torch.arange(B)}


def ctx(step: int = 0) -> StepContext:
    return step_ctx(step, B)


def run_task(cfg: CmarConfig, step: int = 0, with_moments: bool = False):
    model = build_mar(cfg, GRID, DIM, C)
    task = CmarTask(model, cfg, scale_factor=0.5)
    spy = Spy(model)
    b = batch()
    if not with_moments:
        b = {k: v for k, v in b.items() if not k.startswith("moments")}
    torch.manual_seed(1234 + step)  # the trainer reseeds the global RNG per step
    loss, metrics = task.loss(spy, b, ctx(step))
    return loss, metrics, spy.calls[0], b


def test_training_masks_exactly_the_lowest_ranked_patches():
    cfg = cmar_cfg(random_order_share=0.0)
    for step in range(3):
        loss, metrics, call, b = run_task(cfg, step)
        assert torch.isfinite(loss)
        k = call["num_masked"]
        masked = mask_by_order(call["orders"], k)
        tokens = call["tokens"]
        for r in range(B):
            flipped = torch.allclose(tokens[r], (b["tokens_flip"][r]).flatten(1).T)
            collapse = b["order_flip"][r] if flipped else b["order"][r]
            lowest = set(collapse[N - k:].tolist())  # rank N-k .. N-1
            assert set(torch.nonzero(masked[r]).flatten().tolist()) == lowest
        assert metrics["mask_ratio"] == k / N and metrics["random_orders"] == 0.0


def test_ascending_masks_the_highest_ranked():
    _, _, call, b = run_task(cmar_cfg(random_order_share=0.0, direction="ascending"))
    k = call["num_masked"]
    masked = mask_by_order(call["orders"], k)
    for r in range(B):
        collapse = b["order"][r] if torch.allclose(call["tokens"][r], b["tokens"][r].flatten(1).T) \
            else b["order_flip"][r]
        assert set(torch.nonzero(masked[r]).flatten().tolist()) == set(collapse[:k].tolist())


def test_flips_use_flipped_tokens_and_orders_both_ways():
    seen = set()
    for step in range(6):
        _, _, call, b = run_task(cmar_cfg(random_order_share=0.0), step)
        for r in range(B):
            plain = torch.allclose(call["tokens"][r], b["tokens"][r].flatten(1).T)
            flip = torch.allclose(call["tokens"][r], b["tokens_flip"][r].flatten(1).T)
            assert plain != flip
            expect = b["order"][r] if plain else b["order_flip"][r]
            assert torch.equal(call["orders"][r], expect.flip(0))
            seen.add(flip)
    assert seen == {True, False}


def test_random_order_share_and_random_baseline():
    _, m_all, call, b = run_task(cmar_cfg(random_order_share=1.0))
    assert m_all["random_orders"] == 1.0
    _, m_rand, call_r, _ = run_task(cmar_cfg(order="random"))
    assert m_rand["random_orders"] == 1.0
    for r in range(B):
        assert sorted(call_r["orders"][r].tolist()) == list(range(N))
    # share 0.5 over many rows: about half the sequences get random orders
    shares = [run_task(cmar_cfg(random_order_share=0.5), s)[1]["random_orders"] for s in range(6)]
    assert 0.2 < float(np.mean(shares)) < 0.8


def test_posterior_sample_path_matches_means_at_zero_variance():
    loss_m, _, call_m, _ = run_task(cmar_cfg(random_order_share=0.0), with_moments=True)
    _, _, call_t, _ = run_task(cmar_cfg(random_order_share=0.0), with_moments=False)
    # both paths give the posterior mean in fp32 and differ by the rounding of the sample's few ops
    # on tokens ~1 (a few eps32 = 1.2e-7, any CPU); a wrong path differs by whole tokens
    assert torch.allclose(call_m["tokens"], call_t["tokens"], atol=1e-6)


def test_task_randomness_is_independent_of_world_size():
    """Rows 4..7 of a global batch of 8 draw the same numbers as in a 1-process run."""
    full = StepContext(3, torch.arange(8), 8, torch.device("cpu"), 0, torch.float32)
    half = StepContext(3, torch.arange(4, 8), 8, torch.device("cpu"), 0, torch.float32)
    assert torch.equal(full.randperm(N)[4:], half.randperm(N))


def test_train_config_leaves_out_sampling_params():
    a = train_config(cmar_cfg(sample={"cfg": 3.0, "num_iter": 16, "num_sampling_steps": "5"}))
    b = train_config(cmar_cfg(sample={"cfg": 1.0, "num_iter": 64, "num_sampling_steps": "ddim5"}))
    assert a == b
    assert train_config(cmar_cfg(direction="ascending")) != a


def test_sampling_orders_sources():
    class_orders = np.stack([np.random.default_rng(c).permutation(N) for c in range(C)])
    labels = np.array([0, 2, 1, 2])
    g = torch.Generator().manual_seed(0)
    o = sampling_orders("class", labels, N, "descending", g, class_orders=class_orders)
    assert torch.equal(o, torch.from_numpy(class_orders[labels]).flip(1))  # rank 0 revealed first
    o = sampling_orders("class", labels, N, "ascending", g, class_orders=class_orders)
    assert torch.equal(o, torch.from_numpy(class_orders[labels]))
    train_labels = np.array([0, 1, 2, 0, 1, 2])
    per_image = np.stack([np.random.default_rng(10 + i).permutation(N) for i in range(6)])
    o = sampling_orders("train_image", labels, N, "descending", g, train_labels=train_labels,
                        train_order=lambda i: per_image[i])
    for r, c in enumerate(labels):
        candidates = [per_image[i][::-1].tolist() for i in np.flatnonzero(train_labels == c)]
        assert o[r].tolist() in candidates
    o = sampling_orders("random", labels, N, "descending", g)
    assert all(sorted(row) == list(range(N)) for row in o.tolist())
    with pytest.raises(ValueError, match="class-level"):
        sampling_orders("class", labels, N, "descending", g, class_orders=None)
    with pytest.raises(ValueError, match="patches"):
        sampling_orders("class", labels, 64, "descending", g, class_orders=class_orders)
    with pytest.raises(ValueError, match="no class-level order"):
        sampling_orders("class", np.array([5]), N, "descending", g, class_orders=class_orders)


def test_generate_grids():
    cfg = cmar_cfg()
    model = build_mar(cfg, GRID, DIM, C, cfg.sample.num_sampling_steps)
    labels = np.array([0, 1, 2])
    orders = torch.stack([torch.randperm(N) for _ in range(3)])
    grids = generate(model, labels, orders, num_iter=2, cfg=2.0, cfg_schedule="linear", temperature=1.0,
                     generator=torch.Generator().manual_seed(0), batch_size=2)
    assert grids.shape == (3, DIM, GRID, GRID) and torch.isfinite(grids).all()


def test_short_training_run_through_the_shared_trainer(tmp_path, capsys):
    from pipeline.train.trainer import Trainer

    cfg = cmar_cfg()
    model = build_mar(cfg, GRID, DIM, C)
    task = CmarTask(model, cfg, scale_factor=0.5)
    b = batch()
    items = [{k: v[i] for k, v in b.items()} for i in range(B)]
    final = Trainer(task, items, cfg.train, tmp_path / "cmar", log_csv=tmp_path / "train.csv",
                    metrics_json=tmp_path / "m.json", desc="test").fit()
    assert final["train_steps"] == 4 and np.isfinite(final["loss"])
    assert (tmp_path / "cmar" / "model_ema.safetensors").exists()
    lines = (tmp_path / "train.csv").read_text().splitlines()
    assert lines[0].startswith("step") and len(lines) == 5
    # a resume with another training config starts over (the task config is stored)
    other = CmarTask(build_mar(cmar_cfg(direction="ascending"), GRID, DIM, C), cmar_cfg(direction="ascending"), 0.5)
    capsys.readouterr()
    assert Trainer(other, items, cfg.train, tmp_path / "cmar").fit()["steps_this_run"] == 4
    assert "other configuration (task.cmar.direction" in capsys.readouterr().out


def test_eval_helpers():
    from pipeline.utils.images import image_grid, safe_name

    imgs = np.zeros((5, 4, 6, 3), np.uint8) + 7
    g = image_grid(imgs, cols=2, pad=1)
    assert g.shape == (3 * 5 + 1, 2 * 7 + 1, 3)
    assert (g == 7).sum() == 5 * 4 * 6 * 3
    assert safe_name("n01440764/tench fish") == "n01440764_tench_fish"


def test_mar_arch_maps_the_cmar_params_and_seeds_the_init():
    """The cmar params reach MAR under LTH14/mar's names; the initial weights are a function of
    the seed alone (torch seeds its global generator differently in every process)."""
    from types import SimpleNamespace

    from pipeline.models.mar import MarArch
    from pipeline.tasks.cmar import build_cmar, mar_arch

    cfg = cmar_cfg()
    m, steps = cfg.model, cfg.sample.num_sampling_steps
    arch = mar_arch(cfg, GRID, DIM, C, steps)
    assert (arch.encoder_embed_dim, arch.encoder_depth, arch.encoder_num_heads) == (m.enc_dim, m.enc_depth, m.enc_heads)
    assert (arch.decoder_embed_dim, arch.decoder_depth, arch.decoder_num_heads) == (m.dec_dim, m.dec_depth, m.dec_heads)
    assert (arch.diffloss_d, arch.diffloss_w, arch.buffer_size, arch.num_sampling_steps) == (
        m.diffloss_d, m.diffloss_w, m.buffer_size, steps)
    assert build_mar(cfg, GRID, DIM, C, steps).arch == arch
    assert MarArch.from_dict(arch.to_dict()) == arch
    assert mar_arch(cfg, GRID, DIM, C).num_sampling_steps == MarArch().num_sampling_steps  # training
    with pytest.raises(ValueError, match="unknown"):
        MarArch.from_dict({**arch.to_dict(), "enc_dim": 8})
    store = SimpleNamespace(classes=list(range(C)), grid=GRID, dim=DIM)
    a, b, c = (build_cmar(cfg, store, seed=s)[0].state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_pretrain_mar_with_published_weights_writes_every_declared_output(tmp_path):
    """With cmar.model.pretrained (MAR-B, full profile) pretrain_mar trains nothing, but DVC
    needs each of its declared outputs, or `dvc repro` stops there."""
    from pipeline.config import parse_params
    from pipeline.paths import outputs
    from stages import pretrain_mar

    params = parse_params({"cmar": {"model": {"pretrained": str(tmp_path / "checkpoint-last.pth")}}})
    record = pretrain_mar.run(params, data_dir=tmp_path / "data")
    assert record["train_steps"] == 0
    missing = [str(p) for p in vars(outputs("pretrain_mar", tmp_path / "data")).values() if not p.exists()]
    assert not missing, missing



def test_teaser_scores_each_model_in_its_generation_order():
    from pipeline.tasks.cmar_eval import TEASER, format_teaser, teaser

    torch.manual_seed(0)
    models = {"mar": build_mar(cmar_cfg(), GRID, DIM, C).eval(),
              "cmar": build_mar(cmar_cfg(), GRID, DIM, C).eval()}
    with torch.no_grad():  # the arch seeds its own init: make CMAR's weights differ from MAR's
        for p in models["cmar"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    models["cmar_asc"] = models["cmar"]
    M, N = 6, GRID * GRID
    tokens = torch.randn(M, N, DIM)
    labels = np.arange(M) % C
    class_orders = np.stack([np.random.default_rng(c).permutation(N) for c in range(C)])
    t = teaser(models, tokens, labels, class_orders, seed=0, resamples=100)
    rows = t["rows"]
    assert list(rows) == [name for name, _, _ in TEASER] and t["images"] == M
    base = rows["MAR, random order"]
    assert base["d_vs_mar_random"] == 0.0 and len(base["curve"]) == len(t["reveal_counts"])
    # nothing revealed: the same model and the same diffusion draws give the same loss in any order
    assert t["reveal_counts"][0] == 0
    assert rows["MAR, class order (MAR+C)"]["curve"][0] == base["curve"][0]
    assert rows["CMAR ascending, class order"]["curve"][0] == rows["CMAR, class order"]["curve"][0]
    # ... and other weights give another loss; with tokens revealed the order matters
    assert rows["CMAR, class order"]["curve"][0] != base["curve"][0]
    assert rows["CMAR ascending, class order"]["area"] != rows["CMAR, class order"]["area"]
    assert "MAR+C" in format_teaser(t)
