"""Extraction: prepared images -> tokenizer moments (image and flip) -> latent store.

Work unit = one Zarr shard of ``moments`` rows. Under torchrun unit u belongs to rank
u % world (:func:`pipeline.utils.dist.units_for_rank`), so no two processes write the same
shard file and no row is written twice or skipped. Batches never straddle a unit, so the
numbers a row gets do not depend on the world size or on where a previous run stopped:
1 process, N processes and a resumed run all give the same bytes.

Resume: a unit's ``done`` flag is written only after its shard is written (both writes are
atomic renames in Zarr's LocalStore), so a run that is killed at any point redoes just the
units without a flag. A store whose fingerprint (format, tokenizer identity, image set,
layout, encoding precision, device type) differs from this run's is rebuilt from scratch.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
import zarr
from zarr.core.sync import sync

from pipeline.config import LatentsConfig, TokenizerConfig
from pipeline.data.crop import to_model_input
from pipeline.latents.store import (
    DONE,
    FORMAT,
    MOMENTS,
    create_store,
    num_units,
    read_attrs,
    unit_rows,
)
from pipeline.tokenizers.base import Tokenizer
from pipeline.utils.device import pick_device
from pipeline.utils.dist import barrier, get_dist, units_for_rank
from pipeline.utils.io import sha256_json
from pipeline.utils.progress import progress


class ImageRows(Protocol):
    """What extraction needs of :class:`pipeline.data.imageset.ImageSet`."""

    keys: Sequence[str]
    labels: Sequence[int]
    classes: Sequence[str]
    crop_size: int
    identity: dict[str, Any]  # format, fingerprint, shard hashes: what made the images

    def __len__(self) -> int: ...
    def image(self, i: int) -> np.ndarray: ...


@dataclass
class ExtractResult:
    """What one call did (summed over ranks); goes into report.json and the metrics."""

    path: str
    rows: int
    units: int
    grid: int
    dim: int
    fingerprint: str
    rebuilt: bool = False
    units_resumed: int = 0  # already done when this run started
    rows_encoded: int = 0  # by this run, all ranks
    seconds: float = 0.0
    images_per_s: float = 0.0
    world: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Crops(torch.utils.data.Dataset):
    """Row i -> the uint8 [H, W, 3] crop (decoded in DataLoader workers when asked)."""

    def __init__(self, imageset: ImageRows) -> None:
        self.imageset = imageset

    def __len__(self) -> int:
        return len(self.imageset)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.imageset.image(i)


def _stack(batch: list[np.ndarray]) -> np.ndarray:
    return np.stack(batch)


def store_fingerprint(attrs: dict[str, Any]) -> str:
    return sha256_json({"format": FORMAT, **attrs})


def _encode_rows(tokenizer: Tokenizer, images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, 2, 2*dim, h, w] (image, horizontal flip).

    Image and flip go through the tokenizer in one call (MAR encodes ``x.flip(dims=[3])``).
    """
    x = to_model_input(images)
    moments = tokenizer.encode_moments(torch.cat([x, x.flip(dims=[3])]))
    b = x.shape[0]
    return torch.stack([moments[:b], moments[b:]], dim=1).cpu().numpy()


def _write_unit(arr: zarr.Array, unit: int, start: int, stop: int, data: np.ndarray) -> None:
    """One whole shard in one assignment: Zarr writes the shard file once, atomically.

    A shard left by a killed run is deleted first: Zarr merges a write into the existing
    shard (reading its index), and a torn one would fail its checksum instead of being
    replaced.
    """
    sync(arr.store.delete(f"{arr.path}/{_shard_key(arr, unit)}"))
    arr[start:stop] = data


def _shard_key(arr: zarr.Array, unit: int) -> str:
    """The key of shard ``unit`` inside the array (``c/<unit>/0/0/0/0``)."""
    return arr.metadata.encode_chunk_key((unit,) + (0,) * (arr.ndim - 1))


def _mark_done(done: zarr.Array, unit: int) -> None:
    done[unit] = 1


def _prepare_store(out: Path, *, imageset: ImageRows, grid: int, dim: int, cfg: LatentsConfig,
                   attrs: dict[str, Any], fingerprint: str) -> bool:
    """Rank 0: keep a store with the same fingerprint (resume) or rebuild it. True if rebuilt."""
    existing = read_attrs(out)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        # A SIGKILL inside Zarr's atomic write leaves its temporary file behind; drop it.
        for tmp in out.rglob("*.partial"):
            tmp.unlink(missing_ok=True)
        # A unit flagged done whose shard file has gone (deleted by hand) is redone, rather
        # than read back as zeros.
        root = zarr.open_group(str(out), mode="r+")
        arr, done = root[MOMENTS], root[DONE]
        for unit in np.nonzero(np.asarray(done[:], dtype=bool))[0].tolist():
            if not (out / MOMENTS / _shard_key(arr, unit)).exists():
                done[unit] = 0
                root.attrs["complete"] = False
        return False
    if out.exists():
        shutil.rmtree(out)
    create_store(out, keys=list(imageset.keys), labels=np.asarray(imageset.labels), grid=grid,
                 dim=dim, rows_per_chunk=cfg.rows_per_chunk, rows_per_shard=cfg.rows_per_shard,
                 compression_level=cfg.compression_level, attrs=attrs, fingerprint=fingerprint)
    return True


def _plan(pending: list[int], n: int, rows_per_shard: int,
          batch_size: int) -> list[tuple[int, list[int]]]:
    """(unit, row indices) per batch; batches never straddle a unit, so a row's batch
    (and with it its numbers) is the same whoever encodes the unit and whenever."""
    plan = []
    for u in pending:
        start, stop = unit_rows(u, n, rows_per_shard)
        for b in range(start, stop, batch_size):
            plan.append((u, list(range(b, min(stop, b + batch_size)))))
    return plan


def _reduce(values: list[float], op: str) -> list[float]:
    """Sum or max of per-rank numbers (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


def extract_latents(
    imageset: ImageRows,
    tokenizer: Tokenizer,
    out_path: str | Path,
    cfg: LatentsConfig,
    encode: TokenizerConfig | None = None,
    *,
    device: torch.device | None = None,
    desc: str = "latents",
) -> ExtractResult:
    """Encode every image of ``imageset`` and its horizontal flip into ``out_path`` (Zarr).

    ``cfg``: store layout (rows per chunk/shard, zstd level). ``encode``: batch size,
    precision, channels_last and loader workers (the ``tokenizer`` section). Call it on every
    rank under torchrun; it returns the same :class:`ExtractResult` on all of them.
    """
    encode = encode or TokenizerConfig()
    out = Path(out_path)
    info = get_dist()
    device = device or pick_device(info.local_rank)
    tokenizer = tokenizer.to(device).eval()
    tokenizer.set_precision(encode.precision, encode.channels_last)

    n = len(imageset)
    grid, dim = tokenizer.grid_for(int(imageset.crop_size)), int(tokenizer.dim)
    attrs = {
        "tokenizer": tokenizer.identity(),
        "source": dict(imageset.identity),
        "crop_size": int(imageset.crop_size),
        "scale_factor": float(tokenizer.scale_factor),
        "classes": [str(c) for c in imageset.classes],
        "layout": {"rows_per_chunk": cfg.rows_per_chunk, "rows_per_shard": cfg.rows_per_shard,
                   "compression_level": cfg.compression_level},
        # What changes the numbers: the resolved compute dtype, memory format, batch
        # composition and device type. Resuming under other settings would mix two results.
        "encoding": {"dtype": str(tokenizer.compute_dtype()).removeprefix("torch."),
                     "channels_last": bool(encode.channels_last),
                     "batch_size": encode.batch_size, "device": device.type},
    }
    fingerprint = store_fingerprint({**attrs, "grid": grid, "dim": dim, "count": n})
    t0 = time.perf_counter()

    rebuilt = False
    if info.is_main:
        rebuilt = _prepare_store(out, imageset=imageset, grid=grid, dim=dim, cfg=cfg,
                                 attrs=attrs, fingerprint=fingerprint)
    barrier()  # the arrays exist before anyone writes

    root = zarr.open_group(str(out), mode="r+")
    moments_arr, done_arr = root[MOMENTS], root[DONE]
    units = num_units(n, cfg.rows_per_shard)
    done = np.asarray(done_arr[:], dtype=bool) if units else np.zeros(0, bool)
    mine = units_for_rank(units, info)
    pending = [u for u in mine if not done[u]]
    size = {u: np.diff(unit_rows(u, n, cfg.rows_per_shard)).item() for u in mine}
    resumed_rows = sum(size[u] for u in mine if done[u])

    plan = _plan(pending, n, cfg.rows_per_shard, encode.batch_size)
    loader = torch.utils.data.DataLoader(
        _Crops(imageset), batch_sampler=[rows for _, rows in plan],
        num_workers=encode.num_workers, collate_fn=_stack)
    row_shape = (2, 2 * dim, grid, grid)
    rows_encoded = 0
    # Rank 0's bar (the others are silent) shows its share: images/s and ETA.
    with progress(total=sum(size.values()), initial=resumed_rows, desc=desc, unit="img") as bar:
        buf: np.ndarray | None = None
        for (unit, rows), images in zip(plan, loader):
            u_start, u_stop = unit_rows(unit, n, cfg.rows_per_shard)
            if buf is None:
                buf = np.empty((u_stop - u_start, *row_shape), np.float32)
            _check_images(images, imageset, rows)
            got = _encode_rows(tokenizer, images)
            _check_moments(got, row_shape, imageset, rows, attrs["encoding"]["dtype"])
            buf[rows[0] - u_start: rows[-1] + 1 - u_start] = got
            rows_encoded += len(rows)
            bar.update(len(rows))
            if rows[-1] + 1 == u_stop:
                _write_unit(moments_arr, unit, u_start, u_stop, buf)
                _mark_done(done_arr, unit)
                buf = None
    seconds = time.perf_counter() - t0

    barrier()  # every unit is written
    encoded, resumed = _reduce([float(rows_encoded), float(len(mine) - len(pending))], "sum")
    (wall,) = _reduce([seconds], "max")
    if info.is_main:
        _finish(root, out, units)
    barrier()  # the final metadata is visible to every rank

    return ExtractResult(
        path=str(out), rows=n, units=units, grid=grid, dim=dim, fingerprint=fingerprint,
        rebuilt=bool(_reduce([float(rebuilt)], "max")[0]), units_resumed=int(resumed),
        rows_encoded=int(encoded), seconds=round(wall, 3),
        images_per_s=round(encoded / wall, 2) if wall > 0 and encoded else 0.0,
        world=info.world,
    )


def _check_images(images: np.ndarray, imageset: ImageRows, rows: list[int]) -> None:
    size = int(imageset.crop_size)
    if images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
        raise ValueError(f"images {imageset.keys[rows[0]]!r}...: expected uint8 "
                         f"[{size}, {size}, 3] crops, got {images.dtype} {images.shape[1:]}")


def _check_moments(got: np.ndarray, row_shape: tuple[int, ...], imageset: ImageRows,
                   rows: list[int], dtype: str) -> None:
    """A row is never stored with the wrong shape or a NaN/inf: the run stops, naming keys."""
    if got.shape[1:] != row_shape:
        raise RuntimeError(f"tokenizer returned moments {got.shape[1:]}, expected {row_shape}")
    bad = ~np.isfinite(got).reshape(len(rows), -1).all(axis=1)
    if bad.any():
        keys = [imageset.keys[r] for r, b in zip(rows, bad) if b]
        raise RuntimeError(f"non-finite moments for {keys} (compute dtype {dtype}); "
                           "try tokenizer.precision=fp32")


def _finish(root: zarr.Group, out: Path, units: int) -> None:
    """Rank 0, after every rank wrote: check every unit is flagged, then mark complete."""
    done = np.asarray(root[DONE][:], dtype=bool) if units else np.zeros(0, bool)
    missing = np.nonzero(~done)[0].tolist()
    if missing:
        raise RuntimeError(f"{out}: units {missing[:10]} were not written; re-run to resume")
    root.attrs["complete"] = True
