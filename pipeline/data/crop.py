"""The ADM/MAR center crop and the conversion of crops to model input.

``center_crop_arr`` follows the guided-diffusion (ADM) recipe that MAR uses for ImageNet:
halve with a BOX filter while the short side is at least twice the target (cheap, alias-free
downscaling), then one BICUBIC resize so the short side equals the target, then a center crop.
Images smaller than the target are upsampled by the BICUBIC step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is only needed by to_model_input; keep the data workers light
    import torch


def _resize_chain(pil_image: Image.Image, size: int) -> Image.Image:
    while min(*pil_image.size) >= 2 * size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = size / min(*pil_image.size)
    return pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)


def center_crop_arr(pil_image: Image.Image, size: int) -> np.ndarray:
    """ADM/MAR center crop of ``pil_image`` to ``size x size``; returns the array (uint8 for RGB)."""
    if size < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    arr = np.array(_resize_chain(pil_image, size))
    crop_y = (arr.shape[0] - size) // 2
    crop_x = (arr.shape[1] - size) // 2
    return arr[crop_y : crop_y + size, crop_x : crop_x + size]


def center_crop_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Apply the same geometry as :func:`center_crop_arr` to a boolean mask.

    The mask goes through the identical BOX/BICUBIC chain as an 8-bit image and is thresholded
    at half intensity, so it stays aligned with the cropped image pixel for pixel.
    """
    img = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, mode="L")
    return center_crop_arr(img, size) >= 128


def to_model_input(images: np.ndarray | Sequence[np.ndarray]) -> "torch.Tensor":
    """uint8 ``[H, W, 3]`` or ``[B, H, W, 3]`` (or a list of ``[H, W, 3]``) -> float32
    ``[B, 3, H, W]`` in [-1, 1] (``x / 127.5 - 1``, MAR's normalisation)."""
    import torch

    arr = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] or [B, H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {arr.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
