"""Where the export's dependency matrices come from (``orders.estimator``).

The graph-and-PageRank route needs only ``A[i, j]``: how much patch i depends on patch j.
Two estimators fill it; both write the same shard format and name themselves in the set's
identity (``manifest.identity.estimator`` and a section of that name):

* ``comae`` (the paper): CoMAE's N soft selections of an image, one per target.
* ``critic``: ``A[i, j]`` = how much revealing j lowers the *builder* critic's NLL of hidden
  patch i, ``NLL_i(R) - NLL_i(R + {j})`` clipped at 0, averaged over random reveal sets R
  (shares ``orders.critic_shares`` of the tokens; only sets where i and j are both hidden
  count). N + 1 critic passes per set and image. It asks directly what the paper's criterion
  measures, without CoMAE's relaxation; the scorer critic, which judges every order in
  ``score_orders``, has no part in it.

The critic's reveal sets are drawn per image from a generator keyed by the seed and the
image's token bytes, so a row's matrix depends on nothing else: not its batch, the world
size or where a killed export stopped.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import torch
from torch import Tensor

from pipeline.metrics.collapse import positions_first

ESTIMATORS = ("comae", "critic")
CRITIC_VARIANT = "builder"  # the scorer judges the orders; it must not build one


class EstimatorError(ValueError):
    """An estimator whose inputs do not fit the latents (names what to change)."""


class CriticGraph:
    """``dependency_matrices`` (the export's ``DependencyModel``) from a trained critic
    (:class:`pipeline.models.critic.Critic`: ``.nll(tokens, revealed)`` and ``.arch``)."""

    def __init__(self, critic: Any, shares: Sequence[float], seed: int) -> None:
        self.critic = critic
        self.shares = [float(s) for s in shares]
        self.seed = int(seed)

    def eval(self) -> "CriticGraph":
        self.critic.eval()
        return self

    def check_store(self, store: Any) -> None:
        a = self.critic.arch
        if (store.num_tokens, store.dim) != (a.num_tokens, a.token_dim):
            raise EstimatorError(
                f"latent store {getattr(store, 'path', store)} holds {store.num_tokens} tokens of "
                f"{store.dim} channels, but the critic is built for {a.num_tokens} of "
                f"{a.token_dim}: retrain it on this store (dvc repro train_critic@{CRITIC_VARIANT})")

    def _reveal_sets(self, image: Tensor) -> Tensor:
        """bool [S, N]: one random reveal set per share, drawn from this image's own key."""
        N = image.shape[0]
        key = zlib.crc32(image.detach().float().cpu().numpy().tobytes())
        gen = torch.Generator().manual_seed(((self.seed & 0xFFFFFFFF) << 32) | key)
        rank = torch.stack([torch.rand(N, generator=gen).argsort() for _ in self.shares])
        return torch.stack([positions_first(rank[s:s + 1], max(1, round(share * N)))[0]
                            for s, share in enumerate(self.shares)])

    @torch.no_grad()
    def dependency_matrices(self, tokens: Tensor, chunk: int = 4096,
                            dtype: torch.dtype = torch.float32) -> Tensor:
        """tokens [B, N, D] -> float32 A [B, N, N] (A_ii = 0)."""
        B, N, _ = tokens.shape
        device = tokens.device
        R = torch.stack([self._reveal_sets(t) for t in tokens]).to(device)  # [B, S, N]
        S = R.shape[1]
        # every (image, set) once as is and once with each j added: [B, S, N + 1, N]
        eye = torch.eye(N, dtype=torch.bool, device=device)
        variants = torch.cat([R[:, :, None], R[:, :, None] | eye], dim=2)
        flat = variants.reshape(-1, N)
        # sequence q belongs to image q // (S (N + 1)); its tokens are gathered a chunk at a
        # time, so memory stays at ``chunk`` sequences (B S (N + 1) copies would be ~1 GB at 16x16)
        image_of = torch.arange(B, device=device).repeat_interleave(S * (N + 1))
        amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        with amp:
            nll = torch.cat([self.critic.nll(tokens[image_of[s:s + chunk]], flat[s:s + chunk]).float()
                             for s in range(0, len(flat), chunk)])
        nll = nll.reshape(B, S, N + 1, N)
        base, added = nll[:, :, :1], nll[:, :, 1:]  # [B, S, 1, N], [B, S, N(j), N(i)]
        gain = (base - added).clamp_min(0).transpose(2, 3)  # [B, S, N(i), N(j)]
        hidden = ~R  # both i and j hidden in the set
        both = (hidden[:, :, :, None] & hidden[:, :, None, :]).float()
        A = (gain * both).sum(1) / S
        A.diagonal(dim1=1, dim2=2).zero_()
        return A


__all__ = ["CRITIC_VARIANT", "CriticGraph", "ESTIMATORS", "EstimatorError"]
