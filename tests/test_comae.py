"""CoMAE: masking invariants, eq. 3-7 on hand-computed cases, the alternating gradients,
dependency matrices, bad input, and the shared trainer driven by the CoMAE task (exact resume
after a kill, 2-process DDP == 1 process)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pipeline.config import ComaeConfig, TrainConfig
from pipeline.models.comae import (
    CoMAE,
    ComaeError,
    contrastive_loss,
    mask_entropy,
    noise_alpha,
    reconstruction_loss,
)
from pipeline.models.comae_blocks import _cls_only_block
from pipeline.tasks.comae import ComaeTask, comae_arch, load_comae
from pipeline.train.checkpoint import latest_checkpoint
from pipeline.train.trainer import NonFiniteError, Trainer
from tests.support import as_rank, free_port, step_ctx

GRID, DIM = 4, 4
N = GRID * GRID
TINY = dict(enc_dim=16, enc_depth=2, enc_heads=2, dec_dim=16, dec_depth=2, dec_heads=2,
            head_layers=2, targets_per_image=4, sigma=0.5)


def tiny(seed: int = 0, **kw) -> CoMAE:
    torch.manual_seed(seed)
    return CoMAE(comae_arch(ComaeConfig(**{**TINY, **kw}), GRID, DIM))


def rand_inputs(B: int = 3, T: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, N, DIM, generator=g)
    targets = torch.rand(B, N, generator=g).argsort(1)[:, :T]
    eps = torch.randn(B, T, N - 1, DIM, generator=g)
    return tokens, targets, eps


class Grids(torch.utils.data.Dataset):
    """TokenGridDataset-shaped items over fixed random grids (flip = mirrored grid)."""

    def __init__(self, n: int = 12, nan_row: int | None = None) -> None:
        self.x = torch.randn(n, DIM, GRID, GRID, generator=torch.Generator().manual_seed(5))
        if nan_row is not None:
            self.x[nan_row, 0, 0, 0] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self.x[i], "tokens_flip": self.x[i].flip(-1), "label": 0, "index": i}


def train_cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, lr=1e-3, precision="fp32", ckpt_every=2, log_every=2, seed=3)
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- model invariants


HEADS = pytest.mark.parametrize("head", ["linear", "pointer"])


@HEADS
def test_shapes_and_selection_range(head: str) -> None:
    m = tiny(select_head=head).eval()
    tokens, targets, eps = rand_inputs()
    out = m(tokens, targets, eps)
    assert out["w"].shape == (3, 4, N) and out["recon"].shape == (3, 4, DIM)
    assert out["w"].dtype == torch.float32
    w = out["w"]
    assert (w >= 0).all() and (w <= 1).all()
    assert (w.gather(2, targets.unsqueeze(-1)) == 0).all()  # w^n_n = 0
    assert torch.equal(out["target"], tokens[torch.arange(3)[:, None], targets])


@HEADS
def test_target_never_reaches_f_or_g(head: str) -> None:
    """Changing e_n (and only e_n) changes neither w^n nor e*_n, for every target."""
    m = tiny(select_head=head).eval()
    tokens, _, _ = rand_inputs(B=2)
    targets = torch.arange(N).expand(2, N)  # every patch is a target once
    eps = torch.randn(2, N, N - 1, DIM)
    with torch.no_grad():
        ref = m(tokens, targets, eps)
        for n in (0, 5, N - 1):
            bumped = tokens.clone()
            bumped[:, n] += 100.0
            out = m(bumped, targets, eps)
            assert torch.equal(out["w"][:, n], ref["w"][:, n])
            assert torch.equal(out["recon"][:, n], ref["recon"][:, n])
            # ...while another target, which does see e_n, changes.
            other = (n + 1) % N
            assert not torch.allclose(out["w"][:, other], ref["w"][:, other])


def test_alpha_follows_eq4() -> None:
    sigma = 0.5
    a = noise_alpha(torch.tensor([0.0, 1.0, 0.5]), sigma)
    assert a[1] == 1.0  # a selected patch is kept clean
    assert a[0] == pytest.approx(math.exp(-1 / (2 * sigma**2)))  # exp(-2) at w = 0
    assert a[2] == pytest.approx(math.exp(-0.25 / (2 * sigma**2)))
    # eq. 3 through the model: w = 1 keeps e_i, w = 0 mixes exp(-2) e_i + (1 - exp(-2)) eps.
    m = tiny()
    tokens, targets, eps = rand_inputs(B=1, T=1)
    w = torch.zeros(1, 1, N)
    w[0, 0, m.keep[targets[0, 0]][:3]] = 1.0
    noised = m.noise(tokens, targets, w, eps)  # [1, 1, N-1, D]
    kept = tokens[0, m.keep[targets[0, 0]]]
    torch.testing.assert_close(noised[0, 0, :3], kept[:3])
    a0 = math.exp(-2.0)
    torch.testing.assert_close(noised[0, 0, 3:], a0 * kept[3:] + (1 - a0) * eps[0, 0, 3:])


def test_cls_only_block_matches_block() -> None:
    m = tiny()
    blk = m.encoder.blocks[-1]
    x = torch.randn(5, N, 16)
    tgt = torch.tensor([0, 3, 7, 9, 15])
    rope = m._rope(tgt, m.encoder.head_dim)
    # the same sums on fewer rows: matmul blocking may reorder them (fp32, width 16, values ~1:
    # ~1e-6 on AVX2 and AVX-512); 1e-5 is 10x that and far below a wrong mask or rope (~0.1)
    torch.testing.assert_close(_cls_only_block(blk, x, rope), blk(x, rope=rope)[:, 0],
                               atol=1e-5, rtol=1e-5)


@HEADS
def test_dependency_matrices_match_select_and_chunking(head: str) -> None:
    m = tiny(select_head=head).eval()
    tokens, _, _ = rand_inputs(B=2)
    A = m.dependency_matrices(tokens, chunk=7)
    assert A.shape == (2, N, N) and A.dtype == torch.float32
    assert (A.diagonal(dim1=1, dim2=2) == 0).all()
    with torch.no_grad():
        ref = m.select(tokens, torch.arange(N).expand(2, N))
    # w in [0, 1] through tanh: batched vs per-target sums differ in order only (~1e-7)
    torch.testing.assert_close(A, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.dependency_matrices(tokens, chunk=1000), A, atol=1e-6, rtol=1e-5)
    Ab = m.dependency_matrices(tokens, dtype=torch.bfloat16)
    assert Ab.dtype == torch.float32 and (Ab - A).abs().max() < 0.05


# ----------------------------------------------------------------------------- losses (eq. 6, 7)


def test_loss_values_by_hand() -> None:
    e = torch.tensor([[1.0, -2.0, 0.5]])
    r = torch.tensor([[0.0, 0.0, 1.0]])
    assert reconstruction_loss(e, r).item() == pytest.approx(1 + 2 + 0.5)
    # two orthogonal selections: sim = I, so each row is -log(e^{1/t} / (e^{1/t} + e^0))
    w = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]]])
    tau = torch.tensor(0.5)
    assert contrastive_loss(w, tau).item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
    # identical selections: every row is a uniform softmax over T
    w_same = torch.ones(2, 3, 4)
    assert contrastive_loss(w_same, tau).item() == pytest.approx(math.log(3), rel=1e-6)
    # eq. 7: -(sum_j w log w), 0 log 0 = 0, mean over the M samples
    wm = torch.tensor([[0.5, 0.5, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert mask_entropy(wm).item() == pytest.approx(math.log(2) / 2, rel=1e-6)


# ----------------------------------------------------------------------------- alternating steps


def _grads_after(update: str) -> CoMAE:
    m = tiny()
    tokens, targets, eps = rand_inputs()
    out = m(tokens, targets, eps, update=update)
    loss = reconstruction_loss(out["target"], out["recon"]) + 0.01 * contrastive_loss(out["w"], out["tau"])
    loss.backward()
    return m


def _has_grad(params) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]


def test_gradient_reaches_only_the_updated_half() -> None:
    m = _grads_after("decoder")
    assert not any(p.grad is not None for p in m.encoder_parameters())
    assert all(_has_grad(m.decoder_parameters()))
    m = _grads_after("encoder")
    assert not any(p.grad is not None for p in m.decoder_parameters())
    assert all(_has_grad(m.encoder_parameters()))  # f, select head and log_tau
    # the encoder's gradient through the frozen g equals the one of joint backprop
    m_both = _grads_after("both")
    for p, q in zip(m.encoder_parameters(), m_both.encoder_parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_task_alternates_groups() -> None:
    task = ComaeTask(tiny(), ComaeConfig(**TINY))
    assert set(task.param_groups()) == {"encoder", "decoder"}
    assert [task.active_groups(s) for s in range(4)] == [["decoder"], ["encoder"]] * 2
    enc = {id(p) for p in task.param_groups()["encoder"]}
    dec = {id(p) for p in task.param_groups()["decoder"]}
    assert not enc & dec and enc | dec == {id(p) for p in task.model.parameters()}
    ctx = step_ctx(1, 4)
    batch = torch.utils.data.default_collate([Grids()[i] for i in range(4)])
    loss, metrics = task.loss(task.model, batch, ctx)
    assert loss.requires_grad and {"L_r", "L_c", "H_mask", "tau"} <= set(metrics)
    assert float(metrics["tau"]) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_refused() -> None:
    m = tiny()
    with pytest.raises(ComaeError, match="grid 4x4"):
        m.check_tokens(torch.randn(1, 9, DIM))
    with pytest.raises(ComaeError, match="token dim 4"):
        m.check_tokens(torch.randn(1, N, 8))
    bad = torch.randn(3, N, DIM)
    bad[2, 4, 1] = float("inf")
    with pytest.raises(ComaeError, match=r"rows \[2\]"):
        m.dependency_matrices(bad)

    class Store:
        grid, dim, path = 8, DIM, "other.zarr"

    with pytest.raises(ComaeError, match="8x8 grid of 4-dim tokens"):
        m.check_store(Store())
    with pytest.raises(ComaeError, match="targets_per_image"):
        ComaeTask(m, ComaeConfig(**{**TINY, "targets_per_image": N}))


def test_nan_batch_stops_before_any_update(tmp_path: Path) -> None:
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    task = ComaeTask(m, ComaeConfig(**TINY))
    with pytest.raises((NonFiniteError, ComaeError)):
        Trainer(task, Grids(n=4, nan_row=1), train_cfg(batch_size=4), tmp_path).fit()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert latest_checkpoint(tmp_path / "checkpoints") is None


# ----------------------------------------------------------------------------- trainer + files


class Killed(Exception):
    pass


class KilledAt(ComaeTask):
    """The CoMAE task, killed when it reaches ``step`` (as a kill between checkpoints would)."""

    def __init__(self, model: CoMAE, cfg: ComaeConfig, step: int | None) -> None:
        super().__init__(model, cfg)
        self.kill_at = step

    def loss(self, model, batch, ctx):
        if ctx.step == self.kill_at:
            raise Killed
        return super().loss(model, batch, ctx)


def _fit(out: Path, cfg: TrainConfig | None = None, model_kw: dict | None = None,
         kill_at: int | None = None, inputs: dict | None = None) -> tuple[CoMAE, dict]:
    model_kw = model_kw or {}
    m = tiny(**model_kw)
    task = KilledAt(m, ComaeConfig(**{**TINY, **model_kw}), kill_at)
    final = Trainer(task, Grids(), cfg or train_cfg(), out, log_csv=out / "log.csv",
                    metrics_json=out / "metrics.json", inputs=inputs).fit()
    return m, final


def test_resume_after_kill_matches_uninterrupted(tmp_path: Path, capsys) -> None:
    ref, final = _fit(tmp_path / "ref")
    assert {"L_r", "L_c", "H_mask", "tau", "lr", "items_per_s"} <= set(final)

    out = tmp_path / "run"
    with pytest.raises(Killed):
        _fit(out, kill_at=5)  # after the step-4 checkpoint, before the next one
    # a kill during the next checkpoint's write leaves a half-written folder behind
    half = out / "checkpoints" / "step-0000006"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(out / "checkpoints").step == 4
    resumed, _ = _fit(out)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    rows = (out / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4", "6"]  # no duplicated window

    # the stored model loads back as the same function
    loaded, info = load_comae(out)
    assert info["weights"] == "model.safetensors" and len(info["sha256"]) == 64
    tokens = torch.randn(2, N, DIM)
    torch.testing.assert_close(loaded.dependency_matrices(tokens),
                               ref.eval().dependency_matrices(tokens))
    # another architecture in params.yaml than the trained one is refused, naming the key
    with pytest.raises(ComaeError, match="enc_dim: 16 != 32"):
        load_comae(out, expect=ComaeConfig(**{**TINY, "enc_dim": 32}))
    load_comae(out, expect=ComaeConfig(**{**TINY, "lambda": 0.0}))  # training-only key: fine
    # resuming the checkpoints with another loss setting is another experiment: it starts over
    capsys.readouterr()
    _, again = _fit(out, model_kw={"sigma": 0.25})
    assert again["steps_this_run"] == again["train_steps"]
    assert "starting over" in capsys.readouterr().out.split("sigma")[0]


def test_other_latents_start_the_training_over(tmp_path: Path, capsys) -> None:
    """DVC re-runs train_comae on new latents with the old (persisted) checkpoints in place:
    a finished run made from other latents must not be resumed."""
    _fit(tmp_path, cfg=train_cfg(steps=4), inputs={"latents": {"fingerprint": "old"}})
    _, same = _fit(tmp_path, cfg=train_cfg(steps=4), inputs={"latents": {"fingerprint": "old"}})
    assert same["steps_this_run"] == 0
    capsys.readouterr()
    _, new = _fit(tmp_path, cfg=train_cfg(steps=4), inputs={"latents": {"fingerprint": "new"}})
    assert new["steps_this_run"] == 4
    said = [ln for ln in capsys.readouterr().out.splitlines() if "starting over" in ln]
    assert len(said) == 1 and "inputs.latents.fingerprint: 'old' != 'new'" in said[0]


def test_load_comae_refuses_mixed_folder(tmp_path: Path) -> None:
    _fit(tmp_path / "a", cfg=train_cfg(steps=2))
    _fit(tmp_path / "b", cfg=train_cfg(steps=2), model_kw={"enc_dim": 32})
    (tmp_path / "b" / "config.json").write_bytes((tmp_path / "a" / "config.json").read_bytes())
    with pytest.raises(ComaeError, match="does not match its config.json"):
        load_comae(tmp_path / "b")
    with pytest.raises(ComaeError, match="config.json is missing"):
        load_comae(tmp_path / "nothing")


# ----------------------------------------------------------------------------- DDP
#
# What DDP must agree on with one process of the same global batch:
# 1. The all-reduced gradient of every step, given the same parameters. Both are the mean of
#    the same per-row terms, summed in another order (each rank sums its half, then gloo adds
#    the halves), so they differ by fp32 reduction-order rounding: a relative error of a few
#    eps32 (1.2e-7) per summation level, grown through the network's depth, ~1e-6 in norm.
#    We allow 1e-4 of the gradient's norm per tensor: 100x that, whatever the CPU's kernels
#    (AVX2 and AVX-512 sum in other orders), and 1000x below what a real fault gives (a sum
#    where a mean belongs: 1.0; a rank reading the other's rows or dropping a shard, or another
#    noise draw: 0.1 and above), which `test_ddp_check_catches_faults` shows.
# 2. The parameters after N optimiser steps. AdamW does not carry a relative gradient error
#    over as a relative parameter error: an update is lr * m/sqrt(v), ~lr * sign(g) in the first
#    steps, so an entry whose gradient is at rounding level (~0 by cancellation) may move by up
#    to 2 lr the other way, on one CPU and not another (the one-thread AVX2 run differs by
#    1.6e-5 in one entry after 4 steps; 1.6e-6 on AVX-512). Such entries are few, so the bound
#    is on the norm: per tensor, the difference is at most 1% of how far training moved it. A
#    real fault changes every entry's update by O(lr): a fraction of order 1. Adam is blind to a
#    sum-for-mean fault (the update does not depend on the gradient's scale); check 1 is not.

FAULTS = ("sum_not_mean", "other_rank_rows", "other_noise_rows")
GRAD_RTOL = 1e-4   # see 1. above
PARAM_RTOL = 1e-2  # see 2. above


def _inject(fault: str | None, world: int) -> None:
    """In a worker: break DDP the way a real bug would (tests that the checks can fail)."""
    import pipeline.train.trainer as trainer

    if fault == "sum_not_mean":  # each rank's loss scaled by the world: an all-reduce SUM
        loss = ComaeTask.loss
        ComaeTask.loss = lambda self, *a: (lambda l, m: (l * world, m))(*loss(self, *a))
    elif fault == "other_rank_rows":  # every rank reads rank 0's rows: a shard read twice, one dropped
        class Rank0Rows(trainer.StepBatchSampler):
            def __init__(self, *a, **kw) -> None:
                super().__init__(*a, **kw)
                self.lo = 0
        trainer.StepBatchSampler = Rank0Rows
    elif fault == "other_noise_rows":  # the right images, another rank's noise and targets
        class FirstRows(trainer.StepContext):
            def __init__(self, step, rows, *a, **kw) -> None:
                super().__init__(step, torch.arange(len(rows)), *a, **kw)  # rank 0's rows' draws
        trainer.StepContext = FirstRows


def _recording_fit(out: Path, cfg: TrainConfig, frozen: bool) -> tuple[CoMAE, list[list[torch.Tensor]]]:
    """``_fit`` that keeps every step's gradients as the optimiser sees them (all-reduced).
    ``frozen``: learning rate 0 and no clipping, so every step's gradient is the raw one, taken
    at the initial parameters, and the steps of 1 and 2 processes stay comparable to rounding
    (clipping to norm 1 would hide a gradient twice too large)."""
    import pipeline.train.trainer as trainer

    grads: list[list[torch.Tensor]] = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, *_: grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]
                                      if p.grad is not None]))
    lr_at = trainer.lr_at
    if frozen:
        trainer.lr_at = lambda step, cfg: 0.0
        cfg = cfg.model_copy(update={"grad_clip": None})
    try:
        model, _ = _fit(out, cfg=cfg)
    finally:
        hook.remove()
        trainer.lr_at = lr_at
    return model, grads


def _ddp_worker(rank: int, world: int, port: int, out: str, steps: int, frozen: bool,
                fault: str | None) -> None:
    as_rank(rank, world, port)
    _inject(fault, world)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _, grads = _recording_fit(Path(out), train_cfg(steps=steps, ckpt_every=steps), frozen)
        torch.save(grads, Path(out) / f"grads-rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _two_processes(out: Path, steps: int, frozen: bool, fault: str | None = None):
    out.mkdir(parents=True)
    mp.spawn(_ddp_worker, args=(2, free_port(), str(out), steps, frozen, fault), nprocs=2, join=True)
    grads = [torch.load(out / f"grads-rank{r}.pt") for r in range(2)]
    return load_comae(out)[0], grads


def _worst_grad_error(ref: list[list[torch.Tensor]], two: list[list[torch.Tensor]]) -> float:
    """Largest per-tensor ||g_two - g_one|| / ||g_one|| over every step."""
    assert len(ref) == len(two) and all(len(a) == len(b) for a, b in zip(ref, two))
    return max(float((b - a).norm() / a.norm().clamp_min(1e-30))
               for sa, sb in zip(ref, two) for a, b in zip(sa, sb))


@pytest.fixture(scope="module")
def one_process_frozen(tmp_path_factory) -> list[list[torch.Tensor]]:
    return _recording_fit(tmp_path_factory.mktemp("one-frozen"), train_cfg(steps=4, ckpt_every=4),
                          frozen=True)[1]


@pytest.mark.slow
def test_ddp_gradients_match_one_process(tmp_path: Path, one_process_frozen) -> None:
    _, (g0, g1) = _two_processes(tmp_path / "two", steps=4, frozen=True)
    assert len(g0) == 4  # two decoder and two encoder steps
    # the ranks step with the same all-reduced gradient, bit for bit
    assert all(torch.equal(a, b) for sa, sb in zip(g0, g1) for a, b in zip(sa, sb))
    assert _worst_grad_error(one_process_frozen, g0) <= GRAD_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_ddp_check_catches_faults(tmp_path: Path, one_process_frozen, fault: str) -> None:
    _, (g0, _) = _two_processes(tmp_path / "two", steps=4, frozen=True, fault=fault)
    assert _worst_grad_error(one_process_frozen, g0) > 100 * GRAD_RTOL, fault


@pytest.mark.slow
def test_ddp_parameters_after_training_match_one_process(tmp_path: Path) -> None:
    start = tiny().state_dict()  # _fit's initial weights
    ref, _ = _fit(tmp_path / "one", cfg=train_cfg(steps=4, ckpt_every=4))
    two, _ = _two_processes(tmp_path / "two", steps=4, frozen=False)
    for k, v in ref.state_dict().items():
        moved = (v - start[k]).norm()
        if moved == 0:  # never trained (e.g. a buffer): must be identical
            assert torch.equal(two.state_dict()[k], v), k
            continue
        assert (two.state_dict()[k] - v).norm() <= PARAM_RTOL * moved, k
