"""CoMAE's training task for the shared trainer (``pipeline.train.trainer``).

The paper optimises f and g "alternately, batch by batch" (Sec. 3.1, 4): even steps update
the decoder g (f runs without autograd, so w is a constant), odd steps update the encoder f
(and tau) through g, whose parameters are detached for that step. Each group has its own AdamW
(``param_groups``) and the trainer steps only ``active_groups(step)``.

Per step and image the task draws, from the trainer's (seed, step) generator so that 1 and N
processes see the same numbers: a horizontal flip (the store's cached flipped latents),
``targets_per_image`` distinct targets, and the noise eps of eq. 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.config import ComaeConfig
from pipeline.models.comae import (
    ARCH_FIELDS,
    FORMAT,
    CoMAE,
    ComaeArch,
    ComaeError,
    contrastive_loss,
    mask_entropy,
    reconstruction_loss,
)
from pipeline.train.checkpoint import CheckpointError, load_trained
from pipeline.train.trainer import StepContext, TrainTask
from pipeline.utils.dist import unwrap

ENCODER, DECODER = "encoder", "decoder"


def comae_arch(cfg: ComaeConfig, grid: int, token_dim: int) -> ComaeArch:
    """The network the ``comae`` params describe, for a store's ``grid`` and ``token_dim``."""
    return ComaeArch(grid=grid, token_dim=token_dim,
                     **{f: getattr(cfg, f) for f in ComaeArch.__dataclass_fields__
                        if f not in ("grid", "token_dim")})


def stored_config(cfg: ComaeConfig, grid: int, token_dim: int) -> dict[str, Any]:
    """What config.json stores of the network: enough to rebuild it (:func:`comae_from_config`)."""
    return {"format": FORMAT, "grid": grid, "token_dim": token_dim,
            "comae": cfg.model_dump(mode="json", by_alias=True, exclude={"train", "report_images"})}


class ComaeTask(TrainTask):
    find_unused_parameters = True  # each alternating step leaves one half without gradients

    def __init__(self, model: CoMAE, cfg: ComaeConfig,
                 extra_config: dict[str, Any] | None = None) -> None:
        if cfg.targets_per_image > model.num_tokens - 1:
            raise ComaeError(
                f"comae.targets_per_image ({cfg.targets_per_image}) must be below the number "
                f"of tokens per image ({model.num_tokens})"
            )
        self.model = model
        self.cfg = cfg
        self.extra_config = dict(extra_config or {})
        self.items_per_sample = cfg.targets_per_image  # throughput unit: reconstructions/s

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {ENCODER: self.model.encoder_parameters(), DECODER: self.model.decoder_parameters()}

    @staticmethod
    def half_at(step: int) -> str:
        """Which half learns at ``step``: the decoder on even steps, the encoder on odd."""
        return DECODER if step % 2 == 0 else ENCODER

    def active_groups(self, step: int) -> list[str]:
        return [self.half_at(step)]

    def config(self) -> dict[str, Any]:
        # Architecture + grid/dim (config.json) and the loss settings: resuming a run with a
        # different lambda/sigma/targets is a different experiment, not a continuation.
        return {**stored_config(self.cfg, self.model.grid, self.model.token_dim), **self.extra_config}

    def budget_at(self, step: int) -> float | None:
        """The selection budget at ``step``: ``budget_start`` falling linearly to ``budget``
        over the first ``budget_anneal`` of training, so g first learns from rich context
        which tokens matter, then f must choose few of them (a curriculum; null: constant)."""
        cfg = self.cfg
        if cfg.budget is None or cfg.budget_start is None:
            return cfg.budget
        t = min(1.0, step / max(1.0, cfg.budget_anneal * cfg.train.steps))
        return cfg.budget_start + t * (cfg.budget - cfg.budget_start)

    def loss(self, model: nn.Module, batch: dict[str, Tensor], ctx: StepContext
             ) -> tuple[Tensor, dict[str, float | Tensor]]:
        core = unwrap(model)  # for its sizes and checks; the pass itself goes through model
        N, D, T = core.num_tokens, core.token_dim, self.cfg.targets_per_image
        grids = batch["tokens"].to(ctx.device)  # [b, D, h, w] (this rank's rows)
        flip = ctx.rand() < 0.5  # [b]
        grids = torch.where(flip[:, None, None, None], batch["tokens_flip"].to(ctx.device), grids)
        tokens = grids.flatten(2).transpose(1, 2).contiguous()  # [b, N, D]
        core.check_tokens(tokens)  # wrong grid/dim or NaN/inf: stop before any update
        targets = ctx.randperm(N)[:, :T]  # [b, T] distinct targets per image
        eps = ctx.randn(T, N - 1, D)  # [b, T, N-1, D] eq. 3 noise for the kept tokens

        half = self.half_at(ctx.step)
        shuffle = None
        if half == DECODER and self.cfg.w_shuffle > 0:
            shuffle = (ctx.rand(T) < self.cfg.w_shuffle, ctx.rand(T, N - 1))  # rows, keys
        out = model(tokens, targets, eps, update=half, budget=self.budget_at(ctx.step),
                    shuffle=shuffle)
        w, tau = out["w"], out["tau"]  # [b, T, N], scalar (both constants in g's step)
        l_r = reconstruction_loss(out["target"], out["recon"])
        l_c = contrastive_loss(w, tau)  # depends on f and tau only: no gradient in g's step
        loss = l_r + self.cfg.lambda_ * l_c
        metrics = {
            "L_r": l_r.detach(),
            "L_c": l_c.detach(),
            "H_mask": mask_entropy(w.detach()),
            "tau": tau.detach(),
            "w_mean": w.detach().mean(),
        }
        return loss, metrics


def build_comae(cfg: ComaeConfig, store: Any, seed: int, **extra: Any) -> ComaeTask:
    """A freshly initialised CoMAE for ``store``'s grid and token dim, in its training task.

    The initial weights are a function of ``seed`` (recorded with ``extra`` in the run's
    config, so another seed is another run, not a resume).
    """
    torch.manual_seed(seed)
    model = CoMAE(comae_arch(cfg, store.grid, store.dim))
    model.check_store(store)
    return ComaeTask(model, cfg, extra_config={"init_seed": seed, **extra})


# ----------------------------------------------------------------------------- trained model


def arch_mismatch(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Architecture fields (and grid/token dim) that differ between two config.json dicts."""
    out = [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in ("grid", "token_dim") if a.get(k) != b.get(k)]
    # a field missing from an older config.json holds its default
    default = ComaeConfig().model_dump(mode="json", by_alias=True)
    ca, cb = ({**default, **a.get("comae", {})}, {**default, **b.get("comae", {})})
    return out + [f"comae.{k}: {ca.get(k)!r} != {cb.get(k)!r}" for k in ARCH_FIELDS
                  if ca.get(k) != cb.get(k)]


def comae_from_config(stored: dict[str, Any]) -> CoMAE:
    """The network a run's task config describes (what :func:`stored_config` wrote)."""
    if stored.get("format") != FORMAT:
        raise ComaeError(f"task config format {stored.get('format')!r}, this code reads {FORMAT!r}")
    # a field missing from an older config.json holds its params default
    cfg = ComaeConfig.model_validate(stored["comae"])
    return CoMAE(comae_arch(cfg, int(stored["grid"]), int(stored["token_dim"])))


def load_comae(path: str | Path, expect: ComaeConfig | None = None,
               weights: Literal["auto", "ema", "model"] = "auto",
               map_location: str | torch.device = "cpu") -> tuple[CoMAE, dict[str, Any]]:
    """A trained CoMAE from ``path`` (``data/comae``), read by :func:`load_trained`.

    ``expect``: the ComaeConfig the caller was configured with; an architecture that differs
    from the stored one is refused with the differing keys named (params.yaml changed since
    training: re-run train_comae). Returns (model in eval mode, info) with info = {"config",
    "weights" (file name), "sha256" (of that file), "path"}.
    """
    try:
        model, run = load_trained(path, _rebuild(path, expect), weights=weights,
                                  map_location=map_location)
    except (FileNotFoundError, CheckpointError) as err:
        raise ComaeError(str(err)) from None
    info = {"config": run.task, "weights": run.weights.name, "sha256": run.sha256(), "path": str(path)}
    return model, info


def _rebuild(path: str | Path, expect: ComaeConfig | None):
    """``build`` for :func:`load_trained`: the stored network, after checking it against the
    configured one (params.yaml changed since training: say which keys)."""
    def build(stored: dict[str, Any]) -> CoMAE:
        if expect is not None:
            want = {"grid": stored.get("grid"), "token_dim": stored.get("token_dim"),
                    "comae": {k: getattr(expect, k) for k in ARCH_FIELDS}}
            diff = arch_mismatch(stored, want)
            if diff:
                raise ComaeError(
                    f"the CoMAE in {path} was trained with another architecture than the one "
                    f"configured ({'; '.join(diff)}); re-run train_comae or restore the params")
        try:
            return comae_from_config(stored)
        except ComaeError as err:
            raise ComaeError(f"{Path(path) / 'config.json'}: {err}") from None
    return build


__all__ = ["ComaeTask", "DECODER", "ENCODER", "arch_mismatch", "build_comae", "comae_arch",
           "comae_from_config", "load_comae", "stored_config"]
