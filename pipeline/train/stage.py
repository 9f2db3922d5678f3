"""The frame every training stage runs in: process group, trainer, record, headline.

A training stage builds its data and task and calls :meth:`TrainingStage.fit`; the frame
starts and ends the process group (``torchrun`` or one process), points the trainer at the
stage's declared outputs (:data:`pipeline.paths.OUTS`), and on the main rank writes the full
record (``reports/<stage>.json``) and the headline figures ``dvc metrics show`` reads. A
stage that fails writes neither, so DVC never sees a half-finished record::

    with TrainingStage("train_judge", data_dir, HEADLINE) as stage:
        ...build task and dataset...
        stage.fit(task, dataset, cfg.train, inputs={"images": images.identity}, desc="judge")
        if stage.is_main:
            stage.record(**evaluate(...))
            stage.say(f"[judge] ...")
    return stage.metrics
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from pipeline.paths import outputs
from pipeline.train.trainer import Trainer, TrainTask, json_safe
from pipeline.utils.dist import DistInfo, cleanup, init_distributed
from pipeline.utils.io import atomic_write_json


class TrainingStage:
    """``headline``: the keys of the record that go to ``metrics/<stage>.json``; a nested
    record entry is reached as ``<entry>_<key>`` (``val_L_r_own`` for ``{"val": {"L_r_own"}}``)."""

    def __init__(self, stage: str, data_dir: str | Path, headline: tuple[str, ...],
                 **item: str) -> None:
        self.out = outputs(stage, data_dir, **item)
        self.headline = headline
        self.info = DistInfo()
        self.metrics: dict[str, Any] = {}
        self._summary = ""

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def __enter__(self) -> "TrainingStage":
        self.info = init_distributed()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None and self.is_main and self.metrics:
                atomic_write_json(self.out.report, json_safe(self.metrics))
                flat = _flatten(self.metrics)
                atomic_write_json(self.out.metrics, json_safe({k: flat.get(k) for k in self.headline}))
                if self._summary:
                    print(self._summary, flush=True)
        finally:
            cleanup()

    def fit(self, task: TrainTask, dataset: Dataset, train_cfg: Any, *, inputs: dict[str, Any],
            desc: str, report: dict[str, Any] | None = None, **trainer_kw: Any) -> dict[str, Any]:
        """Train (or resume, or find finished) into the stage's run folder; returns the record so
        far: ``report`` (what the stage knows before training) and the trainer's final figures.
        The per-window curve (always ``run/train_log.csv``) is mirrored to the stage's declared
        ``curve`` where it has one."""
        log_csv = trainer_kw.pop("log_csv", getattr(self.out, "curve", None))
        trainer = Trainer(task, dataset, train_cfg, self.out.run, inputs=inputs,
                          log_csv=log_csv, desc=desc, **trainer_kw)
        final = trainer.fit()
        self.metrics = {**(report or {}), **final}
        return self.metrics

    def record(self, **figures: Any) -> None:
        """Add figures measured after training (main rank) to the record."""
        self.metrics.update(figures)

    def say(self, summary: str) -> None:
        """The one line printed once the record is written."""
        self._summary = summary


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    flat = dict(d)
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update({f"{k}_{kk}": vv for kk, vv in v.items()})
    return flat

