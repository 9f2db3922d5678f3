"""The Collapse of Patches (Guo et al., 2025): a staged reference pipeline.

Library layout (one place per concern; the command line, ``cop``, is stages/cli.py):
  config       the params.yaml schema
  data/        image sources, the ADM/MAR center crop, the embedded synthetic set, prepared shards
  tokenizers/  KL-16 (diffusers + LDM checkpoint converter) and the offline patch stand-in
  latents/     the Zarr latent store: writer (resumable, torchrun) and reader Dataset
  models/      the networks: CoMAE, CViT (timm-compatible ViT), MAR/CMAR with its diffusion head
  tasks/       how each model is trained and evaluated: datasets, trainer tasks, loaders
  train/       the one trainer loop shared by the three models, checkpoints, EMA, schedules
  orders/      PageRank, the export of dependency matrices, the collapse-order shard set
  metrics/     evaluation metrics (FID-style distances, AuC and knee, object-overlap)
  utils/       atomic I/O, distributed helpers, progress bars, devices
"""

__version__ = "0.1.0"
