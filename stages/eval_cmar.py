"""Stage ``eval_cmar``: sample every CMAR variant in several orders and score the samples
beside controls, all in the judge's feature space (Tab. 2-4 at this scale).

Rows (:data:`pipeline.tasks.cmar_eval.COMPARISONS`): CMAR sampled in the class-level
collapse order, a training image's order and a random order; the MAR baseline (same
pretraining, same fine-tune steps, random order) sampled in random order and in the class
order (Tab. 2's MAR+C); CMAR trained and sampled ascending (Tab. 4). Controls, scored the
same way: real val images, real val latents decoded by the tokenizer (the ceiling of any
generator under this tokenizer) and real val tokens shuffled across images and positions
(the right tokens, no context). ``cmar.sample.sample_order`` picks which CMAR row is the headline.

Each row: the judge's accuracy on the conditioning class (Wilson 95% interval), Fréchet
distance of judge features to the reference half of val (bootstrap interval), precision,
recall and neighbour colour correlation (bootstrap interval): :mod:`pipeline.metrics.generation`.
With ``cmar.sample.inception_weights`` the CMAR headline row also gets FID/IS.

Writes ``data/reports/cmar.json`` (every row, the params, the models' training configs),
``data/metrics/cmar.json`` (flat headline), ``data/cmar_samples/<row>/grid.png`` and the
labelled figure ``data/plots/cmar_samples.png`` (real images beside samples, per class).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Params, params_dict
from pipeline.paths import outputs
from pipeline.data.imageset import ImageSet
from pipeline.latents.store import LatentStore
from pipeline.orders.shards import CollapseOrders
from pipeline.tasks.cmar import CMAR_VARIANTS, load_cmar, variant_config
from pipeline.tasks.cmar_eval import (COMPARISONS, check_eval_inputs, format_rows, headline,
                                      inception_metrics, plot_samples, sample_row, split_val)
from pipeline.tasks.judge import judge_outputs, load_judge
from pipeline.metrics.generation import score_images, shuffle_tokens
from pipeline.tokenizers import decode_to_images, latents_tokenizer
from pipeline.utils.device import pick_device
from pipeline.utils.images import image_grid, safe_name, save_png
from pipeline.utils.io import atomic_write_json


def run(params: Params, data_dir: Path | str = Path("data")) -> dict[str, Any]:
    data_dir = Path(data_dir)
    cfg = params.cmar
    sample = cfg.sample  # the sampling keys; the models' own come from their runs
    out = outputs("eval_cmar", data_dir)
    dev = pick_device()
    store = LatentStore(data_dir / "latents" / "train.zarr")
    val_store = LatentStore(data_dir / "latents" / "val.zarr")
    orders = CollapseOrders(data_dir / "orders" / "train")
    classes = list(store.classes)
    models, trained = {}, {}
    for v in CMAR_VARIANTS:
        models[v], trained[v] = load_cmar(data_dir / "cmar" / v, variant_config(cfg, v))
        check_eval_inputs(sample, models[v].to(dev), classes, orders)
    judge, _ = load_judge(data_dir / "judge")
    judge.to(dev)
    tokenizer = latents_tokenizer(params.tokenizer, data_dir / "latents", dev)
    val = ImageSet(data_dir / "images" / "val")
    grid = store.grid
    n_per_row = len(classes) * sample.samples_per_class
    ref_rows, ctl_rows = split_val(np.asarray(val.labels), len(classes), sample.samples_per_class)
    ref_feats = judge_outputs(judge, np.stack([val.image(int(i)) for i in ref_rows]))[0]

    def score(images: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, Any]:
        feats, logits = judge_outputs(judge, images)
        return score_images(images, labels, feats, logits, ref_feats, grid, seed=seed)

    # Controls: the same val images (the half not used as the reference), three ways.
    ctl_labels = np.asarray(val.labels)[ctl_rows]
    real = np.stack([val.image(int(i)) for i in ctl_rows])
    tokens = val_store.tokens(ctl_rows)  # scaled posterior means [n, D, h, w]
    shuffled = torch.from_numpy(shuffle_tokens(np.asarray(tokens), np.random.default_rng(params.seed)))
    controls = {
        "real val images": real,
        "real val latents, decoded": decode_to_images(tokenizer, torch.as_tensor(tokens), store.scale_factor,
                                                      sample.eval_batch_size, dev),
        "real val tokens, shuffled": decode_to_images(tokenizer, shuffled, store.scale_factor,
                                                      sample.eval_batch_size, dev),
    }
    rows: dict[str, dict[str, Any]] = {}
    for j, (name, images) in enumerate(controls.items()):
        rows[name] = {"kind": "control", **score(images, ctl_labels, params.seed + j)}

    samples: dict[str, np.ndarray] = {}
    labels = np.repeat(np.arange(len(classes)), sample.samples_per_class)
    for j, (name, variant, order) in enumerate(COMPARISONS):
        t0 = time.perf_counter()
        images = sample_row(models[variant], sample, trained[variant]["cmar"]["direction"], order, labels,
                            orders, tokenizer, store.scale_factor, params.seed, dev)
        seconds = time.perf_counter() - t0
        samples[name] = images
        rows[name] = {"kind": "samples", "model": variant, "sample_order": order,
                      **score(images, labels, params.seed + 10 + j),
                      "sampling_s_per_image": round(seconds / max(len(images), 1), 5)}
        save_png(out.samples / safe_name(name) / "grid.png",
                 image_grid(images, sample.samples_per_class))
        print(f"[eval_cmar] {name}: {len(images)} samples in {seconds:.0f} s", flush=True)

    head = next(n for n, v, o in COMPARISONS if v == "cmar" and o == sample.sample_order)
    rows[head].update(inception_metrics(sample, samples[head], real, dev))
    plot_samples(out.figure, real, ctl_labels, samples, labels, classes,
                 per_class=min(4, sample.samples_per_class))
    report = {"rows": rows, "headline_row": head, "chance": 1 / len(classes),
              "reference_images": len(ref_rows), "samples_per_row": n_per_row,
              "feature_space": "judge CNN pooled features (data/judge); fd is not an FID",
              "params": {"sample": params_dict(sample)}, "models": trained, "classes": classes}
    atomic_write_json(out.report, report)
    atomic_write_json(out.metrics, headline(rows, head))
    print(format_rows(rows, 1 / len(classes)), flush=True)
    return report


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("eval-cmar")
