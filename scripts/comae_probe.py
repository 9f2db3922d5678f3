"""Train one CoMAE configuration and score its val collapse orders against the baselines.

The sweep harness behind docs/comae-sweep.md: it reuses ``data/images`` and ``data/latents``
(run ``dvc repro extract_latents`` first), trains into a scratch folder, computes val orders
(no flips, no shards) and prints the baseline table and the selection diagnostics. The same
configuration runs through DVC as ``dvc exp run -S comae.KEY=VALUE ...``.

    python scripts/comae_probe.py --out /tmp/probe-a -S comae.budget=0.1 -S comae.w_shuffle=0.5
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_params
from pipeline.data.imageset import ImageSet
from pipeline.latents.store import LatentStore
from pipeline.metrics.selection import selection_report
from pipeline.tasks.comae import load_comae
from pipeline.orders.pagerank import pagerank_torch
from pipeline.orders.report import score_table


def scores_of(model, tokens: torch.Tensor, damping: float, batch: int = 16) -> np.ndarray:
    out = []
    for s in range(0, len(tokens), batch):
        seq = tokens[s:s + batch].flatten(2).transpose(1, 2).contiguous()
        out.append(pagerank_torch(model.dependency_matrices(seq), damping=damping).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default="data")
    ap.add_argument("-S", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    params = load_params("params.yaml", args.overrides)
    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "latents").exists():
        os.symlink((data / "latents").resolve(), out / "latents")
    from stages.train_comae import run as train_comae

    t0 = time.time()
    train_comae(params, out)
    t_train = time.time() - t0
    model, _ = load_comae(out / "comae")
    train = LatentStore(data / "latents" / "train.zarr", in_memory=True)
    val = LatentStore(data / "latents" / "val.zarr", in_memory=True)
    tr_tok, va_tok = train.tokens(np.arange(len(train))), val.tokens(np.arange(len(val)))
    figs, _ = selection_report(model, tr_tok, va_tok)
    sub = np.random.default_rng(0).permutation(len(train))[:128]
    fixed = scores_of(model, tr_tok[sub], params.orders.damping).mean(0)
    coll = scores_of(model, va_tok, params.orders.damping)
    images = ImageSet(data / "images" / "val")
    table = score_table(coll, val.keys, images, val, fixed)["table"]
    res = {"overrides": args.overrides, "train_s": t_train, "selection": figs, "table": table,
           "comae": json.loads((out / "metrics" / "comae.json").read_text())}
    (out / "probe.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(args.overrides), f"train {t_train:.0f}s")
    for k, v in figs.items():
        print(f"  {k:<20}{v:.4f}")
    for k, r in table.items():
        print(f"  {k:<16} auc {r['auc']:.3f}±{r['auc_ci']:.3f} top10 {r['top10']:.3f} "
              f"pos_auc {r['pos_auc'] if r['pos_auc'] is None else round(r['pos_auc'], 3)}")


if __name__ == "__main__":
    main()
