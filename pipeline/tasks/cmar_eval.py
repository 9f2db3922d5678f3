"""CMAR evaluation: what ``eval_cmar`` checks before sampling, writes, and measures.

Metrics of generated images (uint8 [n, H, W, 3], ``labels`` the classes they were
conditioned on):
- always, without downloads, in the feature space of the project's CViT "vit" variant
  (pre-logit [cls] features) against real val images: ``frechet_cvit_distance`` (a Fréchet
  distance, NOT an FID), ``cvit_precision`` / ``cvit_recall`` (k-NN manifolds, k = 3) and
  ``cvit_accuracy`` (does the classifier find the conditioning class; ``cvit_accuracy_real``
  is its val accuracy, the ceiling);
- with ``cmar.inception_weights`` (the FID Inception): ``fid`` and ``is_mean``/``is_std``,
  against ``cmar.reference_batch`` (ADM's .npz: its mu/sigma for FID, its images for
  ``precision``/``recall``), else against the real val images (then named ``fid_val``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import CmarConfig
from pipeline.metrics.fid import (feature_stats, frechet_distance, inception_features,
                                  inception_score, precision_recall, read_reference_batch)
from pipeline.models.mar import MAR
from pipeline.models.vit import VisionTransformer
from pipeline.tasks.cvit_eval import vit_features
from pipeline.utils.images import image_grid, safe_name, save_png

GRID_COLS = 8


def check_eval_inputs(cfg: CmarConfig, model: MAR, classes: list[str], orders: Any) -> None:
    """Bad input stops here, before any sampling."""
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


def write_samples(out_dir: Path, overview: Path, images: np.ndarray, labels: np.ndarray,
                  classes: list[str], per_class: int) -> None:
    """``out_dir/<c>_<name>/NNNN.png``, one grid per class, and an all-class grid ``overview``."""
    for c, name in enumerate(classes):
        sel = images[labels == c]
        for j, img in enumerate(sel):
            save_png(out_dir / f"{c:03d}_{safe_name(name)}" / f"{j:04d}.png", img)
        save_png(out_dir / f"grid_{c:03d}_{safe_name(name)}.png", image_grid(sel, GRID_COLS))
    cols = min(GRID_COLS, per_class)
    save_png(overview, image_grid(np.concatenate([images[labels == c][:cols]
                                                  for c in range(len(classes))]), cols))


def reference_rows(n: int, limit: int | None) -> np.ndarray:
    """Val rows used as the real reference: all, or ``limit`` spread evenly over the classes."""
    k = n if limit is None else min(n, limit)
    return np.linspace(0, n - 1, k).round().astype(int) if k else np.zeros(0, int)


def cvit_space_metrics(cfg: CmarConfig, images: np.ndarray, labels: np.ndarray, real: np.ndarray,
                       real_labels: np.ndarray, vit: VisionTransformer) -> dict[str, Any]:
    """Generated ``images`` against ``real`` ones in the CViT's feature space (no downloads)."""
    f_fake, lg_fake = vit_features(vit, images, cfg.eval_batch_size)
    f_real, lg_real = vit_features(vit, real, cfg.eval_batch_size)
    precision, recall = precision_recall(f_real, f_fake, k=3)
    return {
        "frechet_cvit_distance": frechet_distance(*feature_stats(f_real), *feature_stats(f_fake)),
        "cvit_precision": precision,
        "cvit_recall": recall,
        "cvit_accuracy": float((lg_fake.argmax(1) == labels).mean()),
        "cvit_accuracy_real": float((lg_real.argmax(1) == real_labels).mean()),
        "num_samples": int(len(images)),
        "num_reference": int(len(real)),
    }


def inception_metrics(cfg: CmarConfig, images: np.ndarray, real: np.ndarray,
                      device: torch.device) -> dict[str, Any]:
    """FID / IS / precision / recall with the FID Inception; empty without its weights."""
    if not cfg.inception_weights:
        return {}
    from pipeline.models.inception import load_fid_inception

    metrics: dict[str, Any] = {}
    net = load_fid_inception(cfg.inception_weights, device)
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
    return metrics


__all__ = ["GRID_COLS", "check_eval_inputs", "cvit_space_metrics", "inception_metrics", "reference_rows",
           "write_samples"]
