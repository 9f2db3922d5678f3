"""MAR (Li et al. 2024, LTH14/mar ``models/mar.py``) with the generation order given from outside.

The architecture, parameter names and shapes are MAR's, so a published ``checkpoint-last.pth``
({"model", "model_ema"}) loads as it is (:func:`load_mar_checkpoint`):

    class_emb [num_classes, E]      fake_latent [1, E]            (CFG's "no class" latent)
    z_proj [E, D] (+bias)           z_proj_ln                     (token -> encoder width)
    encoder_pos_embed_learned [1, buffer + N, E]
    encoder_blocks.{i}  (timm Block names)                        encoder_norm
    decoder_embed [Dd, E]           mask_token [1, 1, Dd]
    decoder_pos_embed_learned [1, buffer + N, Dd]
    decoder_blocks.{i}              decoder_norm
    diffusion_pos_embed_learned [1, N, Dd]
    diffloss.net.*                  (see pipeline/models/diffloss.py)

Tokens are ``[B, N, D]`` sequences of the latent grid (row-major, patch size 1: MAR's
KL-16 setting), N = grid², D = the tokenizer's token dim (16 for KL-16).

Differences from the released code, all about WHERE randomness and orders come from:
- ``forward`` takes the generation ``orders`` and the number of masked tokens instead of
  drawing a random permutation and a truncated-normal ratio itself; the CMAR task draws them
  (collapse or random orders) from the trainer's step-seeded generators, so 1 and N
  processes train identically. MAR's ratio law is kept in :meth:`MAR.num_masked`.
- ``sample_tokens`` takes the orders to reveal in (a class-level collapse order, a training
  image's, or a random one) and a ``torch.Generator`` for reproducible samples.
The order convention is MAR's: ``orders[:, :k]`` are the k tokens still masked, so the TAIL of
an order is revealed (generated) first and kept visible longest in training.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import scipy.stats as stats
import torch
from torch import Tensor, nn

from pipeline.models.diffloss import DiffLoss
from pipeline.models.layers import Block


def mask_by_order(orders: Tensor, num_masked: int) -> Tensor:
    """[B, N] orders -> bool mask [B, N], True at ``orders[:, :num_masked]`` (the masked tokens)."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :num_masked], True)


def check_orders(orders: Tensor, batch: int, seq_len: int) -> None:
    """Orders must be [batch, seq_len] permutations of 0..seq_len-1 (a grid mismatch fails here)."""
    if orders.dim() != 2 or orders.shape[0] != batch or orders.shape[1] != seq_len:
        raise ValueError(f"orders must have shape [{batch}, {seq_len}] (one permutation of the "
                         f"model's {seq_len} tokens per sequence), got {list(orders.shape)}")
    expect = torch.arange(seq_len, device=orders.device).expand(batch, -1)
    if not torch.equal(orders.sort(dim=1).values, expect):
        raise ValueError("every row of orders must be a permutation of 0..N-1")


@dataclass(frozen=True)
class MarArch:
    """Everything MAR is built from: its constructor's arguments under LTH14/mar's names, so
    ``MAR(**asdict(arch))`` and a run's config.json stores ``arch.to_dict()``."""

    grid: int = 16
    token_dim: int = 16
    encoder_embed_dim: int = 1024
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    buffer_size: int = 64
    label_drop_prob: float = 0.1
    mask_ratio_min: float = 0.7
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    diffloss_d: int = 3
    diffloss_w: int = 1024
    num_sampling_steps: str = "100"  # the diffusion sampler's steps: sampling, not weights
    diffusion_batch_mul: int = 4

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MarArch":
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"MAR architecture fields {unknown} are unknown to this code")
        return cls(**d)


class MAR(nn.Module):
    """Masked autoregressive generator with a diffusion loss per token."""

    @classmethod
    def from_arch(cls, arch: MarArch) -> "MAR":
        return cls(**arch.to_dict())

    def __init__(
        self,
        grid: int = 16,
        token_dim: int = 16,
        encoder_embed_dim: int = 1024,
        encoder_depth: int = 16,
        encoder_num_heads: int = 16,
        decoder_embed_dim: int = 1024,
        decoder_depth: int = 16,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        buffer_size: int = 64,
        label_drop_prob: float = 0.1,
        mask_ratio_min: float = 0.7,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        diffloss_d: int = 3,
        diffloss_w: int = 1024,
        num_sampling_steps: str = "100",
        diffusion_batch_mul: int = 4,
    ) -> None:
        super().__init__()
        self.arch = MarArch(
            grid=grid, token_dim=token_dim, encoder_embed_dim=encoder_embed_dim,
            encoder_depth=encoder_depth, encoder_num_heads=encoder_num_heads,
            decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
            buffer_size=buffer_size, label_drop_prob=label_drop_prob, mask_ratio_min=mask_ratio_min,
            attn_dropout=attn_dropout, proj_dropout=proj_dropout, diffloss_d=diffloss_d,
            diffloss_w=diffloss_w, num_sampling_steps=num_sampling_steps,
            diffusion_batch_mul=diffusion_batch_mul)
        self.grid = grid
        self.seq_len = grid * grid
        self.token_embed_dim = token_dim
        self.num_classes = num_classes
        self.buffer_size = buffer_size
        self.label_drop_prob = label_drop_prob
        self.diffusion_batch_mul = diffusion_batch_mul
        E, Dd, N = encoder_embed_dim, decoder_embed_dim, self.seq_len

        # Class conditioning: the class embedding fills the buffer tokens; fake_latent replaces
        # it for label dropout in training and for the unconditional half of CFG.
        self.class_emb = nn.Embedding(num_classes, E)
        self.fake_latent = nn.Parameter(torch.zeros(1, E))

        # Mask ratio ~ left half of N(1, 0.25²) truncated to [mask_ratio_min, 1] (MAR).
        self.mask_ratio_min = mask_ratio_min
        self.mask_ratio_generator = stats.truncnorm((mask_ratio_min - 1.0) / 0.25, 0, loc=1.0, scale=0.25)

        # Encoder: sees the buffer (class) tokens and the visible tokens only.
        self.z_proj = nn.Linear(token_dim, E, bias=True)
        self.z_proj_ln = nn.LayerNorm(E, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, N + buffer_size, E))
        self.encoder_blocks = nn.ModuleList([
            Block(E, encoder_num_heads, mlp_ratio, qkv_bias=True, proj_drop=proj_dropout,
                  attn_drop=attn_dropout, eps=1e-6) for _ in range(encoder_depth)])
        self.encoder_norm = nn.LayerNorm(E, eps=1e-6)

        # Decoder: all positions, mask tokens where the encoder saw nothing.
        self.decoder_embed = nn.Linear(E, Dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, N + buffer_size, Dd))
        self.decoder_blocks = nn.ModuleList([
            Block(Dd, decoder_num_heads, mlp_ratio, qkv_bias=True, proj_drop=proj_dropout,
                  attn_drop=attn_dropout, eps=1e-6) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, N, Dd))

        self.initialize_weights()

        # The diffusion head initialises itself (zeroed modulation/output), after the rest.
        self.diffloss = DiffLoss(target_channels=token_dim, z_channels=Dd, width=diffloss_w,
                                 depth=diffloss_d, num_sampling_steps=num_sampling_steps)

    def initialize_weights(self) -> None:
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token,
                  self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                  self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # as official JAX ViT / MAE
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ masking
    def num_masked(self, u: float) -> int:
        """MAR's masked-token count from a uniform u in (0, 1): ceil(N · truncnorm.ppf(u))."""
        ratio = float(self.mask_ratio_generator.ppf(min(max(u, 1e-12), 1 - 1e-12)))
        return int(np.clip(math.ceil(self.seq_len * ratio), 1, self.seq_len))

    # ------------------------------------------------------------------ encoder / decoder
    def forward_mae_encoder(self, x: Tensor, mask: Tensor, class_embedding: Tensor) -> Tensor:
        """x: [B, N, D] tokens, mask: [B, N] bool (True = masked, equal count per row),
        class_embedding: [B, E] -> [B, buffer + N_visible, E]."""
        x = self.z_proj(x)
        B, N, E = x.shape
        x = torch.cat([class_embedding.unsqueeze(1).expand(B, self.buffer_size, E).to(x.dtype), x], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        keep = torch.cat([mask.new_zeros(B, self.buffer_size), mask], dim=1).logical_not()
        x = x[keep].reshape(B, -1, E)  # drop the masked tokens
        for blk in self.encoder_blocks:
            x = blk(x)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: [B, buffer + N_visible, E], mask: [B, N] -> z: [B, N, Dd] (one condition per token)."""
        x = self.decoder_embed(x)
        B, _, Dd = x.shape
        keep = torch.cat([mask.new_zeros(B, self.buffer_size), mask], dim=1).logical_not()
        full = self.mask_token.to(x.dtype).expand(B, keep.shape[1], Dd).clone()
        full[keep] = x.reshape(-1, Dd)
        x = full + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, self.buffer_size:]
        return x + self.diffusion_pos_embed_learned

    def class_embedding(self, labels: Tensor, drop: Tensor | None = None) -> Tensor:
        """labels: [B] -> [B, E]; rows where ``drop`` is True get the fake (unconditional) latent."""
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.num_classes}), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        emb = self.class_emb(labels)
        if drop is not None:
            d = drop.to(emb.dtype).unsqueeze(-1)
            emb = d * self.fake_latent + (1 - d) * emb
        return emb

    # ------------------------------------------------------------------ training
    def forward(self, tokens: Tensor, labels: Tensor, orders: Tensor, num_masked: int,
                drop_labels: Tensor | None = None, t: Tensor | None = None,
                noise: Tensor | None = None) -> Tensor:
        """Diffusion loss on the masked tokens.

        tokens: [B, N, D] (scaled latents); labels: [B]; orders: [B, N] (MAR convention: the
        first ``num_masked`` entries are masked); drop_labels: [B] bool (CFG label dropout;
        drawn with ``label_drop_prob`` when None and training); t: [B, mul, N] diffusion steps;
        noise: [B, mul, N, D]. ``mul`` = diffusion_batch_mul: each token is noised ``mul`` times.
        """
        B, N, D = tokens.shape
        check_orders(orders, B, self.seq_len)
        if not 1 <= num_masked <= N:
            raise ValueError(f"num_masked must lie in [1, {N}], got {num_masked}")
        if drop_labels is None and self.training:
            drop_labels = torch.rand(B, device=tokens.device) < self.label_drop_prob
        mask = mask_by_order(orders, num_masked)
        x = self.forward_mae_encoder(tokens, mask, self.class_embedding(labels, drop_labels))
        z = self.forward_mae_decoder(x, mask)  # [B, N, Dd]

        mul = self.diffusion_batch_mul
        if t is None:
            t = torch.randint(0, self.diffloss.train_diffusion.num_timesteps, (B, mul, N), device=tokens.device)
        if noise is None:
            noise = torch.randn(B, mul, N, D, device=tokens.device)
        target = tokens.detach().unsqueeze(1).expand(B, mul, N, D).reshape(-1, D)
        z = z.unsqueeze(1).expand(B, mul, N, z.shape[-1]).reshape(-1, z.shape[-1])
        m = mask.unsqueeze(1).expand(B, mul, N).reshape(-1).float()
        return self.diffloss(target=target, z=z, mask=m, t=t.reshape(-1), noise=noise.reshape(-1, D))

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_tokens(self, labels: Tensor, orders: Tensor, num_iter: int = 64, cfg: float = 1.0,
                      cfg_schedule: str = "linear", temperature: float = 1.0,
                      generator: torch.Generator | None = None,
                      return_reveal_step: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Generate tokens [B, N, D], revealing ``orders`` from the tail (MAR convention).

        Step s (of num_iter) leaves floor(N · cos(π/2 · (s+1)/num_iter)) tokens masked (at least
        one fewer than before; none after the last step); the tokens leaving the mask are sampled
        by the diffusion head. CFG runs a [cond; uncond] batch; with the linear schedule its
        scale at a step is 1 + (cfg - 1) · (N - masked_after_step) / N (Muse/MAR).
        With ``return_reveal_step`` also returns the step [B, N] at which each token appeared.
        """
        B = labels.shape[0]
        N = self.seq_len
        dev = self.fake_latent.device
        if not 1 <= num_iter <= N:
            raise ValueError(f"num_iter must lie in [1, {N}] (at least one token per step), got {num_iter}")
        if not 1.0 <= cfg <= 20.0:
            raise ValueError(f"cfg must lie in [1, 20], got {cfg}")
        if not 0.0 < temperature <= 5.0:
            raise ValueError(f"temperature must lie in (0, 5], got {temperature}")
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        labels = labels.to(dev)
        orders = orders.to(dev)
        check_orders(orders, B, N)
        class_embedding = self.class_embedding(labels)  # validates the ids
        if cfg != 1.0:
            class_embedding = torch.cat([class_embedding, self.fake_latent.expand(B, -1)], dim=0)

        mask = torch.ones(B, N, dtype=torch.bool, device=dev)
        tokens = torch.zeros(B, N, self.token_embed_dim, device=dev)
        reveal = torch.full((B, N), -1, dtype=torch.long, device=dev)
        for step in range(num_iter):
            x_in, m_in = (tokens, mask) if cfg == 1.0 else (tokens.repeat(2, 1, 1), mask.repeat(2, 1))
            z = self.forward_mae_decoder(self.forward_mae_encoder(x_in, m_in, class_embedding), m_in)

            # Masked count after this step: cosine schedule (MaskGIT/MAGE), >= 1 newly revealed.
            still = int(mask[0].sum())
            mask_len = int(np.floor(N * np.cos(math.pi / 2.0 * (step + 1) / num_iter)))
            mask_len = max(1, min(still - 1, mask_len))
            if step >= num_iter - 1:
                mask_next = torch.zeros_like(mask)
            else:
                mask_next = mask_by_order(orders, mask_len)
            to_pred = mask & ~mask_next  # [B, N], the same count in every row
            if cfg_schedule == "linear":
                cfg_iter = 1 + (cfg - 1) * (N - mask_len) / N
            else:
                cfg_iter = cfg
            sel = to_pred if cfg == 1.0 else to_pred.repeat(2, 1)
            sampled = self.diffloss.sample(z[sel], temperature, cfg_iter, generator=generator)
            if cfg != 1.0:
                sampled = sampled[: sampled.shape[0] // 2]  # drop the unconditional half
            tokens = tokens.clone()
            tokens[to_pred] = sampled.to(tokens.dtype)
            reveal[to_pred] = step
            mask = mask_next
        if return_reveal_step:
            return tokens, reveal
        return tokens


# ---------------------------------------------------------------------------- configs


def mar_base(**kwargs) -> MAR:
    """MAR-B: encoder/decoder 768 x 12 blocks, 12 heads; released with diffloss 6 x 1024."""
    kw = dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
              decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12,
              mlp_ratio=4.0, diffloss_d=6, diffloss_w=1024)
    kw.update(kwargs)
    return MAR(**kw)


# ---------------------------------------------------------------------------- checkpoints


def read_mar_checkpoint(path: str | Path, key: str = "model_ema") -> dict[str, Tensor]:
    """The state dict stored under ``key`` ("model_ema" or "model") in a MAR checkpoint.

    Released checkpoints hold {"model", "model_ema"}; checkpoints MAR's own training writes also
    hold the argparse ``args``, which is allowed through the safe unpickler (no code runs).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MAR checkpoint {path} not found")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict with 'model'/'model_ema', got {type(ckpt).__name__}")
    if key in ckpt and isinstance(ckpt[key], dict):
        return ckpt[key]
    if "model" in ckpt and isinstance(ckpt["model"], dict):
        return ckpt["model"]  # no EMA stored: the raw weights are all there is
    if all(isinstance(v, Tensor) for v in ckpt.values()):
        return ckpt  # a bare state dict
    raise ValueError(f"{path}: no 'model' or 'model_ema' state dict (keys: {sorted(ckpt)[:8]})")


def load_mar_state(model: MAR, state: dict[str, Tensor], allow_missing: bool = False) -> list[str]:
    """Copy ``state`` into ``model``; every key must exist with the model's shape.

    Unexpected keys and shape mismatches are always errors (a different architecture);
    missing keys are an error unless ``allow_missing``. Returns the missing keys.
    """
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    bad_shape = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
                 for k in sorted(set(state) & set(own)) if tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if bad_shape:
        problems.append("shape mismatches (check grid, token dim, widths, buffer, classes):\n  "
                        + "\n  ".join(bad_shape[:20]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {unexpected[:10]}")
    if missing and not allow_missing:
        problems.append(f"{len(missing)} missing keys: {missing[:10]} "
                        "(set cmar.model.allow_missing_keys=true to start those from scratch)")
    if problems:
        raise ValueError("MAR checkpoint does not fit the model:\n" + "\n".join(problems))
    model.load_state_dict(state, strict=False)
    return missing


def load_mar_checkpoint(model: MAR, path: str | Path, key: str = "model_ema",
                        allow_missing: bool = False) -> list[str]:
    return load_mar_state(model, read_mar_checkpoint(path, key), allow_missing)


__all__ = ["MAR", "check_orders", "load_mar_checkpoint", "load_mar_state",
           "mar_base", "mask_by_order", "read_mar_checkpoint"]
