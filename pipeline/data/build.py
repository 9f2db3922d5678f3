"""Build the prepared image set (stage ``prepare``): plan, load + crop + encode, write shards.

Work units are output shards (``data.shard_size`` planned entries each, in key order), so the
result does not depend on ``data.num_workers`` or the torchrun world size. A unit writes its
tar atomically and then a small ``.parts/shard-XXXXXX.json`` (offsets, skips); a unit with
both is complete and is not redone on resume. ``index.json`` is written last and marks the
split complete; ``.parts`` is then removed.

Webdataset sources cannot be listed in key order without reading them, so they take two
passes: every source tar is decoded and cropped into a key-sorted staging run
(``.staging/run-XXXXXX.tar``, itself resumable per source tar), then the runs are merged in
key order into the output shards by copying encoded bytes, and ``.staging`` is removed.

Fingerprint = sha256 of (format, ``params.data`` without ``num_workers``, ``params.seed``,
and for a folder or tar source the digest of its listing, :mod:`pipeline.data.listing`).
It is kept in ``data/images/.fingerprint`` and in each ``index.json``; a different
fingerprint clears the output folder, so files added, removed or changed in the source
rebuild the set instead of leaving a complete split trusted.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.config import DataConfig, Params, params_dict
from pipeline.data.imageset import FORMAT, IMAGE_EXT, ShardResult, shard_name, write_index
from pipeline.data.listing import source_listing, source_listing_of
from pipeline.data.sources import (Entry, Plan, expand_urls, folder_plan, imagefolder_classes, imagefolder_plan,
                                   skip)
from pipeline.data.synthetic import class_names, synthetic_keys
from pipeline.data.units import (  # noqa: F401 - PrepareError is part of this module's API
    Encoding, FileLoader, PrepareError, ShardJob, SourceNotFound, StagedLoader, StageJob,
    SyntheticLoader, build_shard, call_job, stage_run, strict_error,
)
from pipeline.utils.dist import DistInfo, barrier, get_dist, units_for_rank
from pipeline.utils.io import atomic_write_text, read_json, sha256_json
from pipeline.utils.progress import progress

SPLITS = ("train", "val")


def fingerprint(params: Params, listing_sha256: str | None = None) -> str:
    data = params_dict(params.data)
    data.pop("num_workers", None)  # parallelism never changes the bytes written
    what: dict[str, Any] = {"format": FORMAT, "data": data, "seed": params.seed}
    if listing_sha256 is not None:  # absent for synthetic: its params say it all
        what["listing"] = listing_sha256
    return sha256_json(what)


def run_jobs(fn: Callable, jobs: Sequence[Any], workers: int, desc: str, total: int | None) -> None:
    """Run ``fn(job)`` for every job, in-process or on a spawn pool; progress in images/s."""
    bar = progress(total=total, desc=desc, unit="img")
    try:
        if workers <= 0 or len(jobs) <= 1:
            for job in jobs:
                fn(job, bar.update)
            return
        ctx = mp.get_context("spawn")  # no forked torch/thread state in the workers
        with ctx.Pool(min(workers, len(jobs))) as pool:
            for i, result in pool.imap_unordered(call_job, [(fn, i, j) for i, j in enumerate(jobs)]):
                bar.update(len(jobs[i]) or result.count + len(result.skipped))
    finally:
        bar.close()


# ----------------------------------------------------------------------------- splits


def _part_complete(part: Path, tar: Path) -> bool:
    if not (part.exists() and tar.exists()):
        return False
    try:
        return read_json(part)["size"] == tar.stat().st_size
    except (ValueError, KeyError, OSError):
        return False


def _clean_tmp(folder: Path) -> None:
    """Remove what a killed writer left behind (``.<name>.XXXX.tmp`` from atomic_path)."""
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def split_complete(split_dir: Path, fp: str) -> bool:
    idx_path = split_dir / "index.json"
    if not idx_path.exists():
        return False
    try:
        index = read_json(idx_path)
    except ValueError:
        return False
    if index.get("format") != FORMAT or index.get("fingerprint") != fp:
        return False
    return all((split_dir / s["name"]).exists() and (split_dir / s["name"]).stat().st_size == s["size"]
               for s in index["shards"])


def _write_shards(split_dir: Path, plan: Plan, loader: Any, cfg: DataConfig, fp: str, info: DistInfo,
                  desc: str) -> list[ShardResult]:
    """Plan -> shards (resumable, split across ranks and workers) -> results in shard order."""
    parts = split_dir / ".parts"
    plan_sha = sha256_json({"fp": fp, "entries": [(e.key, e.label, e.ref) for e in plan.entries]})
    if info.is_main:
        marker = parts / "plan.sha256"
        if marker.exists() and marker.read_text().strip() != plan_sha:  # inputs changed under us
            shutil.rmtree(parts)
            for old in split_dir.glob("shard-*.tar"):
                old.unlink()
        _clean_tmp(split_dir)
        _clean_tmp(parts)
        atomic_write_text(marker, plan_sha + "\n")
    barrier()
    size = cfg.shard_size
    n_units = max(1, -(-len(plan.entries) // size))
    jobs = [ShardJob(split_dir / shard_name(u), parts / f"shard-{u:06d}.json",
                     tuple(plan.entries[u * size:(u + 1) * size]), loader, IMAGE_EXT[cfg.image_format], cfg.strict)
            for u in range(n_units)]
    mine = [jobs[u] for u in units_for_rank(n_units, info)]
    todo = [j for j in mine if not _part_complete(j.part, j.path)]
    run_jobs(build_shard, todo, cfg.num_workers, desc, total=sum(map(len, todo)))
    barrier()
    return [ShardResult.from_json(read_json(j.part)) for j in jobs] if info.is_main else []


def _stage_webdataset(split_dir: Path, urls: list[str], cfg: DataConfig, info: DistInfo,
                      split: str, default_label: int | None = None) -> list[dict[str, Any]]:
    staging = split_dir / ".staging"
    if info.is_main:
        _clean_tmp(staging)
    barrier()
    enc = Encoding.from_config(cfg)
    jobs = [StageJob(url, staging / f"run-{r:06d}.tar", staging / f"run-{r:06d}.json", enc, cfg.strict,
                     default_label) for r, url in enumerate(urls)]
    mine = [jobs[u] for u in units_for_rank(len(jobs), info)]
    todo = [j for j in mine if not _part_complete(j.part, j.path)]
    run_jobs(stage_run, todo, cfg.num_workers, f"prepare {split} (decode)", total=None)
    barrier()
    return [read_json(j.part) for j in jobs]


def _merge_plan(runs: list[dict[str, Any]], urls: list[str], num_classes: int | None) -> Plan:
    """Key-sorted entries over all staging runs; cross-run duplicates and (val) labels beyond
    the train classes become skips."""
    skipped = [s for run in runs for s in run["skipped"]]
    seen: set[str] = set()
    entries = []
    flat = sorted((k, r, row, lab) for r, run in enumerate(runs)
                  for row, (k, lab) in enumerate(zip(run["keys"], run["labels"])))
    for key, r, row, label in flat:
        source = f"{urls[r]}#{key}"
        if key in seen:
            skipped.append(skip(source, "duplicate_key", f"key {key!r} also in an earlier shard"))
        elif num_classes is not None and label >= num_classes:
            skipped.append(skip(source, "unknown_class", f"label {label} >= {num_classes} train classes"))
        else:
            seen.add(key)
            entries.append(Entry(key, label, f"{r}:{row}"))
    return Plan(entries, skipped, {"kind": "webdataset", "urls": urls})


def prepare_split(split: str, cfg: DataConfig, out_dir: Path, fp: str, classes: list[str] | None,
                  info: DistInfo) -> dict[str, Any]:
    """Build one split unless it is already complete; return its index (on every rank)."""
    split_dir = out_dir / split
    if split_complete(split_dir, fp):
        return read_json(split_dir / "index.json")
    enc = Encoding.from_config(cfg)
    desc = f"prepare {split}"
    if cfg.source == "synthetic":
        syn = cfg.synthetic
        per_class = {"train": syn.train_per_class, "val": syn.val_per_class,
                     "pretrain": syn.pretrain_per_class}[split]
        classes = class_names(syn.num_classes)
        plan = Plan([Entry(k, c, f"{c}:{j}") for k, c, j in synthetic_keys(split, syn.num_classes, per_class)],
                    identity={"kind": "synthetic", "generator": "cop-synthetic/2", **syn.model_dump()})
        loader: Any = SyntheticLoader(enc, split, syn.image_size, syn.seed)
    elif cfg.source == "imagefolder":
        classes = classes or imagefolder_classes(cfg.root)
        plan = imagefolder_plan(cfg.root, split, classes)
        loader = FileLoader(enc)
    else:
        pattern = cfg.train_urls if split == "train" else cfg.val_urls
        if not pattern:
            raise ValueError(f"data.{split}_urls is required for the webdataset source")
        urls = expand_urls(pattern)
        runs = _stage_webdataset(split_dir, urls, cfg, info, split)
        plan = _merge_plan(runs, urls, None if classes is None else len(classes))
        if classes is None:
            classes = [str(i) for i in range(max((e.label for e in plan.entries), default=-1) + 1)]
        loader = StagedLoader(split_dir / ".staging", tuple(runs))
    return _build_split(split_dir, split, plan, loader, classes or [], cfg, fp, info, desc)


def _build_split(split_dir: Path, split: str, plan: Plan, loader: Any, classes: list[str], cfg: DataConfig,
                 fp: str, info: DistInfo, desc: str) -> dict[str, Any]:
    """Plan -> shards -> index.json (written last); return the index on every rank."""
    if cfg.strict and plan.skipped:
        raise strict_error(plan.skipped[0])
    results = _write_shards(split_dir, plan, loader, cfg, fp, info, desc)
    if info.is_main:
        write_index(split_dir, split=split, crop_size=cfg.crop_size, classes=classes, image_format=cfg.image_format,
                    source=plan.identity, fingerprint=fp, shards=results, extra_skipped=plan.skipped)
        shutil.rmtree(split_dir / ".parts", ignore_errors=True)
        shutil.rmtree(split_dir / ".staging", ignore_errors=True)
    barrier()
    return read_json(split_dir / "index.json")


def prepare_source(source: str | Path, split_dir: str | Path, cfg: DataConfig, split: str = "images",
                   info: DistInfo | None = None) -> dict[str, Any]:
    """One prepared split from a folder of images (any layout) or a tar pattern, labels optional
    (``cop orders compute``); same shards, index and resume as ``prepare``. ``cfg`` gives the
    crop and encoding (its ``source``/``root``/``*_urls`` are ignored). Returns the index."""
    split_dir = Path(split_dir)
    info = info or get_dist()
    source = str(source)
    check_source_exists(source)
    listing = source_listing_of(source)
    data = params_dict(cfg)
    for k in ("num_workers", "source", "root", "train_urls", "val_urls", "synthetic"):
        data.pop(k, None)
    fp = sha256_json({"format": FORMAT, "source": source, "listing": listing["sha256"], "data": data})
    if split_complete(split_dir, fp):
        return read_json(split_dir / "index.json")
    if info.is_main:
        marker = split_dir / ".fingerprint"
        if split_dir.exists() and (not marker.exists() or marker.read_text().strip() != fp):
            shutil.rmtree(split_dir)  # made from another source or crop: start over
        split_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, fp + "\n")
    barrier()
    desc = f"prepare {split}"
    if Path(source).is_dir():
        plan = folder_plan(source)
        classes = plan.identity["classes"]
        loader: Any = FileLoader(Encoding.from_config(cfg))
    else:
        urls = expand_urls(source)
        runs = _stage_webdataset(split_dir, urls, cfg, info, split, default_label=0)
        plan = _merge_plan(runs, urls, None)
        classes = [str(i) for i in range(max((e.label for e in plan.entries), default=0) + 1)]
        loader = StagedLoader(split_dir / ".staging", tuple(runs))
    if not plan.entries:
        raise PrepareError(f"{source}: no usable image (skipped: "
                           f"{dict(Counter(s['reason'] for s in plan.skipped))})")
    return _build_split(split_dir, split, plan, loader, classes, cfg, fp, info, desc)


def check_source_exists(source: str) -> None:
    """A local path that is neither a folder nor (after brace expansion) any existing tar is a
    typo, not a set of bad shards: say so before anything is written."""
    if Path(source).is_dir() or "://" in source or source.startswith("pipe:"):
        return
    urls = expand_urls(source)
    if any(Path(u).exists() for u in urls):
        return
    if len(urls) == 1 and urls[0] == source:
        raise SourceNotFound(f"{source} does not exist: give a folder of images (any layout) or "
                             "a tar pattern such as 'shards/part-{0000..0009}.tar'")
    raise SourceNotFound(f"none of the {len(urls)} tars of {source!r} exists (the first is {urls[0]})")


def _reset_output(out_dir: Path, fp: str, info: DistInfo) -> None:
    """Keep ``out_dir`` only if it was built with the same fingerprint; else empty it."""
    if info.is_main:
        marker = out_dir / ".fingerprint"
        if out_dir.exists() and (not marker.exists() or marker.read_text().strip() != fp):
            for child in out_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        atomic_write_text(marker, fp + "\n")
    barrier()


def _split_metrics(split_dir: Path, index: dict[str, Any]) -> dict[str, Any]:
    lines = (split_dir / "skipped.jsonl").read_text().splitlines()
    reasons = Counter(json.loads(line)["reason"] for line in lines if line.strip())
    per_class = Counter(index["labels"])
    return {"count": index["count"], "shards": len(index["shards"]), "skipped": sum(reasons.values()),
            "skipped_by_reason": dict(sorted(reasons.items())),
            "per_class": [per_class.get(i, 0) for i in range(len(index["classes"]))]}


def splits(params: Params) -> tuple[str, ...]:
    """The splits ``prepare`` builds: train and val, and the synthetic set's pretrain pool."""
    syn = params.data.synthetic
    extra = ("pretrain",) if params.data.source == "synthetic" and syn.pretrain_per_class else ()
    return SPLITS + extra


def prepare_images(params: Params, out_dir: str | Path = "data/images", info: DistInfo | None = None) -> dict[str, Any]:
    """Build ``out_dir/{train,val}``; return the metrics for ``data/metrics/prepare.json``."""
    out_dir = Path(out_dir)
    info = info or get_dist()
    cfg = params.data
    listing = None if cfg.source == "synthetic" else source_listing(cfg)
    fp = fingerprint(params, listing and listing["sha256"])
    _reset_output(out_dir, fp, info)
    classes: list[str] | None = None
    metrics: dict[str, Any] = {"format": FORMAT, "source": cfg.source, "crop_size": cfg.crop_size,
                               "fingerprint": fp, "splits": {}}
    for split in splits(params):
        index = prepare_split(split, cfg, out_dir, fp, classes, info)
        classes = index["classes"]
        metrics["splits"][split] = _split_metrics(out_dir / split, index)
    metrics["classes"] = classes
    metrics["num_classes"] = len(classes or [])
    return metrics


def summary(metrics: dict[str, Any]) -> str:
    """What ``prepare`` made, for a person: images per split and skips by reason."""
    lines = []
    for split, m in metrics["splits"].items():
        reasons = ", ".join(f"{n} {r}" for r, n in m["skipped_by_reason"].items())
        skipped = f"{m['skipped']} skipped ({reasons})" if m["skipped"] else "0 skipped"
        lines.append(f"prepare {split}: {m['count']} images in {m['shards']} shards, {skipped}")
    lines.append(f"prepare: {metrics['num_classes']} classes, {metrics['crop_size']} px crops "
                 f"from {metrics['source']}"
                 + ("; skipped inputs are listed in <split>/skipped.jsonl" if any(
                     m["skipped"] for m in metrics["splits"].values()) else ""))
    return "\n".join(lines)
