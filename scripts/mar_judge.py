"""A third judge of the orders: MAR's own diffusion loss (the paper's teaser measures it).

``pretrain_mar``'s MAR (trained in random order on the pretrain pool; it built no order)
scores each order like the critics do in ``score_orders``: reveal the order's first k tokens,
and take MAR's diffusion loss of the tokens still hidden, averaged over them (per token, the
loss at ``--draws`` diffusion steps t with their noise, the same t and noise for every order
and k, so orders are compared on the same draws). Area = the mean over the reveal grid;
paired 95% bootstrap interval vs random over images. Beside it, the scorer critic's raw area
for the same orders, and the rank agreement of the two judges. Does it separate orders at
this scale? The printed intervals say.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/mar_judge.py          # ~2 min at 64 px

``--mar data/cmar/cmar`` (or ``data/cmar/mar``, ``data/cmar/cmar_asc``) scores with a
fine-tuned model instead: the paper's teaser, the loss of the tokens not yet generated as a
model generates in each order (real tokens in place of generated ones).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from pipeline.config import load_params
from pipeline.data.imageset import ImageSet
from pipeline.latents.store import LatentStore
from pipeline.metrics.collapse import collapse_curves, curve_area, reveal_grid
from pipeline.metrics.intervals import resample_weights
from pipeline.models.mar import MAR
from pipeline.orders.export import to_sequences
from pipeline.orders.report import mean_scores, report_keys
from pipeline.orders.shards import CollapseOrders
from pipeline.tasks.cmar import build_cmar
from pipeline.tasks.cmar_eval import hidden_loss_fn as mar_loss_fn
from pipeline.tasks.critic import load_critic
from pipeline.tasks.order_scores import build_orders, nll_fn

ORDERS = ("random", "halton", "token_l1", "token_saliency", "pixel_variance", "fixed",
          "collapse", "collapse_asc", "confidence", "greedy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--greedy-images", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mar", default=None, help="a MAR run folder (default: DATA/pretrain_mar)")
    ap.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    params = load_params("params.yaml")
    orders = CollapseOrders(f"{args.data}/orders/val")
    store = LatentStore(f"{args.data}/latents/val.zarr")
    images = ImageSet(f"{args.data}/images/val")
    keys = report_keys(orders.keys, args.images)
    row_of = {k: i for i, k in enumerate(store.keys)}
    rows = np.asarray([row_of[k] for k in keys])
    tokens = to_sequences(store.tokens(rows)).float()
    labels = torch.as_tensor(np.asarray(store.labels)[rows], dtype=torch.long)
    M, N, _ = tokens.shape
    pixels = np.stack([images.image(images.index_of(k)) for k in keys])
    scorer, _ = load_critic(f"{args.data}/critic/scorer", "cpu")
    builder, _ = load_critic(f"{args.data}/critic/builder", "cpu")
    built = build_orders(
        collapse_scores=np.stack([orders.scores(k) for k in keys]).astype(np.float64),
        matrices=None, tokens=tokens, pixels=pixels,
        fixed=mean_scores(CollapseOrders(f"{args.data}/orders/train", verify=False)),
        builder=builder, greedy_images=args.greedy_images if "greedy" in args.orders else 0,
        seed=args.seed)
    mar, _ = build_cmar(params.cmar, store, init=args.mar or f"{args.data}/pretrain_mar")
    mar.eval()
    ks = reveal_grid(N, params.critic.score.points)
    ks = [k for k in ks if k < N]
    gen = torch.Generator().manual_seed(args.seed)  # one (t, noise) per token, shared by every order
    t_all = torch.randint(0, mar.diffloss.train_diffusion.num_timesteps, (M, args.draws, N), generator=gen)
    noise_all = torch.randn(M, args.draws, N, mar.token_embed_dim, generator=gen)
    t0 = time.perf_counter()
    mar_area, critic_area = {}, {}
    names = [n for n in args.orders if n in built]
    if "random" not in names:
        names.insert(0, "random")
    for name in names:
        o = torch.from_numpy(np.ascontiguousarray(built[name]["orders"]))
        m = len(o)
        curves = np.concatenate([
            collapse_curves(mar_loss_fn(mar, labels[s:e], t_all[s:e], noise_all[s:e]), tokens[s:e],
                            o[s:e], ks, 64)
            for s, e in ((s, min(s + 64, m)) for s in range(0, m, 64))])
        mar_area[name] = curve_area(curves, ks)
        critic_area[name] = curve_area(collapse_curves(nll_fn(scorer), tokens[:m], o, ks), ks)
    secs = time.perf_counter() - t0
    w = resample_weights(M, 1000, args.seed)
    G = len(mar_area.get("greedy", mar_area["random"]))
    wg = resample_weights(G, 1000, args.seed)
    print(f"MAR {args.mar or 'pretrain_mar'}: {M} val images, N = {N}, {args.draws} diffusion "
          "draws per token; area = mean over the reveal grid of MAR's diffusion loss of the "
          "hidden tokens (lower: collapses faster)")
    print(f"  {'order':<16}{'MAR area':>10}{'MAR d vs random [95%]':>30}{'scorer d vs random':>22}")
    for name in names:
        a, c = mar_area[name], critic_area[name]
        ww = wg if len(a) == G and name == "greedy" else w
        ra, rc = mar_area["random"][:len(a)], critic_area["random"][:len(a)]
        lo, hi = np.percentile(ww @ (a - ra), [2.5, 97.5])
        print(f"  {name:<16}{a.mean():>10.4f}{(a - ra).mean():>+12.4f} [{lo:+.4f}, {hi:+.4f}]"
              f"{(c - rc).mean():>+14.4f}" + (f"   ({G} images)" if name == "greedy" else ""))
    both = [n for n in names if n != "greedy"]
    rho = spearmanr([mar_area[n].mean() for n in both], [critic_area[n].mean() for n in both]).statistic
    print(f"rank agreement of MAR and the scorer critic over {len(both)} orders: Spearman {rho:.2f}; "
          f"{secs:.0f} s")


if __name__ == "__main__":
    main()
