"""Sample-quality metrics: Fréchet distance, Inception Score, k-NN precision/recall, ADM batches.

The math is independent of the feature network. With the FID Inception network
(pipeline/models/inception.py, weights from a local file) these are FID, IS and the ADM suite's
precision/recall; in any other feature space the Fréchet number is NOT an FID and the stage
names it after its network (e.g. ``frechet_cvit_distance``).

- Fréchet distance (Heusel et al. 2017): ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), the matrix
  square root by scipy (pytorch-fid's recipe: an eps·I offset when the product is singular,
  the imaginary part dropped when it is numerical noise).
- Precision/recall (Kynkäänniemi et al. 2019, as in ADM's evaluator): a sample is inside the
  other set's manifold when it lies within the k-th nearest-neighbour radius (k = 3, self
  excluded) of at least one of that set's points. precision = fakes inside the real manifold,
  recall = reals inside the fake manifold.
- Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean over splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from pipeline.utils.images import to_unit


@torch.no_grad()
def inception_features(net: torch.nn.Module, images_u8: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Pool features and logits (float64) of the FID Inception on uint8 images [n, H, W, 3]."""
    pools, logits = [], []
    dev = next(net.parameters()).device
    for s in range(0, len(images_u8), batch):
        p, lg = net(to_unit(images_u8[s:s + batch]).to(dev))
        pools.append(p.cpu())
        logits.append(lg.cpu())
    return torch.cat(pools).double().numpy(), torch.cat(logits).double().numpy()


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features [n, d] -> (mu [d], sigma [d, d]) in float64 (sigma: unbiased covariance)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need [n >= 2, d] features for a covariance, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        # A singular product (fewer samples than dimensions): regularise both covariances.
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances [len(a), len(b)] in float64 (exact enough for ties)."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min(0)


def manifold_radii(features: np.ndarray, k: int = 3, batch: int = 1024) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour in the same set (self excluded)."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if f.shape[0] <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {f.shape[0]}")
    out = []
    for s in range(0, f.shape[0], batch):
        d = _sq_dists(f[s:s + batch], f)
        # index 0 of the sorted row is the point itself (distance 0); index k is the k-th neighbour
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out).numpy()


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch: int = 1024) -> np.ndarray:
    p = torch.as_tensor(np.asarray(points), dtype=torch.float64)
    c = torch.as_tensor(np.asarray(centres), dtype=torch.float64)
    r = torch.as_tensor(radii, dtype=torch.float64)
    hits = [(_sq_dists(p[s:s + batch], c) <= r[None]).any(dim=1) for s in range(0, p.shape[0], batch)]
    return torch.cat(hits).numpy()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.) of ``fake`` against ``real``."""
    precision = float(_inside(fake, real, manifold_radii(real, k)).mean())
    recall = float(_inside(real, fake, manifold_radii(fake, k)).mean())
    return precision, recall


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` of exp(E KL(p(y|x) || p(y))) from classifier logits [n, C]."""
    lg = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = lg.shape[0]
    splits = max(1, min(splits, n))
    logp = torch.log_softmax(lg, dim=1)
    scores = []
    for part in torch.tensor_split(logp, splits):
        log_py = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log of the marginal p(y)
        kl = (part.exp() * (part - log_py[None])).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


@dataclass
class ReferenceBatch:
    """ADM's reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): the statistics FID compares
    against (pool features of the whole training set) and the images precision/recall use."""

    mu: np.ndarray | None          # [2048]
    sigma: np.ndarray | None       # [2048, 2048]
    images: np.ndarray | None      # uint8 [n, H, W, 3] ("arr_0")
    mu_s: np.ndarray | None = None  # spatial (mixed_6/conv) statistics for sFID, when present
    sigma_s: np.ndarray | None = None


def read_reference_batch(path: str | Path) -> ReferenceBatch:
    """Read an ADM ``.npz`` as published (no pickle): arr_0, mu, sigma, mu_s, sigma_s."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch {path} not found")
    with np.load(path, allow_pickle=False) as z:
        names = set(z.files)
        get = lambda k: np.asarray(z[k]) if k in names else None  # noqa: E731
        ref = ReferenceBatch(mu=get("mu"), sigma=get("sigma"), images=get("arr_0"),
                             mu_s=get("mu_s"), sigma_s=get("sigma_s"))
    if ref.mu is None and ref.images is None:
        raise ValueError(f"{path} has neither 'mu'/'sigma' nor 'arr_0' (keys: {sorted(names)})")
    if (ref.mu is None) != (ref.sigma is None):
        raise ValueError(f"{path} has only one of 'mu' and 'sigma'")
    if ref.mu is not None and (ref.mu.ndim != 1 or ref.sigma.shape != (ref.mu.size, ref.mu.size)):
        raise ValueError(f"{path}: mu {ref.mu.shape} and sigma {ref.sigma.shape} do not match")
    if ref.images is not None and (ref.images.ndim != 4 or ref.images.shape[-1] != 3
                                   or ref.images.dtype != np.uint8):
        raise ValueError(f"{path}: arr_0 must be uint8 [n, H, W, 3], got {ref.images.dtype} {ref.images.shape}")
    return ref


__all__ = ["ReferenceBatch", "feature_stats", "frechet_distance", "frechet_distance_features", "inception_features",
           "inception_score", "manifold_radii", "precision_recall", "read_reference_batch"]
