"""Latent store (``data/latents/<split>.zarr``): format and reader in :mod:`.store`, the
resumable, torchrun-able extraction in :mod:`.writer` (imported on demand: it pulls in the
tokenizers, which readers do not need)."""

from pipeline.latents.store import (FORMAT, LatentStore, LatentStoreError, TokenGridDataset,
                                    sample_posterior)

__all__ = ["FORMAT", "LatentStore", "LatentStoreError", "TokenGridDataset", "sample_posterior"]
