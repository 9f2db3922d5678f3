"""Decode untrusted image bytes into RGB, or say precisely why not.

Conversion rules (every PIL mode ends as 8-bit RGB):
- ``RGB``: as is. ``1``, ``L``, ``CMYK``, ``YCbCr``, ``HSV``: PIL's own conversion.
- Alpha (``RGBA``, ``LA``, ``La``, ``RGBa``, ``PA``, and ``P``/``L``/``RGB`` with a
  ``transparency`` entry): composited on WHITE. Dropping alpha instead would expose whatever
  colour the encoder left under transparent pixels (often black or garbage); white is what a
  viewer shows and is deterministic.
- 16-bit and 32-bit integer greyscale (``I;16*``, ``I``): scaled to 8 bits by ``v / 257``
  (rounded), i.e. 65535 -> 255 and not clipped at 255. ``I`` values outside [0, 65535] and
  float ``F`` images outside [0, 1] are min-max scaled; ``F`` in [0, 1] is multiplied by 255.
- EXIF orientation is NOT applied (ADM/MAR load with ``Image.open(...).convert("RGB")``).
Failures raise :class:`BadImage` with a short machine-readable ``reason``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}


class BadImage(Exception):
    """An input that cannot become a training image; ``reason`` is one of the codes below."""

    # empty_file, unreadable, not_an_image, truncated, corrupt, decompression_bomb,
    # unsupported_mode, too_small
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def read_bytes(path: str | Path) -> bytes:
    """Read a file; unreadable paths and empty files become :class:`BadImage`."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise BadImage("unreadable", f"{type(err).__name__}: {err.strerror or err}") from None
    if not data:
        raise BadImage("empty_file", "0 bytes")
    return data


def _scale_to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    arr = arr.astype(np.float64)
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit ``L`` without clipping the range."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(arr, 0, 65535), mode="L")
    if img.mode == "I":
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 65535:  # how PIL opens 16-bit greyscale PNG/TIFF
            return Image.fromarray(_scale_to_uint8(arr, 0, 65535), mode="L")
        return Image.fromarray(_scale_to_uint8(arr, lo, hi), mode="L")
    # mode "F"
    arr = np.nan_to_num(arr.astype(np.float64))
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return Image.fromarray(_scale_to_uint8(arr, 0.0, 1.0), mode="L")
    return Image.fromarray(_scale_to_uint8(arr, lo, hi), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB following the module rules (alpha on white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(img).convert("RGB")
    if mode == "P" or ("transparency" in img.info and mode in ("L", "RGB")):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise BadImage("unsupported_mode", f"mode {mode}: {err}") from None


def decode_rgb(data: bytes, min_size: int = 0) -> Image.Image:
    """Decode image bytes fully (so truncation is detected now) and return RGB."""
    if not data:
        raise BadImage("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            # A bomb *warning* (between 1x and 2x MAX_IMAGE_PIXELS) is treated as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage("decompression_bomb", str(err)) from None
    except UnidentifiedImageError:
        # PIL's message names the BytesIO object (a memory address): say what the bytes are
        raise BadImage("not_an_image", f"no image format recognised in {len(data)} bytes "
                                       f"starting {data[:8]!r}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        msg = str(err)
        reason = "truncated" if "truncat" in msg.lower() or isinstance(err, EOFError) else "corrupt"
        raise BadImage(reason, f"{type(err).__name__}: {msg}") from None
    w, h = img.size
    if w < 1 or h < 1 or min(w, h) < min_size:
        raise BadImage("too_small", f"{w}x{h} < min_size {min_size}")
    try:
        return to_rgb(img)
    except BadImage:
        raise
    except Exception as err:  # noqa: BLE001 - any conversion failure is a property of the input
        raise BadImage("unsupported_mode", f"mode {img.mode}: {type(err).__name__}: {err}") from None
