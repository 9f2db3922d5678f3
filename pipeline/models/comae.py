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
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pipeline.config import ComaeConfig
from pipeline.models.layers import (
    Block,
    RopeTables,
    apply_rope,
    init_vit_weights,
    rope_2d_tables,
    trunc_normal_,
)

FORMAT = "cop-comae/1"
# ComaeConfig fields that define the network that produces w; the rest (lambda, tau_init,
# targets_per_image, train) shape training only and may differ between trainer and reader.
ARCH_FIELDS = ("enc_dim", "enc_depth", "enc_heads", "dec_dim", "dec_depth", "dec_heads",
               "mlp_ratio", "head_layers", "sigma", "budget", "decoder_sees_alpha",
               "select_head")
TAU_MIN, TAU_MAX = 1e-2, 1e2
Half = Literal["encoder", "decoder", "both"]


class ComaeError(ValueError):
    """CoMAE input or weights that cannot be used: wrong grid/dim, other config, NaN/inf."""


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


# ----------------------------------------------------------------------------- modules


class ResidualMLP(nn.Module):
    """The decoder's head: ``layers`` pre-norm residual MLP blocks (MAR's ResBlock without
    adaLN), then LayerNorm + Linear to the token dim."""

    def __init__(self, dim: int, out_dim: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, dim), nn.SiLU(),
                          nn.Linear(dim, dim))
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = x + blk(x)
        return self.out(self.norm(x))


class _TargetStack(nn.Module):
    """Shared body of f and g: embed the kept tokens, prepend ``[cls] + q_n``, run pre-norm
    RoPE blocks and return the final-norm ``[cls]`` output."""

    def __init__(self, token_dim: int, num_tokens: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.embed = nn.Linear(token_dim, dim)
        self.cls = nn.Parameter(torch.zeros(1, dim))
        self.query = nn.Parameter(torch.zeros(num_tokens, dim))  # q_n, one row per target
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_dim = dim // heads
        if self.head_dim % 4:
            raise ComaeError(f"2-D RoPE needs width/heads divisible by 4, got {dim}/{heads}")

    def init_weights(self) -> None:
        self.apply(init_vit_weights)
        trunc_normal_(self.cls)
        trunc_normal_(self.query)

    def forward(self, kept: Tensor, tgt: Tensor, rope: RopeTables,
                with_tokens: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """kept: [S, N-1, D] the tokens of S sequences with their target dropped; tgt: [S]
        target indices; rope: tables [S, N, hd] for [cls] + kept. Returns [cls] out [S, C];
        with ``with_tokens`` also the kept tokens as they enter the last block [S, N-1, C]
        (the last block's token outputs are never computed: only [cls] reads them)."""
        h = self.embed(kept)  # [S, N-1, C]
        cls = (self.cls + self.query[tgt]).unsqueeze(1).to(h.dtype)  # [S, 1, C]
        h = torch.cat((cls, h), dim=1)  # [S, N, C]
        for blk in self.blocks[:-1]:
            h = blk(h, rope=rope)
        out = self.norm(_cls_only_block(self.blocks[-1], h, rope))  # [S, C]
        return (out, h[:, 1:]) if with_tokens else out


def _cls_only_block(blk: Block, x: Tensor, rope: RopeTables) -> Tensor:
    """``blk(x, rope)[:, 0]`` computed for the [cls] row only: [S, L, C] -> [S, C].

    Only the [cls] output of the last block is used, so its query, output projection and MLP
    are computed for one row instead of L (the keys and values still need every token). This
    saves ~5/6 of the last block; a test checks it against ``Block.forward``.
    """
    attn = blk.attn
    S, L, C = x.shape
    H, hd = attn.num_heads, attn.head_dim
    y = blk.norm1(x)
    # Split the fused qkv weight so q is computed for the [cls] row only.
    w_q, w_kv = attn.qkv.weight[:C], attn.qkv.weight[C:]
    b_q, b_kv = (None, None) if attn.qkv.bias is None else (attn.qkv.bias[:C], attn.qkv.bias[C:])
    q = F.linear(y[:, :1], w_q, b_q).reshape(S, 1, H, hd).transpose(1, 2)  # [S, H, 1, hd]
    kv = F.linear(y, w_kv, b_kv).reshape(S, L, 2, H, hd).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)  # [S, H, L, hd]
    cos, sin = rope
    q = apply_rope(q, (cos[:, :1], sin[:, :1])).to(v.dtype)
    k = apply_rope(k, rope).to(v.dtype)
    # One query row: softmax(q kᵀ / √hd) v written out. The fused CPU SDPA kernel's
    # single-query path changes the last bits with the intra-op thread count, which made
    # exported scores depend on it; these matmuls are row-local (docs/architecture.md).
    o = (q @ k.transpose(-2, -1)).mul_(hd ** -0.5).softmax(-1) @ v  # [S, H, 1, hd]
    h = x[:, 0] + attn.proj(o.reshape(S, C))  # [S, C]
    return h + blk.mlp(blk.norm2(h))


class PointerHead(nn.Module):
    """Selection logits addressed by content (``comae.select_head: pointer``; beyond the paper).

    The paper reads w off the [cls] output with one linear map to N position-indexed logits, so
    "which patch" must be spelled out by absolute position in [cls]'s features. Here the logit
    of kept patch j is an attention score between [cls]'s output and patch j's state,
    ``<R_n q(cls), R_j k(h_j)> / sqrt(C) + b`` with the 2-D RoPE rotations R of the target's
    cell n and of j: it depends on j's content and on its displacement from the target, the
    two things a dependency can be about. h_j is the token as it enters the last block, the
    same keys the last block's [cls] attends to, so the last block still runs for [cls] only.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 4:
            raise ComaeError(f"the pointer head's 2-D RoPE needs a width divisible by 4, got {dim}")
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, cls: Tensor, kept: Tensor, rope: RopeTables) -> Tensor:
        """cls [S, C] (final, normed), kept [S, N-1, C]; rope tables [S, N, C] for [cls] +
        kept -> logits [S, N-1]."""
        cos, sin = rope
        q = apply_rope(self.q(cls)[:, None, None], (cos[:, :1], sin[:, :1]))  # [S, 1, 1, C]
        k = apply_rope(self.k(self.norm(kept)).unsqueeze(1), (cos[:, 1:], sin[:, 1:]))
        return (q @ k.transpose(-2, -1))[:, 0, 0] * cls.shape[-1] ** -0.5 + self.bias


class CoMAE(nn.Module):
    """Encoder f (selection), noise injection, decoder g (reconstruction) and temperature tau.

    ``grid`` and ``token_dim`` come from the latent store (N = grid^2 tokens, row-major).
    Parameter groups for the alternating optimisation: ``encoder`` (f, its target queries and
    ``log_tau``, which only L_c -- a function of f -- depends on) and ``decoder`` (g and head).
    """

    def __init__(self, cfg: ComaeConfig, grid: int, token_dim: int) -> None:
        super().__init__()
        self.cfg, self.grid, self.token_dim = cfg, grid, token_dim
        self.num_tokens = N = grid * grid
        if N < 2:
            raise ComaeError(f"CoMAE needs at least 2 tokens (grid {grid})")
        self.sigma = cfg.sigma
        self.encoder = _TargetStack(token_dim, N, cfg.enc_dim, cfg.enc_depth, cfg.enc_heads,
                                    cfg.mlp_ratio)
        # [cls] -> N selection logits (paper), or a content-addressed pointer over the kept
        # patches (comae.select_head: pointer)
        self.select_head = (PointerHead(cfg.enc_dim) if cfg.select_head == "pointer"
                            else nn.Linear(cfg.enc_dim, N))
        # With comae.decoder_sees_alpha each noised token carries its alpha as one more channel.
        self.decoder = _TargetStack(token_dim + int(cfg.decoder_sees_alpha), N, cfg.dec_dim, cfg.dec_depth, cfg.dec_heads,
                                    cfg.mlp_ratio)
        self.recon_head = ResidualMLP(cfg.dec_dim, token_dim, cfg.head_layers)
        self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.tau_init)))
        # The training task anneals the budget (comae.budget_start); trained models read
        # with comae.budget.
        self.budget_now: float | None = None

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

    def config(self) -> dict[str, Any]:
        """What config.json stores: enough to rebuild the network (``pipeline.tasks.comae``)."""
        return {"format": FORMAT, "grid": self.grid, "token_dim": self.token_dim,
                "comae": self.cfg.model_dump(mode="json", by_alias=True, exclude={"train"})}

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
        if self.cfg.select_head == "linear":
            return self.select_head(self.encoder(kept, tgt, rope)).float()  # [S, N]
        cls, tok = self.encoder(kept, tgt, rope, with_tokens=True)
        kept_logits = self.select_head(cls, tok, self._rope(tgt, cls.shape[-1])).float()
        return kept_logits.new_zeros(len(tgt), self.num_tokens).scatter(
            1, self.keep[tgt], kept_logits)  # [S, N]

    def _select_seq(self, tokens: Tensor, img: Tensor, tgt: Tensor) -> Tensor:
        """f for S sequences: image img[s] with target tgt[s]. tokens [B, N, D] -> w [S, N]."""
        logits = self.selection_logits(tokens, img, tgt)
        budget = self.cfg.budget if self.budget_now is None else self.budget_now
        if budget is not None:
            logits = logits - budget_shift(logits, tgt, budget)
        w = (1.0 + torch.tanh(logits)) / 2.0  # "tanh normalization" into [0, 1]
        return w.scatter(1, tgt.unsqueeze(1), 0.0)  # w^n_n = 0

    @staticmethod
    def _flat(targets: Tensor) -> tuple[Tensor, Tensor]:
        """targets [B, T] -> (image index, target index) per sequence, each [B*T]."""
        B, T = targets.shape
        return torch.arange(B, device=targets.device).repeat_interleave(T), targets.reshape(-1)

    def select(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """f: tokens [B, N, D], targets [B, T] -> selection weights w [B, T, N] (float32)."""
        img, tgt = self._flat(targets)
        return self._select_seq(tokens, img, tgt).view(*targets.shape, -1)

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
        return torch.cat((noised, alpha), -1) if self.cfg.decoder_sees_alpha else noised

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

    def forward(self, tokens: Tensor, targets: Tensor, eps: Tensor, update: Half = "both",
                shuffle: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """One training pass: tokens [B, N, D], targets [B, T] (distinct per image), eps
        [B, T, N-1, D] -> {"w" [B, T, N], "recon" [B, T, D], "target" [B, T, D], "tau" []}.

        ``update`` names the half that receives gradients (the alternating optimisation):
        "decoder" runs f without autograd (w is a constant for g); "encoder" runs g with
        detached parameters (gradients flow through g into w; g's weights get none);
        "both" is plain joint backprop.

        ``shuffle`` = (rows [B, T] bool, perm [B, T, N] long): for the marked sequences g sees
        f's weights moved to random positions (``perm`` permutes the non-target entries), so
        g learns to read whichever tokens are clean rather than one fixed pattern
        (``comae.w_shuffle``). The returned ``w`` stays f's own.
        """
        if update not in ("encoder", "decoder", "both"):
            raise ValueError(f"update must be 'encoder', 'decoder' or 'both', got {update!r}")
        # tau is returned from here, not read by the caller: under DDP every parameter that
        # gets a gradient must be reached from forward()'s outputs.
        with torch.set_grad_enabled(torch.is_grad_enabled() and update != "decoder"):
            w = self.select(tokens, targets)
            tau = self.tau
        w_dec = w
        if shuffle is not None:
            rows, perm = shuffle
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
