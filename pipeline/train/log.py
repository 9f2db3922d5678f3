"""The trainer's CSV logs: per log window, per epoch and (when the task is evaluated during
training) per evaluation, kept beside the checkpoints.

The canonical files live in the run's output folder (persisted with the checkpoints, so a
resumed run continues its curve); ``mirror`` copies them to the stage's DVC plot path. DVC
deletes a stage's plot files before re-running it, so the mirror must be reproducible from
the canonical logs, never the other way round. Only the main rank writes.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from pipeline.utils.io import atomic_write_text


class TrainLog:
    def __init__(self, out_dir: Path, mirror: Path | None, is_main: bool,
                 eval_mirror: Path | None = None) -> None:
        self.window = out_dir / "train_log.csv"
        self.epochs = out_dir / "train_log_epochs.csv"
        self.evals = out_dir / "eval_log.csv"
        self.mirror_path = mirror
        self.eval_mirror = eval_mirror
        self.is_main = is_main

    def truncate(self, step: int, epoch: float) -> None:
        """After a resume, drop rows logged past the checkpoint so the curves have no duplicates."""
        _truncate(self.window, step, "step", self.is_main)
        _truncate(self.epochs, epoch, "epoch", self.is_main)
        _truncate(self.evals, step, "step", self.is_main)

    def eval_row(self, row: dict[str, Any]) -> None:
        _append(self.evals, row, self.is_main)

    def window_row(self, row: dict[str, Any]) -> None:
        _append(self.window, row, self.is_main)

    def epoch_row(self, row: dict[str, Any]) -> None:
        _append(self.epochs, row, self.is_main)

    def mirror(self) -> None:
        if not self.is_main:
            return
        pairs = []
        if self.mirror_path:
            dst = self.mirror_path
            pairs += [(self.window, dst), (self.epochs, dst.with_name(dst.stem + "_epochs.csv"))]
        if self.eval_mirror:
            pairs.append((self.evals, self.eval_mirror))
        for src, to in pairs:
            if src.exists():
                atomic_write_text(to, src.read_text())


def _truncate(path: Path, upto: float, key: str, is_main: bool) -> None:
    if not path.exists() or not is_main:
        return
    rows = list(csv.DictReader(path.open()))
    if not rows:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(r for r in rows if float(r[key]) <= upto)
    atomic_write_text(path, buf.getvalue())


def _append(path: Path, row: dict[str, Any], is_main: bool) -> None:
    if not is_main:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        fields = next(csv.reader(path.open()))
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="").writerow(row)
    else:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row.keys()), restval="")
            w.writeheader()
            w.writerow(row)
