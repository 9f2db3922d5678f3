"""uint8 image arrays: to model input, to a grid, to PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.utils.io import atomic_path


def to_unit(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float [n, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float() / 255.0


def images_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1] (MAR/ADM scaling; the in21k
    ViT-B/16 was trained with mean = std = 0.5, i.e. the same range; the judge reads it too)."""
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def image_grid(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """uint8 [n, H, W, 3] -> one uint8 image, ``cols`` per row, white padding."""
    n, H, W, _ = images.shape
    rows = max(1, math.ceil(n / cols))
    canvas = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return canvas


def save_png(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def safe_name(name: str) -> str:
    """A class name as a file-name part (class names may hold '/' or spaces)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
