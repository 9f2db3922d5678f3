"""Learning-rate schedules: linear warm-up, then cosine (or constant) to ``min_lr``."""

from __future__ import annotations

import math

from pipeline.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for the update made at ``step`` (0-based). Warm-up rises linearly to ``cfg.lr``."""
    warmup = int(round(cfg.warmup_frac * cfg.steps))
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
