"""The critic: an any-order masked token predictor that says how uncertain the hidden tokens are.

Given an image's token grid and which tokens are revealed, it predicts for every token a
distribution per channel (a location and a log-scale): Gaussian or Laplace. Its negative
log-likelihood of the hidden tokens, in nats per channel, is the paper's criterion for an
order made measurable: reveal the first k patches of the order, score what is still hidden;
an order that collapses the image fast drives that number down fast.

It is built to judge orders it did not help make: it shares no weights or objective with
CoMAE, and a stage trains two of them (another width, depth, seed and likelihood) so the
ranking of orders can be checked for agreement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pipeline.models.layers import Block, init_vit_weights, trunc_normal_

LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 5.0  # keeps exp() finite early in training


@dataclass(frozen=True)
class CriticArch:
    num_tokens: int          # N = grid * grid
    token_dim: int           # channels of one token
    dim: int = 96
    depth: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    likelihood: Literal["gaussian", "laplace"] = "gaussian"

    def to_dict(self) -> dict:
        return asdict(self)


class Critic(nn.Module):
    def __init__(self, arch: CriticArch) -> None:
        super().__init__()
        if arch.dim % arch.heads:
            raise ValueError(f"critic dim ({arch.dim}) must be divisible by heads ({arch.heads})")
        self.arch = arch
        self.embed = nn.Linear(arch.token_dim, arch.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, arch.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.num_tokens, arch.dim))
        self.blocks = nn.ModuleList(Block(arch.dim, arch.heads, arch.mlp_ratio)
                                    for _ in range(arch.depth))
        self.norm = nn.LayerNorm(arch.dim, eps=1e-6)
        self.head = nn.Linear(arch.dim, 2 * arch.token_dim)
        self.apply(init_vit_weights)
        trunc_normal_(self.mask_token)
        trunc_normal_(self.pos_embed)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "pos_embed"}

    def forward(self, tokens: Tensor, revealed: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, N, D], revealed bool [B, N] -> (loc, log_scale), each [B, N, D].
        A hidden token's value never enters the network: only its position does."""
        B, N, D = tokens.shape
        if (N, D) != (self.arch.num_tokens, self.arch.token_dim):
            raise ValueError(f"critic built for {self.arch.num_tokens} tokens of "
                             f"{self.arch.token_dim} channels, got {N} of {D}")
        x = self.embed(tokens)
        x = torch.where(revealed[..., None], x, self.mask_token.to(x.dtype)) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        loc, log_scale = self.head(self.norm(x)).chunk(2, dim=-1)
        return loc, log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)

    def nll(self, tokens: Tensor, revealed: Tensor) -> Tensor:
        """Negative log-likelihood of every token, nats per channel: [B, N]."""
        loc, log_scale = self(tokens, revealed)
        return token_nll(tokens, loc, log_scale, self.arch.likelihood)


    def nll_and_l1(self, tokens: Tensor, revealed: Tensor) -> Tensor:
        """[B, N, 2]: every token's NLL (nats per channel) and the L1 error of the predicted
        location summed over channels (CoMAE's L_r units), from one pass."""
        loc, log_scale = self(tokens, revealed)
        nll = token_nll(tokens, loc, log_scale, self.arch.likelihood)
        return torch.stack([nll, (tokens - loc).abs().sum(-1).to(nll.dtype)], dim=-1)


def token_nll(x: Tensor, loc: Tensor, log_scale: Tensor, likelihood: str) -> Tensor:
    """Mean over channels of -log p(x) under a per-channel Gaussian (scale = std) or Laplace."""
    if likelihood == "gaussian":
        z = (x - loc) * torch.exp(-log_scale)
        per = 0.5 * z * z + log_scale + 0.5 * math.log(2 * math.pi)
    elif likelihood == "laplace":
        per = (x - loc).abs() * torch.exp(-log_scale) + log_scale + math.log(2.0)
    else:
        raise ValueError(f"unknown likelihood {likelihood!r} (gaussian | laplace)")
    return per.mean(-1)


__all__ = ["Critic", "CriticArch", "token_nll"]
