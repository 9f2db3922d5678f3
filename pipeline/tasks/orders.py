"""Collapse orders for your own images with an already trained CoMAE, no DVC graph
(``cop orders compute IMAGES --out DIR``).

The same three library steps as the pipeline, on one split named ``images``:

1. ``prepare``: :func:`pipeline.data.build.prepare_source` center-crops every image of a
   folder (any layout; sub-folders become classes) or a tar pattern into ``DIR/.compute/images``;
2. tokenize: the tokenizer the CoMAE was trained with (``data/latents/tokenizer`` for the
   patch stand-in, saved by ``extract_latents``; a KL-16 checkpoint otherwise) encodes them
   into ``DIR/.compute/latents.zarr``;
3. export: :func:`pipeline.orders.export.export_split` writes the shard set and manifest
   (format ``cop-orders/1``) into ``DIR``, as ``export_orders`` does.

Every step resumes (a rerun redoes only what is missing or stale). The crop size is the one
the CoMAE was trained at (grid x tokenizer patch size). When the CoMAE's training latents are
at hand (``data/latents/train.zarr``), the tokenizer must be the one they were made with.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import DataConfig, LatentsConfig, OrdersConfig, TokenizerConfig
from pipeline.orders.export import SplitResult

WORK = ".compute"
SPLIT = "images"


class ComputeError(ValueError):
    """Inputs of ``cop orders compute`` that do not fit together (names what to change)."""


@dataclass
class ComputeResult:
    out: Path
    images: int
    skipped: dict[str, int]
    export: SplitResult


def _tokenizer(spec: str | Path, device: Any) -> Any:
    from pipeline.tokenizers import build_tokenizer, load_tokenizer

    spec = Path(spec)
    if spec.is_dir():
        return load_tokenizer(spec, precision="fp32", channels_last=False, device=device)
    if spec.is_file():  # a KL-16 checkpoint (kl16.ckpt, diffusers folder file, safetensors)
        return build_tokenizer(TokenizerConfig(kind="kl16", checkpoint=str(spec), precision="fp32",
                                               channels_last=False), device=device)
    raise ComputeError(f"tokenizer {spec} not found: pass --tokenizer with the saved stand-in "
                       "(data/latents/tokenizer, written by extract_latents) or a KL-16 checkpoint")


def _check_tokenizer(tok: Any, training_latents: Path | None) -> None:
    """Refuse a tokenizer other than the one the CoMAE's training latents were made with."""
    if training_latents is None or not training_latents.exists():
        return
    from pipeline.latents.store import LatentStore
    from pipeline.utils.io import sha256_json

    trained = LatentStore(training_latents).identity.get("tokenizer")
    if trained is not None and sha256_json(trained) != sha256_json(tok.identity()):
        raise ComputeError(
            f"the tokenizer given ({tok.kind}, weights {tok.weights_sha256()[:12]}) is not the one "
            f"of {training_latents} ({trained.get('kind')}, weights "
            f"{str(trained.get('weights_sha256'))[:12]}), the latents the CoMAE was trained on: "
            "pass the matching --tokenizer")


def compute_orders(images: str | Path, out: str | Path, *, comae: str | Path = "data/comae",
                   tokenizer: str | Path = "data/latents/tokenizer",
                   training_latents: str | Path | None = "data/latents/train.zarr",
                   orders_cfg: OrdersConfig | None = None, batch_size: int = 32,
                   log: Callable[[str], None] | None = None) -> ComputeResult:
    """Prepare, tokenize and export ``images`` into the shard set ``out`` (see module doc)."""
    from pipeline.data.build import check_source_exists, prepare_source
    from pipeline.data.imageset import ImageSet
    from pipeline.latents.store import LatentStore
    from pipeline.latents.writer import extract_latents
    from pipeline.tasks.comae import load_comae
    from pipeline.tasks.estimators import comae_identity
    from pipeline.orders.export import export_split
    from pipeline.utils.device import pick_device

    check_source_exists(str(images))  # before any model is loaded or file written
    cfg = orders_cfg or OrdersConfig()
    if cfg.estimator != "comae":
        raise ComputeError(f"cop orders compute makes CoMAE orders only (orders.estimator is "
                           f"{cfg.estimator!r}): set it to comae, or export with the pipeline's "
                           "export_orders stage")
    out = Path(out)
    say = log or (lambda _msg: None)
    device = pick_device()
    model, comae_info = load_comae(comae, map_location=device)
    tok = _tokenizer(tokenizer, device)
    _check_tokenizer(tok, Path(training_latents) if training_latents else None)
    crop = model.grid * tok.patch_size  # the CoMAE knows only grids of its training size

    index = prepare_source(images, out / WORK / SPLIT, DataConfig(crop_size=crop), split=SPLIT)
    imageset = ImageSet(out / WORK / SPLIT)
    lines = (out / WORK / SPLIT / "skipped.jsonl").read_text().splitlines()
    skipped = dict(sorted(Counter(json.loads(x)["reason"] for x in lines if x.strip()).items()))
    say(f"prepared {index['count']} images ({crop} px center crops) from {images}"
        + (f"; skipped {sum(skipped.values())}: "
           + ", ".join(f"{n} {r}" for r, n in skipped.items())
           + f" (each file and why: {out / WORK / SPLIT / 'skipped.jsonl'})" if skipped else ""))

    encode = TokenizerConfig(kind=tok.kind, checkpoint=str(tokenizer) if tok.kind == "kl16" else None,
                             batch_size=batch_size, precision="fp32", channels_last=False)
    extract_latents(imageset, tok, out / WORK / "latents.zarr", LatentsConfig(), encode,
                    device=device, desc="latents")
    store = LatentStore(out / WORK / "latents.zarr", in_memory=None)
    model.check_store(store)

    res = export_split(store, model, comae_identity(comae_info), cfg, out, SPLIT, device=device,
                       class_orders=True)
    rate = f", {res.images_per_s:.1f} images/s" if res.images_per_s else ""
    say(f"orders of {res.count} images in {res.shards} shards -> {out} "
        f"({res.computed} shards computed{rate})")
    return ComputeResult(out, int(index["count"]), skipped, res)
