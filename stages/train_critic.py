"""Stage ``train_critic`` (foreach scorer, builder): an any-order masked token predictor -> ``data/critic/<variant>/``.

The critics judge orders by the paper's criterion (stage ``score_orders``): the ``scorer``
scores every order, the ``builder`` (another width, depth, seed and likelihood:
``critic.builder``) builds the critic-made orders (OAR-style confidence, KPP-style greedy)
and scores them all a second time, so the ranking of orders can be checked for agreement.
Neither shares anything with CoMAE. Both learn from the pretrain pool's latents
(``data/latents/pretrain.zarr``; ``train.zarr`` when there is none) for ``critic.train``.
Writes ``data/critic/<variant>/{model.safetensors, config.json, train_log.csv}``, the record
``data/reports/critic_<variant>.json`` and the headline ``data/metrics/critic_<variant>.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import Params
from pipeline.data.imageset import pretrain_split
from pipeline.latents.store import LatentStore, TokenGridDataset
from pipeline.models.critic import Critic
from pipeline.models.layers import count_params
from pipeline.tasks.critic import CRITICS, CriticTask, critic_arch
from pipeline.train.stage import TrainingStage

HEADLINE = ("nll", "train_steps", "wall_time_s", "items_per_s")


def run(params: Params, variant: str = "scorer", data_dir: Path | str = Path("data")) -> dict[str, Any]:
    if variant not in CRITICS:
        raise ValueError(f"unknown critic {variant!r}: choose one of {', '.join(CRITICS)}")
    data_dir = Path(data_dir)
    cfg = getattr(params.critic, variant)
    with TrainingStage("train_critic", data_dir, HEADLINE, variant=variant) as stage:
        # in memory when it fits the budget (the pool at CPU scale); Zarr chunks otherwise
        store = LatentStore(pretrain_split(data_dir / "latents", ".zarr"), in_memory=None)
        torch.manual_seed(cfg.seed)
        model = Critic(critic_arch(cfg, store.num_tokens, store.dim))
        task = CriticTask(model, extra_config={"init_seed": cfg.seed, "variant": variant})
        final = stage.fit(task, TokenGridDataset(store, in_memory=None), params.critic.train,
                          inputs={"latents": store.identity}, desc=f"critic[{variant}]",
                          report={"variant": variant, "params": count_params(model),
                                  "train_images": len(store)})
        stage.say(f"[critic] {variant}: hidden-token NLL {final.get('nll', float('nan')):.3f} "
                  f"nats/channel after {final.get('train_steps')} steps -> {stage.out.run}")
    return stage.metrics


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("train-critic")
