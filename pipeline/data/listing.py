"""The image source's listing: what makes DVC (and ``prepare``'s own fingerprint) see a changed
source (stage ``list_source``, file ``data/source.json``).

``data.root`` and ``data.*_urls`` are only *strings* in ``params.yaml``: adding a photo to the
folder changes no param and no dependency, so DVC would call ``prepare`` up to date. The
``list_source`` stage (cheap: one directory walk, one ``stat`` per file, no decoding) runs on
every ``dvc repro`` (``always_changed``) and writes this listing; ``prepare`` depends on it,
so DVC reruns ``prepare`` exactly when the listing changed. ``prepare`` folds the same digest
into its fingerprint, so the rerun rebuilds instead of trusting the old complete split.

What is listed (each file by relative path, size and mtime in ns):

- ``imagefolder``: every image file of ``ROOT/train`` and ``ROOT/val`` (the files
  ``prepare`` would read, same walk) and the flat-val label files; a missing ``val/`` is
  recorded as absent.
- ``webdataset``: every shard the brace patterns expand to; local paths and ``file://`` URLs
  by size and mtime, ``http(s)://`` and ``pipe:`` sources by their URL only (a remote
  shard that changes under the same URL is not seen: publish new shards under new names).
- ``synthetic``: nothing on disk; the generator's params are already DVC params.

mtime is part of it, so a copied folder (``cp`` without ``-p``) or a ``touch`` reruns
``prepare`` even when no byte changed: the price of not hashing every image on every repro.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig
from pipeline.data.sources import BOX_FILES, VAL_LABEL_FILES, expand_urls, walk_images
from pipeline.utils.io import atomic_write_json, read_json, sha256_json

FORMAT = "cop-source-listing/1"
SPLITS = ("train", "val")


def _stat(path: str | Path) -> tuple[int, int]:
    """(size, mtime_ns); (-1, -1) for a path that cannot be stat'ed (a broken symlink is an
    input ``prepare`` reports as bad, so it belongs in the listing too)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _summary(rows: list[tuple[str, int, int]]) -> dict[str, Any]:
    h = hashlib.sha256()
    for name, size, mtime in rows:
        h.update(f"{name}\0{size}\0{mtime}\n".encode())
    return {"files": len(rows), "bytes": sum(max(size, 0) for _, size, _ in rows),
            "sha256": h.hexdigest()}


def _folder_split(split_dir: Path) -> dict[str, Any] | None:
    if not split_dir.is_dir():
        return None
    return _summary([(rel, *_stat(split_dir / rel)) for rel in walk_images(split_dir)])


def _local_path(url: str) -> str | None:
    """The file behind a local shard URL, or None for a remote or piped one."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return urllib.parse.unquote(parsed.path)
    return url if not parsed.scheme else None


def _shards_split(pattern: str | None) -> dict[str, Any] | None:
    if not pattern:
        return None
    rows = []
    for url in expand_urls(pattern):
        local = _local_path(url)
        rows.append((url, *_stat(local)) if local is not None else (url, -2, -2))
    out = _summary(rows)
    out["remote"] = sum(1 for _, size, _ in rows if size == -2)
    return out


def source_listing_of(source: str | Path) -> dict[str, Any]:
    """The listing of one folder (any layout) or one tar pattern (``cop orders compute``)."""
    listing: dict[str, Any] = {"format": FORMAT, "source": str(source)}
    listing["files"] = (_folder_split(Path(source)) if Path(source).is_dir()
                        else _shards_split(str(source)))
    listing["sha256"] = sha256_json(listing)
    return listing


def source_listing(cfg: DataConfig) -> dict[str, Any]:
    """The listing of ``cfg``'s source; ``["sha256"]`` digests all of it."""
    listing: dict[str, Any] = {"format": FORMAT, "source": cfg.source}
    if cfg.source == "imagefolder":
        root = Path(cfg.root or "")
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: {root} is not a folder "
                                    "(expected ROOT/train/<class>/<file>)")
        listing["root"] = str(root)
        listing["splits"] = {s: _folder_split(root / s) for s in SPLITS}
        listing["label_files"] = {n: list(_stat(root / n)) for n in dict.fromkeys(VAL_LABEL_FILES + BOX_FILES)
                                  if (root / n).exists()}
    elif cfg.source == "webdataset":
        listing["splits"] = {"train": _shards_split(cfg.train_urls),
                             "val": _shards_split(cfg.val_urls)}
    else:  # synthetic: generated from params DVC already tracks
        listing["synthetic"] = cfg.synthetic.model_dump()
    listing["sha256"] = sha256_json(listing)
    return listing


def describe(listing: dict[str, Any]) -> str:
    """One line for a person: what was listed."""
    if listing["source"] == "synthetic":
        return f"source synthetic (generated), listing {listing['sha256'][:12]}"
    parts = []
    for split, s in listing["splits"].items():
        if s is None:
            parts.append(f"{split}: none")
        else:
            remote = f", {s['remote']} remote" if s.get("remote") else ""
            parts.append(f"{split}: {s['files']} files, {s['bytes'] / 1e6:.1f} MB{remote}")
    where = f" {listing['root']}" if "root" in listing else ""
    return f"source {listing['source']}{where}: {'; '.join(parts)}; listing {listing['sha256'][:12]}"


def write_listing(path: str | Path, listing: dict[str, Any]) -> bool:
    """Write ``listing`` to ``path`` unless it already holds the same; True if written."""
    path = Path(path)
    if path.exists():
        try:
            if read_json(path).get("sha256") == listing["sha256"]:
                return False
        except ValueError:
            pass
    atomic_write_json(path, listing)
    return True
