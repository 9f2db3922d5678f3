"""The tokenizer interface every stage sees: images <-> grids of continuous tokens.

A tokenizer maps an image batch ``x[B, 3, H, W]`` in [-1, 1] to posterior *moments*
``[B, 2·dim, h, w]`` (mean then logvar, unscaled, exactly what MAR caches) and decodes an
unscaled latent ``z[B, dim, h, w]`` back to pixels. Models downstream see ``mean * scale_factor``.

Precision. ``encode_moments``/``decode`` run in one of two modes, chosen by
:meth:`Tokenizer.set_precision`:
- exact: float32 math, contiguous tensors (bitwise what the fp32 module computes);
- fast: bf16 autocast where the hardware has native bf16 (CUDA, AVX512-BF16/AMX CPUs), plus
  channels_last memory format when asked. 'auto' resolves to bf16 only on such hardware; on
  CPUs without native bf16 it is fp32, whose channels_last convs are the fast path there
  (see :func:`pipeline.utils.device.cpu_has_native_bf16` for the measurement).
Results are always returned as contiguous float32. The weights stay float32 in every mode,
so :meth:`identity` does not depend on it.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.utils.device import autocast, cpu_has_native_bf16, resolve_precision
from pipeline.utils.io import atomic_write_json, read_json

FORMAT = "tokenizer/v1"
CONFIG_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """A stable hash of a state dict: names, dtypes, shapes and raw bytes, in key order.

    Independent of memory format (channels_last tensors are made contiguous first) and of
    device, so the same weights hash the same wherever they live.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@functools.cache
def _warn_slow_bf16() -> None:
    warnings.warn("precision 'bf16' on a CPU without native bf16 support: convolutions run "
                  "slower than fp32 (use 'auto' or 'fp32' with channels_last)", stacklevel=3)


class Tokenizer(nn.Module, abc.ABC):
    """Base class; subclasses set ``kind`` and implement the ``_encode``/``_decode`` math."""

    kind: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.precision: str = "fp32"  # the requested setting ('auto' | 'fp32' | 'bf16')
        self.channels_last: bool = False

    # ------------------------------------------------------------------ geometry
    @property
    @abc.abstractmethod
    def patch_size(self) -> int:
        """Pixels per token side: an H×W image becomes an (H/p)×(W/p) grid."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Channels per token."""

    @property
    @abc.abstractmethod
    def scale_factor(self) -> float:
        """Multiply latents by this before a model sees them (KL-16: 0.2325)."""

    def grid_for(self, image_size: int) -> int:
        if image_size % self.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size "
                             f"{self.patch_size}")
        return image_size // self.patch_size

    # ------------------------------------------------------------------ precision
    @property
    def device(self) -> torch.device:
        return next(self.buffers(), next(self.parameters(), torch.empty(0))).device

    def auto_dtype(self, device: torch.device) -> torch.dtype:
        """What 'auto' means for this tokenizer: bf16 only where it runs natively; on AVX2
        CPUs the fast path is fp32 + channels_last (``utils.device.cpu_has_native_bf16``)."""
        return resolve_precision("auto", device)

    def compute_dtype(self) -> torch.dtype:
        if self.precision == "auto":
            return self.auto_dtype(self.device)
        dtype = resolve_precision(self.precision, self.device)
        if dtype == torch.bfloat16 and self.device.type == "cpu" and not cpu_has_native_bf16():
            _warn_slow_bf16()
        return dtype

    def set_precision(self, precision: str = "fp32", channels_last: bool = False) -> "Tokenizer":
        """Select the exact path (``'fp32'``, no channels_last) or the fast one."""
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        self.channels_last = bool(channels_last)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        # Module.to(memory_format=...) only touches 4-D parameters/buffers (the convs).
        self.to(memory_format=fmt)
        return self

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # ------------------------------------------------------------------ API
    @torch.inference_mode()
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """x[B, 3, H, W] in [-1, 1] -> moments[B, 2·dim, H/p, W/p] (mean ‖ logvar), float32."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(x.shape)}")
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch "
                             f"size {self.patch_size}")
        with autocast(self.device, self.compute_dtype()):
            out = self._encode(self._prepare(x))
        return out.float().contiguous()

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z[B, dim, h, w] (unscaled) -> images[B, 3, h·p, w·p], float32, roughly in [-1, 1]."""
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"expected latents [B, {self.dim}, h, w], got {tuple(z.shape)}")
        with autocast(self.device, self.compute_dtype()):
            out = self._decode(self._prepare(z))
        return out.float().contiguous()

    @abc.abstractmethod
    def _encode(self, x: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _decode(self, z: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able description that, with the weights, rebuilds this tokenizer."""

    def weights_sha256(self) -> str:
        return state_dict_sha256(self.state_dict())

    def identity(self) -> dict[str, Any]:
        """What produced a latent: kind, config and the hash of the weights (not precision)."""
        return {"kind": self.kind, "config": self.config(), "weights_sha256": self.weights_sha256()}

    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` + ``tokenizer.json`` (atomically) into ``directory``."""
        from safetensors.torch import save_file

        from pipeline.utils.io import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp))
        atomic_write_json(directory / CONFIG_FILE, {"format": FORMAT, **self.identity()})
        return directory


def read_saved_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a saved tokenizer directory")
    meta = read_json(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported format {meta.get('format')!r} (expected {FORMAT})")
    return meta
