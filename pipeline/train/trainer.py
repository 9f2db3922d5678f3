"""The one training loop shared by CoMAE, CViT and CMAR.

A model plugs in through a :class:`TrainTask` (its loss, parameter groups and config); the
trainer owns everything else: the step-indexed data stream, AdamW with warm-up/cosine LR,
bf16 autocast, gradient clipping, non-finite checks, EMA, DDP under ``torchrun``, atomic
checkpoints with exact resume, and the metrics a DVC stage reports.

Determinism: the data order and every random draw are functions of ``(seed, step)`` only.
Before each step the global RNG is reseeded from ``(seed, step)`` (identically on every rank),
and :class:`StepContext` draws task randomness per global row, on the device, from generators
keyed by (seed, step, draw, row): each rank draws only its own rows. Resuming from a checkpoint therefore replays the exact same steps, and a
run on W processes sees the same numbers as one process with the same global batch.
"""

from __future__ import annotations

import math
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, default_collate

from pipeline.config import TrainConfig, params_dict
from pipeline.train.checkpoint import (
    config_diff, latest_checkpoint, save_weights, write_checkpoint,
)
from pipeline.train.ema import EMA
from pipeline.train.log import TrainLog
from pipeline.train.schedules import lr_at
from pipeline.train.steps import StepBatchSampler, StepContext, step_seed
from pipeline.utils.device import autocast, pick_device, resolve_precision
from pipeline.utils.dist import all_reduce_mean, barrier, get_dist
from pipeline.utils.io import atomic_write_json, read_json
from pipeline.utils.progress import progress

# Train-config keys that change what the run computes (the rest only change how it reports).
_RESUME_KEYS = ("steps", "batch_size", "lr", "min_lr", "warmup_frac", "schedule", "weight_decay",
                "betas", "grad_clip", "ema", "precision", "seed")


class NonFiniteError(RuntimeError):
    """NaN or inf in a batch, a loss or a gradient: raised before the optimiser steps."""


class ConfigMismatchError(RuntimeError):
    """A checkpoint that claims this run's configuration but cannot be loaded into it."""


class TrainTask:
    """What a model supplies to the trainer. Subclasses set ``model`` and implement ``loss``."""

    model: nn.Module
    find_unused_parameters: bool = False  # DDP: True when some steps leave parameters unused
    items_per_sample: int = 1  # throughput unit (e.g. target reconstructions per image)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"all": [p for p in self.model.parameters() if p.requires_grad]}

    def active_groups(self, step: int) -> Sequence[str]:
        return list(self.param_groups())

    def loss(self, model: nn.Module, batch: Any, ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        return default_collate(items)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameter names (as ``model.named_parameters()`` spells them) that the model exempts from
    weight decay through timm's ``no_weight_decay()`` hook, found on any submodule (a task may
    wrap the model) and prefixed with that submodule's path."""
    out: set[str] = set()
    for prefix, module in model.named_modules():
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            out |= {f"{prefix}.{n}" if prefix else n for n in hook()}
    return out


def _check_finite_batch(batch: Any, step: int, where: str = "batch") -> None:
    if isinstance(batch, Tensor):
        if batch.is_floating_point() and not torch.isfinite(batch).all():
            bad = (~torch.isfinite(batch)).reshape(batch.shape[0], -1).any(1).nonzero().flatten()
            raise NonFiniteError(f"non-finite values in {where} at step {step} (rows {bad[:8].tolist()})")
    elif isinstance(batch, dict):
        for k, v in batch.items():
            _check_finite_batch(v, step, f"{where}[{k!r}]")
    elif isinstance(batch, (list, tuple)):
        for i, v in enumerate(batch):
            _check_finite_batch(v, step, f"{where}[{i}]")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class _MeanMeter:
    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] += v
            self.counts[k] += 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load(self, state: dict[str, Any]) -> None:
        self.sums.update(state.get("sums", {}))
        self.counts.update(state.get("counts", {}))


class Trainer:
    """``inputs``: the identity of what the run trains on (latent store, orders, image set
    fingerprints). It is stored with every checkpoint beside the task's and the training
    config; a checkpoint whose config or inputs differ is not resumed: the run starts over and
    says why in one line. DVC re-runs a stage exactly when its params or inputs changed, and
    ``persist: true`` keeps the old checkpoints, so resuming them would train on stale data."""

    def __init__(self, task: TrainTask, dataset: Dataset, cfg: TrainConfig, out_dir: str | Path, *,
                 inputs: dict[str, Any] | None = None, log_csv: str | Path | None = None,
                 metrics_json: str | Path | None = None, report: dict[str, Any] | None = None,
                 desc: str = "train", device: torch.device | None = None,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 eval_every: int = 0, eval_csv: str | Path | None = None) -> None:
        self.task, self.dataset, self.cfg = task, dataset, cfg
        self.inputs = dict(inputs or {})
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_json = Path(metrics_json) if metrics_json else None
        self.report = dict(report or {})  # written before the final values in metrics_json
        self.desc = desc
        self.dist = get_dist()
        self.log = TrainLog(self.out_dir, Path(log_csv) if log_csv else None, self.dist.is_main,
                            Path(eval_csv) if eval_csv else None)
        # A learning curve: ``evaluate(model)`` (eval mode, no grad, main rank) every
        # ``eval_every`` steps and at the last, rows into ``eval_log.csv`` beside the
        # checkpoints (so a resumed run keeps its curve) and mirrored to ``eval_csv``.
        if evaluate is not None and eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 with an evaluate function, got {eval_every}")
        self.evaluate, self.eval_every = evaluate, eval_every
        self.device = device or pick_device(self.dist.local_rank)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.step = 0

    # ------------------------------------------------------------------ setup

    def _optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        names = {id(p): n for n, p in model.named_parameters()}
        skip = no_weight_decay_names(model)
        opts = {}
        for group, params in self.task.param_groups().items():
            decay, no_decay = [], []
            for p in params:
                # MAE/MAR convention: no weight decay on biases, norms and 1-D embeddings;
                # plus what the model names (timm's ViT: pos_embed and cls_token, 3-D tensors
                # that the ndim rule would decay).
                name = names.get(id(p), "")
                exempt = p.ndim <= 1 or name.endswith(".bias") or name in skip
                (no_decay if exempt else decay).append(p)
            opts[group] = torch.optim.AdamW(
                [{"params": decay, "weight_decay": self.cfg.weight_decay},
                 {"params": no_decay, "weight_decay": 0.0}],
                lr=self.cfg.lr, betas=tuple(self.cfg.betas),
            )
        return opts

    def _meta(self) -> dict[str, Any]:
        train = params_dict(self.cfg)
        meta = {"task": self.task.config(), "train": {k: train[k] for k in _RESUME_KEYS},
                "inputs": self.inputs}
        # which weights train decides the optimiser's groups: a checkpoint made with others
        # cannot resume (recorded only when some are frozen, so older checkpoints still match)
        frozen = [n for n, p in self.task.model.named_parameters() if not p.requires_grad]
        if frozen:
            meta["frozen"] = frozen
        return meta

    def _resume(self, model: nn.Module, opts: dict[str, torch.optim.Optimizer], ema: EMA | None,
                epoch_meter: _MeanMeter) -> int:
        ckpt = latest_checkpoint(self.ckpt_dir)
        if ckpt is None:
            return 0
        diff = config_diff(ckpt.meta.get("config", {}), self._meta())
        if diff:
            what = "inputs" if any(d.startswith("inputs.") for d in diff) else "configuration"
            if self.dist.is_main:
                print(f"[{self.desc}] starting over: {ckpt.path} was made with other {what} "
                      f"({'; '.join(_short(d) for d in diff[:3])}"
                      f"{f'; {len(diff) - 3} more' if len(diff) > 3 else ''})", flush=True)
            barrier()
            if self.dist.is_main:
                shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            barrier()
            return 0
        model.load_state_dict(ckpt.model())
        state = ckpt.state()
        for name, opt in opts.items():
            opt.load_state_dict(state["optimizers"][name])
        if ema is not None:
            ema_state = ckpt.ema()
            if ema_state is None:
                raise ConfigMismatchError(f"{ckpt.path} has no EMA weights but EMA is enabled")
            ema.load_state_dict(ema_state)
        epoch_meter.load(state.get("epoch_meter", {}))
        if self.dist.is_main:
            print(f"[{self.desc}] resuming from {ckpt.path} (step {ckpt.step})", flush=True)
        return ckpt.step

    # ------------------------------------------------------------------ the loop

    def _reduce(self, means: dict[str, float]) -> dict[str, float]:
        if not self.dist.enabled or not means:
            return means
        keys = sorted(means)
        t = all_reduce_mean(torch.tensor([means[k] for k in keys], dtype=torch.float64,
                                         device=self.device if self.device.type == "cuda" else "cpu"))
        return dict(zip(keys, t.tolist()))

    def fit(self) -> dict[str, Any]:
        cfg, task, dist = self.cfg, self.task, self.dist
        model = task.model.to(self.device)
        opts = self._optimizers(model)
        ema = EMA(model, cfg.ema) if cfg.ema else None
        epoch_meter = _MeanMeter()
        start = self._resume(model, opts, ema, epoch_meter)
        self.step = start
        self.log.truncate(start, start / max(len(self.dataset), 1) * cfg.batch_size)
        self.log.mirror()

        wrapped: nn.Module = model
        if dist.enabled:
            wrapped = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=task.find_unused_parameters,
            )
        n = len(self.dataset)
        sampler = StepBatchSampler(n, cfg.batch_size, cfg.seed, start, cfg.steps, dist.rank, dist.world)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                            collate_fn=task.collate, pin_memory=self.device.type == "cuda")
        rows = torch.arange(sampler.lo, sampler.lo + sampler.per_rank)
        window = _MeanMeter()
        final: dict[str, Any] = {}
        t_window, t_start, samples_window = time.perf_counter(), time.perf_counter(), 0
        bar = progress(total=cfg.steps, initial=start, desc=self.desc, unit="step")
        model.train()
        for batch in loader:
            step = self.step
            torch.manual_seed(step_seed(cfg.seed, step))
            _check_finite_batch(batch, step)
            batch = _to_device(batch, self.device)
            ctx = StepContext(step, rows, cfg.batch_size, self.device, cfg.seed, self.amp_dtype)
            lr = lr_at(step, cfg)
            active = list(task.active_groups(step))
            for name in active:
                for g in opts[name].param_groups:
                    g["lr"] = lr
            with autocast(self.device, self.amp_dtype):
                loss, metrics = task.loss(wrapped, batch, ctx)
            if not torch.isfinite(loss):
                raise NonFiniteError(f"[{self.desc}] loss is {loss.item()} at step {step}: "
                                     f"{ {k: float(v) for k, v in metrics.items()} }")
            loss.backward()
            params = [p for name in active for g in opts[name].param_groups for p in g["params"]
                      if p.grad is not None]
            if cfg.grad_clip:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) \
                    if params else torch.tensor(0.0)
            if not torch.isfinite(gnorm):
                raise NonFiniteError(f"[{self.desc}] gradient norm is {gnorm.item()} at step {step}")
            for name in active:
                opts[name].step()
            for opt in opts.values():
                opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            self.step = step + 1

            values = {k: float(v) for k, v in metrics.items()}
            values["loss"] = float(loss.detach())
            values["grad_norm"] = float(gnorm)
            window.add(values)
            epoch_meter.add(values)
            samples_window += cfg.batch_size
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)

            last = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or last:
                dt = max(time.perf_counter() - t_window, 1e-9)
                means = self._reduce(window.means())
                final = {"step": self.step, "epoch": self.step * cfg.batch_size / n, "lr": lr, **means,
                         "samples_per_s": samples_window / dt,
                         "items_per_s": samples_window * task.items_per_sample / dt}
                self.log.window_row(final)
                window, samples_window, t_window = _MeanMeter(), 0, time.perf_counter()
            # epoch boundary: the samples seen crossed a multiple of the dataset size
            if (self.step * cfg.batch_size) // n > (step * cfg.batch_size) // n or last:
                self.log.epoch_row({"epoch": round(self.step * cfg.batch_size / n, 4),
                                    "step": self.step, **self._reduce(epoch_meter.means())})
                epoch_meter = _MeanMeter()
            if self.evaluate is not None and (self.step % self.eval_every == 0 or last):
                self._evaluate(model)  # before the checkpoint: a resume there keeps this row
            if self.step % cfg.ckpt_every == 0 or last:
                self._checkpoint(model, opts, ema, epoch_meter)
                self.log.mirror()
        bar.close()
        elapsed = time.perf_counter() - t_start
        return self._finish(model, ema, final, elapsed, start)

    def _evaluate(self, model: nn.Module) -> None:
        if self.dist.is_main:
            model.eval()
            # the evaluation's own draws must not shift the next step's: the trainer reseeds
            # every step, but a task may hold generators of its own
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                values = self.evaluate(model)
            model.train()
            self.log.eval_row({"step": self.step, **{k: float(v) for k, v in values.items()}})
        barrier()

    def _checkpoint(self, model: nn.Module, opts: dict[str, torch.optim.Optimizer], ema: EMA | None,
                    epoch_meter: _MeanMeter) -> None:
        if self.dist.is_main:
            write_checkpoint(
                self.ckpt_dir, self.step, model.state_dict(),
                ema.state_dict() if ema is not None else None,
                {"optimizers": {k: o.state_dict() for k, o in opts.items()},
                 "epoch_meter": epoch_meter.state()},
                {"config": self._meta()},
            )
        barrier()

    def _finish(self, model: nn.Module, ema: EMA | None, final: dict[str, Any], elapsed: float,
                start: int) -> dict[str, Any]:
        ckpt = latest_checkpoint(self.ckpt_dir)
        if ckpt is None or ckpt.step != self.cfg.steps:
            raise RuntimeError(f"training ended at step {self.step} without a final checkpoint")
        if not final:  # the run had already finished: report what it logged then, its
            # wall time included (0 s of this no-op run would read as infinitely fast training)
            prev = self.out_dir / "config.json"
            final = dict(read_json(prev).get("final", {})) if prev.exists() else {"step": ckpt.step}
            final.setdefault("wall_time_s", None)
        else:
            final["wall_time_s"] = elapsed  # of this run, which did steps_this_run steps
        final = {**final, "train_steps": self.cfg.steps, "steps_this_run": self.cfg.steps - start}
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_weights(self.out_dir / "model.safetensors", model.state_dict())
            ema_state = ckpt.ema()
            if ema_state is not None:
                save_weights(self.out_dir / "model_ema.safetensors", ema_state)
            atomic_write_json(self.out_dir / "config.json",
                              {**self._meta(), "train_full": params_dict(self.cfg), "final": final})
            if self.metrics_json:
                atomic_write_json(self.metrics_json, json_safe({**self.report, **final}))
        barrier()
        return final


def _short(diff: str, width: int = 60) -> str:
    """One ``key: old != new`` entry cut to a readable length (identities are long hashes)."""
    return diff if len(diff) <= width else diff[:width - 1] + "…"


def json_safe(d: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf floats as null: JSON has no spelling for them."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
