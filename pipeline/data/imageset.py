"""The prepared image set: webdataset tar shards + ``index.json`` + ``skipped.jsonl``.

Layout of ``data/images/<split>/`` (see docs/architecture.md):
- ``shard-000000.tar`` ...: members ``<key>.png`` (or ``.jpg``), ``<key>.cls`` (ASCII int),
  ``<key>.mask.png`` (0/255, when the source has masks), in key order. Tar headers are fixed
  (mtime 0, uid/gid 0, no user names, mode 0644, PAX format) so equal inputs give equal bytes.
- ``index.json``: ``format`` ("cop-images/1"), ``split``, ``crop_size``, ``classes``, ``count``,
  ``has_masks``, ``image_format``, ``source``, ``fingerprint``, ``shards`` (name, count, sha256,
  size), ``keys``, ``labels`` and per-row member locations ``rows``: ``shard`` (index into
  ``shards``), ``image`` ([offset, size] of the image bytes inside that tar) and ``mask``
  ([offset, size] or null).
- ``skipped.jsonl``: one ``{"source", "reason", "detail"}`` line per rejected input.

:class:`ImageSet` reads it with one ``seek`` + ``read`` per member (no tar scan).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from pipeline.utils.io import atomic_path, atomic_write_text, sha256_file

FORMAT = "cop-images/1"
IMAGE_EXT = {"png": "png", "jpeg": "jpg"}


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def encode_image(arr: np.ndarray, image_format: str = "png", jpeg_quality: int = 95) -> bytes:
    """Deterministic encoding of a uint8 RGB (or L) array: no metadata, fixed settings."""
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(arr))
    if image_format == "png":
        img.save(buf, format="PNG", compress_level=6, optimize=False)
    elif image_format == "jpeg":
        img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0, optimize=False)
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    return encode_image(np.asarray(mask, bool).astype(np.uint8) * 255, "png")


@dataclass(frozen=True)
class Record:
    """One encoded sample ready for a shard."""

    key: str
    label: int
    image: bytes
    mask: bytes | None = None


@dataclass
class ShardResult:
    """What a written shard holds: enough to build the index without reopening the tar."""

    name: str
    count: int
    sha256: str
    size: int
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image: list[list[int]] = field(default_factory=list)  # [offset, size] per row
    mask: list[list[int] | None] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ShardResult":
        return cls(**d)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_shard(path: Path, records: list[Record], image_ext: str, skipped: list[dict] | None = None) -> ShardResult:
    """Write ``records`` (already in key order) as a tar, atomically; return offsets and hash."""
    result = ShardResult(name=path.name, count=len(records), sha256="", size=0, skipped=list(skipped or []))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rec in records:
                members = [(f"{rec.key}.{image_ext}", rec.image), (f"{rec.key}.cls", str(rec.label).encode())]
                if rec.mask is not None:
                    members.append((f"{rec.key}.mask.png", rec.mask))
                locs = []
                for name, data in members:
                    info = _tarinfo(name, len(data))
                    # the header addfile writes is exactly tobuf(); data starts right after it
                    header = info.tobuf(tar.format, tar.encoding, tar.errors)
                    locs.append([tar.offset + len(header), len(data)])
                    tar.addfile(info, io.BytesIO(data))
                result.keys.append(rec.key)
                result.labels.append(int(rec.label))
                result.image.append(locs[0])
                result.mask.append(locs[2] if rec.mask is not None else None)
        result.sha256 = sha256_file(tmp)
        result.size = tmp.stat().st_size
    return result


def write_index(
    split_dir: Path,
    *,
    split: str,
    crop_size: int,
    classes: list[str],
    image_format: str,
    source: dict[str, Any],
    fingerprint: str,
    shards: list[ShardResult],
    extra_skipped: list[dict] | None = None,
) -> dict[str, Any]:
    """Write ``skipped.jsonl`` then ``index.json`` (the completion marker), both atomically."""
    skipped = list(extra_skipped or []) + [s for sh in shards for s in sh.skipped]
    atomic_write_text(split_dir / "skipped.jsonl", "".join(json.dumps(s, sort_keys=True) + "\n" for s in skipped))
    keys = [k for sh in shards for k in sh.keys]
    if keys != sorted(keys) or len(set(keys)) != len(keys):
        raise RuntimeError(f"{split_dir}: shard keys are not unique and sorted (writer bug)")
    index = {
        "format": FORMAT,
        "split": split,
        "crop_size": crop_size,
        "classes": classes,
        "count": len(keys),
        "has_masks": bool(keys) and all(m is not None for sh in shards for m in sh.mask),
        "image_format": image_format,
        "source": source,
        "fingerprint": fingerprint,
        "shards": [{"name": s.name, "count": s.count, "sha256": s.sha256, "size": s.size} for s in shards],
        "keys": keys,
        "labels": [lab for sh in shards for lab in sh.labels],
        "rows": {
            "shard": [i for i, sh in enumerate(shards) for _ in sh.keys],
            "image": [loc for sh in shards for loc in sh.image],
            "mask": [loc for sh in shards for loc in sh.mask],
        },
        "skipped": len(skipped),
    }
    # compact: at ImageNet scale the per-row lists dominate and indentation would triple the size
    atomic_write_text(split_dir / "index.json", json.dumps(index, sort_keys=True, separators=(",", ":")) + "\n")
    return index


class ImageSet:
    """Random-access reader of a prepared split (``data/images/<split>``).

    Picklable: file handles are opened lazily and per process (a DataLoader worker that
    receives a pickled copy opens its own).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.exists():
            raise FileNotFoundError(f"{index_path} not found: run `cop prepare` (or the split is incomplete)")
        index = json.loads(index_path.read_text())
        fmt = index.get("format")
        if fmt != FORMAT:
            raise ValueError(f"{index_path}: image-set format {fmt!r} is not supported (expected {FORMAT!r}); "
                             "rebuild it with `cop prepare`")
        self._index = index
        self.split: str = index["split"]
        self.crop_size: int = int(index["crop_size"])
        self.classes: list[str] = list(index["classes"])
        self.has_masks: bool = bool(index["has_masks"])
        self.keys: list[str] = list(index["keys"])
        self.labels: np.ndarray = np.asarray(index["labels"], dtype=np.int64)
        rows = index["rows"]
        self._shard = np.asarray(rows["shard"], dtype=np.int64)
        self._image = np.asarray(rows["image"], dtype=np.int64).reshape(-1, 2)
        self._mask = rows["mask"]
        self._shard_names = [s["name"] for s in index["shards"]]
        self._key_to_row = {k: i for i, k in enumerate(self.keys)}
        self._files: dict[int, BinaryIO] = {}
        self._pid = os.getpid()

    # --------------------------------------------------------------- metadata
    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"ImageSet({str(self.path)!r}, n={len(self)}, classes={len(self.classes)}, crop={self.crop_size})"

    @property
    def identity(self) -> dict[str, Any]:
        """What made this set: format, fingerprint, source and shard hashes (for downstream stages)."""
        idx = self._index
        return {"format": idx["format"], "split": self.split, "fingerprint": idx["fingerprint"],
                "source": idx["source"], "count": len(self), "crop_size": self.crop_size,
                "shards": [{"name": s["name"], "sha256": s["sha256"]} for s in idx["shards"]]}

    def index_of(self, key: str) -> int:
        try:
            return self._key_to_row[key]
        except KeyError:
            raise KeyError(f"key {key!r} is not in {self.path}") from None

    # --------------------------------------------------------------- access
    def _file(self, shard: int) -> BinaryIO:
        if self._pid != os.getpid():  # forked: never share a file position with the parent
            self._files, self._pid = {}, os.getpid()
        fh = self._files.get(shard)
        if fh is None:
            fh = self._files[shard] = open(self.path / self._shard_names[shard], "rb")
        return fh

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        fh = self._file(shard)
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise OSError(f"{self.path / self._shard_names[shard]}: short read at {offset} (shard changed?)")
        return data

    def _row(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} images")
        return int(i) % n

    def image_bytes(self, i: int) -> bytes:
        """The encoded image member (PNG or JPEG) of row ``i``."""
        i = self._row(i)
        off, size = self._image[i]
        return self._read(int(self._shard[i]), int(off), int(size))

    def mask_bytes(self, i: int) -> bytes | None:
        i = self._row(i)
        loc = self._mask[i]
        return None if loc is None else self._read(int(self._shard[i]), int(loc[0]), int(loc[1]))

    def image(self, i: int) -> np.ndarray:
        """uint8 ``[H, W, 3]``."""
        with Image.open(io.BytesIO(self.image_bytes(i))) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)

    def mask(self, i: int) -> np.ndarray | None:
        """bool ``[H, W]`` object mask, or None when the source has no masks."""
        data = self.mask_bytes(i)
        if data is None:
            return None
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("L")) >= 128

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def pretrain_split(root: str | Path, suffix: str = "") -> Path:
    """``root/pretrain<suffix>`` when ``prepare`` built the pretrain pool (the synthetic set's
    ``pretrain_per_class``), else ``root/train<suffix>``: what the pretraining stages learn
    from. Works for the image set (``data/images``) and the latents (``suffix=".zarr"``)."""
    root = Path(root)
    pool = root / f"pretrain{suffix}"
    return pool if pool.exists() else root / f"train{suffix}"
