"""Stage ``prepare``: build the prepared image set ``data/images/{train,val}``.

Reads ``params.data`` (and ``params.seed``); writes webdataset shards + ``index.json`` +
``skipped.jsonl`` per split and ``data/metrics/prepare.json``. Resumable (``persist: true``):
complete shards of the same fingerprint are kept. Under torchrun, ranks share the shards.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params

IMAGES_DIR = Path("data/images")
METRICS_PATH = Path("data/metrics/prepare.json")


def run(params: Params) -> None:
    # imported here: data.num_workers spawns processes that re-import this module, and they
    # should not pay for torch (pulled in by the distributed helpers)
    from pipeline.data.build import prepare_images, summary
    from pipeline.utils.dist import init_distributed
    from pipeline.utils.io import atomic_write_json

    info = init_distributed()
    metrics = prepare_images(params, IMAGES_DIR, info)
    if info.is_main:
        atomic_write_json(METRICS_PATH, metrics)
        print(summary(metrics), flush=True)


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("prepare")
