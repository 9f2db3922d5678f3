"""Shared fixtures for the collapse-order tests: a real tiny latent store and a tiny model.

No tests live here; ``test_orders_*.py`` import these helpers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import OrdersConfig
from pipeline.latents.store import LatentStore
from pipeline.models.comae import CoMAE
from pipeline.tasks.comae import comae_arch
from tests.support import tiny_comae_cfg, write_store

CFG = OrdersConfig(images_per_batch=3, samples_per_shard=4, save_matrix=True, flip="compute",
                   precision="fp32")
COMAE_ID = {"sha256": "c" * 64}
TOKENIZER = {"kind": "patch", "config": {"patch_size": 8, "dim": 4}, "sha256": "a" * 64}


def make_store(path: Path, n: int = 10, grid: int = 4, dim: int = 4, classes: int = 3,
               seed: int = 0, tokenizer: dict | None = None) -> LatentStore:
    """A complete latent store with random moments (flip = the mirrored grid, as real ones)."""
    rng = np.random.default_rng(seed)
    keys = [f"c{i % classes}/img_{i:04d}" for i in range(n)]
    order = np.argsort(keys, kind="stable")
    keys = [keys[i] for i in order]
    labels = [int(k[1]) for k in keys]
    mom = rng.standard_normal((n, 2, 2 * dim, grid, grid)).astype(np.float32)
    mom[:, 1] = mom[:, 0, :, :, ::-1]  # the flipped image's latents are the mirrored grid
    return write_store(path, keys, labels, mom,
                       {"tokenizer": tokenizer or TOKENIZER, "crop_size": grid * 8,
                        "scale_factor": 0.5, "classes": [f"c{c}" for c in range(classes)],
                        "source": {"kind": "test", "seed": seed}},
                       fingerprint=f"test-{seed}")


def tiny_comae(grid: int = 4, dim: int = 4, seed: int = 0) -> CoMAE:
    """A randomly initialised, small real CoMAE (the export's model in every test)."""
    torch.manual_seed(seed)
    return CoMAE(comae_arch(tiny_comae_cfg(), grid, dim)).eval()


def tiny_model_matrices() -> torch.Tensor:
    """Dependency matrices as the export computes them (bf16 autocast, float32 out)."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(3, 16, 4, generator=g)
    return tiny_comae().dependency_matrices(tokens, dtype=torch.bfloat16)


def set_bytes(out: Path) -> dict[str, bytes]:
    """Every file of an exported shard set, by name (two exports must match byte for byte)."""
    names = sorted(p.name for p in out.glob("orders-*.tar")) + ["manifest.json"]
    names += [n for n in ("class_orders.npy", "class_scores.npy") if (out / n).exists()]
    return {n: (out / n).read_bytes() for n in names}
