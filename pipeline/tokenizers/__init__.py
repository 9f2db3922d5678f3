"""Tokenizers: images <-> token grids. See docs/architecture.md ("Tokenizer").

- ``kl16``: MAR's KL-16 VAE (diffusers AutoencoderKL, weights from a local checkpoint).
- ``patch``: the offline STAND-IN, a PCA patch tokenizer fitted on the training images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.config import TokenizerConfig
from pipeline.tokenizers.base import (CONFIG_FILE, WEIGHTS_FILE, Tokenizer, read_saved_config,
                                      state_dict_sha256)
from pipeline.tokenizers.kl16 import CheckpointError, KL16Tokenizer
from pipeline.tokenizers.patch import PatchTokenizer

__all__ = ["Tokenizer", "KL16Tokenizer", "PatchTokenizer", "CheckpointError", "LATENTS_TOKENIZER_DIR",
           "build_tokenizer", "decode_to_images", "roundtrip_images", "latents_tokenizer", "load_tokenizer",
           "state_dict_sha256"]

# The fitted stand-in is saved beside the latents it made (data/latents/tokenizer/).
LATENTS_TOKENIZER_DIR = "tokenizer"


def build_tokenizer(cfg: TokenizerConfig,
                    fit_images: np.ndarray | Sequence[np.ndarray] | None = None,
                    device: torch.device | str = "cpu") -> Tokenizer:
    """The tokenizer ``cfg`` describes, on ``device``, with its precision settings applied.

    ``kl16`` loads ``cfg.checkpoint``; ``patch`` is fitted on ``fit_images`` (uint8
    [n, H, W, 3] training images; the first ``cfg.fit_images`` of them are used).
    """
    tok: Tokenizer
    if cfg.kind == "kl16":
        if not cfg.checkpoint:
            raise ValueError("tokenizer.checkpoint is required for kind 'kl16'")
        tok = KL16Tokenizer.from_checkpoint(cfg.checkpoint)
    elif cfg.kind == "patch":
        if fit_images is None or len(fit_images) == 0:
            raise ValueError("the patch stand-in must be fitted: pass fit_images "
                             "(uint8 training images [n, H, W, 3])")
        tok = PatchTokenizer(cfg.patch_size, cfg.dim).fit(fit_images[: cfg.fit_images])
    else:  # pydantic already restricts kind; this guards direct callers
        raise ValueError(f"unknown tokenizer kind {cfg.kind!r}")
    return tok.to(device).set_precision(cfg.precision, cfg.channels_last)


def load_tokenizer(directory: str | Path, precision: str = "fp32", channels_last: bool = False,
                   device: torch.device | str = "cpu") -> Tokenizer:
    """A tokenizer written by ``Tokenizer.save(directory)``; weights are checked against the
    hash recorded beside them."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_saved_config(directory)
    state = load_file(str(directory / WEIGHTS_FILE))
    tok: Tokenizer
    if meta["kind"] == "kl16":
        # Saved from KL16Tokenizer's state dict: diffusers names under the "vae." submodule.
        tok = KL16Tokenizer({k.removeprefix("vae."): v for k, v in state.items()},
                            source=str(directory / WEIGHTS_FILE))
    elif meta["kind"] == "patch":
        cfg = meta["config"]
        tok = PatchTokenizer(cfg["patch_size"], cfg["dim"])
        tok.load_state_dict(state, strict=True)
    else:
        raise ValueError(f"{directory / CONFIG_FILE}: unknown tokenizer kind {meta['kind']!r}")
    if tok.weights_sha256() != meta.get("weights_sha256"):
        raise ValueError(f"{directory}: weights do not match the hash in {CONFIG_FILE}")
    return tok.to(device).set_precision(precision, channels_last)


def latents_tokenizer(cfg: TokenizerConfig, latents_dir: str | Path, device: torch.device | str = "cpu",
                      precision: str = "fp32", channels_last: bool = False) -> Tokenizer:
    """The tokenizer that made the latents in ``latents_dir``: ``patch`` was fitted on the data
    and saved there; ``kl16`` is rebuilt from ``cfg.checkpoint`` (with ``cfg``'s precision)."""
    if cfg.kind == "patch":
        return load_tokenizer(Path(latents_dir) / LATENTS_TOKENIZER_DIR, precision, channels_last,
                              device=device)
    return build_tokenizer(cfg, device=device)


@torch.no_grad()
def decode_to_images(tokenizer: Tokenizer, grids: torch.Tensor, scale_factor: float, batch: int,
                     device: torch.device | str) -> np.ndarray:
    """Scaled token grids [n, D, h, w] -> uint8 images [n, H, W, 3] (tokenizer on ``device``)."""
    out = []
    for s in range(0, len(grids), batch):
        x = tokenizer.decode(grids[s:s + batch].to(device) / scale_factor)  # [-1, 1]
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        out.append(x.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def roundtrip_images(tokenizer: Tokenizer, x: torch.Tensor) -> torch.Tensor:
    """Images x [B, 3, H, W] in [-1, 1] as the tokenizer renders them: encoded to the
    posterior mean, decoded and quantised to uint8 levels as :func:`decode_to_images` does.
    Returns an ordinary tensor (usable in autograd) on x's device."""
    z = tokenizer.encode_moments(x.to(tokenizer.device))[:, :tokenizer.dim]
    y = tokenizer.decode(z)
    y = ((y.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    return y.clone().to(x.device)  # clone: leave inference mode's tensor behind
