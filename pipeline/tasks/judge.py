"""The judge's training and use: a classifier of real images that scores generated ones.

Training (stage ``train_judge``): cross-entropy on real images, each flipped and shifted
(reflect-padded, up to ``judge.max_shift`` px). With ``judge.roundtrip`` > 0 that share of
the images is first sent through the tokenizer (encode to the posterior mean, decode): still
real images, but as the tokenizer renders them. Generated images reach pixels only through
the tokenizer's decoder, so a judge that has never seen its rendering would score the
tokenizer, not the generator (the patch stand-in drops the fine texture that tells the
classes apart: a judge trained on raw pixels alone recognises only ~35% of decoded real
val latents, docs/downstream.md).

Everything random is drawn from the trainer's ``StepContext`` per global row,
so 1 and N processes train the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.judge import ConvJudge, JudgeArch
from pipeline.tokenizers import roundtrip_images
from pipeline.train.checkpoint import load_trained
from pipeline.train.trainer import StepContext, TrainTask
from pipeline.utils.images import images_to_input

TASK_KIND = "judge"


def augment(x: Tensor, ctx: StepContext, max_shift: int) -> Tensor:
    """Per image: a horizontal flip (p = 0.5) and a shift of up to ``max_shift`` px each way
    (reflect padding), drawn from the step's stream. x: [b, 3, H, W] -> [b, 3, H, W]."""
    flip = ctx.rand() < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if max_shift <= 0:
        return x
    off = ctx.randint(2 * max_shift + 1, 2)  # [b, 2]: (dy, dx) into the padded image
    H, W = x.shape[-2:]
    padded = F.pad(x, (max_shift,) * 4, mode="reflect")
    return torch.stack([padded[i, :, dy:dy + H, dx:dx + W] for i, (dy, dx) in enumerate(off.tolist())])


class JudgeTask(TrainTask):
    """Cross-entropy on augmented real images (a share rendered by the tokenizer)."""

    def __init__(self, model: ConvJudge, max_shift: int, roundtrip: float, tokenizer: Any = None,
                 extra_config: dict[str, Any] | None = None) -> None:
        if roundtrip > 0 and tokenizer is None:
            raise ValueError("judge.roundtrip > 0 needs the tokenizer that made the latents")
        self.model = model
        self.max_shift = max_shift
        self.roundtrip = roundtrip
        self.tokenizer = tokenizer
        self.extra_config = dict(extra_config or {})

    def config(self) -> dict[str, Any]:
        return {"kind": TASK_KIND, "arch": self.model.arch.to_dict(), "max_shift": self.max_shift,
                "roundtrip": self.roundtrip, **self.extra_config}

    def loss(self, model: nn.Module, batch: dict[str, Tensor], ctx: StepContext
             ) -> tuple[Tensor, dict[str, Any]]:
        x = images_to_input(batch["image"])  # [b, 3, H, W]
        rt = ctx.rand() < self.roundtrip  # [b]; drawn even at 0 so streams do not shift
        if self.roundtrip > 0 and bool(rt.any()):
            x = x.clone()
            x[rt] = roundtrip_images(self.tokenizer, x[rt])  # only the rows drawn for it
        logits = model(augment(x, ctx, self.max_shift))
        loss = F.cross_entropy(logits.float(), batch["label"])
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        return loss, {"acc": acc.detach(), "roundtrip_share": float(rt.float().mean())}


class ImageLabelDataset(torch.utils.data.Dataset):
    """``image`` uint8 [H, W, 3] and ``label`` of a prepared image set."""

    def __init__(self, images: Any) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": torch.from_numpy(self.images.image(i).copy()), "label": int(self.images.labels[i])}


def load_judge(directory: str | Path) -> tuple[ConvJudge, dict[str, Any]]:
    """The trained judge of ``data/judge`` (eval mode) and its run's meta."""
    model, run = load_trained(directory, lambda task: ConvJudge(JudgeArch.from_dict(task["arch"])),
                              kind=TASK_KIND, weights="model")
    return model, {**run.meta, "weights": run.weights.name}


@torch.no_grad()
def judge_outputs(judge: ConvJudge, images_u8: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features [n, F] and logits [n, C] of uint8 images [n, H, W, 3]."""
    dev = next(judge.parameters()).device
    feats, logits = [], []
    for s in range(0, len(images_u8), batch):
        x = images_to_input(torch.from_numpy(np.ascontiguousarray(images_u8[s:s + batch]))).to(dev)
        f = judge.features(x)
        feats.append(f.float().cpu())
        logits.append(judge.head(f).float().cpu())
    C = judge.arch.num_classes
    if not feats:
        return np.zeros((0, judge.arch.feature_dim), np.float32), np.zeros((0, C), np.float32)
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


__all__ = ["ImageLabelDataset", "JudgeTask", "augment", "judge_outputs", "load_judge"]
