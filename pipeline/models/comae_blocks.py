"""The parts CoMAE (``pipeline/models/comae.py``) is built from: f's and g's shared body, the
[cls]-only last block, the pointer read-out and g's residual head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.layers import Block, RopeTables, apply_rope, init_vit_weights, trunc_normal_


class ComaeError(ValueError):
    """CoMAE input or weights that cannot be used: wrong grid/dim, other config, NaN/inf."""


class ResidualMLP(nn.Module):
    """The decoder's head: ``layers`` pre-norm residual MLP blocks (MAR's ResBlock without
    adaLN), then LayerNorm + Linear to the token dim."""

    def __init__(self, dim: int, out_dim: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, dim), nn.SiLU(),
                          nn.Linear(dim, dim))
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = x + blk(x)
        return self.out(self.norm(x))


class _TargetStack(nn.Module):
    """Shared body of f and g: embed the kept tokens, prepend ``[cls] + q_n``, run pre-norm
    RoPE blocks and return the final-norm ``[cls]`` output."""

    def __init__(self, token_dim: int, num_tokens: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.embed = nn.Linear(token_dim, dim)
        self.cls = nn.Parameter(torch.zeros(1, dim))
        self.query = nn.Parameter(torch.zeros(num_tokens, dim))  # q_n, one row per target
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_dim = dim // heads
        if self.head_dim % 4:
            raise ComaeError(f"2-D RoPE needs width/heads divisible by 4, got {dim}/{heads}")

    def init_weights(self) -> None:
        self.apply(init_vit_weights)
        trunc_normal_(self.cls)
        trunc_normal_(self.query)

    def forward(self, kept: Tensor, tgt: Tensor, rope: RopeTables,
                with_tokens: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """kept: [S, N-1, D] the tokens of S sequences with their target dropped; tgt: [S]
        target indices; rope: tables [S, N, hd] for [cls] + kept. Returns [cls] out [S, C];
        with ``with_tokens`` also the kept tokens as they enter the last block [S, N-1, C]
        (the last block's token outputs are never computed: only [cls] reads them)."""
        h = self.embed(kept)  # [S, N-1, C]
        cls = (self.cls + self.query[tgt]).unsqueeze(1).to(h.dtype)  # [S, 1, C]
        h = torch.cat((cls, h), dim=1)  # [S, N, C]
        for blk in self.blocks[:-1]:
            h = blk(h, rope=rope)
        out = self.norm(_cls_only_block(self.blocks[-1], h, rope))  # [S, C]
        return (out, h[:, 1:]) if with_tokens else out


def _cls_only_block(blk: Block, x: Tensor, rope: RopeTables) -> Tensor:
    """``blk(x, rope)[:, 0]`` computed for the [cls] row only: [S, L, C] -> [S, C].

    Only the [cls] output of the last block is used, so its query, output projection and MLP
    are computed for one row instead of L (the keys and values still need every token). This
    saves ~5/6 of the last block; a test checks it against ``Block.forward``.
    """
    attn = blk.attn
    S, L, C = x.shape
    H, hd = attn.num_heads, attn.head_dim
    y = blk.norm1(x)
    # Split the fused qkv weight so q is computed for the [cls] row only.
    w_q, w_kv = attn.qkv.weight[:C], attn.qkv.weight[C:]
    b_q, b_kv = (None, None) if attn.qkv.bias is None else (attn.qkv.bias[:C], attn.qkv.bias[C:])
    q = F.linear(y[:, :1], w_q, b_q).reshape(S, 1, H, hd).transpose(1, 2)  # [S, H, 1, hd]
    kv = F.linear(y, w_kv, b_kv).reshape(S, L, 2, H, hd).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)  # [S, H, L, hd]
    cos, sin = rope
    q = apply_rope(q, (cos[:, :1], sin[:, :1])).to(v.dtype)
    k = apply_rope(k, rope).to(v.dtype)
    # One query row: softmax(q kᵀ / √hd) v written out. The fused CPU SDPA kernel's
    # single-query path changes the last bits with the intra-op thread count, which made
    # exported scores depend on it; these matmuls are row-local (docs/architecture.md).
    o = (q @ k.transpose(-2, -1)).mul_(hd ** -0.5).softmax(-1) @ v  # [S, H, 1, hd]
    h = x[:, 0] + attn.proj(o.reshape(S, C))  # [S, C]
    return h + blk.mlp(blk.norm2(h))


class PointerHead(nn.Module):
    """Selection logits addressed by content (``comae.select_head: pointer``; beyond the paper).

    The paper reads w off the [cls] output with one linear map to N position-indexed logits, so
    "which patch" must be spelled out by absolute position in [cls]'s features. Here the logit
    of kept patch j is an attention score between [cls]'s output and patch j's state,
    ``<R_n q(cls), R_j k(h_j)> / sqrt(C) + b`` with the 2-D RoPE rotations R of the target's
    cell n and of j: it depends on j's content and on its displacement from the target, the
    two things a dependency can be about. h_j is the token as it enters the last block, the
    same keys the last block's [cls] attends to, so the last block still runs for [cls] only.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 4:
            raise ComaeError(f"the pointer head's 2-D RoPE needs a width divisible by 4, got {dim}")
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, cls: Tensor, kept: Tensor, rope: RopeTables) -> Tensor:
        """cls [S, C] (final, normed), kept [S, N-1, C]; rope tables [S, N, C] for [cls] +
        kept -> logits [S, N-1]."""
        cos, sin = rope
        q = apply_rope(self.q(cls)[:, None, None], (cos[:, :1], sin[:, :1]))  # [S, 1, 1, C]
        k = apply_rope(self.k(self.norm(kept)).unsqueeze(1), (cos[:, 1:], sin[:, 1:]))
        return (q @ k.transpose(-2, -1))[:, 0, 0] * cls.shape[-1] ** -0.5 + self.bias
