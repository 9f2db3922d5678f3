"""Does CoMAE's selection know the image? Held-out diagnostics of a trained CoMAE.

The decoder g is run on the same (image, target, noise) samples with four selections:

* ``own``: f's w for that image and target (the method);
* ``mean``: the train-mean w for that target (one selection per target, the same for every
  image: what a position prior gives g);
* ``other``: f's w for the same target of *another* val image;
* ``clean``: w = 1 (every context token clean).

``w_gain`` = L_r(mean) − L_r(own), per image averaged over its targets, with a 95% interval
over images: above 0 (interval excluding it) means g reconstructs better from the image's
own selection than from the position prior, i.e. the selection carries image information.

Two reference predictors bound L_r from the data side: each image's mean token, and a
least-squares linear map from the 8 neighbouring tokens (zero-padded at the border, plus a
bias), fitted on train.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.metrics.objectness import mean_ci
from pipeline.utils.device import module_device

HIST_BINS = 20


def _sequences(tokens: torch.Tensor, idx: slice, device: torch.device) -> torch.Tensor:
    return tokens[idx].flatten(2).transpose(1, 2).contiguous().to(device)  # [b, N, D]


@torch.no_grad()
def selections(model: Any, tokens: torch.Tensor, targets: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """f's w [M, T, N] (on the CPU) for token grids [M, D, h, w] and targets [M, T], computed in
    batches on the model's device."""
    dev = module_device(model)
    out = [model.select(_sequences(tokens, slice(s, s + batch), dev), targets[s:s + batch].to(dev)).cpu()
           for s in range(0, len(tokens), batch)]
    return torch.cat(out)


@torch.no_grad()
def recon_l1(model: Any, tokens: torch.Tensor, targets: torch.Tensor, w: torch.Tensor,
             noise_seed: int, batch: int = 32) -> torch.Tensor:
    """Per-sample L1 error [M, T] of g given selections w [M, T, N]. The eq. 3 noise of each
    batch is drawn from ``(noise_seed, batch start)``: every selection compared meets the same
    noise, and none of it is held for the whole set."""
    dev = module_device(model)
    errs = []
    for s in range(0, len(tokens), batch):
        seq = _sequences(tokens, slice(s, s + batch), dev)
        tg = targets[s:s + batch].to(dev)
        b, T = tg.shape
        gen = torch.Generator().manual_seed(noise_seed * 1_000_003 + s)
        eps = torch.randn(b, T, seq.shape[1] - 1, seq.shape[2], generator=gen).to(dev)
        rec = model.reconstruct(model.noise(seq, tg, w[s:s + batch].to(dev), eps), tg)
        true = torch.gather(seq, 1, tg.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))
        errs.append((true - rec).abs().sum(-1).float().cpu())
    return torch.cat(errs)


def neighbour_features(seq: np.ndarray, grid: int) -> np.ndarray:
    """[M, N, D] tokens -> [M, N, 8*D + 1]: the 8 neighbours of each token (zeros off-grid) + 1."""
    M, N, D = seq.shape
    g = np.zeros((M, grid + 2, grid + 2, D), seq.dtype)
    g[:, 1:-1, 1:-1] = seq.reshape(M, grid, grid, D)
    feats = [g[:, 1 + dr:grid + 1 + dr, 1 + dc:grid + 1 + dc].reshape(M, N, D)
             for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
    return np.concatenate([*feats, np.ones((M, N, 1), seq.dtype)], axis=-1)


def linear_neighbour_l1(train: np.ndarray, val: np.ndarray, grid: int) -> float:
    """L1 on val of the least-squares 8-neighbour predictor fitted on train ([M, N, D] each)."""
    x = neighbour_features(train, grid).reshape(-1, 8 * train.shape[-1] + 1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(x, train.reshape(-1, train.shape[-1]).astype(np.float64), rcond=None)
    xv = neighbour_features(val, grid).astype(np.float64)
    return float(np.abs(xv @ coef - val).sum(-1).mean())


def image_mean_l1(seq: np.ndarray) -> float:
    """L1 of predicting every token by the mean of the image's other tokens."""
    N = seq.shape[1]
    others = (seq.sum(1, keepdims=True) - seq) / (N - 1)
    return float(np.abs(others - seq).sum(-1).mean())


@torch.no_grad()
def selection_report(model: Any, train_tokens: torch.Tensor, val_tokens: torch.Tensor,
                     targets_per_image: int = 16, train_images: int = 128, seed: int = 0
                     ) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """(figures, w histogram rows) for token grids ``[M, D, h, w]`` of train and val (the
    callers cap M: every figure here holds [M, T, N] selections in memory)."""
    N = model.num_tokens
    grid = model.grid
    gen = torch.Generator().manual_seed(seed)
    M = len(val_tokens)
    T = min(targets_per_image, N - 1)
    targets = torch.rand(M, N, generator=gen).argsort(1)[:, :T]
    noise_seed = int(torch.randint(2**31 - 1, (), generator=gen))

    # Train-mean selection per target: all N targets of a subset of train images.
    sub = train_tokens[torch.randperm(len(train_tokens), generator=gen)[:train_images]]
    all_t = torch.arange(N).expand(len(sub), N)
    w_mean = selections(model, sub, all_t).mean(0)  # [N targets, N]

    w_own = selections(model, val_tokens, targets)  # [M, T, N]
    w_avg = w_mean[targets]  # [M, T, N]
    shift = torch.roll(torch.arange(M), 1)  # another val image, same targets
    w_other = selections(model, val_tokens[shift], targets)
    w_clean = torch.ones_like(w_own).scatter(2, targets.unsqueeze(-1), 0.0)
    err = {name: recon_l1(model, val_tokens, targets, w, noise_seed)
           for name, w in (("own", w_own), ("mean", w_avg), ("other", w_other), ("clean", w_clean))}
    gain, gain_ci = mean_ci((err["mean"] - err["own"]).mean(1).tolist())

    kept = torch.ones_like(w_own, dtype=torch.bool).scatter(2, targets.unsqueeze(-1), False)
    wk = w_own[kept]  # every non-target entry
    ent = -(wk * wk.clamp_min(1e-12).log()).mean().item()
    counts, edges = np.histogram(wk.numpy(), bins=HIST_BINS, range=(0.0, 1.0))
    hist = [{"w": float((a + b) / 2), "share": float(c / wk.numel())}
            for a, b, c in zip(edges[:-1], edges[1:], counts)]

    tr = train_tokens.flatten(2).transpose(1, 2).numpy()
    va = val_tokens.flatten(2).transpose(1, 2).numpy()
    figures = {
        "L_r_own": err["own"].mean().item(),
        "L_r_mean_w": err["mean"].mean().item(),
        "L_r_other_w": err["other"].mean().item(),
        "L_r_clean": err["clean"].mean().item(),
        "w_gain": gain, "w_gain_ci": gain_ci,
        "L_r_linear8": linear_neighbour_l1(tr, va, grid),
        "L_r_image_mean": image_mean_l1(va),
        "H_mask_per_entry": ent,
        "w_mean": wk.mean().item(),
        "w_mid_share": ((wk > 0.1) & (wk < 0.9)).float().mean().item(),
        "w_image_var_share": _image_variance_share(w_own, w_avg),
    }
    return figures, hist


def _image_variance_share(w_own: torch.Tensor, w_avg: torch.Tensor) -> float:
    """Share of the variance of w (over images, targets, entries) that the per-target mean
    does not explain: 0 when every image gets the same selection."""
    total = w_own.var().item()
    return float(((w_own - w_avg) ** 2).mean().item() / total) if total > 0 else 0.0


def format_selection(f: dict[str, Any]) -> str:
    return (f"[comae] val: L_r with own w {f['L_r_own']:.3f}, train-mean w {f['L_r_mean_w']:.3f}, "
            f"another image's w {f['L_r_other_w']:.3f}, clean context {f['L_r_clean']:.3f}; "
            f"w gain {f['w_gain']:+.3f} ± {f['w_gain_ci']:.3f}\n"
            f"[comae] val references: linear 8-neighbour L_r {f['L_r_linear8']:.3f}, image-mean "
            f"L_r {f['L_r_image_mean']:.3f}; H_mask/entry {f['H_mask_per_entry']:.4f} (paper "
            f"~0.017), w mean {f['w_mean']:.3f}, w in (0.1, 0.9) {f['w_mid_share']:.1%}")


__all__ = ["format_selection", "linear_neighbour_l1", "image_mean_l1", "selection_report", "selections", "recon_l1"]
