"""Stage ``train_judge``: train the judge, a CNN classifier of real images -> ``data/judge/``.

It learns from the pretrain pool (``data/images/pretrain``; ``train`` when there is none),
part of each batch rendered by the tokenizer (``judge.roundtrip``), and is scored on val:
raw images and as the tokenizer renders them (the ceiling of any generator's class
consistency under this tokenizer). The judge scores CMAR's samples (``eval_cmar``) and is
the teacher ``pretrain_vit`` distils from. Writes ``data/judge/{model.safetensors,
config.json}``, ``data/plots/judge_train.csv``, the full record ``data/reports/judge.json``
and the headline ``data/metrics/judge.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Params
from pipeline.data.imageset import ImageSet, pretrain_split
from pipeline.models.judge import ConvJudge, JudgeArch
from pipeline.models.layers import count_params
from pipeline.tasks.judge import ImageLabelDataset, JudgeTask, judge_outputs, load_judge
from pipeline.tokenizers import latents_tokenizer, roundtrip_images
from pipeline.train.stage import TrainingStage
from pipeline.utils.device import pick_device
from pipeline.utils.images import images_to_input

HEADLINE = ("val_acc", "val_acc_roundtrip", "train_images", "train_steps", "wall_time_s")


def run(params: Params, data_dir: Path | str = Path("data")) -> dict[str, Any]:
    data_dir = Path(data_dir)
    cfg = params.judge
    with TrainingStage("train_judge", data_dir, HEADLINE) as stage:
        images = ImageSet(pretrain_split(data_dir / "images"))
        val = ImageSet(data_dir / "images" / "val")
        # on the trainer's device: it renders the round-trip share of every batch
        tokenizer = latents_tokenizer(params.tokenizer, data_dir / "latents",
                                      pick_device(stage.info.local_rank))
        torch.manual_seed(params.seed)
        model = ConvJudge(JudgeArch(len(images.classes), cfg.width))
        if stage.info.world > 1:  # batch statistics of the global batch, as with one process
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        task = JudgeTask(model, cfg.max_shift, cfg.roundtrip, tokenizer,
                         extra_config={"init_seed": params.seed,
                                       "tokenizer": tokenizer.identity()})
        report = {"params": count_params(model), "train_split": images.path.name,
                  "train_images": len(images)}
        stage.fit(task, ImageLabelDataset(images), cfg.train, inputs={"images": images.identity},
                  report=report, desc="judge")
        if stage.is_main:
            judge, _ = load_judge(stage.out.run)
            scores = evaluate(judge, val, tokenizer)
            stage.record(**scores)
            stage.say(f"[judge] val accuracy {scores['val_acc']:.3f} on images, "
                      f"{scores['val_acc_roundtrip']:.3f} as the tokenizer renders them "
                      f"({len(val)} images, chance {1 / len(val.classes):.3f}) -> {stage.out.run}")
    return stage.metrics


def evaluate(judge: ConvJudge, val: ImageSet, tokenizer: Any, batch: int = 64) -> dict[str, Any]:
    """Top-1 on val images, raw and rendered by the tokenizer (encode, decode), a batch at a
    time (ImageNet's 50,000 val images are ~10 GB of pixels)."""
    hits = {"val_acc": 0, "val_acc_roundtrip": 0}
    labels = np.asarray(val.labels)
    for s in range(0, len(val), batch):
        raw = np.stack([val.image(i) for i in range(s, min(len(val), s + batch))])
        rendered = roundtrip_images(tokenizer, images_to_input(torch.from_numpy(raw)))
        rendered_u8 = ((rendered + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        for name, imgs in (("val_acc", raw), ("val_acc_roundtrip", rendered_u8)):
            hits[name] += int((judge_outputs(judge, imgs)[1].argmax(1) == labels[s:s + len(raw)]).sum())
    return {**{k: v / max(len(val), 1) for k, v in hits.items()}, "val_images": len(val)}


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("train-judge")
