"""CViT training (paper Sec. 3.4, 4.4, Tab. 5): data, drop policies, the task, the trained model.

Evaluation (Tab. 5, Fig. 8) is in :mod:`pipeline.tasks.cvit_eval`.

Variants (Tab. 5). Three models are trained, four rows are tested:

    row     trained model   dropped at test
    ViT     vit  (full images in training)      random patches
    ViT+C   vit  (the same weights)             lowest-ranked patches (collapse order)
    RViT    rvit (random drops in training)     random patches
    CViT    cvit (collapse drops in training)   lowest-ranked patches

and the cheap competitor: ``cvit_pss``, trained and tested keeping first the patches whose
latent tokens have the largest L1 norm (PSS's embedding-norm order; no CoMAE, no PageRank).

Dropping keeps the *first* k patches of an order: for collapse drops the collapse order
(rank 0 = the most relied-upon patch first), for random drops a random permutation, so in
both cases the kept set at a higher mask ratio is a subset of the one at a lower ratio.
``k = max(1, N − round(ratio · N))``: at 78% of 256 patches, 56 are kept; at 99%, 3.

Training mask ratio. The paper masks "0 ∼ 99% low-rank patches with a cosine annealing
schedule favoring lower mask rates". Here every step draws u ~ U(0, 1) and uses

    ratio = max_ratio · (1 − cos(π/2 · u))

which sweeps [0, max_ratio] with density largest near 0: P(ratio < max/2) = 2/3, mean
0.36·max_ratio. One ratio per step for the whole (global) batch, so every image keeps the
same number of patches and the batch stays a dense [B, 1 + k, D] tensor -- no padding, no
attention masks, and the step's compute falls with k. The variants differ only in *which*
patches are kept. The ViT variant trains on full images (ratio 0).

Randomness (ratio, flips, random drops) comes from the trainer's ``StepContext``: the ratio
from ``ctx.uniform()`` (the same number on every rank), flips and random orders drawn
per global row, so 1 and N processes train on identical inputs. A flipped image
uses the order of the flipped image (the shard set's ``flip_order``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from pipeline.config import VARIANTS, Params
from pipeline.models.vit import PatchConvEmbed, VisionTransformer, VitArch, load_pretrained
from pipeline.orders.baselines import token_l1_scores
from pipeline.orders.pagerank import collapse_order
from pipeline.orders.shards import order_dtype
from pipeline.train.checkpoint import load_run, load_trained
from pipeline.train.trainer import StepContext, TrainTask
from pipeline.utils.images import images_to_input
from pipeline.utils.io import read_json, sha256_file, sha256_json

TRAIN_DROP = {"vit": "none", "rvit": "random", "cvit": "collapse", "cvit_pss": "token_l1"}
# Tab. 5 row -> (trained variant, drop at test)
ROWS: dict[str, tuple[str, str]] = {
    "ViT": ("vit", "random"),
    "ViT+C": ("vit", "collapse"),
    "RViT": ("rvit", "random"),
    "CViT": ("cvit", "collapse"),
}
TASK_KIND = "cvit"
PRETRAIN_KIND = "vit_pretrain"  # the task kind of data/pretrain_vit (pipeline.tasks.cvit_pretrain)
# What pretrain_vit writes when the published weights (cvit.model.pretrained) stand in for its training.
PUBLISHED_RECORD = "published.json"


class OrdersMismatchError(ValueError):
    """Orders that do not belong to these images / this model (keys, grid, tokenizer)."""


# ----------------------------------------------------------------------------- drops


def num_keep(ratio: float, num_patches: int) -> int:
    """Patches kept at a mask ratio: N − round(ratio·N) (half up), at least one."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1), got {ratio}")
    return max(1, num_patches - math.floor(ratio * num_patches + 0.5))


def cosine_mask_ratio(u: float | Tensor, max_ratio: float) -> float | Tensor:
    """u ~ U(0, 1) -> max_ratio · (1 − cos(π/2 · u)): low ratios are the most likely."""
    if isinstance(u, Tensor):
        return max_ratio * (1.0 - torch.cos(u * (math.pi / 2)))
    return max_ratio * (1.0 - math.cos(u * math.pi / 2))


def keep_first(orders: Tensor, k: int) -> Tensor | None:
    """[B, N] orders -> [B, k] patches to keep, or None for "all" (the plain forward)."""
    return None if k >= orders.shape[1] else orders[:, :k]


def random_order(index: int, num_patches: int, seed: int) -> Tensor:
    """The test-time random drop order of one image: a permutation seeded by (seed, index),
    so every model and every batch size sees the same random drops."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1))
    return torch.randperm(num_patches, generator=g)


# ----------------------------------------------------------------------------- data


def orders_tokenizer_fingerprint(orders: Any) -> str:
    """Hash of the tokenizer identity the orders were computed with (manifest identity)."""
    return sha256_json(orders.tokenizer_identity)


def check_orders_match_images(images: Any, orders: Any) -> np.ndarray:
    """Refuse orders that do not belong to ``images``; return the order row of each image.

    - every image key must have an order (the error counts and names the missing ones);
    - a key's class label must be the same in both (else the orders are of another data set);
    - the orders' latents must have been made from crops of the images' size, whose side the
      latent grid divides: then patch n of the ViT is token n of the orders' grid;
    - the image set the orders' latents came from should be this one (a warning only: a
      re-prepared or fetched copy of the same images is legitimate).
    """
    index = {k: i for i, k in enumerate(orders.keys)}
    missing = [k for k in images.keys if k not in index]
    if missing:
        raise OrdersMismatchError(
            f"{len(missing)} of {len(images.keys)} images in {images.path} have no collapse order "
            f"in {orders.path} (first: {', '.join(repr(k) for k in missing[:3])}); re-export "
            "orders for this image set")
    rows = np.fromiter((index[k] for k in images.keys), dtype=np.int64, count=len(images.keys))
    bad = np.nonzero(np.asarray(orders.labels)[rows] != np.asarray(images.labels))[0]
    if len(bad):
        k = images.keys[int(bad[0])]
        raise OrdersMismatchError(
            f"{len(bad)} images carry another label in {orders.path} than in {images.path} "
            f"(first: {k!r}); the orders belong to another data set")
    latents = orders.manifest.get("identity", {}).get("latents") or {}
    tok = orders.tokenizer_identity or {}
    crop = latents.get("crop_size")
    if crop is not None and int(crop) != images.crop_size:
        raise OrdersMismatchError(
            f"orders in {orders.path} were computed on {crop}px crops (tokenizer "
            f"{tok.get('kind')!r}, {orders.grid}x{orders.grid} grid), but the images in "
            f"{images.path} are {images.crop_size}px: re-export orders from latents of these images")
    if images.crop_size % orders.grid:
        raise OrdersMismatchError(
            f"the {orders.grid}x{orders.grid} grid of the orders in {orders.path} does not divide "
            f"the {images.crop_size}px images: ViT patches could not align with the latent tokens")
    source = latents.get("source") or {}
    mine = getattr(images, "identity", {}) or {}
    if source.get("fingerprint") and mine.get("fingerprint") \
            and source["fingerprint"] != mine["fingerprint"]:
        warnings.warn(f"orders in {orders.path} were computed from another preparation of the "
                      f"images than {images.path} (fingerprints differ); keys and labels match",
                      stacklevel=2)
    return rows


class CvitImageDataset(Dataset):
    """Prepared images joined with their collapse orders by key; deterministic per index.

    item -> ``image`` uint8 [H, W, 3], ``label``, ``index`` and, with orders, ``order`` and
    ``order_flip`` (int64 [N], rank 0 first); with ``random_seed``, ``random_order`` (int64
    [N], the seeded test-time random drop order). Augmentation (flip) happens in the task.
    """

    def __init__(self, images: Any, orders: Any | None = None, *, check_orders: Any | None = None,
                 random_seed: int | None = None,
                 order_tables: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.images = images
        self.orders = orders
        ref = orders if orders is not None else check_orders
        self._rows = check_orders_match_images(images, ref) if ref is not None else None
        if orders is not None and "flip_order" not in orders.fields:
            raise OrdersMismatchError(f"{orders.path} holds no flipped orders (flip_order); "
                                      "training flips images and needs them")
        self.num_patches = int(ref.num_tokens) if ref is not None else None
        self.random_seed = random_seed
        if random_seed is not None and self.num_patches is None:
            raise ValueError("random test-time orders need the grid: pass orders")
        self._order = self._order_flip = None
        if orders is not None:
            self._order, self._order_flip = self._preload(orders, self._rows)
        elif order_tables is not None:  # another order of every image, e.g. PSS's token norm
            self._order, self._order_flip = (np.asarray(t) for t in order_tables)
            if self._order.shape[0] != len(images) or self._order_flip.shape != self._order.shape:
                raise ValueError(f"order tables {self._order.shape} / {self._order_flip.shape} do "
                                 f"not cover the {len(images)} images")

    @staticmethod
    def _preload(orders: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every image's order and flipped order in memory (``CollapseOrders.order_table``)."""
        return orders.order_table()[rows], orders.order_table(flip=True)[rows]

    def image_orders(self) -> np.ndarray:
        """Every image's collapse order (rank 0 first), [n, N] in image order: what another
        image's order is drawn from at evaluation."""
        if self._order is None:
            raise ValueError("this dataset was built without orders")
        return self._order

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {
            # PIL hands out read-only arrays; torch wants its own writable copy
            "image": torch.from_numpy(self.images.image(i).copy()),  # uint8 [H, W, 3]
            "label": int(self.images.labels[i]),
            "index": int(i),
        }
        if self._order is not None:
            item["order"] = torch.from_numpy(self._order[i].astype(np.int64))  # [N]
            item["order_flip"] = torch.from_numpy(self._order_flip[i].astype(np.int64))
        if self.random_seed is not None:
            item["random_order"] = random_order(i, self.num_patches, self.random_seed)
        return item


# ----------------------------------------------------------------------------- training


class CvitTask(TrainTask):
    """Cross-entropy on images with a step-wise mask ratio and the variant's drop policy."""

    def __init__(self, model: VisionTransformer, variant: str, max_mask_ratio: float,
                 orders_tokenizer: str, extra_config: dict[str, Any] | None = None) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown CViT variant {variant!r} (choose from {', '.join(VARIANTS)})")
        self.model = model
        self.variant = variant
        self.drop = TRAIN_DROP[variant]
        self.max_mask_ratio = max_mask_ratio
        self.orders_tokenizer = orders_tokenizer
        self.extra_config = dict(extra_config or {})

    def config(self) -> dict[str, Any]:
        return {
            "kind": TASK_KIND, "variant": self.variant, "drop": self.drop,
            "arch": self.model.arch.to_dict(),
            "mask_schedule": "cosine", "max_mask_ratio": self.max_mask_ratio,
            "orders_tokenizer": self.orders_tokenizer, **self.extra_config,
        }

    def draw_ratio(self, ctx: StepContext) -> float:
        """This step's mask ratio: one draw from the step's generator, identical on every rank
        (drawn first, before any per-row draw, so its place in the stream is fixed)."""
        if self.drop == "none":
            return 0.0
        u = ctx.uniform()
        return float(cosine_mask_ratio(u, self.max_mask_ratio))

    def loss(self, model: nn.Module, batch: dict[str, Tensor], ctx: StepContext
             ) -> tuple[Tensor, dict[str, Any]]:
        ratio = self.draw_ratio(ctx)
        x = images_to_input(batch["image"])  # [b, 3, H, W]
        labels = batch["label"]
        N = self.model.num_patches
        flip = ctx.rand() < 0.5  # [b]; a horizontal flip per image
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        k = num_keep(ratio, N)
        keep: Tensor | None = None
        if self.drop in ("collapse", "token_l1"):
            order = torch.where(flip[:, None], batch["order_flip"], batch["order"])  # [b, N]
            keep = keep_first(order, k)
        elif self.drop == "random":
            keep = keep_first(ctx.randperm(N), k)
        logits = model(x, keep)  # [b, C]
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {"acc": acc.detach(), "mask_ratio": ratio, "kept": float(k)}


# ----------------------------------------------------------------------------- saved models


def vit_arch(params: Params, crop_size: int, grid: int, num_classes: int) -> VitArch:
    """The ViT of ``cvit.model.dim/depth/heads/mlp_ratio`` on the latent grid."""
    cfg = params.cvit.model
    return VitArch.for_grid(crop_size, grid, num_classes, dim=cfg.dim, depth=cfg.depth,
                            heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, stem=cfg.stem,
                            stem_width=cfg.stem_width)


def published_record(params: Params) -> dict[str, Any]:
    """What pretrain_vit writes instead of training when ``cvit.model.pretrained`` is set."""
    path = params.cvit.model.pretrained
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"cvit.model.pretrained: published ViT weights not found: {path}")
    return {"kind": PRETRAIN_KIND, "published": str(path), "sha256": sha256_file(path),
            "note": "cvit.model.pretrained is set: the published weights are the pretrained ViT; "
                    "pretrain_vit trained nothing"}


def start_weights(model: VisionTransformer, pretrain_dir: str | Path, params: Params) -> dict[str, Any]:
    """Load the weights a variant starts from into ``model`` (in place); say what was loaded.

    ``pretrain_dir`` (``data/pretrain_vit``) holds either a trained ViT (its architecture
    must be the model's: same width, depth, grid and classes, the head included) or the
    record that the published weights (``cvit.model.pretrained``) stand in for it; those load
    through :func:`pipeline.models.vit.load_pretrained` (pos_embed resized, a head for
    another class count re-initialised from the current RNG, i.e. from the run's seed).
    """
    pretrain_dir = Path(pretrain_dir)
    record = pretrain_dir / PUBLISHED_RECORD
    if record.exists():
        rec = read_json(record)
        want = params.cvit.model.pretrained
        if not want or Path(rec["published"]) != Path(want):
            raise ValueError(f"{pretrain_dir} records the published weights {rec['published']}, "
                             f"but cvit.model.pretrained is {want!r}: re-run pretrain_vit")
        if sha256_file(want) != rec["sha256"]:
            raise ValueError(f"{want} changed since pretrain_vit recorded it: re-run pretrain_vit")
        report = load_pretrained(model, want, allow_missing_keys=params.cvit.allow_missing_keys)
        return {"start": "published", "pretrained": str(want), "pretrained_sha256": rec["sha256"],
                "loaded": len(report.loaded), "missing": report.missing,
                "unexpected": report.unexpected, "dropped": report.dropped,
                "reinitialized": report.reinitialized, "pos_embed_resized": report.pos_embed_resized,
                "summary": report.summary()}
    if params.cvit.model.pretrained:
        raise ValueError(f"cvit.model.pretrained is set but {pretrain_dir} holds a ViT trained here: "
                         "re-run pretrain_vit")
    run = load_run(pretrain_dir, "auto")
    task = run.task
    if task.get("kind") != PRETRAIN_KIND:
        raise ValueError(f"{pretrain_dir} does not hold a pretrained ViT (task kind {task.get('kind')!r})")
    theirs = VitArch.from_dict(task["arch"])
    if theirs != model.arch:
        diff = {k: (v, getattr(model.arch, k)) for k, v in theirs.to_dict().items()
                if getattr(model.arch, k) != v}
        raise ValueError(f"the pretrained ViT in {pretrain_dir} has another architecture than "
                         f"this model (pretrained, here): {diff}; re-run pretrain_vit")
    model.load_state_dict(run.state)
    weights = pretrain_dir / run.weights.name
    return {"start": "pretrain_vit", "pretrained": str(weights),
            "pretrained_sha256": sha256_file(weights)}


def freeze_stem(model: VisionTransformer) -> None:
    """Keep the loaded stem as it is (the trainer optimises only what needs grad): a conv
    stem's convolutions (the judge's layers; the projection to the width still learns), or
    the whole linear patch embedding (published weights)."""
    stem = model.patch_embed
    (stem.convs if isinstance(stem, PatchConvEmbed) else stem).requires_grad_(False)


def token_l1_orders(store: Any, keys: list[str], flips: tuple[bool, ...] = (False,),
                    chunk: int = 1024) -> tuple[np.ndarray, ...]:
    """One table per entry of ``flips`` (False: the image, True: its horizontal flip), each
    [len(keys), N] in the shards' order dtype (uint8 for N <= 256, as ``order_table``: an
    ImageNet train split's table is 0.33 GB, not 2.6 GB of int64): each image's tokens by
    descending L1 norm (PSS's order). Read from the latent ``store`` a chunk of keys at a time,
    every flip in the same read (a Zarr chunk holds both), so a split never sits in memory as
    latents and is decompressed once."""
    row_of = {k: i for i, k in enumerate(store.keys)}
    missing = [k for k in keys if k not in row_of]
    if missing:
        raise ValueError(f"{len(missing)} images have no latents in {getattr(store, 'path', store)} "
                         f"(first: {missing[0]}): re-run extract_latents")
    rows = np.asarray([row_of[k] for k in keys], dtype=np.int64)
    dtype = order_dtype(store.num_tokens)
    out: list[list[np.ndarray]] = [[] for _ in flips]
    for s in range(0, len(rows), chunk):
        r = rows[s:s + chunk]
        grids = store.tokens(np.tile(r, len(flips)), flip=np.repeat(np.asarray(flips, bool), len(r)))
        ranked = collapse_order(token_l1_scores(grids.flatten(2).transpose(1, 2).numpy())).astype(dtype)
        for f, part in enumerate(np.split(ranked, len(flips))):
            out[f].append(part)
    return tuple(np.concatenate(o) if o else np.zeros((0, store.num_tokens), dtype) for o in out)


def run_name(variant: str, seed: int) -> str:
    """A fine-tuning run's folder and file stem: ``cvit_s1`` (data/cvit/cvit_s1,
    data/metrics/cvit_train_cvit_s1.json); dvc.yaml's train_cvit matrix spells the same."""
    return f"{variant}_s{seed}"


def run_params(params: Params, seed: int) -> Params:
    """``params`` with ``seed`` deciding the whole fine-tuning run: the root seed (initial
    weights not loaded from pretraining, e.g. a re-initialised head) and ``cvit.train.seed``
    (data order, flips, drop ratios, random drops). Before, ``-S seed=1`` changed only the
    initial weights and left the trainer's stream at ``cvit.train.seed``."""
    train = params.cvit.train.model_copy(update={"seed": seed})
    return params.model_copy(update={"seed": seed,
                                     "cvit": params.cvit.model_copy(update={"train": train})})


def build_vit(params: Params, crop_size: int, grid: int, num_classes: int,
              pretrain_dir: str | Path) -> tuple[VisionTransformer, dict[str, Any]]:
    """A variant's ViT on the latent grid, started from ``pretrain_dir`` (data/pretrain_vit:
    the ViT pretrained here, or the published weights it records); returns the model and
    what was loaded into it. The RNG is seeded from ``params.seed`` first, so whatever the
    start leaves initialised (a head for another class count) follows the run's seed."""
    torch.manual_seed(params.seed)
    model = VisionTransformer(vit_arch(params, crop_size, grid, num_classes))
    info = start_weights(model, pretrain_dir, params)
    if params.cvit.model.freeze_stem:
        freeze_stem(model)
    info["frozen_stem"] = params.cvit.model.freeze_stem
    print(f"[cvit] starts from {info['start']} weights {info['pretrained']}"
          + (f": {info['summary']}" if info.get("summary") else ""), flush=True)
    return model, info


def load_cvit(directory: str | Path, prefer_ema: bool = True) -> tuple[VisionTransformer, dict[str, Any]]:
    """A trained variant from ``data/cvit/<variant>`` (read by :func:`load_trained`).

    The EMA weights are used when the run kept them (the paper evaluates its EMA model).
    """
    model, run = load_trained(directory, lambda task: VisionTransformer(VitArch.from_dict(task["arch"])),
                              kind=TASK_KIND, weights="auto" if prefer_ema else "model")
    return model, {**run.meta, "weights": run.weights.name}


__all__ = [
    "CvitImageDataset", "CvitTask", "OrdersMismatchError", "PRETRAIN_KIND", "PUBLISHED_RECORD",
    "ROWS", "TRAIN_DROP", "VARIANTS", "build_vit", "check_orders_match_images", "freeze_stem",
    "cosine_mask_ratio", "keep_first", "load_cvit", "num_keep",
    "orders_tokenizer_fingerprint", "published_record", "random_order", "run_name", "run_params",
    "start_weights", "token_l1_orders", "vit_arch",
]
