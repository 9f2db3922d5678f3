"""An independent, plain-torch LDM KL autoencoder, used only to check the KL-16 converter.

It follows the module structure of LDM's ``taming``-style KL-VAE as MAR uses it
(LTH14/mar ``models/vae.py``) so that its ``state_dict()`` has exactly the key names and
shapes of MAR's ``kl16.ckpt["model"]``:
- ``ResnetBlock``: norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus a 1×1
  ``nin_shortcut`` when the channel count changes (no time embedding: temb_ch = 0);
- ``AttnBlock``: norm, single-head attention with q/k/v/proj_out as 1×1 convs, residual;
- ``Downsample``: zero pad (0, 1, 0, 1) then a stride-2 3×3 conv (asymmetric padding);
- ``Upsample``: nearest ×2 then a 3×3 conv;
- GroupNorm(32, eps=1e-6) and swish everywhere;
- encoder attention at resolution 16 (with resolution=256: the last level), decoder none;
- decoder ``up`` list indexed by level (``up[0]`` = highest resolution), run in reverse.
Nothing here imports diffusers or the pipeline: it is the yardstick, not the thing measured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))  # dropout is 0 in MAR's KL-16
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = group_norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        n = self.norm(x)
        q = self.q(n).flatten(2).transpose(1, 2)  # [B, HW, C]
        k = self.k(n).flatten(2)  # [B, C, HW]
        v = self.v(n).flatten(2)  # [B, C, HW]
        attn = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=-1)  # [B, HW(query), HW(key)]
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, hh, ww)  # [B, C, HW(query)]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``block`` and ``attn`` lists plus an optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class Mid(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, z_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, cin = resolution, ch
        for i, mult in enumerate(ch_mult):
            level = Level()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(cin, ch * mult))
                cin = ch * mult
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(cin)
                res //= 2
            self.down.append(level)
        self.mid = Mid(cin)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * z_channels, 3, padding=1)  # double_z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, z_channels: int) -> None:
        super().__init__()
        levels = len(ch_mult)
        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = Mid(cin)
        ups: list[Level] = []
        for i in reversed(range(levels)):  # built lowest resolution first ...
            level = Level()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, ch * ch_mult[i]))
                cin = ch * ch_mult[i]
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != 0:
                level.upsample = Upsample(cin)
                res *= 2
            ups.insert(0, level)  # ... but stored so that up[i] is level i
        self.up = nn.ModuleList(ups)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class LDMAutoencoderKL(nn.Module):
    """MAR's ``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))`` by default."""

    def __init__(self, embed_dim: int = 16, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, resolution: int = 256) -> None:
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, (16,), resolution, embed_dim)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, (), resolution, embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """MAR's ``posterior.parameters``: quant_conv output [B, 2·embed_dim, H/16, W/16]."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Give every tensor distinct random values, GroupNorm affines included (their defaults,
    ones and zeros, would hide a swapped norm1/norm2 or a dropped bias). Conv weights are
    scaled so activations stay O(1) through the deep residual stack."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.GroupNorm):
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:  # conv weight [out, in, kh, kw]
                fan_in = p[0].numel()
                p.copy_(noise * (0.5 / fan_in) ** 0.5)
    return model
