"""Fetch a published collapse-order shard set, verifying every byte against its manifest.

``SOURCE`` may be

- a local folder holding ``manifest.json`` and the shards (or ``file:///…/folder``);
- a manifest URL (``file://``, ``https://``; plain ``http://`` is accepted too -- integrity
  comes from the sha256 checks, not the transport): shards are resolved next to it;
- a brace pattern of shard URLs (``https://host/orders/orders-{000000..000015}.tar``): the
  manifest is read from the same folder and must list exactly those shards.

Downloads go to a temporary name and are renamed only after their sha256 matched, so ``dest``
never holds an unverified shard; files already in ``dest`` with the right hash are kept
(a fetch resumes). Then every shard is parsed and validated (members, permutations, dtypes,
shapes) as the reader does, and only then is the manifest written: a failed fetch leaves a
folder without one, which no reader opens as a finished set.

The maker's side, :func:`publish_orders`: the same verified copy into a folder to serve over
HTTP (or upload), then ``cop orders fetch <url>/manifest.json`` on the user's side.

With DVC, the same set can be taken from a repository that tracks it (the maker runs
``dvc remote add -d published <remote>``, ``dvc push data/orders`` and commits ``dvc.lock`` and
``.dvc/config``)::

    dvc get    https://github.com/<org>/<repo> data/orders/train -o data/orders-fetched/train
    dvc import https://github.com/<org>/<repo> data/orders/train -o data/orders-fetched/train

(``import`` also records the source so ``dvc update`` follows it); open the result with
``CollapseOrders`` as usual -- it checks the manifest's sha256 sums on open.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Callable

from pipeline.orders.shards import (CLASS_ORDERS, CLASS_SCORES, MANIFEST, CollapseOrders, ShardError,
                                    check_manifest)
from pipeline.utils.io import atomic_path, atomic_write_bytes, sha256_file
from pipeline.utils.progress import progress

_SHARD_RE = re.compile(r"orders-\d{6}\.tar")
_MAX_MANIFEST = 1 << 30  # a manifest lists keys; 1 GiB is far beyond ImageNet's
_TIMEOUT_S = 60


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b{x,y}`` → a00bx a00by a01bx … (ranges keep the zero padding of the start)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        items = [str(i).zfill(len(a)) for i in range(int(a), int(b) + 1)]
    else:
        items = body.split(",")
    return [x for item in items for x in expand_braces(head + item + tail)]


def _is_url(s: str) -> bool:
    return urllib.parse.urlparse(s).scheme in ("file", "http", "https")


def _open(url: str) -> BinaryIO:
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("file", "http", "https"):
        raise ValueError(f"unsupported source {url!r}: use a folder, file://, https:// or http://")
    return urllib.request.urlopen(url, timeout=_TIMEOUT_S)  # noqa: S310 (scheme checked above)


def _join(base: str, name: str) -> str:
    """``name`` (a checked shard file name) next to ``base`` (a folder path or URL)."""
    if _is_url(base):
        return urllib.parse.urljoin(base.rstrip("/") + "/", urllib.parse.quote(name))
    return str(Path(base) / name)


def _locate(source: str) -> tuple[str, list[str] | None]:
    """(folder or base URL, the shard names a brace pattern asked for, if any)."""
    if "{" in source:
        urls = expand_braces(source)
        base = urls[0].rsplit("/", 1)[0]
        names = [u.rsplit("/", 1)[1] for u in urls]
        if any(u.rsplit("/", 1)[0] != base for u in urls):
            raise ValueError(f"{source!r}: all shards of a pattern must lie in one folder")
        return base, names
    if source.endswith(".json"):  # a manifest URL or path: shards lie beside it
        return source.rsplit("/", 1)[0], None
    return source, None  # a folder (path or file:// URL)


def _read_manifest(base: str) -> tuple[dict, bytes]:
    where = _join(base, MANIFEST)
    try:
        if _is_url(base):
            with _open(where) as r:
                raw = r.read(_MAX_MANIFEST + 1)
        else:
            raw = Path(where).read_bytes()
    except (OSError, ValueError) as err:
        raise ShardError(f"cannot read the manifest {where}: {err}") from None
    if len(raw) > _MAX_MANIFEST:
        raise ShardError(f"{where} is larger than {_MAX_MANIFEST} bytes")
    try:
        return check_manifest(json.loads(raw), where), raw
    except json.JSONDecodeError as err:
        raise ShardError(f"{where} is not valid JSON ({err})") from None


def _copy_verified(src: str, dest: Path, digest: str, size: int | None, name: str) -> None:
    """Stream ``src`` to a temporary file beside ``dest``, hashing; rename only if it matches."""
    h = hashlib.sha256()
    got = 0
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        try:
            f = _open(src) if _is_url(src) else open(src, "rb")
            with f:
                while block := f.read(1 << 20):
                    got += len(block)
                    if size is not None and got > size:
                        raise ShardError(f"shard {name} from {src} is longer than the manifest says")
                    h.update(block)
                    out.write(block)
        except OSError as err:
            raise ShardError(f"shard {name}: cannot fetch {src}: {err}") from None
        if size is not None and got != size:
            raise ShardError(f"shard {name} from {src} is truncated ({got} of {size} bytes)")
        if h.hexdigest() != digest:
            raise ShardError(f"shard {name} from {src} fails its sha256 check (tampered or corrupt)")
        out.flush()


def fetch_orders(source: str | Path, dest: str | Path,
                 log: Callable[[str], None] | None = None) -> Path:
    """Fetch ``source`` into ``dest`` (a folder) and return it; raises naming any bad shard.

    Order of work: every file is copied (or kept) only after its sha256 matched, then every
    shard is parsed and validated exactly as ``CollapseOrders`` reads it (members, dtypes,
    shapes, permutations), and only then is ``manifest.json`` written. A fetch that fails at
    any point leaves ``dest`` without a manifest, so it never opens as a finished set.
    ``log`` receives a short summary of what was fetched and verified.
    """
    source, dest = str(source), Path(dest)
    base, wanted = _locate(source)
    manifest, raw = _read_manifest(base)
    entries = manifest["shards"]
    for s in entries:
        if not _SHARD_RE.fullmatch(s["name"]):
            raise ShardError(f"manifest at {base} names an unexpected shard file {s['name']!r}")
    if wanted is not None and sorted(wanted) != sorted(s["name"] for s in entries):
        raise ShardError(f"the pattern {source!r} names {len(wanted)} shards; the manifest next to "
                         f"them lists {len(entries)} (fetch the manifest URL instead)")
    files = [(s["name"], s["sha256"], s.get("bytes")) for s in entries]
    co = manifest.get("class_orders") or {}
    for key in ("orders", "scores"):
        if co.get(key):
            fname = co[key]
            if fname not in (CLASS_ORDERS, CLASS_SCORES):
                raise ShardError(f"manifest at {base} names an unexpected file {fname!r}")
            files.append((fname, co[f"{key}_sha256"], None))

    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST).unlink(missing_ok=True)  # unfinished until the manifest lands
    listed = {name for name, _, _ in files}
    ours = lambda name: bool(_SHARD_RE.fullmatch(name)) or name in (CLASS_ORDERS, CLASS_SCORES)  # noqa: E731
    for old in dest.iterdir():  # files of an earlier, different set are not part of this one
        if old.name not in listed and ours(old.name):
            old.unlink()
    kept = fetched = nbytes = 0
    bar = progress(total=len(files), desc="fetch", unit="file")
    try:
        for name, digest, size in files:
            target = dest / name
            if target.exists() and sha256_file(target) == digest:
                kept += 1  # resumed fetch: already here and intact
            else:
                _copy_verified(_join(base, name), target, digest, size, name)
                fetched += 1
            nbytes += target.stat().st_size
            bar.update(1)
    finally:
        bar.close()
    # Shards are untrusted: parse and validate every one (hashes were checked while copying)
    # against the manifest held in memory; class orders are checked when the reader opens.
    reader = CollapseOrders(dest, verify=False, cache_shards=1, manifest=manifest)
    bar = progress(total=len(entries), desc="verify", unit="shard")
    try:
        reader.validate_all(on_shard=lambda _name: bar.update(1))
    finally:
        bar.close()
    atomic_write_bytes(dest / MANIFEST, raw)
    if log is not None:
        extra = f", {len(files) - len(entries)} class-order files" if len(files) > len(entries) else ""
        log(f"fetched {fetched} and kept {kept} already present of {len(files)} files "
            f"({len(entries)} shards{extra}; {nbytes / 1e6:.1f} MB) from {base}")
        log(f"verified: sha256 of every file; every shard parsed: {manifest['count']} keys x "
            f"{', '.join(manifest['fields'])}, orders are permutations of 0..{manifest['num_tokens'] - 1}, "
            "dtypes and shapes as the manifest says, no unexpected tar members")
        log(f"wrote {dest / MANIFEST} last: the set is complete")
    return dest


def publish_orders(src: str | Path, dest: str | Path,
                   log: Callable[[str], None] | None = None) -> Path:
    """Copy the finished shard set ``src`` into ``dest`` for others to fetch: every file is
    checked against the manifest and every shard parsed on the way (:func:`fetch_orders` from a
    folder), so a published folder is exactly what a user's fetch will accept."""
    src = Path(src)
    if not (src / MANIFEST).is_file():
        raise FileNotFoundError(f"{src} holds no {MANIFEST}: not a finished collapse-order set")
    out = fetch_orders(src, dest, log=log)
    if log:
        log(f"published {src} -> {out}; serve that folder over HTTP (or upload it) and give out "
            f"its manifest URL: cop orders fetch https://<host>/<path>/{MANIFEST}")
    return out

