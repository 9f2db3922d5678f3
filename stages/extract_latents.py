"""Stage ``extract_latents``: prepared images -> tokenizer -> ``data/latents/{train,val}.zarr``.

torchrun-able: ranks split the work by Zarr shard. The ``patch`` STAND-IN tokenizer is fitted
here on training images (rank 0 fits and saves it to ``data/latents/tokenizer/``, the others
load it); ``kl16`` is loaded from ``tokenizer.checkpoint`` on every rank. Writes the full
record to ``data/latents/report.json`` and ``data/reports/extract_latents.json`` (params,
tokenizer identity, per-split timings, skipped inputs) and the headline figures to
``data/metrics/extract_latents.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Params, TokenizerConfig, params_dict
from pipeline.paths import outputs
from pipeline.data.imageset import ImageSet
from pipeline.latents.store import FORMAT
from pipeline.latents.writer import extract_latents
from pipeline.tokenizers import LATENTS_TOKENIZER_DIR, Tokenizer, build_tokenizer, latents_tokenizer
from pipeline.utils.device import pick_device
from pipeline.utils.dist import DistInfo, barrier, cleanup, init_distributed
from pipeline.utils.io import atomic_write_json

SPLITS = ("train", "val")
OPTIONAL_SPLITS = ("pretrain",)  # encoded when prepare built them (the synthetic pretrain pool)


def fit_indices(n: int, k: int) -> list[int]:
    """``k`` rows spread evenly over ``n`` (rows are sorted by class, so the first k rows
    would fit the stand-in on the first classes only)."""
    k = min(k, n)
    return np.linspace(0, n - 1, k).round().astype(int).tolist() if k else []


def _tokenizer(cfg: TokenizerConfig, train: ImageSet, latents_dir: Path, info: DistInfo) -> Tokenizer:
    """Rank 0 fits the stand-in and saves it with the latents; the other ranks (and KL-16
    everywhere) load what ``latents_tokenizer`` will also give the stages downstream."""
    device = pick_device(info.local_rank)
    tok_dir = latents_dir / LATENTS_TOKENIZER_DIR
    if cfg.kind == "patch" and info.is_main:
        images = np.stack([train.image(i) for i in fit_indices(len(train), cfg.fit_images)])
        tok = build_tokenizer(cfg, fit_images=images, device=device)
        # The fit is deterministic; rewrite only when the weights changed, so a rerun leaves
        # the saved tokenizer (and its mtime) alone.
        saved = tok_dir / "tokenizer.json"
        if not saved.exists() or json.loads(saved.read_text()).get("weights_sha256") \
                != tok.weights_sha256():
            tok.save(tok_dir)
    barrier()
    if cfg.kind == "patch" and info.is_main:
        return tok
    return latents_tokenizer(cfg, latents_dir, device, cfg.precision, cfg.channels_last)


def _skipped_inputs(split_dir: Path) -> dict[str, Any]:
    """Inputs the prepare stage rejected (rows that never reached the image set), by reason."""
    path = split_dir / "skipped.jsonl"
    lines = [json.loads(s) for s in path.read_text().splitlines() if s.strip()] \
        if path.exists() else []
    return {"count": len(lines), "by_reason": dict(Counter(r.get("reason", "?") for r in lines)),
            "examples": lines[:20]}


def run(params: Params, data_dir: Path | str = Path("data")) -> None:
    data_dir = Path(data_dir)
    info = init_distributed()
    try:
        present = SPLITS + tuple(s for s in OPTIONAL_SPLITS if (data_dir / "images" / s).is_dir())
        sets = {s: ImageSet(data_dir / "images" / s) for s in present}
        out_dir = data_dir / "latents"
        tok = _tokenizer(params.tokenizer, sets["train"], out_dir, info)
        results = {
            s: extract_latents(sets[s], tok, out_dir / f"{s}.zarr", params.latents,
                               params.tokenizer, desc=f"latents {s}").to_dict()
            for s in present
        }
        if info.is_main:
            _write_report(data_dir, params, tok, results, sets)
    finally:
        cleanup()


def _write_report(data_dir: Path, params: Params, tok: Tokenizer, results: dict[str, dict],
                  sets: dict[str, ImageSet]) -> None:
    seconds = sum(r["seconds"] for r in results.values())
    encoded = sum(r["rows_encoded"] for r in results.values())
    report = {
        "format": FORMAT,
        "tokenizer": tok.identity(),
        "params": {k: params_dict(getattr(params, k)) for k in ("tokenizer", "latents")},
        "world": results["train"]["world"],
        "splits": results,
        "skipped_inputs": {s: _skipped_inputs(data_dir / "images" / s) for s in sets},
        "seconds": round(seconds, 3),
        "images_per_s": round(encoded / seconds, 2) if seconds > 0 and encoded else 0.0,
    }
    out = outputs("extract_latents", data_dir)
    atomic_write_json(out.latents / "report.json", report)
    atomic_write_json(out.report, report)
    metrics = {
        "train_images": results["train"]["rows"],
        "val_images": results["val"]["rows"],
        "grid": results["train"]["grid"],
        "dim": results["train"]["dim"],
        "images_encoded": encoded,
        "units_resumed": sum(r["units_resumed"] for r in results.values()),
        "seconds": report["seconds"],
        "images_per_s": report["images_per_s"],
    }
    atomic_write_json(out.metrics, metrics)


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("extract-latents")
