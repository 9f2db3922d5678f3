"""Fixtures for the CViT tests, built through the project's real writers.

- an image set written by ``pipeline.data.imageset`` (``tests.support.write_imageset``);
- a latent store for it (``tests.support.write_store``) whose tokens are the mean colour of each patch;
- collapse orders exported from that store by ``pipeline.orders.export.export_split`` with a
  tiny position-aware stand-in for CoMAE.

No tests live here; ``test_cvit*.py`` import these helpers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipeline.config import OrdersConfig
from pipeline.data.imageset import ImageSet
from pipeline.latents.store import LatentStore
from pipeline.orders.export import export_split
from pipeline.orders.shards import CollapseOrders
from tests.support import write_imageset, write_store

TOKENIZER = {"kind": "patch", "config": {"patch_size": 8, "dim": 3}, "sha256": "c" * 64}


def class_image(c: int, i: int, size: int, seed: int) -> np.ndarray:
    """A noisy image whose class is the colour of a square at a class-specific place."""
    rng = np.random.default_rng(seed * 10_007 + c * 101 + i)
    img = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    s = size // 4
    r0, c0 = (c % 2) * size // 2 + rng.integers(0, s), (c // 2 % 2) * size // 2 + rng.integers(0, s)
    img[r0:r0 + s, c0:c0 + s] = np.array([[255, 40, 40], [40, 255, 40], [40, 40, 255],
                                          [255, 255, 40]][c % 4], np.uint8)
    return img


def make_imageset(split_dir: Path, split: str, classes: int = 3, per_class: int = 8,
                  size: int = 32, seed: int = 0) -> ImageSet:
    images = [(f"c{c}/img_{i:03d}", c, class_image(c, i, size, seed + (split == "val")))
              for c in range(classes) for i in range(per_class)]
    return write_imageset(split_dir, split, images, [f"c{c}" for c in range(classes)], size,
                          per_shard=len(images), source={"kind": "cvit-test", "seed": seed},
                          fingerprint=f"cvit-test-{split}-{seed}")


class TinyDependencyModel(torch.nn.Module):
    """CoMAE's ``dependency_matrices`` contract (values in [0, 1], zero diagonal), position-aware
    so a flipped image gets its own order."""

    def __init__(self, dim: int, num_tokens: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(dim, 8, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(num_tokens, 8, generator=g))

    def dependency_matrices(self, tokens: torch.Tensor, chunk: int | None = None,
                            dtype: torch.dtype | None = None) -> torch.Tensor:
        q = tokens @ self.w + self.pos  # [B, N, 8]
        A = (1 + torch.tanh(q @ q.transpose(1, 2) / math.sqrt(8))) / 2
        return A * (1 - torch.eye(A.shape[-1]))


def make_store(path: Path, images: ImageSet, grid: int, tokenizer: dict | None = None,
               keep_keys: int | None = None, crop_size: int | None = None) -> LatentStore:
    """Latents of ``images``: per patch, the mean colour (dim 3), the flip = mirrored grid.

    ``keep_keys``: only the first rows (orders that miss images); ``crop_size``: what the
    store claims its crops were (orders of other images)."""
    n = len(images) if keep_keys is None else keep_keys
    p = images.crop_size // grid
    mom = np.zeros((n, 2, 6, grid, grid), np.float32)
    for i in range(n):
        img = images.image(i).astype(np.float32) / 127.5 - 1
        means = img.reshape(grid, p, grid, p, 3).mean(axis=(1, 3)).transpose(2, 0, 1)  # [3, g, g]
        mom[i, 0, :3] = means
        mom[i, 1, :3] = means[:, :, ::-1]
    return write_store(path, images.keys[:n], images.labels[:n].tolist(), mom,
                       {"tokenizer": tokenizer or TOKENIZER, "crop_size": crop_size or images.crop_size,
                        "scale_factor": 1.0, "classes": images.classes, "source": images.identity},
                       fingerprint=f"cvit-test-{path.name}")


def make_orders(out: Path, images: ImageSet, grid: int, split: str, work: Path,
                tokenizer: dict | None = None, keep_keys: int | None = None,
                crop_size: int | None = None) -> CollapseOrders:
    store = make_store(work / f"{out.name}-{split}.zarr", images, grid, tokenizer, keep_keys, crop_size)
    model = TinyDependencyModel(3, grid * grid)
    cfg = OrdersConfig(samples_per_shard=16, flip="compute", precision="fp32")
    export_split(store, model, {"kind": "tiny-test"}, cfg, out, split,
                 class_orders=split == "train")
    return CollapseOrders(out)


def make_data_dir(root: Path, grid: int = 4, size: int = 32, classes: int = 3,
                  per_class: int = 8, seed: int = 0) -> Path:
    """``root/data`` laid out as the pipeline has it: images/, orders/ and latents/ of train, val."""
    data = root / "data"
    for split, n in (("train", per_class), ("val", max(2, per_class // 2))):
        images = make_imageset(data / "images" / split, split, classes, n, size, seed)
        make_orders(data / "orders" / split, images, grid, split, root / "work")
        make_store(data / "latents" / f"{split}.zarr", images, grid)  # what the orders came from
    return data


def make_pretrain_inputs(data: Path, grid: int = 4) -> Path:
    """What pretrain_vit reads besides the images: the latent store (for the grid) and a
    judge to distil from (a tiny CNN trained 4 steps: a teacher's quality is not under test)."""
    from pipeline.config import TrainConfig
    from pipeline.models.judge import ConvJudge, JudgeArch
    from pipeline.tasks.judge import ImageLabelDataset, JudgeTask
    from pipeline.train.trainer import Trainer

    images = ImageSet(data / "images" / "train")
    if not (data / "latents" / "train.zarr").exists():
        make_store(data / "latents" / "train.zarr", images, grid)
    if not (data / "judge" / "config.json").exists():
        torch.manual_seed(0)
        task = JudgeTask(ConvJudge(JudgeArch(len(images.classes), 8)), max_shift=2, roundtrip=0.0)
        cfg = TrainConfig(steps=4, batch_size=8, lr=1e-2, ckpt_every=4, log_every=2, precision="fp32")
        Trainer(task, ImageLabelDataset(images), cfg, data / "judge").fit()
    return data


def make_pretrained_vit(data: Path, params) -> Path:
    """``data/pretrain_vit`` for ``params`` (a few steps of the real stage)."""
    from stages import pretrain_vit

    make_pretrain_inputs(data)
    pretrain_vit.run(params, data_dir=data)
    return data / "pretrain_vit"
