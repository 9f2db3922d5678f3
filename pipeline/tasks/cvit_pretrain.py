"""The ViT every CViT variant starts from (stage ``pretrain_vit``), and how a variant loads it.

The paper fine-tunes an ImageNet-21k ViT-B/16. At CPU scale there is no such model, and a
small ViT trained from scratch on a few thousand 64 px images does not learn (issue 12: 46%
on 6 classes after 4,000 steps), while a small CNN does (the judge). So the pretraining
distils the judge into the ViT, as DeiT does for data-poor ViTs (soft distillation):

    loss = (1 − a) · CE(student, labels) + a · T² · KL(softmax(teacher/T) ‖ softmax(student/T))

on full images of the pretrain pool (no orders: pretraining knows nothing of collapse), each
flipped and shifted (``pipeline.tasks.judge.augment``); the teacher sees the very image the
student sees, so its soft labels describe that input. The T² keeps the gradient scale of
the soft term independent of T (Hinton et al. 2015).

With ``cvit.model.pretrained`` (the published timm weights, full profile) nothing is trained: the
stage records which weights stand in for it, and
:func:`pipeline.tasks.cvit.start_weights` loads those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.judge import ConvJudge
from pipeline.models.layers import fold_batchnorm
from pipeline.models.vit import PatchConvEmbed, VisionTransformer
from pipeline.tasks.cvit import PRETRAIN_KIND
from pipeline.tasks.judge import augment
from pipeline.train.trainer import StepContext, TrainTask
from pipeline.utils.images import images_to_input


def distill_loss(student: Tensor, teacher: Tensor, labels: Tensor, distill: float,
                 temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(total, CE, KL) of DeiT's soft distillation; logits [b, C], labels [b]."""
    ce = F.cross_entropy(student.float(), labels)
    T = temperature
    kl = F.kl_div(F.log_softmax(student.float() / T, dim=1), F.log_softmax(teacher.float() / T, dim=1),
                  log_target=True, reduction="batchmean")
    return (1 - distill) * ce + distill * T * T * kl, ce, kl


class VitDistillTask(TrainTask):
    """Cross-entropy plus distillation from a frozen teacher, on augmented full images."""

    def __init__(self, model: VisionTransformer, teacher: nn.Module, distill: float,
                 temperature: float, max_shift: int, extra_config: dict[str, Any] | None = None) -> None:
        self.model = model
        self.teacher = teacher.eval().requires_grad_(False)  # BatchNorm in eval: fixed statistics
        self.distill = distill
        self.temperature = temperature
        self.max_shift = max_shift
        self.extra_config = dict(extra_config or {})

    def config(self) -> dict[str, Any]:
        return {"kind": PRETRAIN_KIND, "arch": self.model.arch.to_dict(), "distill": self.distill,
                "temperature": self.temperature, "max_shift": self.max_shift, **self.extra_config}

    def loss(self, model: nn.Module, batch: dict[str, Tensor], ctx: StepContext
             ) -> tuple[Tensor, dict[str, Any]]:
        x = augment(images_to_input(batch["image"]), ctx, self.max_shift)  # [b, 3, H, W]
        labels = batch["label"]
        logits = model(x)
        with torch.no_grad():
            teacher = self.teacher.to(x.device)(x)
        total, ce, kl = distill_loss(logits, teacher, labels, self.distill, self.temperature)
        return total, {"ce": ce.detach(), "kl": kl.detach(),
                       "acc": (logits.argmax(1) == labels).float().mean().detach(),
                       "teacher_acc": (teacher.argmax(1) == labels).float().mean()}


@torch.no_grad()
def load_judge_stem(model: VisionTransformer, judge: ConvJudge) -> int:
    """Copy the judge's half-resolution layers (stem conv and three 3x3 conv-BN-ReLU) into the
    ViT's conv stem, BatchNorm folded into the biases; returns the layers copied.

    Applied inside each patch, they see zero padding at the patch border where the judge saw
    the neighbouring pixels; the linear projection after them is trained."""
    stem = model.patch_embed
    if not isinstance(stem, PatchConvEmbed):
        raise ValueError("cvit.pretrain.stem_from_judge needs cvit.model.stem=conv "
                         f"(the ViT has {type(stem).__name__})")
    if model.arch.stem_width != judge.arch.width:
        raise ValueError(f"cvit.model.stem_width={model.arch.stem_width} must equal the judge's "
                         f"width {judge.arch.width} to copy its layers")
    convs = [m for m in judge.body.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in judge.body.modules() if isinstance(m, nn.BatchNorm2d)]
    mine = stem.conv_layers()
    for dst, conv, bn in zip(mine, convs, norms):
        if dst.weight.shape != conv.weight.shape:
            raise ValueError(f"judge layer {tuple(conv.weight.shape)} does not fit the stem's "
                             f"{tuple(dst.weight.shape)}")
        w, b = fold_batchnorm(conv, bn)
        dst.weight.copy_(w)
        dst.bias.copy_(b)
    return len(mine)


@torch.no_grad()
def top1(model: nn.Module, images: Any, batch: int = 256, limit: int | None = None) -> float:
    """Top-1 (fraction) of ``model`` on full, unaugmented images of a prepared set."""
    n = len(images) if limit is None else min(limit, len(images))
    dev = next(model.parameters()).device
    labels = torch.as_tensor(np.asarray(images.labels[:n]), dtype=torch.long)
    hits = 0
    for s in range(0, n, batch):
        u8 = torch.from_numpy(np.stack([images.image(i) for i in range(s, min(s + batch, n))]))
        hits += int((model(images_to_input(u8).to(dev)).argmax(1).cpu() == labels[s:s + len(u8)]).sum())
    return hits / max(n, 1)


class ImageCache:
    """A prepared image set decoded once into memory (val images are read at every
    evaluation of the learning curve; decoding PNGs each time would cost more than the model)."""

    def __init__(self, images: Any) -> None:
        self.path = images.path
        self.labels = np.asarray(images.labels)
        self._pixels = np.stack([images.image(i) for i in range(len(images))]) if len(images) else \
            np.zeros((0, images.crop_size, images.crop_size, 3), np.uint8)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        return self._pixels[i]


__all__ = ["ImageCache", "VitDistillTask", "distill_loss", "load_judge_stem", "top1"]
