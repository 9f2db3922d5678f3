"""Where each stage writes, below the data folder (``data/``).

The one table of stage outputs: the stages take their output paths from it, and
``tests/test_layout.py`` checks it against dvc.yaml's ``outs``, ``metrics`` and ``plots``, so
code, docstrings and the stage graph cannot drift apart. Matrix stages name their item with
``{name}`` (train_cvit: ``<variant>_s<seed>``) or ``{variant}`` (train_cmar).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

OUTS: dict[str, dict[str, str]] = {
    "list_source": {"listing": "source.json"},
    "prepare": {"images": "images", "report": "reports/prepare.json",
                "metrics": "metrics/prepare.json"},
    "extract_latents": {"latents": "latents", "report": "reports/extract_latents.json",
                        "metrics": "metrics/extract_latents.json"},
    "train_comae": {"run": "comae", "report": "reports/comae.json", "curve": "plots/comae_train.csv",
                    "curve_epochs": "plots/comae_train_epochs.csv", "w_hist": "plots/comae_w_hist.csv",
                    "metrics": "metrics/comae.json"},
    "probe_comae": {"run": "comae_probe", "metrics": "metrics/comae_probe.json"},
    "export_orders": {"orders": "orders", "report": "reports/orders.json",
                      "pictures": "plots/orders", "metrics": "metrics/orders.json"},
    "train_critic": {"run": "critic/{variant}", "report": "reports/critic_{variant}.json",
                     "metrics": "metrics/critic_{variant}.json"},
    "score_orders": {"report": "reports/order_scores.json", "curve": "plots/collapse_curves.csv",
                     "figure": "plots/collapse_curves.png", "metrics": "metrics/order_scores.json"},
    "train_judge": {"run": "judge", "report": "reports/judge.json", "curve": "plots/judge_train.csv",
                    "curve_epochs": "plots/judge_train_epochs.csv", "metrics": "metrics/judge.json"},
    "pretrain_vit": {"run": "pretrain_vit", "report": "reports/pretrain_vit.json",
                     "curve": "plots/pretrain_vit_val.csv", "metrics": "metrics/pretrain_vit.json"},
    "train_cvit": {"run": "cvit/{name}", "report": "reports/cvit_train_{name}.json",
                   "metrics": "metrics/cvit_train_{name}.json"},
    "eval_cvit": {"report": "reports/cvit.json", "curve": "plots/cvit_accuracy.csv",
                  "figure": "plots/cvit_fig8.png", "quality": "plots/cvit_order_quality.png",
                  "metrics": "metrics/cvit.json"},
    "pretrain_mar": {"run": "pretrain_mar", "report": "reports/pretrain_mar.json",
                     "curve": "plots/pretrain_mar_train.csv",
                     "curve_epochs": "plots/pretrain_mar_train_epochs.csv",
                     "metrics": "metrics/pretrain_mar.json"},
    "train_cmar": {"run": "cmar/{variant}", "report": "reports/cmar_train_{variant}.json",
                   "metrics": "metrics/cmar_train_{variant}.json"},
    "eval_cmar": {"samples": "cmar_samples", "report": "reports/cmar.json",
                  "figure": "plots/cmar_samples.png", "metrics": "metrics/cmar.json"},
    "report": {"page": "report.html"},
}


def outputs(stage: str, data_dir: str | Path = "data", **item: str) -> SimpleNamespace:
    """The output paths of ``stage`` under ``data_dir``, by name (``outputs("train_comae").run``
    is ``data/comae``); ``item``: a matrix stage's ``name`` or ``variant``."""
    return SimpleNamespace(**{k: Path(data_dir) / v.format(**item) for k, v in OUTS[stage].items()})
