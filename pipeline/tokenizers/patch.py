"""OFFLINE STAND-IN for KL-16: a linear patch tokenizer fitted on the data (PCA of pixel patches).

It exists so the default CPU profile runs end to end with no download. It is *not* the
paper's tokenizer; it only shares KL-16's interface and latent layout.

- A token is the PCA projection of one p×p×3 pixel patch (values in [-1, 1]) onto the top
  ``dim`` principal components of the training patches: ``y = U^T (x - μ)``. Encoding is a
  single stride-p conv2d whose kernels are the components, so it is batched and fast.
- Decoding is the transpose (conv_transpose2d with the same kernels) plus μ: the
  least-squares reconstruction from the kept components.
- logvar (constant per component, so ``moments`` has KL-16's ``[mean ‖ logvar]`` layout) is
  the posterior variance of probabilistic PCA (Tipping & Bishop 1999) in token units:
  σ² = mean of the discarded eigenvalues (pixel noise the components do not explain) and
  var_k = σ² (1 − σ²/λ_k) for kept eigenvalue λ_k, floored at 1e-8·mean(λ) so it stays
  finite when nothing is discarded. Sampling from it perturbs tokens by about the
  reconstruction error, as a VAE posterior would.
- ``scale_factor`` = 1 / sqrt(mean of the kept eigenvalues): the training tokens have zero
  mean per component, so scaled tokens have unit standard deviation overall (KL-16's 0.2325
  plays the same role).
The fit is deterministic: patches come from the given images in order (a seeded subsample
when there are more than ``max_patches``), the covariance is accumulated in float64 and the
sign of each component is fixed (largest-magnitude entry positive).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.tokenizers.base import Tokenizer

MAX_PATCHES = 1 << 18  # 262144 patches: a 192×192 covariance is well determined long before
FIT_SEED = 0


def _as_image_batch(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    arr = np.stack(images) if not isinstance(images, np.ndarray) else images
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [n, H, W, 3], got {arr.dtype} {arr.shape}")
    return arr


class PatchTokenizer(Tokenizer):
    """STAND-IN tokenizer: PCA of p×p pixel patches (see module docstring)."""

    kind = "patch"

    def __init__(self, patch_size: int = 8, dim: int = 16) -> None:
        super().__init__()
        if dim > 3 * patch_size * patch_size:
            raise ValueError(f"dim {dim} exceeds the patch's {3 * patch_size ** 2} pixel values")
        self._p, self._dim = int(patch_size), int(dim)
        d = 3 * patch_size * patch_size
        # Buffers (not parameters): nothing here is trained by gradient; they are the weights.
        self.register_buffer("components", torch.zeros(dim, 3, patch_size, patch_size))  # U^T
        self.register_buffer("mean", torch.zeros(3, patch_size, patch_size))  # μ
        self.register_buffer("logvar", torch.zeros(dim))
        self.register_buffer("eigenvalues", torch.zeros(d))  # all, descending (for the record)
        self.register_buffer("scale", torch.zeros(()))
        self.register_buffer("fit_count", torch.zeros((), dtype=torch.int64))  # patches used

    # ------------------------------------------------------------------ geometry
    @property
    def patch_size(self) -> int:
        return self._p

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def scale_factor(self) -> float:
        return float(self.scale)

    @property
    def fitted(self) -> bool:
        return bool(self.fit_count > 0)

    def auto_dtype(self, device: torch.device) -> torch.dtype:
        # One small conv: bf16 buys no speed here and costs 3 significant digits.
        return torch.float32

    def config(self) -> dict[str, Any]:
        return {"patch_size": self._p, "dim": self._dim, "fit_patches": int(self.fit_count),
                "stand_in": True}

    # ------------------------------------------------------------------ fit
    def _patches(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [n, H, W, 3] -> float64 patches [n·(H/p)·(W/p), 3·p·p] in [-1, 1]."""
        p = self._p
        n, h, w, _ = images.shape
        if h % p or w % p:
            raise ValueError(f"image size {h}×{w} is not a multiple of the patch size {p}")
        x = torch.from_numpy(images).to(torch.float64).div_(127.5).sub_(1.0)  # [n,H,W,3]
        x = x.reshape(n, h // p, p, w // p, p, 3)
        # (C, kh, kw) per patch: the flattening order of a conv2d kernel [dim, 3, p, p].
        return x.permute(0, 1, 3, 5, 2, 4).reshape(-1, 3 * p * p)

    def fit(self, images: np.ndarray | Sequence[np.ndarray], max_patches: int = MAX_PATCHES
            ) -> "PatchTokenizer":
        """Fit the PCA on uint8 images [n, H, W, 3] (all their patches, or a seeded sample)."""
        patches = self._patches(_as_image_batch(images))  # [P, D]
        if patches.shape[0] > max_patches:
            g = torch.Generator().manual_seed(FIT_SEED)
            keep = torch.randperm(patches.shape[0], generator=g)[:max_patches].sort().values
            patches = patches[keep]
        if patches.shape[0] < 2:
            raise ValueError("need at least two patches to fit the patch tokenizer")
        mu = patches.mean(0)  # [D]
        xc = patches - mu
        cov = xc.T @ xc / (patches.shape[0] - 1)  # [D, D]
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)  # descending
        # eigh's sign per vector is arbitrary: make the largest-magnitude entry positive.
        idx = evecs.abs().argmax(0)
        evecs = evecs * torch.sign(evecs[idx, torch.arange(evecs.shape[1])])
        kept = evals[: self._dim]
        dropped = evals[self._dim:]
        sigma2 = dropped.mean() if dropped.numel() else torch.zeros((), dtype=torch.float64)
        floor = 1e-8 * max(float(kept.mean()), 1e-12)
        var = (sigma2 * (1.0 - sigma2 / kept.clamp_min(1e-30))).clamp_min(floor)  # [dim]
        p = self._p
        self.components.copy_(evecs[:, : self._dim].T.reshape(self._dim, 3, p, p))
        self.mean.copy_(mu.reshape(3, p, p))
        self.logvar.copy_(var.log())
        self.eigenvalues.copy_(evals)
        self.scale.copy_(1.0 / kept.mean().clamp_min(1e-12).sqrt())
        self.fit_count.fill_(patches.shape[0])
        # The buffers' memory format must follow the current precision setting.
        return self.set_precision(self.precision, self.channels_last)

    # ------------------------------------------------------------------ math
    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("the patch tokenizer is not fitted: call .fit(images) or load one")

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        w = self.components.to(x.dtype)  # [dim, 3, p, p]
        # y = U^T (x - μ) = conv(x, U) - U^T μ
        bias = -(w.flatten(1) @ self.mean.flatten().to(x.dtype))  # [dim]
        mean = F.conv2d(x, w, bias, stride=self._p)  # [B, dim, H/p, W/p]
        logvar = self.logvar.to(mean.dtype).view(1, -1, 1, 1).expand_as(mean)
        return torch.cat([mean, logvar], dim=1)  # [B, 2·dim, h, w]

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        w = self.components.to(z.dtype)
        x = F.conv_transpose2d(z, w, stride=self._p)  # [B, 3, h·p, w·p] = Σ_k z_k U_k
        h, ww = z.shape[-2:]
        return x + self.mean.to(x.dtype).repeat(1, h, ww)  # + μ tiled over the grid
