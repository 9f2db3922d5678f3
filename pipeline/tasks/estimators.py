"""The export's dependency model for ``orders.estimator``, loaded from a run's ``data/``
(:mod:`pipeline.orders.estimators` says what each estimator is)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline.orders.estimators import CRITIC_VARIANT, ESTIMATORS, CriticGraph, EstimatorError
from pipeline.tasks.comae import load_comae
from pipeline.tasks.critic import load_critic


def comae_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What made CoMAE's matrices: the exact weights file (by sha256) and its config."""
    return {"weights": info["weights"], "sha256": info["sha256"], "config": info["config"]}


def load_estimator(name: str, data_dir: str | Path, device: torch.device, *,
                   shares: Sequence[float] = (), seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The export's dependency model for ``orders.estimator`` and its identity (what made the
    matrices: the exact weights by sha256, their config and the estimator's own settings)."""
    data_dir = Path(data_dir)
    if name == "comae":
        model, info = load_comae(data_dir / "comae")
        return model.to(device).eval(), comae_identity(info)
    if name == "critic":
        critic, info = load_critic(data_dir / "critic" / CRITIC_VARIANT, device)
        return CriticGraph(critic, shares, seed).eval(), {
            "variant": CRITIC_VARIANT, "weights": info["weights"], "sha256": info["sha256"],
            "config": info.get("task"), "shares": [float(s) for s in shares], "seed": int(seed)}
    raise EstimatorError(f"orders.estimator {name!r} is not one of {', '.join(ESTIMATORS)}")


__all__ = ["comae_identity", "load_estimator"]
