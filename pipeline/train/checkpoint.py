"""Training checkpoints: safetensors weights + a small state file, written atomically.

A finished run's folder holds ``config.json`` (the task config, the training keys, the
identity of its inputs and the final metrics), ``model.safetensors`` and, with EMA,
``model_ema.safetensors``: :func:`load_run` is the one reader of it for every model.

Layout under ``<out>/checkpoints/``::

    step-0000200/  model.safetensors  ema.safetensors  state.pt  meta.json
    latest         (text: the name of the newest complete checkpoint)

A checkpoint directory is assembled under a temporary name and renamed into place only when
every file is written, so a kill during writing leaves the previous checkpoint usable.
``meta.json`` is written last inside the directory and marks it complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn
from safetensors.torch import load_file, save_file

from pipeline.utils.io import atomic_write_text, read_json, sha256_file

CKPT_FORMAT = "cop-ckpt/1"


def state_dict_to_save(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone() breaks storage sharing (tied weights), which safetensors refuses to write.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from pipeline.utils.io import atomic_path

    with atomic_path(path) as tmp:
        save_file(state_dict_to_save(state), str(tmp), metadata=metadata)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@dataclass
class Checkpoint:
    path: Path
    step: int

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "meta.json").read_text())

    def model(self) -> dict[str, torch.Tensor]:
        return load_weights(self.path / "model.safetensors")

    def ema(self) -> dict[str, torch.Tensor] | None:
        p = self.path / "ema.safetensors"
        return load_weights(p) if p.exists() else None

    def state(self) -> dict[str, Any]:
        return torch.load(self.path / "state.pt", map_location="cpu", weights_only=True)


@dataclass
class TrainedRun:
    """What a finished training run left in its folder (see ``Trainer``)."""

    path: Path
    meta: dict[str, Any]  # config.json: task, train, inputs, train_full, final
    weights: Path  # the file ``state`` was read from
    state: dict[str, torch.Tensor]

    @property
    def task(self) -> dict[str, Any]:
        return self.meta.get("task", {})

    @property
    def inputs(self) -> dict[str, Any]:
        return self.meta.get("inputs", {})

    def sha256(self) -> str:
        return sha256_file(self.weights)


def load_run(path: str | Path, weights: Literal["auto", "ema", "model"] = "auto",
             map_location: str | torch.device = "cpu") -> TrainedRun:
    """``config.json`` and the weights of a finished run. ``weights="auto"`` prefers the EMA
    weights when training kept them (MAE and MAR evaluate their EMA models)."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"no trained model at {path}: {cfg_path.name} is missing "
                                "(run its training stage first)")
    files = {"ema": path / "model_ema.safetensors", "model": path / "model.safetensors"}
    if weights == "auto":
        weights = "ema" if files["ema"].exists() else "model"
    file = files[weights]
    if not file.exists():
        raise FileNotFoundError(f"no weights at {file} (run its training stage first)")
    return TrainedRun(path, read_json(cfg_path), file, load_file(str(file), device=str(map_location)))


class CheckpointError(ValueError):
    """A trained-model folder that cannot be loaded as the model its config.json describes."""


def load_trained(path: str | Path, build: Callable[[dict[str, Any]], nn.Module], *,
                 kind: str | None = None, weights: Literal["auto", "ema", "model"] = "auto",
                 map_location: str | torch.device = "cpu") -> tuple[nn.Module, TrainedRun]:
    """The one reader of a finished run for every model (nanoGPT's ``GPT(GPTConfig(**args))``).

    ``build(task)`` rebuilds the network from the task config the run stored (its arch);
    ``kind``: what ``task["kind"]`` must say (older CoMAE configs say it as ``format``).
    The weights load strictly: missing, unexpected and wrong-shape keys are named, NaN/inf
    weights refused. Returns (model in eval mode on ``map_location``, the run: its task
    config, ``inputs`` -- the identity of what it was trained on --, weights file, sha256).
    """
    run = load_run(path, weights, map_location)
    found = run.task.get("kind", run.task.get("format"))
    if kind is not None and found != kind:
        raise CheckpointError(f"{path} does not hold a {kind} model (its config.json says {found!r})")
    model = build(run.task)
    own, state = model.state_dict(), run.state
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{run.weights} does not match its config.json (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, wrong shapes {wrong[:4]}); the folder mixes two trainings")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{run.weights} holds NaN/inf weights in {bad[:4]}")
    model.load_state_dict(state)
    return model.to(map_location).eval(), run


def _is_complete(d: Path) -> bool:
    return (d / "meta.json").exists() and (d / "model.safetensors").exists() and (d / "state.pt").exists()


def latest_checkpoint(ckpt_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint; half-written ones (no meta.json) are ignored."""
    if not ckpt_dir.exists():
        return None
    pointer = ckpt_dir / "latest"
    if pointer.exists():
        d = ckpt_dir / pointer.read_text().strip()
        if _is_complete(d):
            return Checkpoint(d, int(d.name.split("-")[1]))
    done = sorted(d for d in ckpt_dir.glob("step-*") if d.is_dir() and _is_complete(d))
    return Checkpoint(done[-1], int(done[-1].name.split("-")[1])) if done else None


def write_checkpoint(ckpt_dir: Path, step: int, model_state: dict[str, torch.Tensor],
                     ema_state: dict[str, torch.Tensor] | None, state: dict[str, Any],
                     meta: dict[str, Any], keep: int = 2) -> Checkpoint:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", dir=ckpt_dir))
    try:
        save_file(state_dict_to_save(model_state), str(tmp / "model.safetensors"))
        if ema_state is not None:
            save_file(state_dict_to_save(ema_state), str(tmp / "ema.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"format": CKPT_FORMAT, "step": step, **meta},
                                                  indent=2, sort_keys=True, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(ckpt_dir / "latest", final.name + "\n")
    for old in sorted(d for d in ckpt_dir.glob("step-*") if d.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob(".step-*"):  # leftovers of killed writes
        shutil.rmtree(stale, ignore_errors=True)
    return Checkpoint(final, step)


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key}: {va!r} != {vb!r}")
    return out
