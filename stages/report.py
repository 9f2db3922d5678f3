"""Stage ``report``: one self-contained HTML page of everything the pipeline produced.

Reads ``data/metrics/``, ``data/reports/``, ``data/plots/`` and the CViT training logs and
writes ``data/report.html`` (:mod:`pipeline.utils.report`): the collapse order against its
baselines, the headline figures of every stage, the training curves, the order pictures,
Fig. 8 and the CMAR samples, all inline. It loads nothing from the network (unlike
``dvc plots show``'s page), so it opens offline: ``xdg-open data/report.html``. Missing
artifacts are marked "not produced"; ``cop report`` works at any point of the pipeline.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params
from pipeline.paths import outputs
from pipeline.utils.report import write_report


def run(params: Params, data_dir: Path | str = Path("data"), out: Path | str | None = None) -> Path:
    path = write_report(data_dir, out if out is not None else outputs("report", data_dir).page)
    print(f"[report] {path} ({path.stat().st_size / 1e6:.2f} MB; open it in a browser, "
          "it needs no network)", flush=True)
    return path


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("report")
