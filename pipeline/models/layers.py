"""Transformer building blocks shared by CoMAE, the ViT (CViT) and MAR.

Parameter names follow timm's ``vision_transformer.py`` (``norm1``, ``attn.qkv``,
``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) because published ViT-B/16 and MAR
checkpoints are stored under those names and must load as they are.
Attention runs through ``F.scaled_dot_product_attention`` (fused kernels on CPU and GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RopeTables = tuple[Tensor, Tensor]  # (cos, sin), each [B or 1, L, head_dim]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, rope: RopeTables) -> Tensor:
    """x: [B, H, L, hd]; cos/sin: [B, L, hd] broadcast over heads."""
    cos, sin = rope
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def rope_2d_tables(pos: Tensor, valid: Tensor, head_dim: int, base: float = 100.0) -> RopeTables:
    """Axial 2-D rotary tables.

    pos:   [B, L, 2] integer (row, col) grid positions of each token.
    valid: [B, L] bool; False for tokens without a grid position ([cls], queries), which get
           the identity rotation (cos 1, sin 0) so they stay position-free.
    Half of each head's channels rotate with the row, half with the column.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = base ** (-torch.arange(quarter, device=pos.device, dtype=torch.float32) / quarter)
    ang_r = pos[..., 0:1].float() * inv_freq  # [B, L, hd/4]
    ang_c = pos[..., 1:2].float() * inv_freq
    ang = torch.cat((ang_r, ang_c), dim=-1)  # [B, L, hd/2]
    ang = torch.cat((ang, ang), dim=-1)  # [B, L, hd] (rotate_half pairs i with i + hd/2)
    ang = ang * valid.unsqueeze(-1)
    return ang.cos(), ang.sin()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, rope: RopeTables | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, L, hd]
        if rope is not None:
            q, k = apply_rope(q, rope).to(v.dtype), apply_rope(k, rope).to(v.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block, timm-compatible names."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: Tensor, rope: RopeTables | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


def trunc_normal_(t: Tensor, std: float = 0.02) -> Tensor:
    return nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


def init_vit_weights(module: nn.Module) -> None:
    """timm/MAE-style init: xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the one convolution that equals ``bn(conv(x))`` with ``bn`` in eval
    mode (its running statistics): bn scales each output channel and shifts it."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # [out]
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * scale[:, None, None, None], bn.bias + (bias - bn.running_mean) * scale


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def attention_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-accumulate FLOPs (x2) of a ViT stack over ``tokens`` tokens."""
    per_block = 2 * tokens * (4 * dim * dim + 2 * mlp_ratio * dim * dim) + 2 * 2 * tokens * tokens * dim
    return float(depth * per_block)


__all__ = [
    "Attention", "Block", "Mlp", "RopeTables", "apply_rope", "attention_flops", "count_params",
    "init_vit_weights", "rope_2d_tables", "rotate_half", "trunc_normal_",
]

