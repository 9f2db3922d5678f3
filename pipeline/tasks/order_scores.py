"""Every order scored by the paper's own criterion (stage ``score_orders``).

On ``critic.score.images`` val images, each order reveals its first k patches and the scoring
critic measures the uncertainty (NLL, nats per channel) of the patches still hidden
(:mod:`pipeline.metrics.collapse`). The orders:

* ``collapse`` (the exported CoMAE order), ``collapse_asc`` (the same order reversed, Tab. 4),
  ``collapse_indeg`` (the exported matrices read out by in-degree instead of PageRank) and
  ``other_image`` (another val image's collapse order: what the order knows of *this* image);
* cheap ones: ``random``, ``raster``, ``centre``, ``halton``, ``fixed`` (the train split's mean
  collapse scores), ``pixel_variance``, ``token_saliency``, ``token_l1`` (PSS);
* built by the *builder* critic (another arch, seed and likelihood than the scorer):
  ``confidence`` (OAR-style) and ``greedy`` (KPP-style, an upper reference, on the first
  ``critic.score.greedy_images`` images).

Each with its cost per image: measured seconds on this machine and FLOPs (counted by
``torch.utils.flop_counter`` for the networks, analytic for the rest). The tokenizer's cost,
shared by every order that reads tokens, is left out of all of them.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import spearmanr

from pipeline.metrics.collapse import (
    collapse_curves, confidence_orders, curve_area, greedy_orders, hidden_mean, paired_summary,
)
from pipeline.metrics.intervals import resample_weights
from pipeline.models.critic import Critic
from pipeline.orders import baselines
from pipeline.orders.pagerank import collapse_order
from pipeline.utils.device import flops_of

CHEAP = ("random", "raster", "centre", "halton", "fixed", "pixel_variance", "token_saliency",
         "token_l1")
COMAE = ("collapse", "collapse_asc", "collapse_indeg", "other_image")
CRITIC_BUILT = ("confidence", "greedy")


def nll_fn(critic: Critic) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda x, r: critic.nll(x, r)


def scale_fn(critic: Critic) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda x, r: critic(x, r)[1].mean(-1)


def _timed(fn: Callable[[], Any], count: int) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) / max(count, 1)


def build_orders(*, collapse_scores: np.ndarray, matrices: np.ndarray | None, tokens: torch.Tensor,
                 pixels: np.ndarray, fixed: np.ndarray, builder: Critic, greedy_images: int,
                 seed: int) -> dict[str, dict[str, Any]]:
    """``{name: {"orders": int64 [M or G, N], "seconds": per image, "flops": per image}}``."""
    M, N, D = tokens.shape
    grid = int(round(N ** 0.5))
    toks = tokens.double().cpu().numpy()
    H, W = pixels.shape[1:3]
    cheap: dict[str, tuple[Callable[[], np.ndarray], float]] = {
        "random": (lambda: baselines.random_scores(M, N, seed), 0.0),
        "raster": (lambda: baselines.raster_scores(M, N), 0.0),
        "centre": (lambda: baselines.centre_scores(M, grid), 0.0),
        "halton": (lambda: baselines.halton_scores(M, grid), 0.0),
        "fixed": (lambda: baselines.fixed_scores(M, fixed), 0.0),
        "pixel_variance": (lambda: baselines.pixel_variance_scores(pixels, grid), 3.0 * H * W * 3),
        "token_saliency": (lambda: baselines.token_saliency_scores(toks), 4.0 * N * D),
        "token_l1": (lambda: baselines.token_l1_scores(toks), 2.0 * N * D),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, (fn, flops) in cheap.items():
        scores, secs = _timed(fn, M)
        out[name] = {"orders": collapse_order(scores), "seconds": secs, "flops": flops}
    out["collapse"] = {"orders": collapse_order(collapse_scores)}
    out["collapse_asc"] = {"orders": out["collapse"]["orders"][:, ::-1].copy()}
    out["other_image"] = {"orders": np.roll(out["collapse"]["orders"], M // 2, axis=0)}
    if matrices is not None:  # how much every other patch relies on j: column sums of A
        out["collapse_indeg"] = {"orders": collapse_order(matrices.astype(np.float64).sum(1))}
    one = tokens[:1]
    step = flops_of(lambda: builder(one, torch.zeros(1, N, dtype=torch.bool)))
    conf, secs = _timed(lambda: confidence_orders(scale_fn(builder), tokens), M)
    out["confidence"] = {"orders": conf.numpy(), "seconds": secs, "flops": float(N * step),
                         "built_by": "builder"}
    G = min(greedy_images, M)
    if G > 0:
        greedy, secs = _timed(lambda: greedy_orders(nll_fn(builder), tokens[:G]), G)
        out["greedy"] = {"orders": greedy.numpy(), "seconds": secs,
                         "flops": float(N * (N + 1) / 2 * step), "built_by": "builder"}
    return out


def score(orders: dict[str, dict[str, Any]], tokens: torch.Tensor, critic: Critic, ks: list[int],
          batch_size: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per order, the raw, the adjusted and the L1 curves [M', len(ks)] under ``critic`` (M' =
    the images it has): one critic pass per (order, k), plus one with nothing revealed.
    L1: the error of the critic's predicted location, summed over channels (L_r's units)."""
    fn = nll_fn(critic)
    with torch.no_grad():
        blind = torch.cat([fn(x, torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device))
                           for x in tokens.split(batch_size)]).double().cpu().numpy()
    raw, adjusted, l1 = {}, {}, {}
    for name, o in orders.items():
        order = np.ascontiguousarray(o["orders"])
        both = collapse_curves(critic.nll_and_l1, tokens[:len(order)], torch.from_numpy(order),
                               ks, batch_size)
        raw[name], l1[name] = both[..., 0], both[..., 1]
        adjusted[name] = raw[name] - hidden_mean(blind[:len(order)], order, ks)
    return raw, adjusted, l1


def summarise(curves: dict[str, np.ndarray], ks: list[int], num_tokens: int, bootstrap: int,
              seed: int) -> dict[str, Any]:
    """Area, value at 22% and 50% revealed, each with its interval and paired differences
    against random and the best cheap order; the greedy subset's share-of-gain figures."""
    full = {n: c for n, c in curves.items() if len(c) == len(curves["random"])}
    M = len(curves["random"])
    weights = resample_weights(M, bootstrap, seed)
    areas = {n: curve_area(c, ks) for n, c in full.items()}
    best_cheap = min((n for n in CHEAP if n != "random"), key=lambda n: areas[n].mean())
    against = {"random": "random", "best_cheap": best_cheap}
    at = {share: ks.index(int(round(share * num_tokens))) for share in (0.22, 0.5)}
    table = {
        "area": paired_summary(areas, weights, against),
        "at22": paired_summary({n: c[:, at[0.22]] for n, c in full.items()}, weights, against),
        "at50": paired_summary({n: c[:, at[0.5]] for n, c in full.items()}, weights, against),
    }
    out: dict[str, Any] = {"images": M, "best_cheap": best_cheap, **table,
                           "curves": {n: c.mean(0).tolist() for n, c in curves.items()}}
    if "greedy" in curves:
        G = len(curves["greedy"])
        sub = {n: curve_area(c[:G], ks) for n, c in curves.items()}
        gain = sub["random"].mean() - sub["greedy"].mean()
        wg = resample_weights(G, bootstrap, seed)
        out["greedy_subset"] = {
            "images": G, "greedy_gain_over_random": float(gain),
            "greedy_vs_random": paired_summary(sub, wg, {"random": "random"})["greedy"]["vs_random"],
            "share_of_greedy_gain": {n: float((sub["random"].mean() - a.mean()) / gain)
                                     if gain > 0 else None for n, a in sub.items()},
        }
    return out


def agreement(a: dict[str, Any], b: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Spearman rank correlation of the orders' mean areas under two critics (the orders
    neither critic built)."""
    x = [a["area"][n]["mean"] for n in names]
    y = [b["area"][n]["mean"] for n in names]
    rho = spearmanr(x, y).statistic
    return {"orders": names, "spearman": float(rho)}


MEASURES = {
    "raw": "mean NLL of the hidden tokens, nats/channel",
    "adjusted": "mean over the hidden tokens of NLL minus the token's NLL with nothing revealed, "
                "nats/channel",
    "l1": "mean L1 error of the critic's prediction of a hidden token, summed over channels "
          "(L_r's units)",
}


def format_table(summary: dict[str, Any], costs: dict[str, dict[str, Any]],
                 auc: dict[str, float | None], critic: str, measure: str = "raw") -> str:
    """The criterion beside object AUC and cost, best area first, as aligned text."""
    a, best = summary["area"], summary["best_cheap"]
    share = summary.get("greedy_subset", {}).get("share_of_greedy_gain", {})
    lines = [f"orders by the collapse criterion ({critic} critic, {summary['images']} val images; "
             f"{MEASURES[measure]}; lower = collapses faster; best cheap order: {best}):",
             f"  {'order':<15}{'area [95% CI]':>22}{'d vs random [95% CI]':>26}"
             f"{'d vs ' + best:>24}{'@22%':>8}{'@50%':>8}{'greedy gain':>12}{'obj AUC':>8}"
             f"{'s/img':>9}{'MFLOP/img':>10}"]
    for name in sorted(a, key=lambda n: a[n]["mean"]):
        r = a[name]
        vr, vb = r.get("vs_random"), r.get("vs_best_cheap")
        fmt = (lambda d: f"{d['mean']:+.3f} [{d['lo']:+.3f},{d['hi']:+.3f}]" if d else "")
        g = share.get(name)
        c = costs.get(name, {})
        secs, flops = c.get("seconds"), c.get("flops")
        obj = auc.get(name)
        lines.append(
            f"  {name:<15}{r['mean']:>8.3f} [{r['lo']:.3f},{r['hi']:.3f}]{fmt(vr):>26}{fmt(vb):>24}"
            f"{summary['at22'][name]['mean']:>8.3f}{summary['at50'][name]['mean']:>8.3f}"
            f"{'' if g is None else f'{g:.0%}':>12}{'' if obj is None else f'{obj:.3f}':>8}"
            f"{'' if secs is None else f'{secs:.1e}':>9}{'' if flops is None else f'{flops / 1e6:.2f}':>10}")
    if "greedy_subset" in summary:
        gs = summary["greedy_subset"]
        d = gs["greedy_vs_random"]
        lines.append(f"  greedy (KPP-style, {gs['images']} images): area {d['mean']:+.3f} "
                     f"[{d['lo']:+.3f},{d['hi']:+.3f}] vs random on them; 'greedy gain' = share "
                     "of that gain each order reaches on the same images")
    return "\n".join(lines)


def plot_curves(path: Any, curves: dict[str, list[float]], ks: list[int], num_tokens: int,
                title: str, greedy_images: int = 0) -> None:
    """Mean collapse curve per order: NLL of the hidden tokens vs share revealed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.utils.io import atomic_path

    xs = [k / num_tokens for k in ks]
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=150)
    # 14 orders, a colour each: the strong half of tab20 for CoMAE's, the critics' and the
    # main references, the pale half for the rest
    strong = [*COMAE, *CRITIC_BUILT, "random", "token_l1", "halton", "token_saliency"]
    rank = {n: i for i, n in enumerate(strong + sorted(set(curves) - set(strong)))}
    colors = plt.get_cmap("tab20").colors
    for name, ys in sorted(curves.items(), key=lambda kv: kv[1][-1]):
        style = "-" if name in COMAE or name in CRITIC_BUILT else "--"
        label = f"{name} ({greedy_images} images)" if name == "greedy" else name
        i = rank[name]
        ax.plot(xs, ys, style, color=colors[(2 * i) % 20 + (2 * i) // 20],
                linewidth=1.8 if name.startswith("collapse") else 1.0, label=label)
    ax.axvline(0.22, color="0.5", linestyle=":", linewidth=1)
    ax.set_xlabel("share of patches revealed (in each order)")
    ax.set_ylabel("NLL of the hidden tokens (nats / channel)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


__all__ = ["CHEAP", "COMAE", "CRITIC_BUILT", "agreement", "build_orders",
           "format_table", "plot_curves", "score", "summarise"]
