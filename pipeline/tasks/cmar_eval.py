"""CMAR evaluation: what ``eval_cmar`` checks before sampling, writes, and measures.

Rows: :data:`COMPARISONS` (which model, sampled in which order); each is scored, like the
controls, in the judge's feature space by :func:`pipeline.metrics.generation.score_features`.
Also, with ``cmar.sample.inception_weights`` (the FID Inception), for every row and control:
``fid`` and ``is_mean``/``is_std``, against ``cmar.sample.reference_batch`` (ADM's .npz: its
mu/sigma for FID, its images for ``inception_precision``/``inception_recall``), else against the
real val images (then named ``fid_val``).

Rows are streamed: samples are generated, decoded and measured a batch at a time
(:func:`measure`), so memory holds features, not the 50,000 images per row of the paper's FID;
pictures keep a few per class (:data:`PICTURE_CLASSES` x :data:`PICTURE_PER_CLASS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from pipeline.config import CmarSampleConfig
from pipeline.metrics.fid import (feature_stats, frechet_distance, inception_features,
                                  inception_score, precision_recall, read_reference_batch)
from pipeline.metrics.collapse import collapse_curves, curve_area, reveal_grid
from pipeline.metrics.generation import patch_means
from pipeline.metrics.intervals import resample_weights
from pipeline.models.mar import MAR
from pipeline.tasks.cmar import generate, sampling_orders
from pipeline.tasks.judge import judge_outputs
from pipeline.tokenizers import decode_to_images
from pipeline.utils.device import autocast
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
    if len(classes) * cfg.samples_per_class <= PR_NEIGHBOURS:
        raise ValueError(f"cmar.sample.samples_per_class={cfg.samples_per_class} x {len(classes)} classes "
                         f"gives {len(classes) * cfg.samples_per_class} samples a row; precision/recall "
                         f"need more than {PR_NEIGHBOURS}")
    if cfg.inception_weights and not Path(cfg.inception_weights).is_file():
        raise FileNotFoundError(f"cmar.sample.inception_weights {cfg.inception_weights} not found")
    if cfg.reference_batch and not Path(cfg.reference_batch).is_file():
        raise FileNotFoundError(f"cmar.sample.reference_batch {cfg.reference_batch} not found")


def split_val(labels: np.ndarray, num_classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Val rows -> (reference rows, control rows): within each class, alternate rows go to
    the reference (the set judge distances are measured to) and to the controls, of which at
    most ``per_class`` are scored, so a control row never contains a reference image. A class
    with fewer than 2 x ``per_class`` images (ImageNet: 50 val images, 50 samples per class)
    gives the controls what it has; only a class without two images is an error."""
    ref, ctl = [], []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            raise ValueError(f"class {c} has {len(rows)} val image(s); the reference and the "
                             "controls need at least one each")
        ref.append(rows[0::2])
        ctl.append(rows[1::2][:per_class])
    ref_rows, ctl_rows = np.concatenate(ref), np.concatenate(ctl)
    if min(len(ref_rows), len(ctl_rows)) <= PR_NEIGHBOURS:
        raise ValueError(f"{len(ref_rows)} reference and {len(ctl_rows)} control val images; "
                         f"precision/recall need more than {PR_NEIGHBOURS} of each")
    return ref_rows, ctl_rows


PR_NEIGHBOURS = 3  # k of the k-NN manifolds of precision/recall (Kynkäänniemi et al.)
# What a row keeps as pictures: a 50,000-sample row is ~10 GB of pixels, and nobody looks at more.
PICTURE_CLASSES, PICTURE_PER_CLASS = 16, 8


@dataclass
class Measured:
    """What a row keeps of its images (never the images): the judge's features and logits,
    patch means, the FID Inception's pool features and logits (None without its weights), and
    up to :data:`PICTURE_PER_CLASS` pictures of each of the first :data:`PICTURE_CLASSES` classes."""

    labels: np.ndarray
    feats: np.ndarray
    logits: np.ndarray
    means: np.ndarray
    pool: np.ndarray | None
    inc_logits: np.ndarray | None
    pictures: np.ndarray
    picture_labels: np.ndarray


def measure(batches: Iterable[np.ndarray], labels: np.ndarray, judge: Any, inception: Any,
            grid: int, batch: int) -> Measured:
    """Stream uint8 image batches [b, H, W, 3] (in ``labels`` order) through the judge and the
    Inception; memory holds per-image features, not pixels."""
    labels = np.asarray(labels)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("feats", "logits", "means", "pool", "inc")}
    pics, pic_labels, seen = [], [], np.zeros(PICTURE_CLASSES, np.int64)
    done = 0
    for imgs in batches:
        lab = labels[done:done + len(imgs)]
        done += len(imgs)
        f, lg = judge_outputs(judge, imgs)
        parts["feats"].append(f)
        parts["logits"].append(lg)
        parts["means"].append(patch_means(imgs, grid))
        if inception is not None:
            p, il = inception_features(inception, imgs, batch)
            parts["pool"].append(p)
            parts["inc"].append(il)
        for img, c in zip(imgs, lab):
            if c < PICTURE_CLASSES and seen[c] < PICTURE_PER_CLASS:
                seen[c] += 1
                pics.append(img)
                pic_labels.append(c)
    if done != len(labels):
        raise RuntimeError(f"measured {done} images for {len(labels)} labels")
    cat = {k: np.concatenate(v) if v else None for k, v in parts.items()}
    return Measured(labels, cat["feats"], cat["logits"], cat["means"], cat["pool"], cat["inc"],
                    np.stack(pics) if pics else np.zeros((0, 1, 1, 3), np.uint8), np.asarray(pic_labels))


def in_batches(images: Any, rows: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """uint8 batches of ``images.image(i)`` for ``rows`` (an image set read a batch at a time)."""
    for s in range(0, len(rows), batch):
        yield np.stack([images.image(int(i)) for i in rows[s:s + batch]])


def decoded_batches(tokenizer: Any, tokens: Any, rows: np.ndarray, scale_factor: float, batch: int,
                    device: torch.device) -> Iterator[np.ndarray]:
    """uint8 batches of ``tokens(rows)`` (scaled grids) decoded by the tokenizer."""
    for s in range(0, len(rows), batch):
        yield decode_to_images(tokenizer, torch.as_tensor(tokens(rows[s:s + batch])), scale_factor,
                               batch, device)


def sample_batches(model: MAR, cfg: CmarSampleConfig, direction: str, order: str, labels: np.ndarray,
                   orders: Any, tokenizer: Any, scale_factor: float, seed: int,
                   device: torch.device) -> Iterator[np.ndarray]:
    """uint8 samples of ``labels`` generated in ``order``, a batch at a time (one seeded stream
    per row, so rows do not depend on which others run, nor on the batch size of decoding)."""
    gen = torch.Generator().manual_seed(seed)
    mar_orders = sampling_orders(order, labels, model.seq_len, direction, gen,
                                 class_orders=orders.class_orders, train_labels=orders.labels,
                                 train_order=orders.order)
    b = cfg.eval_batch_size
    for s in range(0, len(labels), b):
        with autocast(device, sampling_dtype(device)):
            grids = generate(model, labels[s:s + b], mar_orders[s:s + b], cfg.num_iter, cfg.cfg,
                             cfg.cfg_schedule, cfg.temperature, gen, b)
        yield decode_to_images(tokenizer, grids.float(), scale_factor, b, device)


def sampling_dtype(device: torch.device) -> torch.dtype:
    """bf16 autocast on GPUs that have it (MAR samples under autocast too); fp32 on CPUs, so
    the default run's samples do not depend on which CPU it lands on."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


SHORT = {"real val images": "real", "real val latents, decoded": "decoded",
         "real val tokens, shuffled": "shuffled"}


def headline(rows: dict[str, dict[str, Any]], head: str) -> dict[str, Any]:
    """Flat figures for `dvc metrics show` (at most 14): judge accuracy of the headline CMAR
    row, MAR in random order and the three controls; neighbour correlation of CMAR, MAR and
    real images; the Fréchet distance (judge space) of CMAR, MAR and the shuffled-token
    control; with the Inception, FID (``fid`` or ``fid_val``) of CMAR, MAR and MAR+C (Tab. 2)."""
    picks = {"CMAR": rows[head], "MAR": rows["MAR, random order"],
             **{SHORT[k]: rows[k] for k in SHORT if k in rows}}
    out = {f"judge_acc_{name}": r["judge_acc"] for name, r in picks.items()}
    out.update({f"neighbour_corr_{name}": picks[name]["neighbour_corr"] for name in ("CMAR", "MAR", "real")
                if name in picks})
    out.update({f"fd_{name}": picks[name]["fd"] for name in ("CMAR", "MAR", "shuffled") if name in picks})
    tab2 = {"CMAR": rows[head], "MAR": rows["MAR, random order"], "MARC": rows.get("MAR, class order (MAR+C)", {})}
    for name, r in tab2.items():
        for key in ("fid", "fid_val"):
            if key in r:
                out[f"{key}_{name}"] = r[key]
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


def plot_samples(path: Path, blocks: dict[str, Measured], classes: list[str], per_class: int = 4) -> None:
    """One row per class (the first :data:`PICTURE_CLASSES`): the pictures of every block (real
    val images first, then each sample row), each block titled, so samples are seen beside what
    they should look like."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = classes[:PICTURE_CLASSES]
    fig, axes = plt.subplots(len(shown), len(blocks), figsize=(1.9 * len(blocks), 0.55 * len(shown) + 0.6),
                             dpi=150, squeeze=False)
    for col, (name, m) in enumerate(blocks.items()):
        for c in range(len(shown)):
            ax = axes[c, col]
            ax.imshow(image_grid(m.pictures[m.picture_labels == c][:per_class], per_class))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(name.replace(", ", ",\n"), fontsize=6)
            if col == 0:
                ax.set_ylabel(shown[c], fontsize=5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


@dataclass
class InceptionReference:
    """What FID and precision/recall in Inception space compare against: ADM's reference batch
    (its mu/sigma; its images' pool features for precision/recall) when given, else the real
    val images (the figures are then named ``fid_val``)."""

    name: str
    mu: np.ndarray
    sigma: np.ndarray
    pool: np.ndarray | None


def inception_reference(cfg: CmarSampleConfig, net: Any, real: Measured) -> InceptionReference:
    if cfg.reference_batch:
        ref = read_reference_batch(cfg.reference_batch)
        pool = inception_features(net, ref.images, cfg.eval_batch_size)[0] if ref.images is not None else None
        mu, sigma = (ref.mu, ref.sigma) if ref.mu is not None else feature_stats(pool)
        return InceptionReference("fid", mu, sigma, pool)
    return InceptionReference("fid_val", *feature_stats(real.pool), real.pool)


def inception_metrics(m: Measured, ref: InceptionReference | None) -> dict[str, Any]:
    """FID, IS and precision/recall of one row in the FID Inception's space; {} without it."""
    if ref is None or m.pool is None:
        return {}
    out: dict[str, Any] = {ref.name: frechet_distance(ref.mu, ref.sigma, *feature_stats(m.pool))}
    out["is_mean"], out["is_std"] = inception_score(m.inc_logits)
    if ref.pool is not None:
        pr = precision_recall(ref.pool, m.pool, k=PR_NEIGHBOURS)
        out["inception_precision"], out["inception_recall"] = pr
    return out


# ----------------------------------------------------------------------------- the paper's teaser

# (row, model, the order it generates in): the teaser's question is whether a model
# generating in collapse order leaves less uncertainty in what it has not generated yet
TEASER: tuple[tuple[str, str, str], ...] = (
    ("MAR, random order", "mar", "random"),
    ("MAR, class order (MAR+C)", "mar", "class"),
    ("CMAR, class order", "cmar", "class"),
    ("CMAR ascending, class order", "cmar_asc", "class_ascending"),
)
TEASER_POINTS = 16  # reveal counts 0, N/16, ... (+ 22% and 50%), as score_orders uses
TEASER_DRAWS = 4  # diffusion (t, noise) draws per token: the loss of one draw is noisy


def hidden_loss_fn(mar: MAR, labels: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
    """``fn(tokens [B, N, D], revealed [B, N]) -> [B, N]``: MAR's diffusion loss of every token
    given the revealed ones (its training loss, without the mask), averaged over the fixed
    draws ``t`` [B, draws, N] and ``noise`` [B, draws, N, D] of these B rows (``labels`` [B]).
    The same draws for every order and reveal count, so orders compare on the same noise."""
    draws, N, D = t.shape[1], mar.seq_len, mar.token_embed_dim

    @torch.no_grad()
    def fn(x: torch.Tensor, revealed: torch.Tensor) -> torch.Tensor:
        B = len(x)
        hidden = ~revealed
        # MAR's encoder drops the masked tokens and needs the same count per row: every
        # order hides N - k at reveal count k
        enc = mar.forward_mae_encoder(x, hidden, mar.class_embedding(labels))
        z = mar.forward_mae_decoder(enc, hidden)  # [B, N, Dd]
        zz = z.unsqueeze(1).expand(B, draws, N, z.shape[-1]).reshape(-1, z.shape[-1])
        target = x.unsqueeze(1).expand(B, draws, N, D).reshape(-1, D)
        loss = mar.diffloss.train_diffusion.training_losses(
            mar.diffloss.net, target.float(), t.reshape(-1), noise.reshape(-1, D), c=zz)["loss"]
        return loss.reshape(B, draws, N).mean(1)

    return fn


@torch.no_grad()
def teaser(models: dict[str, MAR], tokens: torch.Tensor, labels: np.ndarray, class_orders: np.ndarray,
           seed: int, resamples: int = 1000, batch: int = 64) -> dict[str, Any]:
    """The paper's teaser with real tokens in place of generated ones: as each model of
    :data:`TEASER` generates in its order, the mean diffusion loss of the tokens not yet
    generated, per reveal count (``curve``) and its mean over the grid (``area``); paired 95%
    bootstrap over images of each row minus MAR in random order. tokens [M, N, D] (scaled as
    the models were trained), labels [M], class_orders [C, N] (collapse rank 0 first)."""
    M, N, D = tokens.shape
    ks = reveal_grid(N, TEASER_POINTS)
    gen = torch.Generator().manual_seed(seed)
    num_t = next(iter(models.values())).diffloss.train_diffusion.num_timesteps
    t = torch.randint(0, num_t, (M, TEASER_DRAWS, N), generator=gen)
    noise = torch.randn(M, TEASER_DRAWS, N, D, generator=gen)
    cls = torch.from_numpy(np.asarray(class_orders, np.int64)[np.asarray(labels)])
    orders = {"random": torch.rand((M, N), generator=gen).argsort(dim=1), "class": cls,
              "class_ascending": cls.flip(1)}
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    areas, rows = {}, {}
    for name, variant, order in TEASER:
        mar = models[variant].eval()
        dev = next(mar.parameters()).device
        curves = np.concatenate([
            collapse_curves(hidden_loss_fn(mar, y[s:e].to(dev), t[s:e].to(dev), noise[s:e].to(dev)),
                            tokens[s:e].to(dev), orders[order][s:e], ks, batch)
            for s, e in ((s, min(s + batch, M)) for s in range(0, M, batch))])
        areas[name] = curve_area(curves, ks)
        rows[name] = {"model": variant, "order": order, "area": float(areas[name].mean()),
                      "curve": curves.mean(0).round(5).tolist()}
    base = areas[TEASER[0][0]]
    w = resample_weights(M, resamples, seed)
    for name, r in rows.items():
        d = areas[name] - base
        lo, hi = np.percentile(w @ d, [2.5, 97.5])
        r.update(d_vs_mar_random=float(d.mean()), d_ci=[float(lo), float(hi)])
    return {"images": M, "reveal_counts": ks, "draws": TEASER_DRAWS, "baseline": TEASER[0][0],
            "rows": rows}


def format_teaser(t: dict[str, Any]) -> str:
    lines = [f"the paper's teaser ({t['images']} val images, real tokens revealed in each model's "
             "generation order; mean diffusion loss of the tokens not yet generated; lower = less "
             "left to guess):",
             f"  {'row':<30}{'area':>8}  {'d vs ' + t['baseline'] + ' [95% CI]':>40}"]
    for name, r in t["rows"].items():
        lo, hi = r["d_ci"]
        lines.append(f"  {name:<30}{r['area']:>8.4f}  {r['d_vs_mar_random']:>+14.4f} [{lo:+.4f}, {hi:+.4f}]")
    return "\n".join(lines)


__all__ = ["COMPARISONS", "TEASER", "InceptionReference", "Measured", "check_eval_inputs", "decoded_batches",
           "format_rows", "headline", "in_batches", "inception_metrics", "inception_reference",
           "format_teaser", "hidden_loss_fn", "measure", "plot_samples", "sample_batches",
           "sampling_dtype", "split_val", "teaser"]
