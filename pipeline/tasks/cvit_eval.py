"""CViT evaluation (paper Tab. 5, Fig. 8): accuracy of every Tab. 5 row and every control at
every mask ratio, over several fine-tuning seeds with intervals, the cost of a forward pass
with patches dropped, the table, CSV and figure ``eval_cvit`` writes, and the ViT as a
feature extractor.

The rows and the drop policies of Tab. 5 are those of :mod:`pipeline.tasks.cvit`. The
controls test the *same* fine-tuned CViT model with other orders than the image's own
collapse order (issue 12: "another image's order works as well as the image's own"):

    row           model   kept first at test
    CViT-fixed    cvit    one order for all images: the train split's mean collapse scores
    CViT-centre   cvit    patches nearest the image centre
    CViT-pixvar   cvit    patches of highest pixel variance (cheap contrast saliency)
    CViT-pss      cvit    tokens of highest L1 norm (PSS's embedding norm, in the token space;
                          the best cheap order by the collapse criterion, docs/criterion.md)
    CViT-halton   cvit    a 2-D Halton sequence over the grid (spread-out patches)
    CViT-other    cvit    another val image's collapse order (a fixed derangement)

The baseline orders are the scores of :mod:`pipeline.orders.baselines` (what
``export_orders`` scores the collapse order against), turned into orders by the one
collapse-order rule (descending score, ties to the lower index). If CViT with the image's
own order does not beat CViT-other, the orders carry no per-image value downstream.

Random rows (ViT, RViT) average ``draws`` random drops per image; ViT and RViT see the same
ones. Every score is kept per image, so a row's figure is a mean over images and seeds with a
bootstrap interval over images (:mod:`pipeline.metrics.intervals`).
"""

from __future__ import annotations

import csv
import io
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from pipeline.metrics.curves import auc, kneedle, topk_hits
from pipeline.metrics.intervals import resample_weights, seed_mean_interval
from pipeline.models.vit import VisionTransformer, VitArch, vit_forward_flops
from pipeline.orders.baselines import (
    centre_scores, fixed_scores, halton_scores, pixel_variance_scores,
)
from pipeline.orders.pagerank import collapse_order
from pipeline.tasks.cvit import (
    ROWS, OrdersMismatchError, keep_first, num_keep, orders_tokenizer_fingerprint,
    random_order,
)
from pipeline.utils.device import autocast
from pipeline.utils.images import images_to_input
from pipeline.utils.io import atomic_path

# control row -> (trained variant, order kept first at test)
CONTROLS: dict[str, tuple[str, str]] = {
    "CViT-fixed": ("cvit", "fixed"),
    "CViT-centre": ("cvit", "centre"),
    "CViT-pixvar": ("cvit", "pixel_variance"),
    "CViT-pss": ("cvit", "token_l1"),
    "CViT-halton": ("cvit", "halton"),
    "CViT-other": ("cvit", "other"),
    # the cheap competitor trained on its own order, and with another image's
    "CViT[pss]": ("cvit_pss", "token_l1"),
    "CViT[pss]-other": ("cvit_pss", "token_l1_other"),
}
ALL_ROWS: dict[str, tuple[str, str]] = {**ROWS, **CONTROLS}
# paired differences (same images, same seeds) reported with their intervals; the first is
# the claim under test: the image's own collapse order against another image's
CONTRASTS = (("CViT", "CViT-other"), ("CViT", "CViT-fixed"), ("CViT", "CViT-pss"),
             ("CViT", "CViT[pss]"), ("CViT[pss]", "CViT[pss]-other"), ("CViT", "RViT"),
             ("CViT", "ViT+C"), ("ViT+C", "ViT"))


def check_model_fits(name: str, model: VisionTransformer, meta: dict[str, Any], orders: Any,
                     images: Any) -> None:
    """A trained variant must match the evaluation data: patch grid, image size, classes and
    the tokenizer its training orders came from."""
    arch = model.arch
    if arch.grid != orders.grid:
        raise OrdersMismatchError(
            f"model {name!r} has a {arch.grid}x{arch.grid} patch grid ({arch.img_size}px / "
            f"{arch.patch_size}px patches), the orders in {orders.path} a "
            f"{orders.grid}x{orders.grid} grid: retrain it on these orders")
    if arch.img_size != images.crop_size:
        raise OrdersMismatchError(f"model {name!r} takes {arch.img_size}px images, "
                                  f"{images.path} holds {images.crop_size}px crops")
    if arch.num_classes != len(images.classes):
        raise OrdersMismatchError(f"model {name!r} has {arch.num_classes} classes, "
                                  f"{images.path} {len(images.classes)}")
    trained_on = meta.get("task", {}).get("orders_tokenizer")
    here = orders_tokenizer_fingerprint(orders)
    if trained_on != here:
        tok = orders.tokenizer_identity or {}
        raise OrdersMismatchError(
            f"model {name!r} was trained with collapse orders of tokenizer identity "
            f"{str(trained_on)[:12]}, the orders in {orders.path} come from tokenizer "
            f"{tok.get('kind')!r} (identity {here[:12]}): evaluate with orders of the same tokenizer")


# ----------------------------------------------------------------------------- evaluation


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A seeded permutation with no fixed point (Sattolo's algorithm: one n-cycle), so image i
    borrows the order of image ``perm[i] != i``."""
    if n < 2:
        raise ValueError(f"another image's order needs at least 2 images, got {n}")
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i strictly: that is what rules out fixed points
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def random_draw_seed(run_seed: int, draw: int) -> int:
    """The seed of random drop ``draw`` for the models of fine-tuning seed ``run_seed``:
    distinct for every (seed, draw) pair while draws < 1000."""
    return run_seed * 1000 + draw


class EvalOrders:
    """Every order a row keeps first, for a batch of val images (``index`` into the set).

    ``image_orders`` [n, N]: each image's collapse order; ``mean_scores`` [N]: the train
    split's mean collapse scores (the ``fixed`` baseline); ``grid``: the patch grid;
    ``token_orders`` [n, N]: each image's token-L1 (PSS) order (:func:`pipeline.tasks.cvit.token_l1_orders`).
    """

    def __init__(self, image_orders: np.ndarray, mean_scores: np.ndarray, grid: int,
                 run_seed: int, draws: int, *, token_orders: np.ndarray,
                 derangement_seed: int = 0) -> None:
        n, N = image_orders.shape
        if N != grid * grid:
            raise ValueError(f"orders of {N} patches do not fit a {grid}x{grid} grid")
        self.grid, self.num_patches, self.run_seed, self.draws = grid, N, run_seed, draws
        self.collapse = np.asarray(image_orders, np.int64)
        self.other_of = derangement(n, derangement_seed)
        self.fixed = collapse_order(fixed_scores(1, np.asarray(mean_scores, np.float64)))[0]
        self.centre = collapse_order(centre_scores(1, grid))[0]
        self.halton = collapse_order(halton_scores(1, grid))[0]
        self.token_l1 = np.asarray(token_orders, np.int64)
        if self.token_l1.shape != self.collapse.shape:
            raise ValueError(f"token orders {self.token_l1.shape} do not match the collapse "
                             f"orders {self.collapse.shape}")

    def for_batch(self, batch: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        """{drop: [orders [B, N] per draw]}: one draw for every drop but ``random``."""
        idx = batch["index"].numpy()
        B = len(idx)
        pixels = batch["image"].numpy()  # uint8 [B, H, W, 3]
        fixed = lambda o: [torch.from_numpy(np.broadcast_to(o, (B, self.num_patches)).copy())]  # noqa: E731
        return {
            "collapse": [torch.from_numpy(self.collapse[idx])],
            "other": [torch.from_numpy(self.collapse[self.other_of[idx]])],
            "fixed": fixed(self.fixed),
            "centre": fixed(self.centre),
            "halton": fixed(self.halton),
            "pixel_variance": [torch.from_numpy(collapse_order(pixel_variance_scores(pixels, self.grid)))],
            "random": [torch.stack([random_order(int(i), self.num_patches,
                                                 random_draw_seed(self.run_seed, r)) for i in idx])
                       for r in range(self.draws)],
            "token_l1": [torch.from_numpy(self.token_l1[idx])],
            "token_l1_other": [torch.from_numpy(self.token_l1[self.other_of[idx]])],
        }


@torch.inference_mode()
def evaluate_rows(models: dict[str, VisionTransformer], loader: Iterable[dict[str, Tensor]],
                  ratios: list[float], orders: EvalOrders, device: torch.device,
                  amp_dtype: torch.dtype = torch.float32,
                  rows: dict[str, tuple[str, str]] = ALL_ROWS, progress: Any = None,
                  ) -> dict[str, dict[str, np.ndarray]]:
    """Per image, the share of draws whose label is in the top-1 / top-5, for every row at
    every mask ratio, in one pass over the data (each batch decoded once).

    Returns {row: {"top1": float [n, len(ratios)], "top5": ...}} in dataset order.
    """
    hits: dict[str, dict[str, list[np.ndarray]]] = {r: {"top1": [], "top5": []} for r in rows}
    for batch in loader:
        x = images_to_input(batch["image"]).to(device)
        labels = batch["label"].to(device)
        drops = orders.for_batch(batch)
        # each model embeds the batch once: a patch's embedding is its own (no stem looks
        # across patches), so every drop below is a gather of these
        with autocast(device, amp_dtype):
            tokens = {v: models[v].patch_embed(x) for v in {v for v, _ in rows.values()}}  # [B, N, D]
        for row, (variant, drop) in rows.items():
            model = models[variant]
            got = np.zeros((2, len(labels), len(ratios)))
            for j, ratio in enumerate(ratios):
                k = num_keep(ratio, model.num_patches)
                for order in drops[drop]:
                    keep = keep_first(order.to(device), k)
                    t = tokens[variant]
                    if keep is not None:
                        t = t.gather(1, keep[:, :, None].expand(-1, -1, t.shape[-1]))  # [B, k, D]
                    with autocast(device, amp_dtype):
                        logits = model.forward_embedded(t, keep)
                    h = topk_hits(logits.float(), labels, ks=(1, 5))
                    got[0, :, j] += h[1].cpu().numpy()
                    got[1, :, j] += h[5].cpu().numpy()
            got /= len(drops[drop])
            hits[row]["top1"].append(got[0])
            hits[row]["top5"].append(got[1])
        if progress is not None:
            progress.update(len(labels))
    if not hits[next(iter(rows))]["top1"]:
        raise ValueError("the evaluation set is empty")
    return {row: {m: np.concatenate(v) for m, v in h.items()} for row, h in hits.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_cost(model: VisionTransformer, images: Tensor, orders: Tensor, ratios: list[float],
                 repeats: int = 5, amp_dtype: torch.dtype = torch.float32,
                 ) -> dict[float, dict[str, float]]:
    """Per mask ratio: analytic FLOP ratio and measured wall-time ratio against the full sequence.

    ``images`` [B, 3, H, W] on the model's device, ``orders`` [B, N]. Wall times are medians
    over ``repeats`` rounds; each round times every ratio once, interleaved, so drifting
    machine load (a shared CPU) hits all ratios alike.
    """
    device = images.device
    N = model.num_patches
    ks = sorted({num_keep(r, N) for r in ratios} | {N})

    def run(k: int) -> float:
        keep = keep_first(orders, k)
        _sync(device)
        t0 = time.perf_counter()
        with autocast(device, amp_dtype):
            model(images, keep)
        _sync(device)
        return time.perf_counter() - t0

    for k in ks:  # warm-up: allocator, kernels, caches
        run(k)
    times: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            times[k].append(run(k))
    med = {k: statistics.median(v) for k, v in times.items()}
    full_flops = vit_forward_flops(model.arch, N)
    out = {}
    for r in ratios:
        k = num_keep(r, N)
        out[r] = {"kept": k, "flop_ratio": vit_forward_flops(model.arch, k) / full_flops,
                  "time_ratio": med[k] / med[N], "time_s": med[k]}
    return out


def ratio_label(ratio: float) -> str:
    """0.78 -> "78": metric names like Tab. 5's T1@78% (no dots: DVC flattens keys on dots)."""
    pct = round(ratio * 100, 6)
    return str(int(pct)) if pct == int(pct) else str(pct).replace(".", "_")


# ----------------------------------------------------------------------------- Tab. 5, Fig. 8


TABLE_RATIOS = (0.0, 0.3, 0.5, 0.78)  # the Tab. 5 columns


def auc_weights(ratios: list[float]) -> np.ndarray:
    """w [R] with ``curve @ w == auc(ratios, curve)``: AuC is linear in the curve (trapezoids),
    so each image has an AuC of its own and the bootstrap resamples those."""
    eye = np.eye(len(ratios))
    return np.array([auc(ratios, eye[j]) for j in range(len(ratios))])


def summarise(per_seed: dict[str, list[dict[str, np.ndarray]]], ratios: list[float],
              seeds: list[int], resamples: int, boot_seed: int = 0) -> dict[str, Any]:
    """Per row: mean over seeds with its 95% interval and the per-seed values, at every ratio
    (top-1 and top-5, %), for AuC of the top-1 curve, and the knee of the mean curve; then the
    paired contrasts of :data:`CONTRASTS`. ``per_seed[row][s]`` is ``evaluate_rows``' output
    for seed ``seeds[s]``. One set of resamples serves every row and contrast."""
    rows = list(per_seed)
    n = next(iter(per_seed.values()))[0]["top1"].shape[0]
    weights = resample_weights(n, resamples, boot_seed)
    w_auc = auc_weights(ratios)
    out: dict[str, Any] = {}

    def stack(row: str, metric: str) -> np.ndarray:  # [S, n, R] in percent
        return 100.0 * np.stack([r[metric] for r in per_seed[row]])

    for row in rows:
        top1, top5 = stack(row, "top1"), stack(row, "top5")
        c1, c5 = seed_mean_interval(top1, weights), seed_mean_interval(top5, weights)
        a = seed_mean_interval(top1 @ w_auc, weights)
        curve = c1["mean"].tolist()
        out[row] = {
            "top1": _rounded(c1), "top5": _rounded(c5),
            "AuC": round(a["mean"], 4), "AuC_ci": [round(a["lo"], 4), round(a["hi"], 4)],
            "AuC_per_seed": [round(v, 4) for v in a["per_seed"]],
            "knee": kneedle(ratios, curve),
        }
        for r in TABLE_RATIOS:
            j = ratios.index(r)
            lab = ratio_label(r)
            out[row][f"top1@{lab}"] = round(float(c1["mean"][j]), 4)
            out[row][f"top1@{lab}_ci"] = [round(float(c1["lo"][j]), 4), round(float(c1["hi"][j]), 4)]
            out[row][f"top5@{lab}"] = round(float(c5["mean"][j]), 4)
    contrasts = {}
    j78 = ratios.index(0.78)
    for a_row, b_row in CONTRASTS:
        if a_row not in per_seed or b_row not in per_seed:
            continue
        diff = stack(a_row, "top1") - stack(b_row, "top1")  # paired: same images, same seeds
        d_auc = seed_mean_interval(diff @ w_auc, weights)
        d_78 = seed_mean_interval(diff[:, :, j78], weights)
        contrasts[f"{a_row} - {b_row}"] = {
            "AuC": round(d_auc["mean"], 4), "AuC_ci": [round(d_auc["lo"], 4), round(d_auc["hi"], 4)],
            "AuC_per_seed": [round(v, 4) for v in d_auc["per_seed"]],
            "top1@78": round(d_78["mean"], 4), "top1@78_ci": [round(d_78["lo"], 4), round(d_78["hi"], 4)],
            "top1@78_per_seed": [round(v, 4) for v in d_78["per_seed"]],
        }
    return {"rows": out, "contrasts": contrasts,
            "interval": {"level": 0.95, "method": "percentile bootstrap over val images of the "
                         "seed-mean", "resamples": resamples, "images": n, "seeds": seeds}}


def _rounded(c: dict[str, Any]) -> dict[str, Any]:
    return {"mean": np.round(c["mean"], 4).tolist(), "lo": np.round(c["lo"], 4).tolist(),
            "hi": np.round(c["hi"], 4).tolist(),
            "per_seed": np.round(c["per_seed"], 4).tolist()}


def format_table(summary: dict[str, Any]) -> str:
    """The rows and contrasts as text: mean [95% interval] (per seed) at 0 / 78% and AuC."""
    def cell(e: dict[str, Any], key: str) -> str:
        lo, hi = e[f"{key}_ci"]
        return f"{e[key]:6.2f} [{lo:6.2f}, {hi:6.2f}]"

    seeds = summary["interval"]["seeds"]
    lines = [f"{'row':16s} {'top1@0':>24s} {'top1@78':>24s} {'AuC':>24s}  AuC per seed {seeds}"]
    for row, e in summary["rows"].items():
        lines.append(f"{row:16s} {cell(e, 'top1@0')} {cell(e, 'top1@78')} {cell(e, 'AuC')}  "
                     + " ".join(f"{v:6.2f}" for v in e["AuC_per_seed"]))
    lines.append(f"{'contrast':29s} {'d top1@78':>24s} {'d AuC':>24s}  d AuC per seed")
    for name, e in summary["contrasts"].items():
        lines.append(f"{name:29s} {cell(e, 'top1@78')} {cell(e, 'AuC')}  "
                     + " ".join(f"{v:6.2f}" for v in e["AuC_per_seed"]))
    return "\n".join(lines)


def accuracy_csv(rows: dict[str, dict[str, Any]], ratios: list[float]) -> str:
    """mask_ratio, then per row the seed-mean top-1 (%), then every row's interval bounds."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = list(rows)
    w.writerow(["mask_ratio", *names, *(f"{r}_{b}" for r in names for b in ("lo", "hi"))])
    for j in sorted(range(len(ratios)), key=lambda j: ratios[j]):
        w.writerow([ratios[j], *(f"{rows[r]['top1']['mean'][j]:.4f}" for r in names),
                    *(f"{rows[r]['top1'][b][j]:.4f}" for r in names for b in ("lo", "hi"))])
    return buf.getvalue()


def plot_fig8(path: Path, rows: dict[str, dict[str, Any]], ratios: list[float], title: str,
              chance: float | None = None) -> None:
    """Fig. 8: seed-mean top-1 vs mask ratio with shaded 95% intervals; the Tab. 5 rows solid
    (knees marked), the controls dashed; 78% and beyond shaded as in the paper; ``chance``
    (%) dotted, so a flat curve near it reads as "learned nothing", not as robustness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(range(len(ratios)), key=lambda j: ratios[j])
    xs = [ratios[j] for j in order]
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=150)
    ax.axvspan(0.78, 1.0, color="0.93", zorder=0)
    ax.text(0.79, 0.03, ">78% masked", transform=ax.get_xaxis_transform(), fontsize=8, color="0.35")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (row, e) in enumerate(rows.items()):
        control = row in CONTROLS
        color = colors[i % len(colors)]
        ys = [e["top1"]["mean"][j] for j in order]
        ax.fill_between(xs, [e["top1"]["lo"][j] for j in order], [e["top1"]["hi"][j] for j in order],
                        color=color, alpha=0.10 if control else 0.18, linewidth=0)
        ax.plot(xs, ys, linestyle="--" if control else "-", linewidth=1.1 if control else 1.6,
                marker=None if control else "o", markersize=3, color=color, label=row)
        if not control and e["knee"] is not None:
            ax.plot([e["knee"]], [e["top1"]["mean"][ratios.index(e["knee"])]], marker="x",
                    markersize=8, color=color)
    if chance is not None:
        ax.axhline(chance, color="0.4", linestyle=":", linewidth=1)
        ax.text(0.01, chance, " chance", va="bottom", fontsize=7, color="0.35",
                transform=ax.get_yaxis_transform())
    ax.set_xlabel("mask ratio (share of patches dropped)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- the honest cost

# every row -> the order it keeps first at test, for its cost (the test drops share
# ``score_orders``' names); None: another image's order, a control no method would compute
ORDER_COST_OF_ROW: dict[str, str | None] = {
    row: None if drop.endswith("other") else drop for row, (_, drop) in ALL_ROWS.items()}
# orders computed from the image's tokens: they pay for the tokenizer's encoder too
READS_TOKENS = frozenset({"collapse", "collapse_asc", "collapse_indeg", "token_l1",
                          "token_saliency", "confidence", "greedy"})


def order_costs(order_flops: dict[str, dict[str, Any]], tokenizer_flops: float, arch: VitArch,
                ratio: float = 0.78) -> dict[str, Any]:
    """FLOPs per image of every row at ``ratio`` dropped, against the full ViT's forward pass:
    the ViT on the kept patches, plus making the order (``order_flops``: ``score_orders``'
    ``costs``, the estimator and PageRank for the collapse order), plus the tokenizer's encoder
    when the order reads tokens. The paper's "22% of the patches" counts only the first term."""
    N = arch.grid * arch.grid
    kept = num_keep(ratio, N)
    full, vit = vit_forward_flops(arch, N), vit_forward_flops(arch, kept)
    rows: dict[str, dict[str, Any]] = {}
    for row, name in ORDER_COST_OF_ROW.items():
        own = None if name is None else order_flops.get(name, {}).get("flops")
        if own is None:  # another image's order, or an order score_orders did not cost
            rows[row] = {"order": name, "total_mflop": None, "vs_full_vit": None}
            continue
        tok = tokenizer_flops if name in READS_TOKENS else 0.0
        total = vit + tok + float(own)
        rows[row] = {"order": name, "order_mflop": float(own) / 1e6, "tokenizer_mflop": tok / 1e6,
                     "total_mflop": total / 1e6, "vs_full_vit": total / full}
    return {"ratio": ratio, "kept": kept, "vit_mflop": vit / 1e6, "full_vit_mflop": full / 1e6,
            "tokenizer_mflop": tokenizer_flops / 1e6, "rows": rows}


def format_costs(c: dict[str, Any]) -> str:
    if not c.get("rows"):
        return f"cost: not measured ({c.get('skipped')})"
    lab = ratio_label(c["ratio"])
    lines = [f"cost per image at {lab}% dropped, MFLOP (full ViT forward {c['full_vit_mflop']:.1f}; "
             f"on the {c['kept']} kept patches {c['vit_mflop']:.1f}; tokenizer encoder "
             f"{c['tokenizer_mflop']:.1f}):",
             f"  {'row':<16}{'order':<16}{'order':>10}{'tokenizer':>11}{'total':>10}{'x full ViT':>12}"]
    for row, e in c["rows"].items():
        if e["total_mflop"] is None:
            lines.append(f"  {row:<16}{str(e['order'] or '(control)'):<16}{'':>10}{'':>11}{'':>10}{'—':>12}")
            continue
        lines.append(f"  {row:<16}{e['order']:<16}{e['order_mflop']:>10.2f}{e['tokenizer_mflop']:>11.2f}"
                     f"{e['total_mflop']:>10.1f}{e['vs_full_vit']:>12.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the claim in one figure

# CViT row -> the name ``score_orders`` gives the order that row keeps first
ORDER_OF_ROW = {"CViT": "collapse", "CViT-other": "other_image", "CViT-fixed": "fixed",
                "CViT-centre": "centre", "CViT-pixvar": "pixel_variance", "CViT-pss": "token_l1",
                "CViT-halton": "halton"}


def order_quality(per_seed: dict[str, list[dict[str, np.ndarray]]], ratios: list[float],
                  scored: dict[str, Any], resamples: int, seed: int, ratio: float = 0.78
                  ) -> dict[str, Any]:
    """Does an order that collapses the image faster give a better CViT? For every CViT row
    whose order ``score_orders`` scored: top-1 (%) at ``ratio`` dropped (mean over seeds and
    val images) against the order's raw collapse-curve value at 22% revealed (``scored``:
    ``data/reports/order_scores.json``; lower = collapses faster, so the paper's claim predicts
    a negative rank correlation). Spearman's rho with a 95% bootstrap interval: CViT's val
    images and the criterion's images are resampled independently (they are different sets)."""
    from scipy.stats import spearmanr

    at22 = scored.get("per_image_at22") or {}
    rows = [r for r, name in ORDER_OF_ROW.items() if name in at22 and r in per_seed]
    if len(rows) < 3:
        return {"rows": {}, "skipped": f"{len(rows)} orders scored by both stages (3 needed)"}
    j = ratios.index(ratio)
    acc = {r: 100.0 * np.mean([s["top1"][:, j] for s in per_seed[r]], axis=0) for r in rows}
    crit = {r: np.asarray(at22[ORDER_OF_ROW[r]], np.float64) for r in rows}
    wa = resample_weights(len(acc[rows[0]]), resamples, seed)
    wc = resample_weights(len(crit[rows[0]]), resamples, seed + 1)
    X = np.stack([wc @ crit[r] for r in rows], axis=1)  # [B, rows]
    Y = np.stack([wa @ acc[r] for r in rows], axis=1)
    boot = np.array([spearmanr(x, y).statistic for x, y in zip(X, Y)])
    rho = float(spearmanr([crit[r].mean() for r in rows], [acc[r].mean() for r in rows]).statistic)
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    table = {r: {"order": ORDER_OF_ROW[r], "at22": float(crit[r].mean()),
                 "at22_ci": [float(v) for v in np.percentile(X[:, i], [2.5, 97.5])],
                 "top1": float(acc[r].mean()),
                 "top1_ci": [float(v) for v in np.percentile(Y[:, i], [2.5, 97.5])]}
             for i, r in enumerate(rows)}
    return {"rows": table, "ratio": ratio, "spearman": rho, "spearman_ci": [float(lo), float(hi)],
            "images": {"cvit": len(acc[rows[0]]), "criterion": len(crit[rows[0]])}}


def format_order_quality(q: dict[str, Any]) -> str:
    if not q.get("rows"):
        return f"order quality vs CViT accuracy: not measured ({q.get('skipped')})"
    lab = ratio_label(q["ratio"])
    lines = [f"order quality vs CViT accuracy (the collapse criterion at 22% revealed, lower = "
             f"collapses faster; CViT top-1 at {lab}% dropped):",
             f"  {'row':<13}{'order':<16}{'NLL @22% [95% CI]':>24}{f'top1@{lab} [95% CI]':>24}"]
    for r, e in sorted(q["rows"].items(), key=lambda kv: kv[1]["at22"]):
        lines.append(f"  {r:<13}{e['order']:<16}{e['at22']:>8.3f} [{e['at22_ci'][0]:.3f}, "
                     f"{e['at22_ci'][1]:.3f}]{e['top1']:>8.1f} [{e['top1_ci'][0]:5.1f}, "
                     f"{e['top1_ci'][1]:5.1f}]")
    lo, hi = q["spearman_ci"]
    lines.append(f"  Spearman rho over {len(q['rows'])} orders: {q['spearman']:+.2f} [{lo:+.2f}, "
                 f"{hi:+.2f}] (the paper's claim predicts < 0)")
    return "\n".join(lines)


def plot_order_quality(path: Path, q: dict[str, Any], title: str) -> None:
    """CViT top-1 at 78% dropped against the order's collapse-curve value at 22% revealed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.4), dpi=150)
    for r, e in q.get("rows", {}).items():
        x, y = e["at22"], e["top1"]
        ax.errorbar(x, y, xerr=[[x - e["at22_ci"][0]], [e["at22_ci"][1] - x]],
                    yerr=[[y - e["top1_ci"][0]], [e["top1_ci"][1] - y]], fmt="o", markersize=4,
                    capsize=2, linewidth=0.8, color="C3" if r == "CViT" else "C0")
        ax.annotate(r, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("NLL of the hidden tokens at 22% revealed (lower = collapses faster)")
    ax.set_ylabel(f"CViT top-1 at {ratio_label(q.get('ratio', 0.78))}% dropped (%)")
    if q.get("rows"):
        lo, hi = q["spearman_ci"]
        title += f"\nSpearman rho {q['spearman']:+.2f} [{lo:+.2f}, {hi:+.2f}] over {len(q['rows'])} orders"
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


__all__ = ["ALL_ROWS", "CONTRASTS", "CONTROLS", "TABLE_RATIOS", "EvalOrders", "accuracy_csv",
           "auc_weights", "check_model_fits", "derangement", "evaluate_rows", "format_table",
           "measure_cost", "ORDER_COST_OF_ROW", "ORDER_OF_ROW", "READS_TOKENS", "format_costs",
           "order_costs", "order_quality", "format_order_quality",
           "plot_fig8", "plot_order_quality", "random_draw_seed", "ratio_label", "summarise"]
