"""CMAR: MAR trained and sampled in collapse order (paper Sec. 3.3) -- the trainer task and orders.

Orders. A collapse order lists patches most relied-upon first (rank 0). MAR's ``orders`` array
keeps ``orders[:, :k]`` masked and reveals its tail first, so:
- direction "descending" (the paper's CMAR): MAR order = collapse order reversed -> training
  masks the LOWEST-ranked k patches and predicts them from the higher-ranked; sampling
  generates rank 0 first;
- direction "ascending" (Tab. 4's ablation): MAR order = collapse order;
- ``order: random`` (the MAR baseline): a fresh random permutation per sequence.
``random_order_share`` replaces that share of collapse-ordered sequences in every batch by
random orders (paper: 10%). A flipped latent (random horizontal flip, p = 0.5) uses the
flipped image's order.

Randomness. Everything per sequence (flip, random-order choice, the permutation, label
dropout, posterior noise, diffusion steps and noise) is drawn through the trainer's
``StepContext`` per global row, so 1 and N processes compute the same loss. The
mask ratio is ONE number per step (the encoder drops the same count in every row, as MAR):
``ctx.uniform()``, the same on every rank. Nothing here reads the global RNG.

Latents. MAR trains on posterior samples of the VAE (``posterior.sample() * 0.2325``); with
``cmar.model.posterior_sample`` (default) the task draws them from the stored moments with the
step's noise; otherwise it uses the posterior means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.config import CmarConfig
from pipeline.models.mar import (
    MAR, MarArch, load_mar_checkpoint, load_mar_state, read_mar_checkpoint,
)
from pipeline.train.checkpoint import load_run, load_trained
from pipeline.train.trainer import StepContext, TrainTask
from pipeline.utils.io import sha256_file

# CmarConfig keys that only affect sampling/evaluation: changing them must not retrain.
TASK_KIND = "cmar"  # config.json's task kind of pretrain_mar and train_cmar runs


# The models of the CMAR comparisons (Tab. 2, 4), fine-tuned alike from pretrain_mar:
# "cmar" uses cmar.order / cmar.direction as given (collapse, descending: the paper's CMAR);
# "mar" the same steps in random order (the MAR baseline); "cmar_asc" the reverse direction.
CMAR_VARIANTS: dict[str, dict[str, str]] = {
    "cmar": {}, "mar": {"order": "random"}, "cmar_asc": {"direction": "ascending"},
}


def variant_config(cfg: CmarConfig, variant: str) -> CmarConfig:
    """The ``cmar`` params with the variant's order settings."""
    if variant not in CMAR_VARIANTS:
        raise ValueError(f"unknown CMAR variant {variant!r} (choose from {', '.join(CMAR_VARIANTS)})")
    return cfg.model_copy(update=CMAR_VARIANTS[variant])


def to_mar_orders(collapse: Tensor, direction: str) -> Tensor:
    """Collapse orders [B, N] (rank 0 first) -> MAR orders (masked head, revealed tail)."""
    if direction == "descending":
        return collapse.flip(-1)
    if direction == "ascending":
        return collapse
    raise ValueError(f"direction must be 'descending' or 'ascending', got {direction!r}")


def train_config(cfg: CmarConfig) -> dict[str, Any]:
    """The part of the CMAR params that determines training (stored with checkpoints): not the
    training schedules (the trainer stores its own) nor the sampling keys."""
    return cfg.model_dump(mode="json", by_alias=True, exclude={"train", "pretrain", "sample"})


# cmar params -> MAR's names (LTH14/mar's), for the fields whose names differ
_MAR_NAMES = {"enc_dim": "encoder_embed_dim", "enc_depth": "encoder_depth",
              "enc_heads": "encoder_num_heads", "dec_dim": "decoder_embed_dim",
              "dec_depth": "decoder_depth", "dec_heads": "decoder_num_heads"}


# the cmar params MAR is built from (sampling keys such as num_sampling_steps are not)
_MAR_PARAMS = (*_MAR_NAMES, "buffer_size", "label_drop_prob", "mask_ratio_min", "attn_dropout",
               "proj_dropout", "diffloss_d", "diffloss_w", "diffusion_batch_mul")


def mar_arch(cfg: CmarConfig, grid: int, token_dim: int, num_classes: int,
             num_sampling_steps: str | None = None) -> MarArch:
    """The MAR the ``cmar`` params describe, for the latent store's geometry; its sampler's
    steps are MAR's default unless given (training never samples)."""
    steps = {} if num_sampling_steps is None else {"num_sampling_steps": num_sampling_steps}
    return MarArch(grid=grid, token_dim=token_dim, num_classes=num_classes, **steps,
                   **{_MAR_NAMES.get(k, k): getattr(cfg.model, k) for k in _MAR_PARAMS})


def build_mar(cfg: CmarConfig, grid: int, token_dim: int, num_classes: int,
              num_sampling_steps: str | None = None) -> MAR:
    """MAR from the ``cmar`` params and the latent store's geometry (``num_sampling_steps``:
    for a model that samples; training leaves MAR's default)."""
    return MAR.from_arch(mar_arch(cfg, grid, token_dim, num_classes, num_sampling_steps))


def build_cmar(cfg: CmarConfig, store: Any, init: str | Path | None = None,
               seed: int = 0) -> tuple[MAR, dict[str, Any]]:
    """The model to train on ``store``; a MAR checkpoint, if given, is loaded before any training.

    MAR's released models embed 1000 classes whatever the data set; a pretrained checkpoint
    keeps its class count so its ``class_emb`` loads (labels must still be < 1000). Without
    one, ``init`` (the ``pretrain_mar`` run, when given) supplies the starting weights; without
    either, the initial weights are a function of ``seed`` (torch seeds its global generator
    differently in every process, so an unseeded init is another model every run).
    """
    torch.manual_seed(seed)
    info: dict[str, Any] = {"pretrained": None}
    num_classes = len(store.classes)
    m = cfg.model
    if m.pretrained:
        state = read_mar_checkpoint(m.pretrained, m.pretrained_key)
        if "class_emb.weight" in state:
            num_classes = int(state["class_emb.weight"].shape[0])
        if len(store.classes) > num_classes:
            raise ValueError(f"the data has {len(store.classes)} classes, the MAR checkpoint "
                             f"embeds {num_classes}")
    model = build_mar(cfg, store.grid, store.dim, num_classes)
    if m.pretrained:
        missing = load_mar_checkpoint(model, m.pretrained, m.pretrained_key, m.allow_missing_keys)
        info = {"pretrained": str(m.pretrained), "pretrained_sha256": sha256_file(m.pretrained),
                "pretrained_key": m.pretrained_key, "missing_keys": missing}
    elif init is not None:
        run = load_run(init)
        if run.task.get("grid") != store.grid or run.task.get("num_classes") != num_classes:
            raise ValueError(f"{init} holds a MAR for a {run.task.get('grid')}x grid of "
                             f"{run.task.get('num_classes')} classes; the data: {store.grid}x, "
                             f"{num_classes} (re-run pretrain_mar)")
        load_mar_state(model, run.state, allow_missing=False)
        info = {"pretrained": str(init), "pretrained_sha256": sha256_file(run.weights),
                "pretrained_key": run.weights.name, "missing_keys": []}
    return model, info


def load_cmar(model_dir: str | Path, cfg: CmarConfig) -> tuple[MAR, dict[str, Any]]:
    """The trained model of ``data/cmar`` (read by :func:`load_trained`), with the sampling params
    of ``cfg``; training params that differ from the run's are refused, naming them."""
    def build(task: dict[str, Any]) -> MAR:
        trained, current = task.get("cmar", {}), train_config(cfg)
        diff = sorted(k for k in set(trained) | set(current) if trained.get(k) != current.get(k))
        if diff:
            raise ValueError(f"{model_dir} was trained with other cmar params ({', '.join(diff)}); "
                             "re-run train_cmar (dvc repro / dvc exp run does this)")
        # the stored network, sampled with this evaluation's diffusion steps
        return MAR.from_arch(MarArch.from_dict({**task["arch"],
                                                "num_sampling_steps": cfg.sample.num_sampling_steps}))

    model, run = load_trained(model_dir, build, kind=TASK_KIND)
    return model, {**run.task, "weights": run.weights.name}


class CmarDataset(torch.utils.data.Dataset):
    """Items of ``OrderedTokenDataset`` (tokens, tokens_flip, order, order_flip, label, index),
    or of ``TokenGridDataset`` (no orders: ``pretrain_mar`` draws random ones), plus the unscaled posterior ``moments``/``moments_flip`` [2·dim, h, w] when asked for."""

    def __init__(self, ordered: Any, with_moments: bool) -> None:
        self.ordered = ordered
        self.store = ordered.store
        self.with_moments = with_moments

    def __len__(self) -> int:
        return len(self.ordered)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.ordered[i])
        for k in ("order", "order_flip"):  # absent for the pretrain pool (random orders only)
            if k in item:
                item[k] = np.asarray(item[k], dtype=np.int64)
        if self.with_moments:
            item["moments"] = self.store.moments([i], False)[0]
            item["moments_flip"] = self.store.moments([i], True)[0]
        return item


class CmarTask(TrainTask):
    """Trainer task: one MAR diffusion loss per batch with collapse (or random) orders."""

    def __init__(self, model: MAR, cfg: CmarConfig, scale_factor: float,
                 extra_config: dict[str, Any] | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.scale_factor = float(scale_factor)
        self.extra_config = dict(extra_config or {})

    def config(self) -> dict[str, Any]:
        return {"kind": TASK_KIND, "cmar": train_config(self.cfg), "grid": self.model.grid,
                "token_dim": self.model.token_embed_dim, "num_classes": self.model.num_classes,
                "arch": {**self.model.arch.to_dict(), "num_sampling_steps": None},  # a sampling key
                **self.extra_config}

    def loss(self, model: nn.Module, batch: dict[str, Tensor], ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        mar: MAR = self.model
        cfg = self.cfg
        N, D, mul = mar.seq_len, mar.token_embed_dim, mar.diffusion_batch_mul
        # One mask count per step, identical on every rank: the first draw of the step's
        # generator (before any per-row draw, so its place in the stream is fixed), as CViT's ratio.
        num_masked = mar.num_masked(ctx.uniform())

        # Per-sequence draws, always in this order so streams do not depend on the config.
        flip = ctx.rand() < 0.5                                   # [b]
        use_random = ctx.rand() < cfg.random_order_share          # [b]
        random_orders = ctx.randperm(N)                           # [b, N]
        drop = ctx.rand() < mar.label_drop_prob                   # [b]
        eps = ctx.randn(D, mar.grid, mar.grid)                    # [b, D, h, w] posterior noise
        t = ctx.randint(mar.diffloss.train_diffusion.num_timesteps, mul, N)  # [b, mul, N]
        noise = ctx.randn(mul, N, D)                              # [b, mul, N, D]

        f4 = flip.view(-1, 1, 1, 1)
        if "moments" in batch:
            mom = torch.where(f4, batch["moments_flip"], batch["moments"]).float()
            mean, logvar = mom.chunk(2, dim=1)
            grid = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps) * self.scale_factor
        else:
            grid = torch.where(f4, batch["tokens_flip"], batch["tokens"]).float()
        tokens = grid.flatten(2).transpose(1, 2)  # [b, N, D]

        if cfg.order == "random":
            orders = random_orders
            random_rows = torch.ones_like(use_random)
        else:
            collapse = torch.where(flip.view(-1, 1), batch["order_flip"], batch["order"]).long()
            orders = torch.where(use_random.view(-1, 1), random_orders, to_mar_orders(collapse, cfg.direction))
            random_rows = use_random
        loss = model(tokens, batch["label"].long(), orders, num_masked,
                     drop_labels=drop, t=t, noise=noise)
        return loss, {"mask_ratio": num_masked / N, "random_orders": float(random_rows.float().mean())}


# ---------------------------------------------------------------------------- sampling orders


def sampling_orders(source: str, labels: np.ndarray, seq_len: int, direction: str,
                    generator: torch.Generator, class_orders: np.ndarray | None = None,
                    train_labels: np.ndarray | None = None,
                    train_order: Any = None) -> Tensor:
    """MAR orders [B, N] to sample ``labels`` with.

    source "class": the class-level collapse order of each label (``class_orders[c]``);
    "train_image": the collapse order of a training image of that class, drawn with
    ``generator`` (``train_order(row) -> int64[N]``); "random": a random permutation.
    Collapse orders are turned into MAR orders in ``direction`` (see :func:`to_mar_orders`).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if source == "random":
        return torch.rand((len(labels), seq_len), generator=generator).argsort(dim=1)
    if source == "class":
        if class_orders is None:
            raise ValueError("sample_order 'class' needs the class-level orders of the train split "
                             "(class_orders.npy in the orders shard set)")
        if labels.size and labels.max() >= len(class_orders):
            raise ValueError(f"class id {int(labels.max())} has no class-level order "
                             f"({len(class_orders)} classes)")
        collapse = torch.from_numpy(np.asarray(class_orders, dtype=np.int64)[labels])
    elif source == "train_image":
        if train_labels is None or train_order is None:
            raise ValueError("sample_order 'train_image' needs the training labels and orders")
        rows = []
        for c in labels.tolist():
            members = np.flatnonzero(np.asarray(train_labels) == c)
            if members.size == 0:
                raise ValueError(f"no training image of class {c} to take an order from")
            pick = int(torch.randint(members.size, (1,), generator=generator))
            rows.append(np.asarray(train_order(int(members[pick])), dtype=np.int64))
        collapse = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, seq_len, dtype=torch.long)
    else:
        raise ValueError(f"sample_order must be 'class', 'train_image' or 'random', got {source!r}")
    if collapse.shape[1] != seq_len:
        raise ValueError(f"orders are for {collapse.shape[1]} patches, the model has {seq_len}")
    return to_mar_orders(collapse, direction)


@torch.no_grad()
def generate(model: MAR, labels: np.ndarray, orders: Tensor, num_iter: int, cfg: float,
             cfg_schedule: str, temperature: float, generator: torch.Generator,
             batch_size: int) -> Tensor:
    """Token grids [n, D, h, w] (scaled latents) for ``labels`` [n] sampled in ``orders`` [n, N]."""
    model.eval()
    out = []
    for s in range(0, len(labels), batch_size):
        lab = torch.as_tensor(np.asarray(labels[s:s + batch_size]), dtype=torch.long)
        seq = model.sample_tokens(lab, orders[s:s + batch_size], num_iter=num_iter, cfg=cfg,
                                  cfg_schedule=cfg_schedule, temperature=temperature,
                                  generator=generator)  # [b, N, D]
        out.append(seq.transpose(1, 2).reshape(seq.shape[0], -1, model.grid, model.grid).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.token_embed_dim, model.grid, model.grid)


__all__ = ["CMAR_VARIANTS", "CmarDataset", "CmarTask", "variant_config", "build_cmar", "build_mar", "generate", "load_cmar", "mar_arch",
           "sampling_orders", "to_mar_orders", "train_config"]
