"""Stage ``eval_cmar``: sample (C)MAR in the configured order, decode, score.

For every class, ``cmar.samples_per_class`` images are generated in ``cmar.sample_order``
(class-level collapse order, a training image's order, or random), revealed in the trained
``cmar.direction``, with CFG ``cmar.cfg`` / temperature ``cmar.temperature``, decoded by the
tokenizer and written to ``data/cmar_samples/<class>/NNNN.png`` plus one grid per class
(``data/cmar_samples/grid_<class>.png``) and an all-class grid ``data/plots/cmar_samples.png``.

Metrics (``data/metrics/cmar.json``, what ``dvc exp show`` lists):
- always, without downloads, in the feature space of the project's CViT "vit" variant
  (``data/cvit/vit``: pre-logit [cls] features) against the real val images:
  ``frechet_cvit_distance`` (a Fréchet distance, NOT an FID), ``cvit_precision`` /
  ``cvit_recall`` (k-NN manifolds, k = 3) and ``cvit_accuracy`` (does the classifier find the
  class the sample was conditioned on; ``cvit_accuracy_real`` is its val accuracy, the ceiling);
- with ``cmar.inception_weights`` (the FID Inception): ``fid`` and ``is_mean``/``is_std``;
  against ``cmar.reference_batch`` (ADM's .npz: its mu/sigma for FID, its images for
  ``precision``/``recall``), else against the real val images (then named ``fid_val``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.config import Params, params_dict
from pipeline.data.imageset import ImageSet
from pipeline.latents.store import LatentStore
from pipeline.metrics.fid import (feature_stats, frechet_distance, inception_score,
                                  precision_recall, read_reference_batch)
from pipeline.models.vit import VisionTransformer
from pipeline.orders.shards import CollapseOrders
from pipeline.tasks.cmar import generate, load_cmar, sampling_orders
from pipeline.tasks.cvit import load_cvit
from pipeline.utils.device import pick_device
from pipeline.utils.io import atomic_path, atomic_write_json

GRID_COLS = 8


# ----------------------------------------------------------------------------- features


def to_unit(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float [n, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def cvit_features(vit: VisionTransformer, images_u8: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logit [cls] features [n, D] and logits [n, C] of the ViT on uint8 images."""
    feats, logits = [], []
    dev = next(vit.parameters()).device
    for s in range(0, len(images_u8), batch):
        x = to_unit(images_u8[s:s + batch]).to(dev) * 2 - 1  # the ViT reads [-1, 1]
        h = vit.norm(vit.blocks(vit.embed(x)))[:, 0]
        feats.append(h.float().cpu())
        logits.append(vit.head(h).float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


@torch.no_grad()
def inception_features(net: torch.nn.Module, images_u8: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    pools, logits = [], []
    dev = next(net.parameters()).device
    for s in range(0, len(images_u8), batch):
        p, lg = net(to_unit(images_u8[s:s + batch]).to(dev))
        pools.append(p.cpu())
        logits.append(lg.cpu())
    return torch.cat(pools).double().numpy(), torch.cat(logits).double().numpy()


# ----------------------------------------------------------------------------- images


def decode(tokenizer: Any, grids: torch.Tensor, scale_factor: float, batch: int,
           dev: torch.device) -> np.ndarray:
    """Scaled token grids [n, D, h, w] -> uint8 images [n, H, W, 3] (tokenizer on ``dev``)."""
    out = []
    with torch.no_grad():
        for s in range(0, len(grids), batch):
            x = tokenizer.decode(grids[s:s + batch].to(dev) / scale_factor)  # [-1, 1]
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out.append(x.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def image_grid(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """uint8 [n, H, W, 3] -> one uint8 image, ``cols`` per row, white padding."""
    n, H, W, _ = images.shape
    rows = max(1, math.ceil(n / cols))
    canvas = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return canvas


def save_png(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _tokenizer(params: Params, data_dir: Path, device: torch.device) -> Any:
    from pipeline.tokenizers import build_tokenizer, load_tokenizer

    if params.tokenizer.kind == "patch":
        return load_tokenizer(data_dir / "latents" / "tokenizer", "fp32", device=device)
    return build_tokenizer(params.tokenizer, device=device)


# ----------------------------------------------------------------------------- stage


def run(params: Params, data_dir: Path | str = Path("data")) -> None:
    data_dir = Path(data_dir)
    cfg = params.cmar
    torch.manual_seed(params.seed)
    store = LatentStore(data_dir / "latents" / "train.zarr")
    orders = CollapseOrders(data_dir / "orders" / "train")
    dev = pick_device()
    model, arch = load_cmar(data_dir / "cmar", cfg)
    model.to(dev)

    # ---- bad input, before any sampling
    classes = list(store.classes)
    if len(classes) > model.num_classes:
        raise ValueError(f"{len(classes)} classes in the data, the model embeds {model.num_classes}")
    if orders.grid != model.grid:
        raise ValueError(f"orders are for a {orders.grid}x{orders.grid} grid, the model has "
                         f"{model.grid}x{model.grid}")
    if cfg.sample_order == "class" and orders.class_orders is None:
        raise ValueError(f"{orders.path} has no class-level orders (class_orders.npy)")
    if cfg.num_iter > model.seq_len:
        raise ValueError(f"cmar.num_iter={cfg.num_iter} exceeds the {model.seq_len} tokens of a "
                         f"{model.grid}x{model.grid} grid (each step reveals at least one)")
    if cfg.inception_weights and not Path(cfg.inception_weights).is_file():
        raise FileNotFoundError(f"cmar.inception_weights {cfg.inception_weights} not found")
    if cfg.reference_batch and not Path(cfg.reference_batch).is_file():
        raise FileNotFoundError(f"cmar.reference_batch {cfg.reference_batch} not found")
    vit, _ = load_cvit(data_dir / "cvit" / "vit")
    vit.to(dev)
    val = ImageSet(data_dir / "images" / "val")
    if vit.arch.img_size != val.crop_size or vit.arch.num_classes != len(classes):
        raise ValueError(f"data/cvit/vit takes {vit.arch.img_size}px images of {vit.arch.num_classes} "
                         f"classes; the data has {val.crop_size}px images of {len(classes)} classes")
    tokenizer = _tokenizer(params, data_dir, dev)

    # ---- sample
    labels = np.repeat(np.arange(len(classes)), cfg.samples_per_class)
    gen = torch.Generator().manual_seed(params.seed)
    mar_orders = sampling_orders(cfg.sample_order, labels, model.seq_len, arch["cmar"]["direction"], gen,
                                 class_orders=orders.class_orders, train_labels=orders.labels,
                                 train_order=orders.order)
    t0 = time.perf_counter()
    grids = generate(model, labels, mar_orders, cfg.num_iter, cfg.cfg, cfg.cfg_schedule,
                     cfg.temperature, gen, cfg.eval_batch_size)
    sample_s = time.perf_counter() - t0
    images = decode(tokenizer, grids, store.scale_factor, cfg.eval_batch_size, dev)

    out_dir = data_dir / "cmar_samples"
    for c, name in enumerate(classes):
        sel = images[labels == c]
        for j, img in enumerate(sel):
            save_png(out_dir / f"{c:03d}_{safe_name(name)}" / f"{j:04d}.png", img)
        save_png(out_dir / f"grid_{c:03d}_{safe_name(name)}.png", image_grid(sel, GRID_COLS))
    per_class = min(GRID_COLS, cfg.samples_per_class)
    overview = np.concatenate([images[labels == c][:per_class] for c in range(len(classes))])
    save_png(data_dir / "plots" / "cmar_samples.png", image_grid(overview, per_class))

    # ---- metrics in the CViT's feature space (no downloads)
    n_ref = len(val) if cfg.eval_reference_images is None else min(len(val), cfg.eval_reference_images)
    ref_rows = np.linspace(0, len(val) - 1, n_ref).round().astype(int) if n_ref else np.zeros(0, int)
    real = np.stack([val.image(int(i)) for i in ref_rows])
    real_labels = val.labels[ref_rows]
    f_fake, lg_fake = cvit_features(vit, images, cfg.eval_batch_size)
    f_real, lg_real = cvit_features(vit, real, cfg.eval_batch_size)
    precision, recall = precision_recall(f_real, f_fake, k=3)
    metrics: dict[str, Any] = {
        "frechet_cvit_distance": frechet_distance(*feature_stats(f_real), *feature_stats(f_fake)),
        "cvit_precision": precision,
        "cvit_recall": recall,
        "cvit_accuracy": float((lg_fake.argmax(1) == labels).mean()),
        "cvit_accuracy_real": float((lg_real.argmax(1) == real_labels).mean()),
        "num_samples": int(len(images)),
        "num_reference": int(len(real)),
        "sampling_s_per_image": sample_s / max(len(images), 1),
    }

    # ---- FID / IS with the FID Inception (only when its weights are given)
    if cfg.inception_weights:
        from pipeline.models.inception import load_fid_inception

        net = load_fid_inception(cfg.inception_weights, dev)
        p_fake, l_fake = inception_features(net, images, cfg.eval_batch_size)
        metrics["is_mean"], metrics["is_std"] = inception_score(l_fake)
        mu_f, s_f = feature_stats(p_fake)
        if cfg.reference_batch:
            ref = read_reference_batch(cfg.reference_batch)
            p_ref = inception_features(net, ref.images, cfg.eval_batch_size)[0] if ref.images is not None else None
            mu_r, s_r = (ref.mu, ref.sigma) if ref.mu is not None else feature_stats(p_ref)
            metrics["fid"] = frechet_distance(mu_r, s_r, mu_f, s_f)
            if p_ref is not None:
                metrics["precision"], metrics["recall"] = precision_recall(p_ref, p_fake, k=3)
        else:
            p_real = inception_features(net, real, cfg.eval_batch_size)[0]
            metrics["fid_val"] = frechet_distance(*feature_stats(p_real), mu_f, s_f)
            metrics["precision"], metrics["recall"] = precision_recall(p_real, p_fake, k=3)

    atomic_write_json(data_dir / "metrics" / "cmar.json", metrics)
    atomic_write_json(out_dir / "report.json", {
        "metrics": metrics, "params": params_dict(cfg), "model": arch, "classes": classes,
        "feature_space": "CViT 'vit' variant pre-logit [cls] features (data/cvit/vit); "
                         "frechet_cvit_distance is not an FID"})
    print(f"[eval_cmar] {len(images)} samples; " + ", ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)), flush=True)


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("eval-cmar")
