"""CoMAE: the Collapse Masked Autoencoder (paper Sec. 3.1, 4.1 and 8; eq. 2-7).

For the tokens ``e_1..e_N`` of an image and a target patch ``n``:

* the **encoder** f sees ``[cls] + {e_i, i != n}`` (the target is *dropped*, not masked) and
  predicts selection weights ``w^n = (1 + tanh(Linear(cls))) / 2`` in ``[0, 1]^N`` with
  ``w^n_n = 0`` (eq. 2);
* every kept token is noised as ``e~_i = a_i e_i + (1 - a_i) eps`` with
  ``a_i = exp(-(1 - w^n_i)^2 / (2 sigma^2))`` (eq. 3-4);
* the **decoder** g sees ``[tgt cls] + {e~_i, i != n}`` and a 4-layer residual MLP turns its
  ``[tgt cls]`` output into ``e*_n`` (eq. 5);
* ``L = L_r + lambda L_c``: ``L_r = ||e_n - e*_n||_1`` and the contrastive term (eq. 6) over
  the targets sampled from one image; the mask entropy ``H_mask`` (eq. 7) is a metric.

Choices the paper leaves open:

* **Target query.** Each half owns its own learned table ``q [N, width]``: f adds ``q^f_n`` to
  its ``[cls]``, g adds ``q^g_n`` to its ``[tgt cls]``. The halves share no parameter, so each
  alternating step updates exactly one of them.
* **Positions.** Both halves use the shared 2-D RoPE over the patch grid. The ``[cls]`` token
  is rotated as if it sat at the *target's* cell, so its attention logits see every kept patch
  by its displacement from the target; the target's content never enters (it is dropped).
* **Units.** ``L_r`` is the L1 norm over the token channels (paper: 8.39 / 1.57 on 16-dim
  KL-16 tokens), averaged over (image, target) samples. ``H_mask`` sums ``-w log w`` over all N
  entries of a selection vector and averages over the M (image, target) samples.
* **Arguments, not state.** The network is built from a frozen :class:`ComaeArch` (as
  nanoGPT's ``GPTConfig``; ``pipeline.tasks.comae.comae_arch`` maps the ``comae`` params onto
  it). ``forward`` depends on its arguments only: the training task passes the step's
  selection budget (``budget=``) and the random numbers of ``w_shuffle`` (``shuffle=``).
* **Alternation.** ``forward(..., update=)``: "decoder" runs f without autograd (w constant),
  "encoder" runs g on detached parameters (gradient reaches w through g, none reaches g's
  weights); :mod:`pipeline.tasks.comae` picks g on even steps, f on odd steps.
* **Weights to read.** :func:`pipeline.tasks.comae.load_comae` prefers
  ``model_ema.safetensors`` when training kept an EMA (``comae.train.ema``), else
  ``model.safetensors``.
* **Read-out (beyond the paper).** ``comae.select_head: pointer`` scores each kept patch from
  its own output against [cls]'s (:class:`PointerHead`) instead of the paper's linear map of
  [cls] to N position-indexed logits; ``linear`` is the paper's (docs/comae-sweep.md).
* **Temperature.** ``tau = exp(log_tau)``, ``log_tau`` learnable, clamped to [0.01, 100]
  (CLIP's bound on its logit scale) so a runaway temperature cannot blow up the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pipeline.models.comae_blocks import ComaeError, PointerHead, ResidualMLP, _TargetStack
from pipeline.models.layers import RopeTables, init_vit_weights, rope_2d_tables

FORMAT = "cop-comae/1"
TAU_MIN, TAU_MAX = 1e-2, 1e2
Half = Literal["encoder", "decoder", "both"]


@dataclass(frozen=True)
class ComaeArch:
    """Everything the network is built from. ``grid`` and ``token_dim`` come from the latent
    store (N = grid^2 tokens, row-major); the rest from the ``comae`` params (same names)."""

    grid: int
    token_dim: int
    enc_dim: int = 64
    enc_depth: int = 4
    enc_heads: int = 4
    dec_dim: int = 32
    dec_depth: int = 4
    dec_heads: int = 4
    mlp_ratio: float = 4.0
    head_layers: int = 4  # residual MLP blocks after g
    sigma: float = 0.5  # eq. 4
    budget: float | None = None  # the mean of w a trained f reads with (None: unconstrained)
    decoder_sees_alpha: bool = False
    select_head: Literal["linear", "pointer"] = "linear"
    tau_init: float = 0.1  # initial value of tau: shapes the initial weights, not the network


# The fields that decide which network produces w (two runs that differ elsewhere -- lambda,
# tau_init, targets, training -- still give interchangeable models).
ARCH_FIELDS = tuple(f.name for f in fields(ComaeArch) if f.name not in ("grid", "token_dim", "tau_init"))


# ----------------------------------------------------------------------------- eq. 4, 6, 7


def noise_alpha(w: Tensor, sigma: float) -> Tensor:
    """Eq. 4: alpha = exp(-(1 - w)^2 / (2 sigma^2)); 1 at w = 1, exp(-1 / (2 sigma^2)) at w = 0."""
    return torch.exp(-((1.0 - w) ** 2) / (2.0 * sigma * sigma))


def reconstruction_loss(target: Tensor, recon: Tensor) -> Tensor:
    """L_r = ||e_n - e*_n||_1 per sample (sum over channels), mean over samples. [..., D]."""
    return (target.float() - recon.float()).abs().sum(-1).mean()


def contrastive_loss(w: Tensor, tau: Tensor) -> Tensor:
    """Eq. 6 over the T targets of each image: w [B, T, N] -> scalar.

    Row i's positive is itself (cosine 1); the other T - 1 targets of the same image are the
    negatives, so the loss pushes different targets towards different selections.
    """
    B, T, _ = w.shape
    z = F.normalize(w.float(), dim=-1, eps=1e-8)
    logits = z @ z.transpose(1, 2) / tau  # [B, T, T]
    labels = torch.arange(T, device=w.device).expand(B, T)
    return F.cross_entropy(logits.reshape(B * T, T), labels.reshape(B * T))


def mask_entropy(w: Tensor, eps: float = 1e-12) -> Tensor:
    """Eq. 7: -(1/M) sum_samples sum_j w_j log w_j; w [..., N], M = prod of the leading dims.
    0 log 0 = 0 (the clamp keeps log finite where w is exactly 0, e.g. the target entry)."""
    w = w.float()
    return -(w * w.clamp_min(eps).log()).sum(-1).mean()


class CoMAE(nn.Module):
    """Encoder f (selection), noise injection, decoder g (reconstruction) and temperature tau.

    ``grid`` and ``token_dim`` come from the latent store (N = grid^2 tokens, row-major).
    Parameter groups for the alternating optimisation: ``encoder`` (f, its target queries and
    ``log_tau``, which only L_c -- a function of f -- depends on) and ``decoder`` (g and head).
    """

    def __init__(self, arch: ComaeArch) -> None:
        super().__init__()
        self.arch = arch
        self.grid, self.token_dim = grid, token_dim = arch.grid, arch.token_dim
        self.num_tokens = N = grid * grid
        if N < 2:
            raise ComaeError(f"CoMAE needs at least 2 tokens (grid {grid})")
        for side in ("enc", "dec"):
            dim, heads = getattr(arch, f"{side}_dim"), getattr(arch, f"{side}_heads")
            if dim % heads:
                raise ComaeError(f"{side}_dim ({dim}) must be divisible by {side}_heads ({heads})")
        self.sigma = arch.sigma
        self.encoder = _TargetStack(token_dim, N, arch.enc_dim, arch.enc_depth, arch.enc_heads,
                                    arch.mlp_ratio)
        # [cls] -> N selection logits (paper), or a content-addressed pointer over the kept
        # patches (comae.select_head: pointer)
        self.select_head = (PointerHead(arch.enc_dim) if arch.select_head == "pointer"
                            else nn.Linear(arch.enc_dim, N))
        # With comae.decoder_sees_alpha each noised token carries its alpha as one more channel.
        self.decoder = _TargetStack(token_dim + int(arch.decoder_sees_alpha), N, arch.dec_dim,
                                    arch.dec_depth, arch.dec_heads, arch.mlp_ratio)
        self.recon_head = ResidualMLP(arch.dec_dim, token_dim, arch.head_layers)
        self.log_tau = nn.Parameter(torch.tensor(math.log(arch.tau_init)))

        # keep[n] = [0..N-1] without n: the tokens a sequence for target n holds.
        ar = torch.arange(N)
        keep = ar.expand(N, N)[~torch.eye(N, dtype=torch.bool)].view(N, N - 1)
        pos = torch.stack((ar // grid, ar % grid), dim=-1)  # [N, 2] (row, col)
        self.register_buffer("keep", keep, persistent=False)
        # seq_pos[n] = positions of [cls] (placed at the target's cell) + the kept tokens.
        self.register_buffer("seq_pos", torch.cat((pos.unsqueeze(1), pos[keep]), dim=1),
                             persistent=False)  # [N, N, 2]
        self._init_weights()

    def _init_weights(self) -> None:
        self.encoder.init_weights()
        self.decoder.init_weights()
        self.select_head.apply(init_vit_weights)
        self.recon_head.apply(init_vit_weights)

    # ------------------------------------------------------------------ parts
    def encoder_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.select_head.parameters(), self.log_tau]

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [*self.decoder.parameters(), *self.recon_head.parameters()]

    @property
    def tau(self) -> Tensor:
        return self.log_tau.clamp(math.log(TAU_MIN), math.log(TAU_MAX)).exp()

    def _rope(self, tgt: Tensor, head_dim: int) -> RopeTables:
        pos = self.seq_pos[tgt]  # [S, N, 2]
        return rope_2d_tables(pos, torch.ones(pos.shape[:2], dtype=torch.bool, device=pos.device),
                              head_dim)

    def check_tokens(self, tokens: Tensor) -> None:
        """tokens [B, N, D] must match the model's grid and token dim and be finite."""
        if tokens.ndim != 3 or tokens.shape[1:] != (self.num_tokens, self.token_dim):
            raise ComaeError(
                f"tokens of shape {tuple(tokens.shape)} do not fit this CoMAE, which expects "
                f"[B, {self.num_tokens}, {self.token_dim}] (grid {self.grid}x{self.grid}, "
                f"token dim {self.token_dim})"
            )
        bad = ~torch.isfinite(tokens).flatten(1).all(1)
        if bad.any():
            raise ComaeError(f"NaN/inf in the tokens of batch rows {bad.nonzero().flatten().tolist()}")

    def check_store(self, store: Any) -> None:
        """Refuse a latent store (``.grid``, ``.dim``) this model cannot read, naming both sides,
        before any work is done."""
        if (store.grid, store.dim) != (self.grid, self.token_dim):
            raise ComaeError(
                f"latent store {getattr(store, 'path', store)} holds a {store.grid}x{store.grid} "
                f"grid of {store.dim}-dim tokens, but this CoMAE is built for a {self.grid}x"
                f"{self.grid} grid of {self.token_dim}-dim tokens. Retrain CoMAE on this store "
                "(dvc repro train_comae) or use the latents it was trained on."
            )

    # ------------------------------------------------------------------ f, noise, g
    def _kept(self, tokens: Tensor, img: Tensor, tgt: Tensor) -> Tensor:
        """tokens [B, N, D] -> the kept tokens [S, N-1, D] of sequence s = (img[s], tgt[s])."""
        return tokens[img.unsqueeze(1), self.keep[tgt]]

    def selection_logits(self, tokens: Tensor, img: Tensor, tgt: Tensor) -> Tensor:
        """f's logits before the budget and tanh, for S sequences (image img[s], target
        tgt[s]): tokens [B, N, D] -> [S, N] float32 (the target's own entry is meaningless)."""
        kept = self._kept(tokens, img, tgt)
        rope = self._rope(tgt, self.encoder.head_dim)
        if self.arch.select_head == "linear":
            return self.select_head(self.encoder(kept, tgt, rope)).float()  # [S, N]
        cls, tok = self.encoder(kept, tgt, rope, with_tokens=True)
        kept_logits = self.select_head(cls, tok, self._rope(tgt, cls.shape[-1])).float()
        return kept_logits.new_zeros(len(tgt), self.num_tokens).scatter(
            1, self.keep[tgt], kept_logits)  # [S, N]

    def _select_seq(self, tokens: Tensor, img: Tensor, tgt: Tensor,
                    budget: float | None = None) -> Tensor:
        """f for S sequences: image img[s] with target tgt[s]. tokens [B, N, D] -> w [S, N].
        ``budget``: the mean of w to hold (None: the architecture's, ``arch.budget``)."""
        logits = self.selection_logits(tokens, img, tgt)
        budget = self.arch.budget if budget is None else budget
        if budget is not None:
            logits = logits - budget_shift(logits, tgt, budget)
        w = (1.0 + torch.tanh(logits)) / 2.0  # "tanh normalization" into [0, 1]
        return w.scatter(1, tgt.unsqueeze(1), 0.0)  # w^n_n = 0

    @staticmethod
    def _flat(targets: Tensor) -> tuple[Tensor, Tensor]:
        """targets [B, T] -> (image index, target index) per sequence, each [B*T]."""
        B, T = targets.shape
        return torch.arange(B, device=targets.device).repeat_interleave(T), targets.reshape(-1)

    def select(self, tokens: Tensor, targets: Tensor, budget: float | None = None) -> Tensor:
        """f: tokens [B, N, D], targets [B, T] -> selection weights w [B, T, N] (float32)."""
        img, tgt = self._flat(targets)
        return self._select_seq(tokens, img, tgt, budget).view(*targets.shape, -1)

    def noise(self, tokens: Tensor, targets: Tensor, w: Tensor, eps: Tensor) -> Tensor:
        """Eq. 3-4 on the kept tokens: tokens [B, N, D], targets [B, T], w [B, T, N],
        eps [B, T, N-1, D] -> noised kept tokens [B, T, N-1, D] (the target dropped), or
        [B, T, N-1, D+1] with alpha appended when ``comae.decoder_sees_alpha``: g is then told
        which tokens are clean, as MAE's decoder knows which are masked, instead of having to
        tell clean tokens from noise by their values."""
        img, tgt = self._flat(targets)
        kept = self._kept(tokens, img, tgt).view(eps.shape)  # [B, T, N-1, D]
        w_kept = torch.gather(w, 2, self.keep[targets])  # [B, T, N-1]
        alpha = noise_alpha(w_kept, self.sigma).unsqueeze(-1)
        noised = alpha * kept.float() + (1.0 - alpha) * eps.float()
        return torch.cat((noised, alpha), -1) if self.arch.decoder_sees_alpha else noised

    def reconstruct(self, noised: Tensor, targets: Tensor, frozen: bool = False) -> Tensor:
        """g: noised kept tokens [B, T, N-1, D], targets [B, T] -> e*_n [B, T, D].

        ``frozen`` runs g with detached parameters: gradients still reach ``noised`` (hence w
        and f) but none reach g's weights -- the encoder's half of the alternating step.
        """
        B, T, _, D = noised.shape
        tgt = targets.reshape(-1)
        rope = self._rope(tgt, self.decoder.head_dim)
        h = _call(self.decoder, frozen, noised.reshape(B * T, -1, D), tgt, rope)  # [B*T, C]
        return _call(self.recon_head, frozen, h).view(B, T, self.token_dim)

    def shuffle_perm(self, targets: Tensor, keys: Tensor) -> Tensor:
        """targets [B, T], keys [B, T, N-1] random numbers -> perm [B, T, N]: the target's
        entry stays in place, the N-1 others are permuted in the order that sorts ``keys``."""
        kept = self.keep[targets]  # [B, T, N-1] the non-target positions
        moved = torch.gather(kept, 2, keys.argsort(-1))
        perm = torch.arange(self.num_tokens, device=targets.device).repeat(*targets.shape, 1)
        return perm.scatter(2, kept, moved)

    def forward(self, tokens: Tensor, targets: Tensor, eps: Tensor, update: Half = "both",
                budget: float | None = None,
                shuffle: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """One training pass: tokens [B, N, D], targets [B, T] (distinct per image), eps
        [B, T, N-1, D] -> {"w" [B, T, N], "recon" [B, T, D], "target" [B, T, D], "tau" []}.

        ``update`` names the half that receives gradients (the alternating optimisation):
        "decoder" runs f without autograd (w is a constant for g); "encoder" runs g with
        detached parameters (gradients flow through g into w; g's weights get none);
        "both" is plain joint backprop.

        ``budget``: the mean of w that f must hold at this step (``comae.budget_start``
        anneals it); None: ``arch.budget``.

        ``shuffle`` = (rows [B, T] bool, keys [B, T, N-1] uniform random numbers): for the
        marked sequences g sees f's weights moved to random positions (the non-target entries
        permuted in the order of ``keys``), so g learns to read whichever tokens are clean
        rather than one fixed pattern (``comae.w_shuffle``). The returned ``w`` stays f's own.
        """
        if update not in ("encoder", "decoder", "both"):
            raise ValueError(f"update must be 'encoder', 'decoder' or 'both', got {update!r}")
        # tau is returned from here, not read by the caller: under DDP every parameter that
        # gets a gradient must be reached from forward()'s outputs.
        with torch.set_grad_enabled(torch.is_grad_enabled() and update != "decoder"):
            w = self.select(tokens, targets, budget)
            tau = self.tau
        w_dec = w
        if shuffle is not None:
            rows, keys = shuffle
            perm = self.shuffle_perm(targets, keys)
            w_dec = torch.where(rows.unsqueeze(-1), torch.gather(w, 2, perm), w)
        recon = self.reconstruct(self.noise(tokens, targets, w_dec, eps), targets,
                                 frozen=update == "encoder")
        target = torch.gather(tokens, 1, targets.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return {"w": w, "recon": recon, "target": target, "tau": tau}

    # ------------------------------------------------------------------ dependency matrices
    @torch.no_grad()
    def dependency_matrices(self, tokens: Tensor, chunk: int = 256,
                            dtype: torch.dtype = torch.float32) -> Tensor:
        """A [B, N, N] float32 with A[b, i, j] = w^i_j of image b (A[b, i, i] = 0).

        Runs f over all B*N (image, target) sequences of N tokens, ``chunk`` sequences per
        pass (bounds memory: the MLP activations are chunk * N * 4 * enc_dim values).
        ``dtype`` bfloat16 autocasts the pass (fast where the CPU/GPU has bf16 units).
        """
        self.check_tokens(tokens)
        B, N = tokens.shape[0], self.num_tokens
        dev = tokens.device
        img = torch.arange(B, device=dev).repeat_interleave(N)  # [B*N]
        tgt = torch.arange(N, device=dev).repeat(B)  # [B*N]
        out = torch.empty(B * N, N, dtype=torch.float32, device=dev)
        ctx = (torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32
               else torch.autocast(dev.type, enabled=False))
        with ctx:
            for s in range(0, B * N, chunk):
                out[s:s + chunk] = self._select_seq(tokens, img[s:s + chunk], tgt[s:s + chunk])
        return out.view(B, N, N)


def budget_shift(logits: Tensor, tgt: Tensor, budget: float, iters: int = 40) -> Tensor:
    """Per-row shift b [S, 1] such that the mean of ``(1 + tanh(l - b)) / 2`` over the N - 1
    non-target entries equals ``budget`` (``comae.budget``).

    Paper Sec. 3.1 reads the selection as "masking K patches", a fixed amount of context per
    target; without a budget nothing stops f from asking for every patch. b is found by
    bisection on detached logits, then one Newton step taken with autograd so the gradient
    w.r.t. the logits is (to first order) that of the exact constraint.
    """
    keep = torch.ones_like(logits, dtype=torch.bool).scatter(1, tgt.unsqueeze(1), False)
    n = keep.sum(1, keepdim=True).to(logits.dtype)

    def mean_w(lg: Tensor, b: Tensor) -> Tensor:
        return (((1 + torch.tanh(lg - b)) / 2) * keep).sum(1, keepdim=True) / n

    with torch.no_grad():
        lo = logits.amin(1, keepdim=True) - 20.0  # mean_w(lo) ~ 1
        hi = logits.amax(1, keepdim=True) + 20.0  # mean_w(hi) ~ 0
        for _ in range(iters):
            mid = (lo + hi) / 2
            above = mean_w(logits, mid) > budget
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        b0 = (lo + hi) / 2
    slope = (((1 - torch.tanh(logits - b0) ** 2) / 2) * keep).sum(1, keepdim=True) / n
    return b0 + (mean_w(logits, b0) - budget) / slope.clamp_min(1e-12)


def _call(module: nn.Module, frozen: bool, *args: Tensor) -> Tensor:
    """module(*args), or with ``frozen`` the same computation on detached parameters."""
    if not frozen:
        return module(*args)
    params = {k: v.detach() for k, v in module.named_parameters()}
    return functional_call(module, params, args)


__all__ = [
    "ARCH_FIELDS", "CoMAE", "ComaeError", "PointerHead", "ResidualMLP", "budget_shift",
    "contrastive_loss", "mask_entropy", "noise_alpha", "reconstruction_loss",
]
