"""MAR's KL-16 VAE as a diffusers ``AutoencoderKL``, with a strict LDM -> diffusers converter.

MAR (LTH14/mar, ``models/vae.py``) uses LDM's KL autoencoder: ch=128, ch_mult=(1,1,2,2,4),
2 res blocks, attention at the 16×16 encoder level (the last one) and in both mid blocks,
none in the decoder's up blocks, z_channels=16 with double_z, quant_conv 32->32,
post_quant_conv 16->16. In diffusers terms that is ``AttnDownEncoderBlock2D`` for the last
encoder level, plain ``UpDecoderBlock2D`` everywhere in the decoder, and
``mid_block_add_attention=True`` (the default). The attention of every block is single-head
(diffusers passes ``attention_head_dim = channels``), like LDM's ``AttnBlock``.

Weights come from (never downloaded here):
- MAR's ``kl16.ckpt``: ``torch.load(weights_only=True)["model"]`` with LDM key names;
- a ``.safetensors`` file with LDM or diffusers key names (detected);
- a diffusers folder (``AutoencoderKL.save_pretrained`` layout), read with ``local_files_only``.
Loading is strict: any missing, unexpected or mis-shaped key is an error that lists them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.tokenizers.base import Tokenizer

SCALE_FACTOR = 0.2325

# diffusers AutoencoderKL arguments equal to MAR's LDM config (see module docstring).
KL16_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (128, 128, 256, 256, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",) * 5,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": SCALE_FACTOR,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "sample_size": 256,
}


class CheckpointError(ValueError):
    """A checkpoint that does not hold exactly the KL-16 weights."""


def build_kl16_model(config: Mapping[str, Any] | None = None):
    """A freshly initialised diffusers AutoencoderKL with the KL-16 architecture (eval mode)."""
    from diffusers import AutoencoderKL

    model = AutoencoderKL(**dict(config or KL16_CONFIG))
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- converter
# LDM sub-module names -> diffusers names, inside a res block / attention block.
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
           "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# LDM's attention projections are 1×1 convs; diffusers' are Linear layers.
_ATTN_LINEAR = {"q", "k", "v", "proj_out"}

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), kind) for p, kind in [
        (r"^(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)$", "same"),
        (r"^(encoder|decoder)\.norm_out\.(weight|bias)$", "norm_out"),
        (r"^(encoder)\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$", "resnet"),
        (r"^(decoder)\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$", "resnet"),
        (r"^(encoder)\.down\.(\d+)\.attn\.(\d+)\.(\w+)\.(weight|bias)$", "attn"),
        (r"^(decoder)\.up\.(\d+)\.attn\.(\d+)\.(\w+)\.(weight|bias)$", "attn"),
        (r"^encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)$", "downsample"),
        (r"^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$", "upsample"),
        (r"^(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)$", "mid_resnet"),
        (r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)$", "mid_attn"),
        (r"^(quant_conv|post_quant_conv)\.(weight|bias)$", "same"),
    ]
]


def _level(side: str, i: int, num_levels: int) -> int:
    """LDM ``decoder.up[i]`` is built highest-resolution first (``up.insert(0, ...)``), while
    diffusers' ``up_blocks[0]`` runs first, at the lowest resolution: the order is reversed."""
    return num_levels - 1 - i if side == "decoder" else i


def _sub(table: dict[str, str], name: str, key: str) -> str:
    if name not in table:
        raise KeyError(key)
    return table[name]


def ldm_key_to_diffusers(key: str, num_levels: int = 5) -> tuple[str, bool]:
    """One LDM key -> (diffusers key, whether a 1×1 conv weight must become a Linear weight).

    Raises ``KeyError`` for a key that has no place in the KL autoencoder.
    """
    for pattern, kind in _PATTERNS:
        m = pattern.match(key)
        if not m:
            continue
        g = m.groups()
        if kind == "same":
            return key, False
        if kind == "norm_out":
            return f"{g[0]}.conv_norm_out.{g[1]}", False
        if kind == "resnet":
            side, i, j, name, param = g
            blocks = "down_blocks" if side == "encoder" else "up_blocks"
            lvl = _level(side, int(i), num_levels)
            return f"{side}.{blocks}.{lvl}.resnets.{j}.{_sub(_RESNET, name, key)}.{param}", False
        if kind == "attn":
            side, i, j, name, param = g
            blocks = "down_blocks" if side == "encoder" else "up_blocks"
            lvl = _level(side, int(i), num_levels)
            squeeze = param == "weight" and name in _ATTN_LINEAR
            return f"{side}.{blocks}.{lvl}.attentions.{j}.{_sub(_ATTN, name, key)}.{param}", squeeze
        if kind == "downsample":
            return f"encoder.down_blocks.{g[0]}.downsamplers.0.conv.{g[1]}", False
        if kind == "upsample":
            lvl = _level("decoder", int(g[0]), num_levels)
            return f"decoder.up_blocks.{lvl}.upsamplers.0.conv.{g[1]}", False
        if kind == "mid_resnet":
            side, n, name, param = g
            return f"{side}.mid_block.resnets.{int(n) - 1}.{_sub(_RESNET, name, key)}.{param}", False
        if kind == "mid_attn":
            side, name, param = g
            squeeze = param == "weight" and name in _ATTN_LINEAR
            return f"{side}.mid_block.attentions.0.{_sub(_ATTN, name, key)}.{param}", squeeze
    raise KeyError(key)


def _format_keys(keys: list[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_complete(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                    unexpected: list[str], source: str, converted: bool = False) -> None:
    """Raise one error naming every missing, unexpected and mis-shaped key."""
    missing = [k for k in expected if k not in state]
    unexpected = list(unexpected) + [k for k in state if k not in expected]
    shapes = [f"{k}: {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
              for k in state if k in expected and state[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{source}: not a KL-16 checkpoint"]
    if missing:
        names = ", diffusers names" if converted else ""
        lines.append(f"  missing keys ({len(missing)}{names}): {_format_keys(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}): {_format_keys(shapes)}")
    raise CheckpointError("\n".join(lines))


def convert_ldm_state_dict(ldm: Mapping[str, torch.Tensor], num_levels: int = 5
                           ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LDM/MAR key names -> diffusers key names.

    Returns (converted state dict, LDM keys that have no diffusers counterpart). Two LDM keys
    landing on the same diffusers key would be a converter bug; it is checked, not assumed.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []
    for key, value in ldm.items():
        try:
            new, squeeze = ldm_key_to_diffusers(key, num_levels)
        except KeyError:
            unmapped.append(key)
            continue
        if new in out:
            raise CheckpointError(f"LDM keys {origin[new]} and {key} both map to {new}")
        if squeeze:
            if value.dim() != 4 or value.shape[2:] != (1, 1):
                raise CheckpointError(f"{key}: expected a 1×1 conv weight, got {tuple(value.shape)}")
            value = value[:, :, 0, 0]  # [C, C, 1, 1] -> Linear [C, C]
        out[new] = value
        origin[new] = key
    return out, unmapped


def _is_ldm(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in state)


def to_diffusers_state_dict(state: Mapping[str, torch.Tensor], source: str = "state dict"
                            ) -> dict[str, torch.Tensor]:
    """LDM or diffusers key names -> a complete, checked diffusers KL-16 state dict."""
    expected = _expected_state()
    unexpected: list[str] = []
    ldm = _is_ldm(state)
    if ldm:
        state, unexpected = convert_ldm_state_dict(state, len(KL16_CONFIG["block_out_channels"]))
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    _check_complete(state, expected, unexpected, source, converted=ldm)
    return state


_EXPECTED: dict[str, torch.Tensor] | None = None


def _expected_state() -> dict[str, torch.Tensor]:
    """Names and shapes of the diffusers KL-16 state dict (meta tensors: no memory, no init)."""
    global _EXPECTED
    if _EXPECTED is None:
        with torch.device("meta"):
            _EXPECTED = dict(build_kl16_model().state_dict())
    return _EXPECTED


# ----------------------------------------------------------------------------- loaders


def read_kl16_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Any supported KL-16 checkpoint -> diffusers state dict (strict; never downloads)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"KL-16 checkpoint {path} not found (download MAR's kl16.ckpt "
                                "and pass its local path; nothing is downloaded at run time)")
    if path.is_dir():
        from diffusers import AutoencoderKL

        folder = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
        return to_diffusers_state_dict(folder.state_dict(), str(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return to_diffusers_state_dict(load_file(str(path)), str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle with non-tensor objects, corrupt file, ...
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint: {err}") from err
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # MAR's kl16.ckpt
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # LDM/Lightning checkpoints
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (optionally under 'model')")
    return to_diffusers_state_dict(obj, str(path))


# ----------------------------------------------------------------------------- tokenizer


class KL16Tokenizer(Tokenizer):
    """KL-16 (16×16 pixels -> one 16-dim token). Moments are the raw ``quant_conv`` output,
    i.e. diffusers' ``latent_dist.parameters`` = MAR's cached ``posterior.parameters``: the
    logvar half is *not* clamped (MAR/diffusers clamp it to [-30, 20] only when sampling)."""

    kind = "kl16"

    def __init__(self, state_dict: Mapping[str, torch.Tensor] | None = None,
                 source: str = "state dict") -> None:
        """``state_dict``: LDM or diffusers names (strictly checked). ``None`` keeps diffusers'
        random initialisation, for tests and benchmarks only."""
        super().__init__()
        if state_dict is None:
            self.vae = build_kl16_model()
            return
        weights = to_diffusers_state_dict(state_dict, source)
        # Build on the meta device and adopt the (copied) weights: skips a random init of
        # 84M parameters that would be overwritten at once.
        with torch.device("meta"):
            self.vae = build_kl16_model()
        self.vae.load_state_dict({k: v.clone() for k, v in weights.items()}, strict=True,
                                 assign=True)
        self.vae.requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "KL16Tokenizer":
        return cls(read_kl16_weights(path), source=str(path))

    @property
    def patch_size(self) -> int:
        return 2 ** (len(KL16_CONFIG["block_out_channels"]) - 1)  # 4 downsamplings: 16

    @property
    def dim(self) -> int:
        return int(KL16_CONFIG["latent_channels"])

    @property
    def scale_factor(self) -> float:
        return SCALE_FACTOR

    def config(self) -> dict[str, Any]:
        return {"diffusers": {k: list(v) if isinstance(v, tuple) else v
                              for k, v in KL16_CONFIG.items()}}

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        # x[B,3,H,W] -> encoder [B,32,H/16,W/16] -> quant_conv [B,32,H/16,W/16] = mean ‖ logvar
        return self.vae.quant_conv(self.vae.encoder(x))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        # z[B,16,h,w] -> post_quant_conv -> decoder -> [B,3,16h,16w]
        return self.vae.decoder(self.vae.post_quant_conv(z))
