"""The judge: a small CNN classifier of real images (default profile).

It scores what the other models make: its accuracy on generated samples is their class
consistency, its pooled features are the space for Fréchet distance, precision and recall
of samples, and it is the teacher ``pretrain_vit`` distils from (DeiT: a ViT learns from few
images far better with a convolutional teacher). The full profile judges with the FID
Inception instead.

Layout: a stride-2 4x4 stem, four 3x3 conv-BatchNorm-ReLU at half resolution (widths w, w,
2w, 2w), one at a quarter (4w), one at an eighth (4w), global average pooling, a linear
head (shapes below). BatchNorm, because with
GroupNorm(8) this net did not learn at all in 1000 steps (loss stayed at ln 6) where BatchNorm
reaches 96% val; under DDP the stage converts it to SyncBatchNorm, so batch statistics are
those of the global batch, as with one process.

    x [B, 3, H, W] in [-1, 1] -> stem [B, w, H/2, W/2] -> ... -> pooled [B, feature_dim] -> logits [B, C]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class JudgeArch:
    num_classes: int
    width: int = 32

    @property
    def feature_dim(self) -> int:
        return 4 * self.width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "JudgeArch":
        return cls(**{k: d[k] for k in ("num_classes", "width")})


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ConvJudge(nn.Module):
    def __init__(self, arch: JudgeArch) -> None:
        super().__init__()
        self.arch = arch
        w = arch.width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            _conv(w, w), _conv(w, 2 * w), _conv(2 * w, 2 * w),  # [B, 2w, H/2, W/2]
            nn.MaxPool2d(2), _conv(2 * w, 4 * w),                 # [B, 4w, H/4, W/4]
            nn.MaxPool2d(2), _conv(4 * w, 4 * w),                 # [B, 4w, H/8, W/8]
        )
        self.head = nn.Linear(arch.feature_dim, arch.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Pooled features [B, feature_dim] (the space of the generation metrics)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


__all__ = ["ConvJudge", "JudgeArch"]
