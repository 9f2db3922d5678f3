"""Work units of the ``prepare`` stage: load + crop + encode inputs into one shard.

Kept free of torch (and of the orchestration in :mod:`pipeline.data.build`) so that spawned
worker processes start fast: they import only numpy, PIL and this package's data modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image

from pipeline.data.crop import center_crop_arr, center_crop_mask
from pipeline.data.decode import BadImage, decode_rgb, read_bytes
from pipeline.data.imageset import IMAGE_EXT, Record, ShardResult, encode_image, encode_mask, write_shard
from pipeline.data.sources import Entry, iter_webdataset, skip
from pipeline.data.synthetic import render
from pipeline.utils.io import atomic_write_json

if TYPE_CHECKING:
    from pipeline.config import DataConfig

Tick = Callable[[int], Any]


class PrepareError(RuntimeError):
    """A bad input under ``data.strict: true`` (names the input and the reason)."""


class SourceNotFound(FileNotFoundError):
    """An image source (folder, file or tar pattern) that is not there."""

    hint = "check the path; `ls` it"


def strict_error(s: dict[str, str]) -> PrepareError:
    return PrepareError(f"bad input {s['source']}: {s['reason']}" + (f" ({s['detail']})" if s.get("detail") else ""))


# ----------------------------------------------------------------------------- loaders


@dataclass(frozen=True)
class Encoding:
    crop_size: int
    min_size: int
    image_format: str
    jpeg_quality: int

    @classmethod
    def from_config(cls, cfg: "DataConfig") -> "Encoding":
        return cls(cfg.crop_size, cfg.min_size, cfg.image_format, cfg.jpeg_quality)

    def record(self, key: str, label: int, image: Image.Image, mask: np.ndarray | None = None) -> Record:
        """Crop (ADM/MAR) and encode a PIL image and optional full-size mask."""
        arr = center_crop_arr(image, self.crop_size)
        enc_mask = None if mask is None else encode_mask(center_crop_mask(mask, self.crop_size))
        return Record(key, label, encode_image(arr, self.image_format, self.jpeg_quality), enc_mask)

    def record_from_bytes(self, key: str, label: int, data: bytes) -> Record:
        return self.record(key, label, decode_rgb(data, self.min_size))


@dataclass(frozen=True)
class SyntheticLoader:
    enc: Encoding
    split: str
    image_size: int
    seed: int

    def record(self, e: Entry) -> Record:
        cls, idx = (int(x) for x in e.ref.split(":"))
        img, mask = render(cls, idx, self.split, self.image_size, self.seed)
        return self.enc.record(e.key, e.label, Image.fromarray(img, "RGB"), mask)


@dataclass(frozen=True)
class FileLoader:
    enc: Encoding

    def record(self, e: Entry) -> Record:
        if e.boxes is None:
            return self.enc.record_from_bytes(e.key, e.label, read_bytes(e.ref))
        img = decode_rgb(read_bytes(e.ref), self.enc.min_size)
        return self.enc.record(e.key, e.label, img, boxes_mask(img.size, e.boxes))


def boxes_mask(size: tuple[int, int], boxes: tuple[tuple[int, int, int, int], ...]) -> np.ndarray:
    """bool [H, W] of an image of ``size`` (W, H): True inside any box (inclusive corners,
    as ImageNet's annotations), clipped to the image."""
    w, h = size
    mask = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, y0):min(h, y1 + 1), max(0, x0):min(w, x1 + 1)] = True
    return mask


@dataclass(frozen=True)
class StagedLoader:
    """Copies already-encoded members out of the staging runs (``ref`` = ``"run:row"``)."""

    staging: Path
    runs: tuple[dict[str, Any], ...]  # ShardResult.to_json() of every run

    def record(self, e: Entry) -> Record:
        run, row = (int(x) for x in e.ref.split(":"))
        part = self.runs[run]
        with open(self.staging / part["name"], "rb") as fh:
            fh.seek(part["image"][row][0])
            image = fh.read(part["image"][row][1])
            loc = part["mask"][row]
            mask = None
            if loc is not None:
                fh.seek(loc[0])
                mask = fh.read(loc[1])
        return Record(e.key, e.label, image, mask)


# ----------------------------------------------------------------------------- units


@dataclass(frozen=True)
class ShardJob:
    path: Path
    part: Path
    entries: tuple[Entry, ...]
    loader: Any
    image_ext: str
    strict: bool

    def __len__(self) -> int:
        return len(self.entries)


def build_shard(job: ShardJob, tick: Tick | None = None) -> ShardResult:
    records, skipped = [], []
    for e in job.entries:
        try:
            records.append(job.loader.record(e))
        except BadImage as bad:
            s = skip(e.ref, bad.reason, bad.detail)
            if job.strict:
                raise strict_error(s) from None
            skipped.append(s)
        if tick:
            tick(1)
    result = write_shard(job.path, records, job.image_ext, skipped)
    atomic_write_json(job.part, result.to_json())  # after the tar: part present = unit complete
    return result


@dataclass(frozen=True)
class StageJob:
    url: str
    path: Path
    part: Path
    enc: Encoding
    strict: bool
    default_label: int | None = None  # label of a sample without .cls (None: skip it)

    def __len__(self) -> int:
        return 0  # unknown until read


def stage_run(job: StageJob, tick: Tick | None = None) -> ShardResult:
    """Decode + crop one source tar into a key-sorted staging run."""
    errors: list[dict[str, str]] = []
    records: dict[str, Record] = {}
    skipped: list[dict[str, str]] = []
    for s in iter_webdataset(job.url, errors.append, job.default_label):
        if job.strict and errors:
            raise strict_error(errors[0])
        bad = s.error
        if bad is None and s.key in records:
            bad = skip(s.source, "duplicate_key", f"key {s.key!r} repeated in {job.url}")
        if bad is None:
            try:
                records[s.key] = job.enc.record_from_bytes(s.key, s.label, s.image)
            except BadImage as b:
                bad = skip(s.source, b.reason, b.detail)
        if bad is not None:
            if job.strict:
                raise strict_error(bad)
            skipped.append(bad)
        if tick:
            tick(1)
    if job.strict and errors:
        raise strict_error(errors[0])
    ordered = [records[k] for k in sorted(records)]
    result = write_shard(job.path, ordered, IMAGE_EXT[job.enc.image_format], errors + skipped)
    atomic_write_json(job.part, result.to_json())
    return result


def call_job(args: tuple[Callable, int, Any]) -> tuple[int, Any]:
    """Pool entry point: ``(fn, i, job) -> (i, fn(job))``."""
    fn, i, job = args
    return i, fn(job)
