"""MAR's diffusion loss: a small AdaLN MLP denoises one token conditioned on the transformer's z.

Parameter names and shapes follow LTH14/mar ``models/diffloss.py`` (``net.time_embed.mlp``,
``net.cond_embed``, ``net.input_proj``, ``net.res_blocks.{i}.{in_ln,mlp,adaLN_modulation}``,
``net.final_layer.{linear,adaLN_modulation}``) so MAR checkpoints load as published.
The denoiser predicts eps and a variance interpolant (2·C outputs); training uses all 1000
cosine-schedule steps, sampling a respaced subset (``num_sampling_steps``, MAR: "100").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.models.diffusion import create_diffusion


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Normal noise drawn on the generator's device (a CPU generator can feed a GPU run)."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (original, 0..999) timestep -> 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """[M] -> [M, dim]: cos then sin of t · exp(-log(max_period) · k / half)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                               device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class ResBlock(nn.Module):
    """x + gate · MLP(modulate(LN(x), shift, scale)); shift/scale/gate come from y = t + c."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels, bias=True),
            nn.SiLU(),
            nn.Linear(channels, channels, bias=True),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels, bias=True))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """DiT's final layer: affine-free LN, modulation, linear to the output channels."""

    def __init__(self, model_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The denoiser: input_proj(x_t) -> depth AdaLN residual blocks (conditioned on t + z) -> out."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int,
                 z_channels: int, num_res_blocks: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Zero modulation and output: every block starts as the identity, the output as 0.
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """x: [M, C] noisy tokens, t: [M] timesteps, c: [M, z] conditions -> [M, 2C]."""
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x: Tensor, t: Tensor, c: Tensor, cfg_scale: float) -> Tensor:
        """Batch = [cond; uncond] with the same x: eps = eps_u + s (eps_c - eps_u) for both halves."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class DiffLoss(nn.Module):
    """Diffusion loss over token vectors conditioned on z (one row per token)."""

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: str) -> None:
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(in_channels=target_channels, model_channels=width,
                                  out_channels=target_channels * 2,  # eps and the variance interpolant
                                  z_channels=z_channels, num_res_blocks=depth)
        self.train_diffusion = create_diffusion("")
        self.gen_diffusion = create_diffusion(num_sampling_steps)

    def forward(self, target: Tensor, z: Tensor, mask: Tensor | None = None,
                t: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """target: [M, C], z: [M, z], mask: [M] (1 = count this row); t: [M] in [0, 1000),
        noise: [M, C]; t and noise are drawn from the global RNG when not given."""
        if t is None:
            t = torch.randint(0, self.train_diffusion.num_timesteps, (target.shape[0],), device=target.device)
        if noise is None:
            noise = torch.randn_like(target)
        loss = self.train_diffusion.training_losses(self.net, target.float(), t, noise.float(), c=z)["loss"]
        if mask is not None:
            return (loss * mask).sum() / mask.sum().clamp(min=1)
        return loss.mean()

    @torch.no_grad()
    def sample(self, z: Tensor, temperature: float = 1.0, cfg: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """z: [M, z] (with CFG: [cond; uncond], M even) -> sampled tokens [M, C]."""
        if cfg != 1.0:
            noise = _randn((z.shape[0] // 2, self.in_channels), generator, z.device)
            noise = torch.cat([noise, noise], dim=0)
            return self.gen_diffusion.p_sample_loop(self.net.forward_with_cfg, noise, temperature,
                                                    generator, c=z, cfg_scale=cfg)
        noise = _randn((z.shape[0], self.in_channels), generator, z.device)
        return self.gen_diffusion.p_sample_loop(self.net.forward, noise, temperature, generator, c=z)


__all__ = ["DiffLoss", "FinalLayer", "ResBlock", "SimpleMLPAdaLN", "TimestepEmbedder", "modulate"]
