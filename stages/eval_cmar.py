"""Stage ``eval_cmar``: sample (C)MAR in the configured order, decode, score.

For every class, ``cmar.samples_per_class`` images are generated in ``cmar.sample_order``
(class-level collapse order, a training image's order, or random), revealed in the trained
``cmar.direction``, with CFG ``cmar.cfg`` / temperature ``cmar.temperature``, decoded by the
tokenizer and written to ``data/cmar_samples/<class>/NNNN.png`` plus one grid per class
(``data/cmar_samples/grid_<class>.png``) and an all-class grid ``data/plots/cmar_samples.png``.
The metrics (``data/metrics/cmar.json``, what ``dvc exp show`` lists: flat, at most a dozen)
are described in :mod:`pipeline.tasks.cmar_eval`; the full record (metrics, params, the
model's training config, classes) is ``data/reports/cmar.json`` (also
``data/cmar_samples/report.json``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Params, params_dict
from pipeline.data.imageset import ImageSet
from pipeline.latents.store import LatentStore
from pipeline.orders.shards import CollapseOrders
from pipeline.tasks.cmar import generate, load_cmar, sampling_orders
from pipeline.tasks.cmar_eval import (check_eval_inputs, cvit_space_metrics, inception_metrics,
                                      reference_rows, write_samples)
from pipeline.tasks.cvit import load_cvit
from pipeline.tokenizers import decode_to_images, latents_tokenizer
from pipeline.utils.device import pick_device
from pipeline.utils.io import atomic_write_json


def run(params: Params, data_dir: Path | str = Path("data")) -> None:
    data_dir = Path(data_dir)
    cfg = params.cmar
    torch.manual_seed(params.seed)
    store = LatentStore(data_dir / "latents" / "train.zarr")
    orders = CollapseOrders(data_dir / "orders" / "train")
    dev = pick_device()
    model, trained = load_cmar(data_dir / "cmar", cfg)
    model.to(dev)
    classes = list(store.classes)
    check_eval_inputs(cfg, model, classes, orders)
    vit, _ = load_cvit(data_dir / "cvit" / "vit")
    vit.to(dev)
    val = ImageSet(data_dir / "images" / "val")
    if vit.arch.img_size != val.crop_size or vit.arch.num_classes != len(classes):
        raise ValueError(f"data/cvit/vit takes {vit.arch.img_size}px images of {vit.arch.num_classes} "
                         f"classes; the data has {val.crop_size}px images of {len(classes)} classes")
    tokenizer = latents_tokenizer(params.tokenizer, data_dir / "latents", dev)

    labels = np.repeat(np.arange(len(classes)), cfg.samples_per_class)
    gen = torch.Generator().manual_seed(params.seed)
    mar_orders = sampling_orders(cfg.sample_order, labels, model.seq_len, trained["cmar"]["direction"],
                                 gen, class_orders=orders.class_orders, train_labels=orders.labels,
                                 train_order=orders.order)
    t0 = time.perf_counter()
    grids = generate(model, labels, mar_orders, cfg.num_iter, cfg.cfg, cfg.cfg_schedule,
                     cfg.temperature, gen, cfg.eval_batch_size)
    sample_s = time.perf_counter() - t0
    images = decode_to_images(tokenizer, grids, store.scale_factor, cfg.eval_batch_size, dev)
    out_dir = data_dir / "cmar_samples"
    write_samples(out_dir, data_dir / "plots" / "cmar_samples.png", images, labels, classes,
                  cfg.samples_per_class)

    rows = reference_rows(len(val), cfg.eval_reference_images)
    real = np.stack([val.image(int(i)) for i in rows])
    metrics = {**cvit_space_metrics(cfg, images, labels, real, val.labels[rows], vit),
               "sampling_s_per_image": sample_s / max(len(images), 1),
               **inception_metrics(cfg, images, real, dev)}

    atomic_write_json(data_dir / "metrics" / "cmar.json", metrics)
    report = {"metrics": metrics, "params": params_dict(cfg), "model": trained, "classes": classes,
              "feature_space": "CViT 'vit' variant pre-logit [cls] features (data/cvit/vit); "
                               "frechet_cvit_distance is not an FID"}
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_json(data_dir / "reports" / "cmar.json", report)
    print(f"[eval_cmar] {len(images)} samples; " + ", ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)), flush=True)


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("eval-cmar")
