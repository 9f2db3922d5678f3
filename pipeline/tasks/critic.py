"""Training and loading the critics (stage ``train_critic``): any-order masked token predictors.

Each step reveals, per image, a uniformly drawn number k in [0, N-1] of its tokens at random
positions (every reveal ratio an order passes through, from nothing to all but one) and
minimises the negative log-likelihood of the hidden ones. Half the images are the horizontal
flip. Every draw comes from the trainer's ``StepContext``, so 1 and N processes train alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.models.critic import Critic, CriticArch, token_nll
from pipeline.train.checkpoint import load_trained
from pipeline.train.trainer import StepContext, TrainTask

TASK_KIND = "critic"
CRITICS = ("scorer", "builder")  # scores the orders / builds the critic-made orders


def critic_arch(cfg: Any, num_tokens: int, token_dim: int) -> CriticArch:
    """``cfg``: a ``critic.scorer`` / ``critic.builder`` section."""
    return CriticArch(num_tokens=num_tokens, token_dim=token_dim, dim=cfg.dim, depth=cfg.depth,
                      heads=cfg.heads, likelihood=cfg.likelihood)


def random_reveal(ctx: StepContext, num_tokens: int) -> Tensor:
    """bool [b, N]: k ~ U{0..N-1} tokens revealed per image, at uniformly random positions."""
    k = ctx.randint(num_tokens)  # [b]
    rank = ctx.randperm(num_tokens)  # [b, N]: each token's place in a random order
    return rank < k[:, None]


class CriticTask(TrainTask):
    def __init__(self, model: Critic, extra_config: dict[str, Any] | None = None) -> None:
        self.model = model
        self.extra_config = dict(extra_config or {})

    def config(self) -> dict[str, Any]:
        return {"kind": TASK_KIND, "arch": self.model.arch.to_dict(), **self.extra_config}

    def loss(self, model: nn.Module, batch: dict[str, Tensor], ctx: StepContext
             ) -> tuple[Tensor, dict[str, Any]]:
        flip = ctx.rand() < 0.5
        grid = torch.where(flip[:, None, None, None], batch["tokens_flip"], batch["tokens"])
        x = grid.flatten(2).transpose(1, 2).float()  # [b, N, D]
        revealed = random_reveal(ctx, x.shape[1])
        loc, log_scale = model(x, revealed)  # through the DDP wrapper: gradients sync
        nll = token_nll(x, loc, log_scale, self.model.arch.likelihood)
        hidden = (~revealed).float()
        loss = (nll * hidden).sum() / hidden.sum()
        return loss, {"nll": loss.detach(), "revealed_share": float(revealed.float().mean())}


def load_critic(directory: str | Path, device: str | torch.device = "cpu"
                ) -> tuple[Critic, dict[str, Any]]:
    """A trained critic (eval mode, on ``device``) and its run's meta."""
    model, run = load_trained(directory, lambda task: Critic(CriticArch(**task["arch"])),
                              kind=TASK_KIND, weights="model", map_location=device)
    return model, {**run.meta, "weights": run.weights.name, "sha256": run.sha256()}


__all__ = ["CRITICS", "CriticTask", "critic_arch", "load_critic", "random_reveal"]
