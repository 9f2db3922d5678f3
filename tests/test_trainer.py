"""The shared trainer, on a toy task: resume, DDP equivalence, fault handling."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.config import TrainConfig
from pipeline.train.checkpoint import latest_checkpoint
from pipeline.train.schedules import lr_at
from pipeline.train.steps import StepBatchSampler
from pipeline.train.trainer import NonFiniteError, Trainer, TrainTask
from tests.support import as_rank, free_port


class ToyTask(TrainTask):
    """Noisy linear regression with two alternately-stepped halves (like CoMAE's f and g)."""

    def __init__(self, alternate: bool = False, width: int = 8, kill_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.kill_at = kill_at  # raise Killed at this step, as a kill between checkpoints would
        self.model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))
        self.alternate = alternate
        self.width = width
        self.find_unused_parameters = alternate

    def param_groups(self):
        if not self.alternate:
            return super().param_groups()
        return {"first": list(self.model[0].parameters()), "second": list(self.model[2].parameters())}

    def active_groups(self, step):
        if not self.alternate:
            return ["all"]
        return ["second"] if step % 2 == 0 else ["first"]

    def loss(self, model, batch, ctx):
        if ctx.step == self.kill_at:
            raise Killed
        x, y = batch
        x = x + 0.1 * ctx.randn(4)  # randomness drawn for the global batch, sliced per rank
        pred = model(x).squeeze(-1)
        loss = (pred - y).pow(2).mean()
        return loss, {"mse": loss.detach()}

    def config(self):
        return {"width": self.width, "alternate": self.alternate}


class Killed(Exception):
    pass


def toy_data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)
    return TensorDataset(x, y)


def cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=8, lr=1e-2, ckpt_every=4, log_every=2, ema=0.9,
                precision="fp32", warmup_frac=0.25)
    base.update(kw)
    return TrainConfig(**base)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_lr_schedule_warmup_then_cosine_to_min():
    c = TrainConfig(steps=100, lr=1e-3, min_lr=1e-5, warmup_frac=0.1)
    assert lr_at(0, c) == pytest.approx(1e-4)
    assert lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(10, c) == pytest.approx(1e-3)
    assert lr_at(100, c) == pytest.approx(1e-5)
    assert lr_at(55, c) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))


def test_step_noise_is_per_global_row():
    """Each rank draws only its own rows, and gets exactly the numbers one process holding the
    whole batch gets for them; a step's scalar is the same everywhere."""
    from pipeline.train.steps import StepContext

    def ctx(rows, step=5):
        return StepContext(step, torch.as_tensor(rows), 6, torch.device("cpu"), 3, torch.float32)

    def draws(c):
        return (c.uniform(), c.randn(2, 3), c.rand(), c.randint(10, 4), c.randperm(7))

    one, lo, hi = draws(ctx(range(6))), draws(ctx([0, 1, 2])), draws(ctx([3, 4, 5]))
    assert one[0] == lo[0] == hi[0]
    for a, b, c in zip(one[1:], lo[1:], hi[1:]):
        assert torch.equal(a, torch.cat([b, c]))
    assert one[1].shape == (6, 2, 3) and one[2].shape == (6,) and one[3].shape == (6, 4)
    assert all(sorted(p.tolist()) == list(range(7)) for p in one[4])
    assert len({tuple(r.flatten().tolist()) for r in one[1]}) == 6  # rows differ
    assert not torch.equal(draws(ctx(range(6), step=6))[1], one[1])  # steps differ
    c = ctx(range(6))
    assert not torch.equal(c.randn(2, 3), c.randn(2, 3))  # successive draws differ


def test_sampler_split_is_disjoint_and_complete():
    one = StepBatchSampler(10, 4, seed=3, start_step=0, end_step=5)
    parts = [list(StepBatchSampler(10, 4, 3, 0, 5, rank=r, world=2)) for r in range(2)]
    for s, full in enumerate(one):
        assert parts[0][s] + parts[1][s] == full
    # each epoch is a permutation
    stream = [i for b in one for i in b]
    assert sorted(stream[:10]) == list(range(10))
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(10, 3, 0, 0, 1, rank=0, world=2)


@pytest.mark.parametrize("alternate", [False, True])
def test_resume_after_kill_is_exact(tmp_path, alternate):
    full = Trainer(ToyTask(alternate), toy_data(), cfg(), tmp_path / "full",
                   log_csv=tmp_path / "full.csv").fit()

    with pytest.raises(Killed):
        Trainer(ToyTask(alternate, kill_at=6), toy_data(), cfg(), tmp_path / "killed",
                log_csv=tmp_path / "killed.csv").fit()
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").step == 4
    resumed = Trainer(ToyTask(alternate), toy_data(), cfg(), tmp_path / "killed",
                      log_csv=tmp_path / "killed.csv").fit()
    assert resumed["steps_this_run"] == 8
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = weights(tmp_path / "full" / name), weights(tmp_path / "killed" / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    rows = list(csv.DictReader((tmp_path / "killed.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]  # no duplicated window
    assert resumed["mse"] == pytest.approx(full["mse"])


def test_alternating_groups_step_only_the_active_half(tmp_path):
    task = ToyTask(alternate=True)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    Trainer(task, toy_data(), cfg(steps=1, ema=None, ckpt_every=1), tmp_path).fit()
    after = task.model.state_dict()
    assert torch.equal(before["0.weight"], after["0.weight"])  # step 0 trains "second"
    assert not torch.equal(before["2.weight"], after["2.weight"])


def test_non_finite_batch_is_refused_before_any_update(tmp_path):
    data = toy_data()
    data.tensors[0][5, 2] = float("nan")
    task = ToyTask()
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    with pytest.raises(NonFiniteError, match="non-finite values in batch"):
        Trainer(task, data, cfg(steps=20, batch_size=64), tmp_path).fit()
    for k, v in task.model.state_dict().items():
        assert torch.equal(before[k], v)


def test_checkpoint_from_another_config_or_inputs_starts_over(tmp_path, capsys):
    def fit(task, inputs=None, **kw):
        out = Trainer(task, toy_data(), cfg(steps=4, **kw), tmp_path, inputs=inputs).fit()
        return out, capsys.readouterr().out

    fit(ToyTask(width=8), {"data": "a"})
    for task, inputs, kw, why in [(ToyTask(width=16), {"data": "a"}, {}, "configuration (task.width"),
                                  (ToyTask(width=16), {"data": "a"}, {"lr": 0.5}, "train.lr"),
                                  (ToyTask(width=16), {"data": "b"}, {"lr": 0.5}, "inputs (inputs.data")]:
        out, printed = fit(task, inputs, **kw)
        assert out["steps_this_run"] == 4
        line = [ln for ln in printed.splitlines() if "starting over" in ln]
        assert len(line) == 1 and why in line[0], printed
    # the inputs are part of what the run saves
    assert json.loads((tmp_path / "config.json").read_text())["inputs"] == {"data": "b"}
    trained = json.loads((tmp_path / "config.json").read_text())["final"]
    out, printed = fit(ToyTask(width=16), {"data": "b"}, lr=0.5)  # same again: nothing to do
    assert out["steps_this_run"] == 0 and "starting over" not in printed
    # the no-op rerun reports the run that trained, not its own ~0 s
    assert out["wall_time_s"] == trained["wall_time_s"] and out["loss"] == trained["loss"]


def test_half_written_checkpoint_is_ignored(tmp_path):
    Trainer(ToyTask(), toy_data(), cfg(steps=8), tmp_path).fit()
    ckpts = tmp_path / "checkpoints"
    # a kill mid-write leaves a temporary folder and possibly a stale pointer
    (ckpts / ".step-0000012.abc").mkdir()
    (ckpts / ".step-0000012.abc" / "model.safetensors").write_bytes(b"partial")
    (ckpts / "latest").write_text("step-0000012\n")
    assert latest_checkpoint(ckpts).step == 8
    out = Trainer(ToyTask(), toy_data(), cfg(steps=8), tmp_path).fit()
    assert out["steps_this_run"] == 0


def _ddp_worker(rank: int, world: int, port: int, out: str, alternate: bool) -> None:
    as_rank(rank, world, port)
    from pipeline.utils.dist import cleanup, init_distributed

    init_distributed("gloo")
    try:
        Trainer(ToyTask(alternate), toy_data(), cfg(), out).fit()
    finally:
        cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("alternate", [False, True])
def test_two_process_ddp_matches_one_process(tmp_path, alternate):
    Trainer(ToyTask(alternate), toy_data(), cfg(), tmp_path / "one").fit()
    mp.start_processes(_ddp_worker, args=(2, free_port(), str(tmp_path / "two"), alternate),
                       nprocs=2, join=True, start_method="spawn")
    a, b = weights(tmp_path / "one" / "model.safetensors"), weights(tmp_path / "two" / "model.safetensors")
    for k in a:
        # a 4-8-1 net, sums of 4 rows per rank: rounding ~1e-7, and no gradient entry here sits at
        # rounding level for AdamW to flip (see the DDP notes in test_comae.py); passes on AVX2 and AVX-512
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_checkpoint_with_other_frozen_weights_starts_over(tmp_path, capsys):
    """Freezing weights changes the optimiser's groups: the old state cannot load into them."""
    def fit(task):
        out = Trainer(task, toy_data(), cfg(steps=4), tmp_path).fit()
        return out, capsys.readouterr().out

    fit(ToyTask())
    frozen = ToyTask()
    frozen.model[0].requires_grad_(False)  # same config, fewer weights train
    out, printed = fit(frozen)
    assert out["steps_this_run"] == 4 and "starting over" in printed and "frozen" in printed
    before = frozen.model[0].weight.detach().clone()
    out, printed = fit(frozen)  # same again: nothing to do
    assert out["steps_this_run"] == 0 and torch.equal(frozen.model[0].weight, before)
