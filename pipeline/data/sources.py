"""Where images come from: the synthetic set, an ImageNet-style folder, webdataset shards.

A source is turned into a *plan*: the split's entries ``(key, label, ref)`` sorted by key, plus
the inputs rejected while listing. Loading an entry (:mod:`pipeline.data.build`) decodes and
crops it; rejections there are recorded too.

Image folder (``data.source: imagefolder``, ``data.root: ROOT``):
- ``ROOT/train/<class>/<file>`` (files may sit in sub-folders of a class); classes are the
  sorted folder names of ``train/``; label = position in that list.
- ``ROOT/val/<class>/<file>`` with the same classes (a class missing from train is skipped,
  reason ``unknown_class``), OR ImageNet's flat layout ``ROOT/val/<file>`` with labels in
  ``ROOT/val_labels.txt`` (lines ``<file name or stem> <class name | 0-based class index>``) or
  in Kaggle's ``ROOT/LOC_val_solution.csv`` (``ImageId,PredictionString``; the first word of
  the prediction string is the class). The flat layout is used when ``val/`` directly holds
  image files. Flat files without a label are skipped (``missing_label``).
- Image files are those with an image extension (case-insensitive, see ``IMAGE_EXTS``); hidden
  files and other extensions are ignored. Keys: path relative to the split folder without
  extension, dots -> ``_``; two files with the same key (``a.jpg``, ``a.png``): the first in
  path order wins, the other is skipped (``duplicate_key``).

Webdataset (``data.source: webdataset``, ``data.train_urls`` / ``data.val_urls``): brace
patterns of local paths, ``file://`` or ``https://`` URLs, read with the ``webdataset`` package.
A sample needs an image member (``jpg``, ``jpeg``, ``png`` or ``webp``, first found in that
order) and a ``cls`` member (ASCII int >= 0). Keys: the sample ``__key__``, dots -> ``_``.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                        ".ppm", ".pgm", ".pbm"})
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VAL_LABEL_FILES = ("val_labels.txt", "LOC_val_solution.csv")
# ImageNet's localisation boxes (Kaggle's files), ``ROOT/LOC_<split>_solution.csv``: when present,
# every listed image gets an object mask (its boxes, cropped as the image) for the order report.
BOX_FILES = ("LOC_train_solution.csv", "LOC_val_solution.csv")

Box = tuple[int, int, int, int]  # x_min, y_min, x_max, y_max in the original image's pixels


@dataclass(frozen=True)
class Entry:
    """One input of a split: stable key, label, and where to load it from."""

    key: str
    label: int
    ref: str
    boxes: tuple[Box, ...] | None = None  # object boxes when the source has them


@dataclass
class Plan:
    entries: list[Entry]
    skipped: list[dict[str, str]] = field(default_factory=list)
    identity: dict[str, Any] = field(default_factory=dict)


def skip(source: str, reason: str, detail: str = "") -> dict[str, str]:
    return {"source": source, "reason": reason, "detail": detail}


def normalize_key(key: str) -> str:
    """webdataset splits member names at the first dot of the base name: keys carry none."""
    return key.replace("\\", "/").replace(".", "_")


def _dedupe(entries: list[tuple[str, int, str, str]]) -> tuple[list[Entry], list[dict[str, str]]]:
    """(key, label, ref, order) -> entries sorted by key; later duplicates become skips."""
    out: dict[str, Entry] = {}
    skipped = []
    for key, label, ref, _ in sorted(entries, key=lambda e: (e[0], e[3])):
        if key in out:
            skipped.append(skip(ref, "duplicate_key", f"key {key!r} already taken by {out[key].ref}"))
        else:
            out[key] = Entry(key, label, ref)
    return list(out.values()), skipped


# ----------------------------------------------------------------------------- image folder


def walk_images(folder: Path) -> list[str]:
    """Relative POSIX paths of image files under ``folder`` (broken symlinks included: they
    are inputs that fail to load, and must be reported, not silently ignored)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(folder)
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTS:
                found.append((rel_dir / name).as_posix())
    return found


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def imagefolder_classes(root: str | Path) -> list[str]:
    train = Path(root) / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"data.root: {train} is not a folder (expected ROOT/train/<class>/<file>)")
    classes = _class_dirs(train)
    if not classes:
        raise ValueError(f"data.root: {train} holds no class folders")
    return classes


def _listing_sha(split_dir: Path, rels: list[str]) -> str:
    h = hashlib.sha256()
    for rel in rels:
        try:
            size = os.stat(split_dir / rel).st_size
        except OSError:
            size = -1
        h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()


def _read_val_labels(root: Path) -> dict[str, str]:
    """stem -> class (name or index string) from the first label file present."""
    txt, csv_path = root / VAL_LABEL_FILES[0], root / VAL_LABEL_FILES[1]
    labels: dict[str, str] = {}
    if txt.exists():
        for n, line in enumerate(txt.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{txt}:{n}: expected '<file> <class>', got {line!r}")
            labels[Path(parts[0]).stem] = parts[1]
        return labels
    if csv_path.exists():
        with open(csv_path, newline="") as fh:
            for row in csv.DictReader(fh):
                labels[Path(row["ImageId"]).stem] = row["PredictionString"].split()[0]
        return labels
    raise FileNotFoundError(f"{root / 'val'} is flat (files, no class folders) but neither "
                            f"{txt.name} nor {csv_path.name} exists in {root}")


def read_boxes(root: str | Path, split: str) -> dict[str, tuple[Box, ...]] | None:
    """stem -> boxes from ``ROOT/LOC_<split>_solution.csv`` (``ImageId,PredictionString`` with
    the string ``wnid x_min y_min x_max y_max`` repeated), or None without that file."""
    path = Path(root) / f"LOC_{split}_solution.csv"
    if not path.exists():
        return None
    out: dict[str, tuple[Box, ...]] = {}
    with open(path, newline="") as fh:
        for n, row in enumerate(csv.DictReader(fh), 2):
            words = row["PredictionString"].split()
            if len(words) % 5:
                raise ValueError(f"{path}:{n}: expected 'wnid x_min y_min x_max y_max' groups, got "
                                 f"{row['PredictionString']!r}")
            out[Path(row["ImageId"]).stem] = tuple(
                tuple(int(float(v)) for v in words[i + 1:i + 5]) for i in range(0, len(words), 5))  # type: ignore[misc]
    return out


def imagefolder_plan(root: str | Path, split: str, classes: list[str]) -> Plan:
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"data.root: {split_dir} is not a folder")
    class_index = {c: i for i, c in enumerate(classes)}
    rels = walk_images(split_dir)
    flat = split == "val" and any("/" not in r for r in rels)
    raw: list[tuple[str, int, str, str]] = []
    skipped: list[dict[str, str]] = []
    val_labels = _read_val_labels(root) if flat else {}
    for rel in rels:
        ref = str(split_dir / rel)
        key = normalize_key(rel.rsplit(".", 1)[0])
        if flat:
            if "/" in rel:
                continue  # flat layout: stray sub-folders are not part of the split
            name = val_labels.get(Path(rel).stem)
            if name is None:
                skipped.append(skip(ref, "missing_label", f"no entry for {Path(rel).stem} in the val label file"))
                continue
            label = class_index.get(name)
            if label is None and name.isdigit():
                if int(name) >= len(classes):
                    raise ValueError(
                        f"val label {name} of {Path(rel).stem} is no index of the {len(classes)} classes: "
                        "indices are positions in the sorted class folder list, counted from 0 (the "
                        "devkit's ILSVRC2012_ID is counted from 1 and in another order; write wnids)")
                label = int(name)
        else:
            if "/" not in rel:
                skipped.append(skip(ref, "missing_label", "file outside any class folder"))
                continue
            name = rel.split("/", 1)[0]
            label = class_index.get(name)
        if label is None:
            skipped.append(skip(ref, "unknown_class", f"class {name!r} is not a train class"))
            continue
        raw.append((key, label, ref, rel))
    entries, dups = _dedupe(raw)
    boxes = read_boxes(root, split)
    if boxes is not None:
        entries = [Entry(e.key, e.label, e.ref, boxes.get(Path(e.ref).stem)) for e in entries]
    identity = {"kind": "imagefolder", "root": str(root), "split": split, "layout": "flat" if flat else "classes",
                "files": len(rels), "listing_sha256": _listing_sha(split_dir, rels),
                "boxes": None if boxes is None else {"file": f"LOC_{split}_solution.csv",
                                                     "images": sum(e.boxes is not None for e in entries)}}
    return Plan(entries, skipped + dups, identity)


# ----------------------------------------------------------------------------- any folder

UNFILED_CLASS = "(unfiled)"


def folder_plan(root: str | Path) -> Plan:
    """Every image file under ``root``, any layout (``cop orders compute``: no split folders,
    labels optional). A file in a sub-folder takes its top-level folder as its class; files
    directly in ``root`` get the class ``(unfiled)``. Keys as in the image-folder source."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of images")
    rels = walk_images(root)
    if not rels:
        raise ValueError(f"{root} holds no image files (extensions: {', '.join(sorted(IMAGE_EXTS))})")
    classes = sorted({r.split("/", 1)[0] for r in rels if "/" in r})
    if any("/" not in r for r in rels):
        classes.append(UNFILED_CLASS)
    index = {c: i for i, c in enumerate(classes)}
    raw = [(normalize_key(r.rsplit(".", 1)[0]), index[r.split("/", 1)[0] if "/" in r else UNFILED_CLASS],
            str(root / r), r) for r in rels]
    entries, dups = _dedupe(raw)
    identity = {"kind": "folder", "root": str(root), "files": len(rels), "classes": classes,
                "listing_sha256": _listing_sha(root, rels)}
    return Plan(entries, dups, identity)


# ----------------------------------------------------------------------------- webdataset


def expand_urls(pattern: str) -> list[str]:
    """Brace-expand a shard pattern (``::`` separates several patterns), webdataset's way."""
    from webdataset.shardlists import expand_urls as _expand

    urls = list(_expand(pattern))
    if not urls:
        raise ValueError(f"no shards in pattern {pattern!r}")
    return urls


@dataclass(frozen=True)
class WdsSample:
    key: str
    source: str
    label: int | None = None
    image: bytes | None = None
    error: dict[str, str] | None = None


def iter_webdataset(url: str, on_error: Callable[[dict[str, str]], None],
                    default_label: int | None = None) -> Iterator[WdsSample]:
    """Samples of one shard; shard-level read errors (missing file, truncated tar) go to
    ``on_error`` as ``bad_shard`` and end or skip the damaged part, as webdataset allows.
    ``default_label``: the label of a sample without ``cls`` (unlabelled sets, for
    ``cop orders compute``); None makes it a ``missing_label`` skip."""
    import webdataset as wds

    reported = False

    def handler(exn: Exception) -> bool:
        nonlocal reported
        if not reported:  # one error surfaces at several layers of the webdataset pipeline
            on_error(skip(url, "bad_shard", f"{type(exn).__name__}: {exn}"))
            reported = True
        return True

    ds = wds.WebDataset(url, shardshuffle=False, empty_check=False, nodesplitter=None,
                        workersplitter=None, handler=handler)
    for sample in ds:
        raw_key = sample["__key__"]
        source = f"{url}#{raw_key}"
        key = normalize_key(raw_key)
        ext = next((e for e in WDS_IMAGE_EXTS if e in sample), None)
        if ext is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            yield WdsSample(key, source, error=skip(source, "no_image", f"members {members}"))
            continue
        cls = sample.get("cls")
        if cls is None and default_label is not None:
            yield WdsSample(key, source, label=default_label, image=bytes(sample[ext]))
            continue
        if cls is None:
            yield WdsSample(key, source, error=skip(source, "missing_label", "no .cls member"))
            continue
        try:
            label = int(bytes(cls).decode("ascii").strip())
            if label < 0:
                raise ValueError("negative")
        except (ValueError, UnicodeDecodeError):
            yield WdsSample(key, source, error=skip(source, "bad_label", f".cls is {bytes(cls)[:32]!r}"))
            continue
        yield WdsSample(key, source, label=label, image=bytes(sample[ext]))
