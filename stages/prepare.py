"""Stage ``prepare``: build the prepared image set ``data/images/{train,val}``.

Reads ``params.data`` (and ``params.seed``); writes webdataset shards + ``index.json`` +
``skipped.jsonl`` per split, the full record in ``data/reports/prepare.json`` and the headline
figures (images and skips per split, classes, crop size) in ``data/metrics/prepare.json``.
Resumable (``persist: true``):
complete shards of the same fingerprint are kept. Under torchrun, ranks share the shards.
"""

from __future__ import annotations


from pipeline.config import Params
from pipeline.paths import outputs

OUT = outputs("prepare")


def headline(record: dict) -> dict:
    """The flat figures `dvc metrics show` prints; the rest stays in the report."""
    out = {f"{split}_{k}": m[k] for split, m in record["splits"].items()
           for k in ("count", "skipped")}
    return {**out, "num_classes": record["num_classes"], "crop_size": record["crop_size"]}


def run(params: Params) -> None:
    # imported here: data.num_workers spawns processes that re-import this module, and they
    # should not pay for torch (pulled in by the distributed helpers)
    from pipeline.data.build import prepare_images, summary
    from pipeline.utils.dist import init_distributed
    from pipeline.utils.io import atomic_write_json

    info = init_distributed()
    metrics = prepare_images(params, OUT.images, info)
    if info.is_main:
        atomic_write_json(OUT.report, metrics)
        atomic_write_json(OUT.metrics, headline(metrics))
        print(summary(metrics), flush=True)


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("prepare")
