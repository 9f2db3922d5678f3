"""Controlled experiments on the copy-mechanism grids behind docs/comae-sweep.md.

Each pulls one part of CoMAE out and asks one question, on the train/val latents of a
default run (``dvc repro extract_latents`` first) turned into mechanism grids
(:mod:`pipeline.metrics.mechanism`: half of each grid copies the other half, so every
patch's true source is known). Scores are precision@1 of f's val dependency rows (chance 1/63).

    python scripts/comae_controls.py supervised --head pointer   # f told the source (no g)
    python scripts/comae_controls.py gradient --g-train oracle   # does dL_r/dw point at it?
    python scripts/comae_controls.py reinforce                   # f by a sampled selection

Not part of the pipeline and not tested: a lab notebook in script form, kept so the figures
in the docs can be re-made.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.latents.store import LatentStore
from pipeline.metrics import mechanism as mech
from pipeline.models.comae import CoMAE, ComaeArch, reconstruction_loss

IMAGES, TARGETS = 8, 8  # per step: 8 images x 8 targets, as the default CoMAE


class Grids:
    """Mechanism grids of a split as [M, N, D] token sequences, image i with mode_of(i)."""

    def __init__(self, data: str, split: str) -> None:
        store = LatentStore(f"{data}/latents/{split}.zarr", in_memory=True)
        raw = store.tokens(np.arange(len(store)))  # [M, D, g, g]
        self.raw = raw
        self.seq = torch.stack([mech.apply(raw[i], mech.mode_of(i)) for i in range(len(raw))]
                               ).flatten(2).transpose(1, 2).contiguous()
        self.grid, self.dim = store.grid, store.dim
        self.n = self.grid * self.grid
        sources = [torch.from_numpy(mech.sources(self.grid, m)) for m in mech.MODES]
        self.sources = torch.stack(sources)  # [4, N]: source of each cell under each mode

    def source_of(self, idx: Tensor, targets: Tensor) -> Tensor:
        """True source of each target: idx [B] image indices, targets [B, T] -> [B, T]."""
        return self.sources[idx % len(mech.MODES)].gather(1, targets)

    def batch(self, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.randint(len(self.seq), (IMAGES,), generator=gen)
        targets = torch.rand(IMAGES, self.n, generator=gen).argsort(1)[:, :TARGETS]
        return idx, self.seq[idx], targets


def cosine_lr(opt: torch.optim.Optimizer, lr: float, step: int, steps: int) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))


def target_tokens(tokens: Tensor, targets: Tensor) -> Tensor:
    return torch.gather(tokens, 1, targets.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def selection_logits(model: CoMAE, tokens: Tensor, targets: Tensor) -> Tensor:
    """f's pre-tanh logits [B*T, N] with the target's own entry at -1e4."""
    img, tgt = model._flat(targets)
    return model.selection_logits(tokens, img, tgt).scatter(1, tgt.unsqueeze(1), -1e4)


def one_hot(n: int, positions: Tensor) -> Tensor:
    """positions [B, T] -> w [B, T, n] with a single 1 per row."""
    return torch.zeros(*positions.shape, n).scatter_(2, positions.unsqueeze(-1), 1.0)


def train_g(model: CoMAE, grids: Grids, steps: int, selections: str, gen: torch.Generator) -> None:
    """g alone on fixed selections: 'oracle' = the source alone, 'random' = each entry 1 with
    probability 1/8 (so the source is sometimes in view)."""
    opt = torch.optim.AdamW(model.decoder_parameters(), lr=1e-3, weight_decay=0.05)
    for step in range(steps):
        cosine_lr(opt, 1e-3, step, steps)
        idx, tokens, targets = grids.batch(gen)
        if selections == "oracle":
            w = one_hot(grids.n, grids.source_of(idx, targets))
        else:
            w = (torch.rand(IMAGES, TARGETS, grids.n, generator=gen) < 0.125).float()
        eps = torch.randn(IMAGES, TARGETS, grids.n - 1, grids.dim, generator=gen)
        recon = model.reconstruct(model.noise(tokens, targets, w, eps), targets)
        loss = reconstruction_loss(target_tokens(tokens, targets), recon)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(f"  g step {step} L_r {loss.item():.3f}", flush=True)


def score(model: CoMAE, grids: Grids) -> str:
    res = mech.precision_at_1(model.eval(), grids.raw)
    per = " ".join(f"{k[3:]} {v:.3f}" for k, v in res.items() if k.startswith("p1_"))
    return f"precision@1 {res['precision_at_1']:.3f} (chance {res['chance']:.3f}; {per})"


def supervised(args: argparse.Namespace, train: Grids, val: Grids, gen: torch.Generator) -> None:
    """f alone, cross-entropy straight to the true source: can f infer the mechanism at all?"""
    model = CoMAE(ComaeArch(train.grid, train.dim, enc_dim=args.enc_dim, enc_depth=args.enc_depth,
                            enc_heads=4, select_head=args.head))
    opt = torch.optim.AdamW(model.encoder_parameters(), lr=1e-3, weight_decay=0.05)
    for step in range(args.steps):
        cosine_lr(opt, 1e-3, step, args.steps)
        idx, tokens, targets = train.batch(gen)
        loss = F.cross_entropy(selection_logits(model, tokens, targets),
                               train.source_of(idx, targets).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            print(f"  f step {step} cross-entropy {loss.item():.3f}", flush=True)
    print(f"f supervised, {args.head} head, enc {args.enc_dim}x{args.enc_depth}, {args.steps} "
          f"steps on {args.train_split}: {score(model, val)}")


def gradient(args: argparse.Namespace, train: Grids, val: Grids, gen: torch.Generator) -> None:
    """Train g on fixed selections, freeze it, and ask where dL_r/dw points at a uniform w."""
    model = CoMAE(ComaeArch(train.grid, train.dim, dec_dim=32, dec_heads=4, decoder_sees_alpha=True))
    train_g(model, train, args.steps, args.g_train, gen)
    model.eval()
    idx = torch.arange(min(256, len(val.seq)))
    tokens, B = val.seq[idx], len(idx)
    targets = torch.rand(B, val.n, generator=gen).argsort(1)[:, :TARGETS]
    eps = torch.randn(B, TARGETS, val.n - 1, val.dim, generator=gen)
    src, want = val.source_of(idx, targets), target_tokens(tokens, targets)

    def l_r(w: Tensor) -> Tensor:
        return (want - model.reconstruct(model.noise(tokens, targets, w, eps), targets)).abs().sum(-1)

    with torch.no_grad():
        other = (targets + torch.randint(1, val.n, targets.shape, generator=gen)) % val.n
        print(f"g (alpha channel, trained on {args.g_train} selections, {args.steps} steps): L_r "
              f"with the source alone {l_r(one_hot(val.n, src)).mean():.2f}, with a random "
              f"patch alone {l_r(one_hot(val.n, other)).mean():.2f}")
    for b in (1 / 63, 0.1, 0.3, 0.5):
        w = torch.full((B, TARGETS, val.n), b).scatter(2, targets.unsqueeze(-1), 0.0)
        w.requires_grad_(True)
        l_r(w).sum().backward()
        g = w.grad.scatter(2, targets.unsqueeze(-1), float("inf"))  # never the target
        rank = (g < g.gather(2, src.unsqueeze(-1))).sum(-1).float()
        print(f"  uniform w = {b:.3f}: steepest entry is the source in "
              f"{(g.argmin(-1) == src).float().mean():.3f} of rows (chance 0.016); the source's "
              f"mean rank {rank.mean():.1f} of 63 (chance 31)", flush=True)


def reinforce(args: argparse.Namespace, train: Grids, val: Grids, gen: torch.Generator) -> None:
    """A copy-capable g, frozen; f learns by sampling one patch and being rewarded by -L_r."""
    model = CoMAE(ComaeArch(train.grid, train.dim, enc_dim=args.enc_dim, enc_depth=args.enc_depth,
                            enc_heads=4, dec_dim=32, dec_heads=4, decoder_sees_alpha=True,
                            select_head=args.head))
    train_g(model, train, args.g_steps, "oracle", gen)
    opt = torch.optim.AdamW(model.encoder_parameters(), lr=args.lr, weight_decay=0.05)
    for step in range(args.steps):
        cosine_lr(opt, args.lr, step, args.steps)
        idx, tokens, targets = train.batch(gen)
        logp = selection_logits(model, tokens, targets).log_softmax(-1)  # [B*T, N]
        pick = torch.multinomial(logp.exp(), 1, generator=gen)  # [B*T, 1]
        with torch.no_grad():
            eps = torch.randn(IMAGES, TARGETS, train.n - 1, train.dim, generator=gen)
            w = one_hot(train.n, pick.view(IMAGES, TARGETS))
            recon = model.reconstruct(model.noise(tokens, targets, w, eps), targets)
            reward = -(target_tokens(tokens, targets) - recon).abs().sum(-1).reshape(-1)
        entropy = -(logp.exp() * logp).sum(-1).mean()
        loss = -((reward - reward.mean()) * logp.gather(1, pick).squeeze(1)).mean() - 0.01 * entropy
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            hit = (pick.view(IMAGES, TARGETS) == train.source_of(idx, targets)).float().mean()
            print(f"  f step {step} reward {reward.mean():.2f}, sampled patch is the source "
                  f"{hit:.3f}", flush=True)
    print(f"sampled selection (REINFORCE) against a frozen copy-capable g, {args.head} head, "
          f"enc {args.enc_dim}x{args.enc_depth}, {args.steps} steps: {score(model, val)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", choices=("supervised", "gradient", "reinforce"))
    ap.add_argument("--data", default="data")
    ap.add_argument("--train-split", default="train", help="train, or pretrain (6,000 images)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--g-steps", type=int, default=1500, help="reinforce: g's oracle training")
    ap.add_argument("--g-train", choices=("oracle", "random"), default="oracle")
    ap.add_argument("--head", choices=("linear", "pointer"), default="linear")
    ap.add_argument("--enc-dim", type=int, default=64)
    ap.add_argument("--enc-depth", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)  # model initialisation
    gen = torch.Generator().manual_seed(args.seed)  # data, targets, noise, samples
    t0 = time.time()
    train, val = Grids(args.data, args.train_split), Grids(args.data, "val")
    {"supervised": supervised, "gradient": gradient, "reinforce": reinforce}[args.experiment](
        args, train, val, gen)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
