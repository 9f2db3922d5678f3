"""The collapse-order shard set: format, deterministic writer, validating reader.

A split folder holds ``orders-000000.tar`` … (webdataset: one sample per image key, members
``<key>.<field>.npy``), ``manifest.json`` and, for the train split, ``class_orders.npy`` /
``class_scores.npy``. The manifest is written last: a folder without one is unfinished.

Shards are untrusted input (they are downloaded and shared): arrays are read with
``allow_pickle=False``, every order must be a permutation of ``0..N-1`` in the manifest's
dtype, shapes and dtypes are checked, and tar member names are only ever compared with the
manifest's keys -- nothing is extracted, so no path from inside a tar reaches the filesystem.
"""

from __future__ import annotations

import bisect
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from pipeline.utils.io import (
    atomic_path,
    npy_bytes,
    npy_load,
    read_json,
    sha256_file,
    sha256_json,
)

FORMAT = "cop-orders/1"
MANIFEST = "manifest.json"
CLASS_ORDERS = "class_orders.npy"
CLASS_SCORES = "class_scores.npy"
# Field -> (dtype kind, shape rank). "order" fields hold the manifest's order dtype.
FIELDS = ("order", "scores", "flip_order", "flip_scores", "matrix", "flip_matrix")
ORDER_FIELDS = ("order", "flip_order")
SCORE_FIELDS = ("scores", "flip_scores")
MATRIX_FIELDS = ("matrix", "flip_matrix")


class ShardError(ValueError):
    """A shard set that is incomplete, corrupt, tampered with or from the wrong inputs."""


def shard_name(unit: int) -> str:
    return f"orders-{unit:06d}.tar"


def order_dtype(num_tokens: int) -> np.dtype:
    """Smallest unsigned integer dtype holding indices 0..N-1."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_tokens - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


# ----------------------------------------------------------------------------- writing


@dataclass
class OrderSample:
    key: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def shard_bytes(samples: Sequence[OrderSample]) -> bytes:
    """A tar whose bytes depend only on the samples: fixed order, mtime, owner and mode.

    That is what makes 1 and N processes (and a resumed run) produce byte-identical shards.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for s in samples:
            for name in FIELDS:
                if name not in s.arrays:
                    continue
                data = npy_bytes(np.ascontiguousarray(s.arrays[name]))
                info = tarfile.TarInfo(f"{s.key}.{name}.npy")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shard(path: Path, samples: Sequence[OrderSample]) -> None:
    """Atomic: the shard appears under its name complete, or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(shard_bytes(samples))


# ----------------------------------------------------------------------------- reading


def _check_array(arr: np.ndarray, fld: str, N: int, odt: np.dtype, where: str) -> np.ndarray:
    if fld in ORDER_FIELDS:
        if arr.dtype != odt or arr.shape != (N,):
            raise ShardError(f"{where}: {fld} must be {odt}[{N}], got {arr.dtype}{list(arr.shape)}")
        if not np.array_equal(np.sort(arr), np.arange(N, dtype=arr.dtype)):
            raise ShardError(f"{where}: {fld} is not a permutation of 0..{N - 1}")
        return arr.astype(np.int64)
    if fld in SCORE_FIELDS:
        if arr.dtype != np.float32 or arr.shape != (N,) or not np.isfinite(arr).all():
            raise ShardError(f"{where}: {fld} must be finite float32[{N}], got {arr.dtype}{list(arr.shape)}")
        return arr
    if arr.dtype != np.float16 or arr.shape != (N, N):
        raise ShardError(f"{where}: {fld} must be float16[{N}, {N}], got {arr.dtype}{list(arr.shape)}")
    return arr


def _split_member(name: str) -> tuple[str, str]:
    """``"<key>.<field>.npy"`` -> (key, field); ("", "") for anything else."""
    if not name.endswith(".npy"):
        return "", ""
    key, _, fld = name[: -len(".npy")].rpartition(".")
    return key, fld


def parse_shard(data: bytes, keys: Sequence[str], fields: Sequence[str], num_tokens: int,
                odt: np.dtype, name: str) -> dict[str, dict[str, np.ndarray]]:
    """Validate and decode one shard held in memory; ``keys``/``fields`` are what it must hold."""
    N = num_tokens
    wanted = set(keys)
    # Largest legitimate member: a float16 matrix plus a generous .npy header.
    max_size = 2 * N * N + 4096
    out: dict[str, dict[str, np.ndarray]] = {k: {} for k in keys}
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        members = tar.getmembers()
    except (tarfile.TarError, EOFError) as err:
        raise ShardError(f"shard {name} is not a readable tar ({err}); re-fetch or re-export it") from None
    for m in members:
        # The name is only split and compared with the manifest's keys, never used as a path.
        key, fld = _split_member(m.name)
        if not m.isfile() or fld not in fields or key not in wanted:
            raise ShardError(f"shard {name}: unexpected member {m.name!r}")
        if fld in out[key]:
            raise ShardError(f"shard {name}: duplicate member {m.name!r}")
        if m.size > max_size:
            raise ShardError(f"shard {name}: member {m.name!r} is too large ({m.size} bytes)")
        raw = tar.extractfile(m).read()  # type: ignore[union-attr]
        try:
            arr = npy_load(raw)
        except ValueError as err:  # includes "Object arrays cannot be loaded when allow_pickle=False"
            raise ShardError(f"shard {name}: {m.name!r} is not a plain .npy array ({err})") from None
        out[key][fld] = _check_array(arr, fld, N, odt, f"shard {name}, key {key!r}")
    for k, got in out.items():
        missing = [f for f in fields if f not in got]
        if missing:
            raise ShardError(f"shard {name}: key {k!r} lacks {', '.join(missing)}")
    return out


def check_manifest(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ShardError(f"{where}: not a collapse-order manifest (format {got!r}, expected {FORMAT!r})")
    need = ("count", "num_tokens", "grid", "order_dtype", "fields", "keys", "labels", "shards", "identity")
    missing = [k for k in need if k not in m]
    if missing:
        raise ShardError(f"{where}: manifest lacks {', '.join(missing)}")
    if len(m["keys"]) != m["count"] or len(m["labels"]) != m["count"]:
        raise ShardError(f"{where}: manifest key/label lists do not match its count")
    if m["grid"] ** 2 != m["num_tokens"] or np.dtype(m["order_dtype"]) != order_dtype(m["num_tokens"]):
        raise ShardError(f"{where}: manifest grid/num_tokens/order_dtype disagree")
    if not set(m["fields"]) <= set(FIELDS) or not {"order", "scores"} <= set(m["fields"]):
        raise ShardError(f"{where}: manifest lists unknown fields {m['fields']}")
    start = 0
    for s in m["shards"]:
        if s.get("start") != start or Path(s["name"]).name != s["name"] or not s["name"].endswith(".tar"):
            raise ShardError(f"{where}: manifest shard entry {s.get('name')!r} is malformed")
        start += s["count"]
    if start != m["count"]:
        raise ShardError(f"{where}: shard counts sum to {start}, manifest says {m['count']}")
    return m


def tokenizer_identity_of(store: Any) -> Any:
    """The tokenizer identity recorded by a latent store (``LatentStore.identity['tokenizer']``)."""
    ident = getattr(store, "identity", None)
    if isinstance(ident, dict) and "tokenizer" in ident:
        return ident["tokenizer"]
    attrs = getattr(store, "attrs", None)
    if isinstance(attrs, dict) and "tokenizer" in attrs:
        return attrs["tokenizer"]
    raise ShardError(f"{type(store).__name__} records no tokenizer identity")


def _describe(tok: Any) -> str:
    if isinstance(tok, dict):
        bits = [str(tok.get(k)) for k in ("kind", "sha256") if tok.get(k) is not None]
        return f"{' '.join(bits) or 'tokenizer'} (identity {sha256_json(tok)[:12]})"
    return repr(tok)


class CollapseOrders:
    """Read a shard set: orders and scores by key or row index, class orders, the manifest.

    ``expected_identity``: a tokenizer identity the orders must have been made from (as in a
    latent store's attrs); a mismatch is refused unless ``allow_mismatch``. ``verify`` checks
    every shard's sha256 against the manifest on open (``fetch_orders`` always does).
    Shards are loaded lazily and validated as a whole when first touched.
    """

    def __init__(self, path: str | Path, expected_identity: Any = None, allow_mismatch: bool = False,
                 verify: bool = True, cache_shards: int = 8, manifest: dict[str, Any] | None = None
                 ) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if manifest is not None:
            # A manifest not yet written beside the shards: fetch validates a set this way
            # before it writes the manifest, so a set that fails never opens as finished.
            self.manifest = check_manifest(manifest, str(mpath))
        elif not mpath.exists():
            err = ShardError(f"{self.path}: no {MANIFEST} (not a shard set, or its export is unfinished)")
            err.hint = ("give the folder that `cop orders compute --out`, `export_orders` (data/orders/<split>) "
                        "or `cop orders fetch --dest` wrote; rerun that command if it was interrupted")
            raise err
        else:
            self.manifest = check_manifest(read_json(mpath), str(mpath))
        m = self.manifest
        self.keys: list[str] = list(m["keys"])
        self.labels = np.asarray(m["labels"], dtype=np.int64)
        self.grid: int = int(m["grid"])
        self.num_tokens: int = int(m["num_tokens"])
        self.fields: tuple[str, ...] = tuple(m["fields"])
        self._odt = np.dtype(m["order_dtype"])
        self._starts = [s["start"] for s in m["shards"]]
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._cache: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        self._cache_size = max(1, cache_shards)
        self._tables: dict[str, np.ndarray] = {}
        if verify:
            self.verify()
        self.class_orders, self.class_scores = self._load_class_orders()
        if expected_identity is not None:
            self._check_tokenizer(expected_identity, "the expected identity", allow_mismatch)

    # -- integrity -------------------------------------------------------------------------

    def verify(self) -> None:
        """sha256 of every shard against the manifest; names the first bad shard."""
        for s in self.manifest["shards"]:
            p = self.path / s["name"]
            if not p.exists():
                raise ShardError(f"shard {s['name']} is missing from {self.path}")
            if sha256_file(p) != s["sha256"]:
                raise ShardError(f"shard {s['name']} in {self.path} fails its sha256 check "
                                 "(truncated or modified); re-fetch or re-export it")

    def validate_all(self, on_shard: Callable[[str], None] | None = None) -> None:
        """Parse every shard: member names, dtypes, shapes, and that every order is a permutation.
        ``on_shard(name)`` is called after each shard passed (progress)."""
        for u, s in enumerate(self.manifest["shards"]):
            self._shard(u)
            if on_shard is not None:
                on_shard(s["name"])

    def _load_class_orders(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        co = self.manifest.get("class_orders")
        if not co:
            return None, None
        out = []
        for fname, digest in ((co["orders"], co["orders_sha256"]), (co["scores"], co["scores_sha256"])):
            p = self.path / Path(fname).name
            if not p.exists() or sha256_file(p) != digest:
                raise ShardError(f"{p} is missing or fails its sha256 check")
            out.append(np.load(p, allow_pickle=False))
        orders, scores = out
        C = len(self.manifest.get("classes") or []) or orders.shape[0]
        if orders.shape != (C, self.num_tokens) or scores.shape != (C, self.num_tokens):
            raise ShardError(f"{self.path}: class orders/scores must be [{C}, {self.num_tokens}]")
        for c in range(C):
            _check_array(orders[c], "order", self.num_tokens, self._odt, f"{self.path} class {c}")
        return orders.astype(np.int64), scores.astype(np.float32)

    # -- identity --------------------------------------------------------------------------

    @property
    def identity(self) -> dict[str, Any]:
        """What these orders are, for the runs trained on them: the export fingerprint (latents,
        CoMAE, params) and one hash of every shard's sha256 (the bytes)."""
        return {"format": self.manifest["format"], "fingerprint": self.manifest.get("fingerprint"),
                "shards": sha256_json([s["sha256"] for s in self.manifest["shards"]])}

    @property
    def tokenizer_identity(self) -> Any:
        return self.manifest["identity"].get("tokenizer")

    def _check_tokenizer(self, other: Any, other_name: str, allow_mismatch: bool) -> None:
        mine = self.tokenizer_identity
        if sha256_json(mine) == sha256_json(other):
            return
        msg = (f"collapse orders in {self.path} were made from latents of tokenizer {_describe(mine)}, "
               f"but {other_name} uses tokenizer {_describe(other)}. Orders rank patches of the latents "
               "they were computed on; re-export orders for these latents, or pass "
               "allow_mismatch=True to use them anyway.")
        if not allow_mismatch:
            raise ShardError(msg)

    def check_compatible(self, store: Any, allow_mismatch: bool = False) -> None:
        """Refuse a latent store whose grid differs, or (unless overridden) whose tokenizer does."""
        if int(store.grid) != self.grid:
            raise ShardError(f"orders in {self.path} are for a {self.grid}x{self.grid} grid, "
                             f"the latents have {store.grid}x{store.grid}")
        where = f"the latent store {getattr(store, 'path', '')}".rstrip()
        self._check_tokenizer(tokenizer_identity_of(store), where, allow_mismatch)

    # -- access ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.keys)

    def index_of(self, key_or_index: str | int) -> int:
        if isinstance(key_or_index, (int, np.integer)):
            i = int(key_or_index)
            if not 0 <= i < len(self.keys):
                raise IndexError(f"index {i} out of range for {len(self.keys)} orders")
            return i
        try:
            return self._index[key_or_index]
        except KeyError:
            raise KeyError(f"no collapse order for key {key_or_index!r} in {self.path}") from None

    def _shard(self, u: int) -> dict[str, dict[str, np.ndarray]]:
        if u not in self._cache:
            s = self.manifest["shards"][u]
            data = (self.path / s["name"]).read_bytes()
            keys = self.keys[s["start"] : s["start"] + s["count"]]
            parsed = parse_shard(data, keys, self.fields, self.num_tokens, self._odt, s["name"])
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[u] = parsed
        return self._cache[u]

    def _get(self, key_or_index: str | int, fld: str) -> np.ndarray:
        if fld not in self.fields:
            raise KeyError(f"{self.path} has no {fld!r} (fields: {', '.join(self.fields)})")
        i = self.index_of(key_or_index)
        u = bisect.bisect_right(self._starts, i) - 1
        return self._shard(u)[self.keys[i]][fld]

    def order(self, key_or_index: str | int, flip: bool = False) -> np.ndarray:
        """int64[N] patch indices, most relied-upon first (rank 0)."""
        return self._get(key_or_index, "flip_order" if flip else "order")

    def scores(self, key_or_index: str | int, flip: bool = False) -> np.ndarray:
        return self._get(key_or_index, "flip_scores" if flip else "scores")

    def matrix(self, key_or_index: str | int, flip: bool = False) -> np.ndarray:
        return self._get(key_or_index, "flip_matrix" if flip else "matrix")

    def order_table(self, flip: bool = False) -> np.ndarray:
        """Every order, [n, N] in the stored dtype (uint8 for N <= 256), read in one pass.

        Training reads images in random order; fetching orders the same way would re-parse a
        whole shard per item once the set outgrows the shard cache. One sequential pass
        instead (ImageNet: 1.28M x 256 uint8 = 0.33 GB per direction), shared by forked
        DataLoader workers.
        """
        fld = "flip_order" if flip else "order"
        if fld not in self.fields:
            raise KeyError(f"{self.path} has no {fld!r} (fields: {', '.join(self.fields)})")
        if fld not in self._tables:
            table = np.empty((len(self.keys), self.num_tokens), self._odt)
            for s in self.manifest["shards"]:
                keys = self.keys[s["start"]: s["start"] + s["count"]]
                parsed = parse_shard((self.path / s["name"]).read_bytes(), keys, self.fields,
                                     self.num_tokens, self._odt, s["name"])
                for j, k in enumerate(keys):
                    table[s["start"] + j] = parsed[k][fld]
            self._tables[fld] = table
        return self._tables[fld]

    def orders_for(self, keys: Iterable[str | int], flip: bool = False) -> np.ndarray:
        """int64 [n, N] orders of the given keys or row indices."""
        rows = [self.index_of(k) for k in keys]
        if not rows:
            return np.zeros((0, self.num_tokens), np.int64)
        return self.order_table(flip)[rows].astype(np.int64)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: do not ship the cache
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state
