"""Gaussian diffusion for MAR's diffusion loss (IDDPM/ADM/DiT formulation, as MAR uses it).

Only what MAR needs is here: the cosine noise schedule over 1000 steps, epsilon prediction
with a learned variance interpolated between the posterior variance and beta
("learned range", so the denoiser outputs 2·C channels), the training loss MSE(eps) + the
variational-bound term on the variance (the mean is frozen inside the vb term), and ancestral
sampling with a temperature on the noise, optionally on a respaced subset of the timesteps
("100" = 100 evenly spaced steps; MAR samples with "100", trains with all 1000).

The schedule constants are computed in float64 (as ADM does) and gathered per timestep into
float32 tensors. Vectors here are token batches ``x[M, C]``: one row per token.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

Denoiser = Callable[..., Tensor]  # (x[M, C], t[M], **kwargs) -> out[M, 2C]


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos²((t + s)/(1 + s) · π/2), s=0.008."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def space_timesteps(num_steps: int, spacing: str | list[int]) -> list[int]:
    """Which original timesteps a respaced process keeps.

    ``"100"`` keeps 100 evenly spread steps; ``"10,20"`` splits the range into two halves and
    keeps 10 and 20 of them; ``"ddimN"`` keeps every (T/N)-th step. ``""`` keeps all.
    """
    if isinstance(spacing, str):
        if spacing == "":
            return list(range(num_steps))
        if spacing.startswith("ddim"):
            want = int(spacing[len("ddim"):])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == want:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot make exactly {want} steps with an integer stride from {num_steps}")
        counts = [int(c) for c in spacing.split(",")]
    else:
        counts = list(spacing)
    size_per, extra = divmod(num_steps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(kept))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """ADM's decoder likelihood at t = 0 (bins of width 2/255 on [-1, 1]); kept for parity."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """A (possibly respaced) diffusion process over token vectors.

    ``betas`` are the base process's; ``use_timesteps`` selects the kept steps, whose betas
    are recomputed so the kept alpha_bar values are unchanged. The denoiser always sees the
    ORIGINAL timestep index (``timestep_map``), so one network serves every spacing.
    """

    def __init__(self, betas: np.ndarray, use_timesteps: list[int] | None = None) -> None:
        base_alpha_bar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        keep = list(range(len(betas))) if use_timesteps is None else sorted(use_timesteps)
        new_betas, last = [], 1.0
        for i in keep:
            new_betas.append(1.0 - base_alpha_bar[i] / last)
            last = base_alpha_bar[i]
        b = np.array(new_betas, dtype=np.float64)
        if not ((b > 0).all() and (b <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.timestep_map = torch.tensor(keep, dtype=torch.long)
        self.num_timesteps = len(b)
        self.betas = b
        ab = np.cumprod(1.0 - b)
        ab_prev = np.append(1.0, ab[:-1])
        self.alphas_cumprod = ab
        self.sqrt_alphas_cumprod = np.sqrt(ab)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ab)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ab)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ab - 1.0)
        self.posterior_variance = b * (1.0 - ab_prev) / (1.0 - ab)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value (ADM).
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(b) > 1 else np.log(np.maximum(self.posterior_variance, 1e-20)))
        self.posterior_mean_coef1 = b * np.sqrt(ab_prev) / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * np.sqrt(1.0 - b) / (1.0 - ab)
        self.log_betas = np.log(b)
        self._tables: dict[tuple[int, torch.device], Tensor] = {}

    # ------------------------------------------------------------------ helpers
    def _at(self, arr: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
        """arr[t] as float32 on like's device, broadcast to like's shape: [M] -> [M, 1, ...].

        The float32 copies of the schedule are cached per (array, device): sampling calls this
        ~10 times per diffusion step, and the conversion would otherwise dominate small batches."""
        key = (id(arr), t.device)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = torch.from_numpy(arr).float().to(t.device)
        return table[t].view(-1, *([1] * (like.dim() - 1))).expand_as(like)

    def _model(self, model: Denoiser, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        return model(x, self.timestep_map.to(t.device)[t], **kwargs)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)."""
        return (self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._at(self.posterior_mean_coef1, t, x_t) * x_start
                + self._at(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t)

    def p_mean_variance(self, out: Tensor, x: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Turn the denoiser output [M, 2C] (eps, v in [-1, 1]) into p(x_{t-1} | x_t)."""
        C = x.shape[1]
        eps, v = out[:, :C].float(), out[:, C:].float()
        min_log = self._at(self.posterior_log_variance_clipped, t, x)
        max_log = self._at(self.log_betas, t, x)
        frac = (v + 1) / 2  # learned range: v = -1 -> posterior variance, v = +1 -> beta
        log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = (self._at(self.sqrt_recip_alphas_cumprod, t, x) * x
                   - self._at(self.sqrt_recipm1_alphas_cumprod, t, x) * eps)
        mean, _ = self.q_posterior(pred_x0, x, t)
        return {"mean": mean, "log_variance": log_var, "pred_xstart": pred_x0}

    # ------------------------------------------------------------------ training
    def training_losses(self, model: Denoiser, x_start: Tensor, t: Tensor, noise: Tensor,
                        **model_kwargs) -> dict[str, Tensor]:
        """Per-row loss [M]: mean-squared eps error + the vb term (bits/dim) on the variance."""
        x_t = self.q_sample(x_start, t, noise)
        out = self._model(model, x_t, t, **model_kwargs)
        C = x_start.shape[1]
        eps = out[:, :C]
        # The vb term only trains the variance: the mean it sees is detached (IDDPM's hybrid loss).
        frozen = torch.cat([eps.detach(), out[:, C:]], dim=1)
        p = self.p_mean_variance(frozen, x_t, t)
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        kl = normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x_start, means=p["mean"], log_scales=0.5 * p["log_variance"]).mean(1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = ((noise - eps.float()) ** 2).mean(1)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def p_sample(self, model: Denoiser, x: Tensor, t: Tensor, noise: Tensor,
                 temperature: float = 1.0, **model_kwargs) -> Tensor:
        """One ancestral step x_t -> x_{t-1}; the noise is scaled by the temperature."""
        p = self.p_mean_variance(self._model(model, x, t, **model_kwargs), x, t)
        nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))  # no noise at the last step
        return p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise * temperature

    @torch.no_grad()
    def p_sample_loop(self, model: Denoiser, noise: Tensor, temperature: float = 1.0,
                      generator: torch.Generator | None = None, **model_kwargs) -> Tensor:
        """Run the reverse chain from ``noise`` [M, C]; each step's noise comes from ``generator``.

        Under CFG the batch is [cond; uncond] and the denoiser re-duplicates the conditional
        half every step, so only that half's noise matters (as in MAR)."""
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            z = (torch.randn(x.shape, device=x.device) if generator is None else
                 torch.randn(x.shape, generator=generator, device=generator.device).to(x.device))
            x = self.p_sample(model, x, t, z, temperature, **model_kwargs)
        return x

def create_diffusion(timestep_respacing: str = "", num_steps: int = 1000) -> GaussianDiffusion:
    """MAR's create_diffusion(noise_schedule="cosine", learn_sigma=True, loss MSE + vb)."""
    return GaussianDiffusion(cosine_betas(num_steps), space_timesteps(num_steps, timestep_respacing))


__all__ = ["GaussianDiffusion", "cosine_betas", "create_diffusion", "normal_kl", "space_timesteps"]
