"""CMAR evaluation: what ``eval_cmar`` checks before sampling, writes, and measures.

Rows: :data:`COMPARISONS` (which model, sampled in which order); each is scored, like the
controls, in the judge's feature space by :func:`pipeline.metrics.generation.score_images`.
Also:
- with ``cmar.sample.inception_weights`` (the FID Inception): ``fid`` and ``is_mean``/``is_std``,
  against ``cmar.sample.reference_batch`` (ADM's .npz: its mu/sigma for FID, its images for
  ``precision``/``recall``), else against the real val images (then named ``fid_val``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import CmarSampleConfig
from pipeline.metrics.fid import (feature_stats, frechet_distance, inception_features,
                                  inception_score, precision_recall, read_reference_batch)
from pipeline.models.mar import MAR
from pipeline.tasks.cmar import generate, sampling_orders
from pipeline.tokenizers import decode_to_images
from pipeline.utils.images import image_grid
from pipeline.utils.io import atomic_path

# (row, trained variant, sample order): Tab. 2 (CMAR vs MAR, MAR+C), the order at sampling,
# Tab. 4 (ascending).
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("CMAR, class order", "cmar", "class"),
    ("CMAR, a training image's order", "cmar", "train_image"),
    ("CMAR, random order", "cmar", "random"),
    ("MAR, random order", "mar", "random"),
    ("MAR, class order (MAR+C)", "mar", "class"),
    ("CMAR ascending, class order", "cmar_asc", "class"),
)


def check_eval_inputs(cfg: CmarSampleConfig, model: MAR, classes: list[str], orders: Any) -> None:
    """Bad input stops here, before any sampling."""
    if len(classes) > model.num_classes:
        raise ValueError(f"{len(classes)} classes in the data, the model embeds {model.num_classes}")
    if orders.grid != model.grid:
        raise ValueError(f"orders are for a {orders.grid}x{orders.grid} grid, the model has "
                         f"{model.grid}x{model.grid}")
    if orders.class_orders is None:
        raise ValueError(f"{orders.path} has no class-level orders (class_orders.npy)")
    if cfg.num_iter > model.seq_len:
        raise ValueError(f"cmar.sample.num_iter={cfg.num_iter} exceeds the {model.seq_len} tokens of a "
                         f"{model.grid}x{model.grid} grid (each step reveals at least one)")
    if cfg.inception_weights and not Path(cfg.inception_weights).is_file():
        raise FileNotFoundError(f"cmar.sample.inception_weights {cfg.inception_weights} not found")
    if cfg.reference_batch and not Path(cfg.reference_batch).is_file():
        raise FileNotFoundError(f"cmar.sample.reference_batch {cfg.reference_batch} not found")


def split_val(labels: np.ndarray, num_classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Val rows -> (reference rows, control rows): within each class, alternate rows go to
    the reference (the set distances are measured to) and to the controls, of which the
    first ``per_class`` are scored, so a control row never contains a reference image."""
    ref, ctl = [], []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        ref.append(rows[0::2])
        take = rows[1::2][:per_class]
        if len(take) < per_class:
            raise ValueError(f"class {c} has {len(rows)} val images; the controls need "
                             f"2 x cmar.sample.samples_per_class = {2 * per_class}")
        ctl.append(take)
    return np.concatenate(ref), np.concatenate(ctl)


def sample_row(model: MAR, cfg: CmarSampleConfig, direction: str, order: str, labels: np.ndarray,
               orders: Any, tokenizer: Any, scale_factor: float, seed: int,
               device: torch.device) -> np.ndarray:
    """uint8 samples [n, H, W, 3] of ``labels`` generated in ``order`` (one seeded stream per
    row, so rows do not depend on which others run)."""
    gen = torch.Generator().manual_seed(seed)
    mar_orders = sampling_orders(order, labels, model.seq_len, direction, gen,
                                 class_orders=orders.class_orders, train_labels=orders.labels,
                                 train_order=orders.order)
    grids = generate(model, labels, mar_orders, cfg.num_iter, cfg.cfg, cfg.cfg_schedule,
                     cfg.temperature, gen, cfg.eval_batch_size)
    return decode_to_images(tokenizer, grids, scale_factor, cfg.eval_batch_size, device)


SHORT = {"real val images": "real", "real val latents, decoded": "decoded",
         "real val tokens, shuffled": "shuffled"}


def headline(rows: dict[str, dict[str, Any]], head: str) -> dict[str, Any]:
    """Flat figures for `dvc metrics show` (13): judge accuracy and neighbour correlation of
    the headline CMAR row, MAR in random order and the three controls; the Fréchet distance
    of CMAR, MAR and the shuffled-token control."""
    picks = {"CMAR": rows[head], "MAR": rows["MAR, random order"],
             **{SHORT[k]: rows[k] for k in SHORT if k in rows}}
    out = {f"{key}_{name}": r[key] for name, r in picks.items() for key in ("judge_acc", "neighbour_corr")}
    out.update({f"fd_{name}": picks[name]["fd"] for name in ("CMAR", "MAR", "shuffled") if name in picks})
    return out


def format_rows(rows: dict[str, dict[str, Any]], chance: float) -> str:
    lines = [f"{'row':34s} {'judge acc [95% CI]':>24s} {'FD [95% CI]':>24s} {'prec':>5s} {'rec':>5s} "
             f"{'nbr corr [95% CI]':>22s}"]
    for name, r in rows.items():
        a, f, c = r["judge_acc_ci"], r["fd_ci"], r["neighbour_corr_ci"]
        lines.append(f"{name:34s} {r['judge_acc']:6.3f} [{a[0]:.3f}, {a[1]:.3f}]   "
                     f"{r['fd']:7.2f} [{f[0]:.2f}, {f[1]:.2f}]  {r['precision']:5.2f} {r['recall']:5.2f} "
                     f"{r['neighbour_corr']:6.3f} [{c[0]:.3f}, {c[1]:.3f}]")
    lines.append(f"(judge accuracy by chance: {chance:.3f}; FD to the reference half of val)")
    return "\n".join(lines)


def plot_samples(path: Path, real: np.ndarray, real_labels: np.ndarray, samples: dict[str, np.ndarray],
                 labels: np.ndarray, classes: list[str], per_class: int = 4) -> None:
    """One row per class: real val images, then ``per_class`` samples of every row, each
    block titled, so samples are seen beside what they should look like."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = {"real val images": (real, real_labels), **{k: (v, labels) for k, v in samples.items()}}
    fig, axes = plt.subplots(len(classes), len(blocks), figsize=(1.9 * len(blocks), 0.55 * len(classes) + 0.6),
                             dpi=150, squeeze=False)
    for col, (name, (imgs, labs)) in enumerate(blocks.items()):
        for c in range(len(classes)):
            ax = axes[c, col]
            ax.imshow(image_grid(imgs[labs == c][:per_class], per_class))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(name.replace(", ", ",\n"), fontsize=6)
            if col == 0:
                ax.set_ylabel(classes[c], fontsize=5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def inception_metrics(cfg: CmarSampleConfig, images: np.ndarray, real: np.ndarray,
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


__all__ = ["COMPARISONS", "check_eval_inputs", "format_rows", "headline", "inception_metrics",
           "plot_samples", "sample_row", "split_val"]
