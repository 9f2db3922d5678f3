"""Helpers shared by several test modules (not a test module itself; fixtures: conftest.py)."""

from __future__ import annotations

import io
import os
import socket
import tarfile
from pathlib import Path


def free_port() -> int:
    """A free TCP port on the loopback interface, for a test's own torch.distributed group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_rank(rank: int, world: int, port: int) -> None:
    """In a spawned worker: the environment torchrun would give rank ``rank`` of ``world``
    (one thread, no progress bars), before the worker joins the gloo group."""
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), COP_NO_PROGRESS="1")
    torch.set_num_threads(1)


def scratch_repo(root: Path) -> Path:
    """A copy of what the DVC pipeline needs (code, dvc.yaml, .dvc config) in ``root``, with an
    empty data/: the user's checkout, for tests that run `dvc repro` without touching this one."""
    import shutil

    repo, root = Path(__file__).resolve().parents[1], Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for item in ("pipeline", "stages", "dvc.yaml", ".dvcignore", ".dvc"):
        src = repo / item
        if src.is_dir():
            shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__", "tmp"))
        else:
            shutil.copy2(src, root / item)
    (root / "data").mkdir(exist_ok=True)
    return root


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar holding ``members`` (name, bytes) in order, as webdataset writes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_imageset(split_dir, split: str, images: list[tuple[str, int, "np.ndarray"]],
                   classes: list[str], crop_size: int, per_shard: int, source: dict,
                   fingerprint: str):
    """A real prepared split (``pipeline.data.imageset`` shards + index) from (key, label,
    uint8 image) triples; rows in key order, ``per_shard`` images per tar."""
    from pipeline.data.imageset import ImageSet, Record, encode_image, shard_name, write_index, write_shard

    records = sorted((Record(key=k, label=c, image=encode_image(img)) for k, c, img in images),
                     key=lambda r: r.key)
    split_dir.mkdir(parents=True, exist_ok=True)
    shards = [write_shard(split_dir / shard_name(j), records[s:s + per_shard], "png")
              for j, s in enumerate(range(0, len(records), per_shard))]
    write_index(split_dir, split=split, crop_size=crop_size, classes=list(classes),
                image_format="png", source=source, fingerprint=fingerprint, shards=shards)
    return ImageSet(split_dir)


def write_store(path, keys: list[str], labels: list[int], moments: "np.ndarray", attrs: dict,
                fingerprint: str):
    """A complete latent store (``create_store``, chunks of 4 rows, shards of 8) holding
    ``moments`` [n, 2, 2·dim, grid, grid]; ``attrs``: tokenizer, crop_size, scale_factor,
    classes, source."""
    import zarr

    from pipeline.latents.store import LatentStore, create_store

    create_store(path, keys=keys, labels=labels, grid=moments.shape[-1], dim=moments.shape[2] // 2,
                 rows_per_chunk=4, rows_per_shard=8, compression_level=1, fingerprint=fingerprint,
                 attrs=attrs)
    root = zarr.open_group(str(path), mode="r+")
    root["moments"][:] = moments
    root.attrs["complete"] = True
    return LatentStore(path)


# ----------------------------------------------------------------------------- tiny configs


def step_ctx(step: int = 0, rows: int = 4, seed: int = 0):
    """The trainer's StepContext for one process holding the whole global batch of ``rows``
    (CPU, fp32): a task's ``loss`` called by hand."""
    import torch

    from pipeline.train.trainer import StepContext

    return StepContext(step, torch.arange(rows), rows, torch.device("cpu"), seed, torch.float32)


def tiny_comae_cfg(**kw):
    """A CoMAE config of one block per half, width 16 (fast enough to train in a test)."""
    from pipeline.config import ComaeConfig

    return ComaeConfig(**{**dict(enc_dim=16, enc_depth=1, enc_heads=2, dec_dim=16, dec_depth=1,
                                 dec_heads=2, head_layers=1), **kw})


def tiny_cmar_cfg(sample: dict | None = None, batch_size: int = 8, **kw):
    """A tiny CMAR config; ``kw``: the order keys (or sections); ``sample``: sampling keys."""
    from pipeline.config import CmarConfig, CmarModelConfig, CmarSampleConfig, TrainConfig

    model = CmarModelConfig(enc_dim=32, enc_depth=1, enc_heads=4, dec_dim=32, dec_depth=1,
                            dec_heads=4, buffer_size=2, diffloss_d=1, diffloss_w=32,
                            diffusion_batch_mul=2)
    base = dict(model=model, sample=CmarSampleConfig(**{"num_sampling_steps": "5", **(sample or {})}),
                train=TrainConfig(steps=4, batch_size=batch_size, lr=1e-3, ema=0.9, ckpt_every=2,
                                  log_every=1, precision="fp32"))
    return CmarConfig(**{**base, **kw})


def expand_items(stage: dict) -> list[str]:
    """A stage's params keys, a foreach stage's ``${item}`` replaced by each of its items."""
    params = [p for p in stage.get("do", stage).get("params", []) if isinstance(p, str)]
    items = stage.get("foreach") if isinstance(stage.get("foreach"), list) else [None]
    return sorted({p.replace("${item}", str(i)) if i is not None else p
                   for p in params for i in items})
