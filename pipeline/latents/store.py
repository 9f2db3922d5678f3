"""The latent store: format, creation and reader (``data/latents/<split>.zarr``).

One Zarr v3 group per split:

- ``moments``: float32 ``[n, 2, 2*dim, h, w]``; axis 1 is (image, horizontal flip) and axis 2
  holds the posterior mean then the log-variance, unscaled -- what MAR caches for an image and
  its flip. Chunked *and* sharded along rows (zstd); a shard of rows is the writer's unit of
  work, so no two processes ever write the same file.
- ``labels``: int32 ``[n]``; ``keys``: Zarr v3 ``string`` (vlen-utf8) ``[n]``; row order is the
  image set's.
- ``done``: uint8 ``[units]``, one chunk (file) per unit, set to 1 only after that unit's shard
  of ``moments`` is written; it is what makes extraction resumable.
- group attrs: ``format`` (:data:`FORMAT`), ``tokenizer`` (identity), ``crop_size``,
  ``scale_factor``, ``grid``, ``dim``, ``classes``, ``source`` (image-set identity),
  ``fingerprint`` (everything that determines the bytes; written last at creation) and
  ``complete`` (set once every unit is written).

Readers get token grids scaled by ``scale_factor`` (MAR multiplies latents by 0.2325 before any
model sees them). Random access is served either from an in-memory copy (decompressed once;
the fast path for training, taken only when the split fits :func:`memory_budget`) or from
Zarr through a bounded cache of decoded chunks (ImageNet: chunks of one row, so a random row
costs one row's read; the shard index locates it).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

FORMAT = "cop-latents/1"
MOMENTS, LABELS, KEYS, DONE = "moments", "labels", "keys", "done"
# labels/keys are small: one chunk holds this many rows.
_META_CHUNK = 1 << 16

Index = int | slice | Sequence[int] | np.ndarray | torch.Tensor


class LatentStoreError(ValueError):
    """A latent store that cannot be used: unknown format, unfinished, or incompatible."""


# ----------------------------------------------------------------------------- creation


def num_units(n: int, rows_per_shard: int) -> int:
    return math.ceil(n / rows_per_shard)


def unit_rows(unit: int, n: int, rows_per_shard: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of work unit ``unit`` (= Zarr shard ``unit`` of ``moments``)."""
    start = unit * rows_per_shard
    return start, min(n, start + rows_per_shard)


def create_store(
    path: str | Path,
    *,
    keys: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    grid: int,
    dim: int,
    rows_per_chunk: int,
    rows_per_shard: int,
    compression_level: int,
    attrs: dict[str, Any],
    fingerprint: str,
) -> zarr.Group:
    """Create an empty store (overwriting ``path``). ``fingerprint`` is written last, so a
    creation that was killed half-way has none and is rebuilt by the next run."""
    if rows_per_shard % rows_per_chunk:
        raise LatentStoreError(
            f"latents.rows_per_shard ({rows_per_shard}) must be a multiple of "
            f"latents.rows_per_chunk ({rows_per_chunk})"
        )
    n = len(keys)
    if len(labels) != n:
        raise LatentStoreError(f"{len(labels)} labels for {n} keys")
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs.update({**attrs, "format": FORMAT, "grid": grid, "dim": dim, "count": n,
                       "complete": False})
    shape = (n, 2, 2 * dim, grid, grid)
    root.create_array(
        MOMENTS,
        shape=shape,
        chunks=(rows_per_chunk, *shape[1:]),
        shards=(rows_per_shard, *shape[1:]),
        dtype="float32",
        compressors=ZstdCodec(level=compression_level),
        fill_value=0.0,
    )
    meta_chunk = (max(1, min(n, _META_CHUNK)),)
    lab = root.create_array(LABELS, shape=(n,), chunks=meta_chunk, dtype="int32", fill_value=0,
                            compressors=ZstdCodec(level=compression_level))
    key = root.create_array(KEYS, shape=(n,), chunks=meta_chunk, dtype=str,
                            compressors=ZstdCodec(level=compression_level))
    if n:
        lab[:] = np.asarray(labels, dtype=np.int32)
        key[:] = np.asarray(list(keys), dtype=str)
    # One file per unit: ranks mark their own units without touching each other's files.
    root.create_array(DONE, shape=(num_units(n, rows_per_shard),), chunks=(1,),
                      dtype="uint8", fill_value=0, compressors=None)
    root.attrs["fingerprint"] = fingerprint
    return root


def read_attrs(path: str | Path) -> dict[str, Any] | None:
    """The group attrs of an existing store, or None when there is no readable store."""
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
        return None


def spaced_rows(n: int, cap: int) -> np.ndarray:
    """At most ``cap`` row indices spread evenly over ``range(n)`` (all of them when n <= cap):
    the rows a capped report reads, the same whatever the number of processes."""
    if n <= cap:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, cap).round().astype(np.int64))


# ----------------------------------------------------------------------------- reader


def sample_posterior(moments: torch.Tensor, scale_factor: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """MAR's ``DiagonalGaussianDistribution(moments).sample() * scale``: mean + std * eps.

    ``moments``: ``[..., 2*dim, h, w]`` (mean then logvar). MAR clamps logvar to [-30, 20].
    """
    mean, logvar = moments.chunk(2, dim=-3)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return (mean + std * eps) * scale_factor


MEMORY_BUDGET_ENV = "COP_MEMORY_BUDGET"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_budget() -> int:
    """Bytes one process may spend on a decompressed latent split.

    ``COP_MEMORY_BUDGET`` (bytes, or with a K/M/G/T suffix) when set; otherwise a quarter of
    physical RAM shared by the processes torchrun starts on this machine (``LOCAL_WORLD_SIZE``):
    8 ranks each holding ImageNet's 84 GB would need 672 GB.
    """
    raw = os.environ.get(MEMORY_BUDGET_ENV, "").strip().upper().removesuffix("B")
    if raw:
        num, unit = (raw[:-1], raw[-1]) if raw[-1] in _UNITS else (raw, "")
        try:
            return int(float(num) * _UNITS[unit])
        except ValueError:
            raise ValueError(f"{MEMORY_BUDGET_ENV}={os.environ[MEMORY_BUDGET_ENV]!r}: expected bytes "
                             "such as 8000000000 or 8G") from None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 << 30
    return ram // 4 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


class LatentStore:
    """Reader of one split's latent store. Picklable (Zarr is opened lazily per process).

    ``in_memory``: True decompresses ``moments`` once on first use; False reads Zarr chunks
    through an LRU cache of ``cache_bytes``; None picks memory when the array fits
    :func:`memory_budget`. Decompressing a store larger than that budget is refused (it would
    run every rank out of memory at ImageNet size), and so is a store still being written or
    of another format.
    """

    def __init__(self, path: str | Path, *, in_memory: bool | None = False,
                 cache_bytes: int = 256 << 20) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise LatentStoreError(f"no latent store at {self.path} (run the extract_latents stage)")
        root = zarr.open_group(str(self.path), mode="r")
        attrs = dict(root.attrs)
        fmt = attrs.get("format")
        if fmt != FORMAT:
            raise LatentStoreError(
                f"{self.path}: unknown latent store format {fmt!r}; this code reads {FORMAT!r} "
                "(re-run extract_latents to rebuild it)"
            )
        if not attrs.get("complete"):
            raise LatentStoreError(
                f"{self.path}: extraction has not finished (re-run extract_latents to resume it)"
            )
        self.attrs = attrs
        arr = root[MOMENTS]
        self.shape: tuple[int, ...] = tuple(arr.shape)
        self.rows_per_chunk = int(arr.chunks[0])
        self._labels = np.asarray(root[LABELS][:], dtype=np.int64)
        self._keys = [str(k) for k in root[KEYS][:]] if len(self) else []
        self.cache_bytes = cache_bytes
        self._arr: zarr.Array | None = None
        self._mem: np.ndarray | None = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.in_memory = self.fits_memory() if in_memory is None else bool(in_memory)

    # ------------------------------------------------------------------ metadata
    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (f"LatentStore({str(self.path)!r}, n={len(self)}, grid={self.grid}, dim={self.dim}, "
                f"tokenizer={self.attrs['tokenizer'].get('kind')!r})")

    @property
    def keys(self) -> list[str]:
        return self._keys

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def grid(self) -> int:
        return int(self.attrs["grid"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def scale_factor(self) -> float:
        return float(self.attrs["scale_factor"])

    @property
    def crop_size(self) -> int:
        return int(self.attrs["crop_size"])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def fits_memory(self) -> bool:
        return self.nbytes <= memory_budget()

    @property
    def identity(self) -> dict[str, Any]:
        """What made this store; downstream artifacts record it."""
        return {k: self.attrs[k] for k in ("format", "fingerprint", "tokenizer", "source",
                                           "grid", "dim", "scale_factor", "crop_size")}

    def check_compatible(self, expected_grid: int | None = None,
                         expected_dim: int | None = None) -> None:
        """Raise naming the mismatch when a model built for another token grid meets this store."""
        problems = []
        if expected_grid is not None and expected_grid != self.grid:
            problems.append(f"grid {self.grid}x{self.grid} (expected {expected_grid}x{expected_grid})")
        if expected_dim is not None and expected_dim != self.dim:
            problems.append(f"token dim {self.dim} (expected {expected_dim})")
        if problems:
            raise LatentStoreError(
                f"{self.path} has " + " and ".join(problems)
                + f"; it was made by tokenizer {self.attrs['tokenizer'].get('kind')!r}. "
                "Re-extract the latents or rebuild the model for this store."
            )

    # ------------------------------------------------------------------ reading
    def load(self) -> "LatentStore":
        """Decompress the whole ``moments`` array into memory (idempotent)."""
        self.in_memory = True
        if self._mem is None:
            if not self.fits_memory():
                raise LatentStoreError(
                    f"{self.path}: refusing to decompress {self.nbytes / 2**30:.2f} GiB of latents "
                    f"into memory, over this process's budget of {memory_budget() / 2**30:.2f} GiB "
                    f"(a quarter of RAM over the local processes, or {MEMORY_BUDGET_ENV}); read it "
                    "through the chunk cache instead (in_memory=None or False)")
            self._mem = self._array()[...] if len(self) else np.zeros(self.shape, np.float32)
            self._cache.clear()
        return self

    def moments(self, idx: Index, flip: bool | Sequence[bool] | np.ndarray = False) -> torch.Tensor:
        """Unscaled posterior moments ``float32 [k, 2*dim, h, w]`` (mean, then logvar).

        ``idx``: int (k = 1), slice, or sequence of row indices (negatives count from the end);
        ``flip``: one bool or one per row (the moments of the horizontally flipped image).
        """
        rows = self._rows(idx)
        flips = np.broadcast_to(np.asarray(flip, dtype=np.int64), rows.shape)
        if self.in_memory:
            self.load()
            out = self._mem[rows, flips]
        else:
            out = self._gather(rows, flips)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def tokens(self, idx: Index, flip: bool | Sequence[bool] | np.ndarray = False,
               sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Token grids ``float32 [k, dim, h, w]`` scaled by ``scale_factor``: the posterior mean,
        or with ``sample`` a draw mean + exp(logvar / 2) * eps (MAR's posterior.sample())."""
        m = self.moments(idx, flip)
        if sample:
            return sample_posterior(m, self.scale_factor, generator)
        return m[:, : self.dim] * self.scale_factor

    # ------------------------------------------------------------------ internals
    def _array(self) -> zarr.Array:
        if self._arr is None:
            self._arr = zarr.open_group(str(self.path), mode="r")[MOMENTS]
        return self._arr

    def _rows(self, idx: Index) -> np.ndarray:
        n = len(self)
        if isinstance(idx, slice):
            return np.arange(n, dtype=np.int64)[idx]
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        rows = np.atleast_1d(np.asarray(idx))
        if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
            raise IndexError("row indices must be an int, a slice or a 1-D integer sequence")
        rows = rows.astype(np.int64)
        rows = np.where(rows < 0, rows + n, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row index out of range for a store of {n} rows")
        return rows

    def _chunk(self, c: int) -> np.ndarray:
        """Decoded rows of chunk ``c`` ``[r, 2, 2*dim, h, w]``, through the LRU cache."""
        block = self._cache.get(c)
        if block is not None:
            self._cache.move_to_end(c)
            return block
        rpc = self.rows_per_chunk
        block = self._array()[c * rpc: min(len(self), (c + 1) * rpc)]
        self._cache[c] = block
        used = sum(b.nbytes for b in self._cache.values())
        while used > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            used -= old.nbytes
        return block

    def _gather(self, rows: np.ndarray, flips: np.ndarray) -> np.ndarray:
        out = np.empty((rows.size, *self.shape[2:]), dtype=np.float32)
        chunk_of = rows // self.rows_per_chunk
        # Visit each chunk once, however the rows are ordered.
        for c in np.unique(chunk_of):
            sel = np.nonzero(chunk_of == c)[0]
            block = self._chunk(int(c))
            out[sel] = block[rows[sel] - c * self.rows_per_chunk, flips[sel]]
        return out

    def __getstate__(self) -> dict[str, Any]:
        # Zarr handles and decoded data stay behind; a worker reopens (and, in memory mode,
        # reloads) lazily. Forked DataLoader workers never pickle and share the parent's copy.
        state = self.__dict__.copy()
        state.update(_arr=None, _mem=None, _cache=OrderedDict())
        return state


class TokenGridDataset(torch.utils.data.Dataset):
    """Deterministic items for training: ``{"tokens", "tokens_flip": float32 [dim, h, w]
    (scaled posterior means of the image and of its flip), "label": int, "index": int}``;
    with ``with_moments`` also ``"moments", "moments_flip"`` ``[2*dim, h, w]`` (unscaled) so a
    task can draw posterior samples (:func:`sample_posterior`) with its own RNG.

    ``in_memory``: True decompresses the store once, here, in the creating process, so forked
    DataLoader workers share it; None (default) does that when it fits :func:`memory_budget`
    and otherwise reads Zarr chunks through the bounded cache; False always reads chunks.
    """

    def __init__(self, store: LatentStore | str | Path, in_memory: bool | None = None,
                 with_moments: bool = False) -> None:
        if not isinstance(store, LatentStore):
            store = LatentStore(store)
        store.in_memory = store.fits_memory() if in_memory is None else bool(in_memory)
        if store.in_memory:
            store.load()
        self.store = store
        self.with_moments = with_moments
        self._labels = store.labels.tolist()

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._items(np.asarray([i], dtype=np.int64))[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Batched fetch (used by DataLoader): one gather for the whole batch."""
        return self._items(np.asarray(indices, dtype=np.int64))

    def _items(self, rows: np.ndarray) -> list[dict[str, Any]]:
        store, dim = self.store, self.store.dim
        rows = store._rows(rows)
        # Gather only what is returned: the means unless moments are asked for.
        part = slice(None) if self.with_moments else slice(0, dim)
        if store.in_memory:
            store.load()
            both = torch.from_numpy(store._mem[rows, :, part])  # a copy: [k, 2, d, h, w]
        else:
            both = torch.stack([store.moments(rows, False)[:, part], store.moments(rows, True)[:, part]],
                               dim=1)
        toks = both[:, :, :dim].mul(store.scale_factor) if self.with_moments \
            else both.mul_(store.scale_factor)
        # Per-item views via unbind (one C++ call): the per-item Python work is what limits
        # a DataLoader's grids/s once the data is in memory.
        columns = {"tokens": toks[:, 0].unbind(0), "tokens_flip": toks[:, 1].unbind(0)}
        if self.with_moments:
            columns.update(moments=both[:, 0].unbind(0), moments_flip=both[:, 1].unbind(0))
        rows_l = rows.tolist()
        columns.update(label=[self._labels[r] for r in rows_l], index=rows_l)
        names = list(columns)
        return [dict(zip(names, values)) for values in zip(*columns.values())]
