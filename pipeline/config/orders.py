"""Sections of the stages that make collapse orders (CoMAE, its probe, the export) and judge
them (the critics, the order scores)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.config.base import Precision, Section, TrainConfig, _heads_divide


class ComaeConfig(Section):
    # Paper Sec. 8: encoder 256 / decoder 64 (Sec. 4 says the reverse; both are params).
    enc_dim: int = Field(64, ge=8)
    enc_depth: int = Field(4, ge=1)
    enc_heads: int = Field(4, ge=1)
    dec_dim: int = Field(32, ge=8)
    dec_depth: int = Field(4, ge=1)
    dec_heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    head_layers: int = Field(4, ge=1, description="residual MLP layers after the decoder")
    sigma: float = Field(0.5, gt=0, description="steepness of the noise interpolant (eq. 4)")
    lambda_: float = Field(0.01, ge=0, alias="lambda", description="weight of L_c (eq. 6)")
    tau_init: float = Field(0.1, gt=0, description="initial contrastive temperature")
    targets_per_image: int = Field(16, ge=1, description="targets sampled per image per step")
    # Options beyond the paper; null / 0 is the paper's method (docs/comae-sweep.md).
    budget: float | None = Field(
        None, gt=0, lt=1, description="fix the mean of w over the N-1 context patches (a "
        "selection budget, 'masking K patches'); null: unconstrained (paper)")
    budget_start: float | None = Field(
        None, gt=0, lt=1, description="anneal the budget from this value down to 'budget' "
        "over the first budget_anneal of training; null: the budget is constant")
    budget_anneal: float = Field(0.5, gt=0, le=1, description="share of training spent annealing")
    decoder_sees_alpha: bool = Field(
        False, description="give g each token's noise level alpha as an extra input channel "
        "(as MAE's decoder knows which tokens are masked); false: paper")
    select_head: Literal["linear", "pointer"] = Field(
        "linear", description="how f turns its output into w: a linear map of [cls] to N "
        "position-indexed logits (paper), or a pointer: [cls]'s attention score to each kept "
        "patch's output, addressed by content and displacement")
    w_shuffle: float = Field(
        0.0, ge=0, le=1, description="share of decoder-step sequences whose w is moved to random "
        "positions, so g learns to read any selection; 0: paper")
    report_images: int = Field(
        2048, ge=1, description="val images (evenly spaced) the selection diagnostics after "
        "training score, and train images the linear reference is fitted on; not the model's")
    train: TrainConfig = TrainConfig(steps=600, batch_size=16, lr=1e-3, ckpt_every=200)

    @model_validator(mode="after")
    def _check_heads(self) -> "ComaeConfig":
        return _heads_divide(self)


class ComaeProbeConfig(Section):
    """Stage ``probe_comae``: the same CoMAE (``comae``), trained on the copy-mechanism grids."""

    steps: int = Field(600, ge=1, description="training steps of the probe's CoMAE (its other "
                       "train settings are comae.train's)")
    images: int = Field(1024, ge=1, description="held-out grids (evenly spaced) scored for "
                        "precision@1")


# ----------------------------------------------------------------------------- orders


class OrdersConfig(Section):
    estimator: Literal["comae", "critic"] = Field(
        "comae", description="what fills the dependency matrix A: CoMAE's selections (paper) or "
        "how much revealing j lowers the builder critic's NLL of i (pipeline/orders/estimators.py)")
    critic_shares: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        [0.1, 0.3, 0.5, 0.7], min_length=1, description="estimator critic: shares of the tokens "
        "revealed in the random contexts A is averaged over (one set per share and image)")
    images_per_batch: int = Field(8, ge=1, description="images whose N targets run in one pass")
    precision: Precision = "auto"
    damping: float = Field(0.85, gt=0, lt=1)
    tol: float = Field(1e-10, gt=0)
    max_iter: int = Field(1000, ge=1)
    backend: Literal["torch", "scipy"] = "torch"
    topk: int | None = Field(None, ge=1, description="keep the top-k entries per row of A; null = dense")
    flip: Literal["map", "compute"] = Field(
        "compute", description="orders of flipped images: computed from flipped latents, or mapped"
    )
    save_matrix: bool = Field(False, description="store A (float16) in the shards")
    samples_per_shard: int = Field(256, ge=1)
    report_images: int = Field(
        4096, ge=1, description="images per split (evenly spaced) scored against the baselines")


# ----------------------------------------------------------------------------- critics


class CriticModelConfig(Section):
    """One critic (``train_critic``): an any-order masked token predictor."""

    dim: int = Field(96, ge=8)
    depth: int = Field(3, ge=1)
    heads: int = Field(4, ge=1)
    likelihood: Literal["gaussian", "laplace"] = "gaussian"
    seed: int = Field(1, description="initial weights; another than the root seed, which "
                      "initialises CoMAE")

    @model_validator(mode="after")
    def _check_heads(self) -> "CriticModelConfig":
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class CriticScoreConfig(Section):
    """Stage ``score_orders``: every order's collapse curve on val under the critics."""

    images: int = Field(256, ge=2, description="val images scored (evenly spaced over the split)")
    points: int = Field(16, ge=2, description="reveal counts k on the curve, evenly from 0 to N-N/points")
    greedy_images: int = Field(32, ge=0, description="images the greedy reference (N^2/2 critic "
                               "passes each) is built for; 0: none")
    batch_size: int = Field(256, ge=1, description="sequences per critic pass")
    bootstrap: int = Field(1000, ge=100, description="resamples of images for the 95% intervals")


class CriticConfig(Section):
    scorer: CriticModelConfig = CriticModelConfig()
    builder: CriticModelConfig = CriticModelConfig(dim=64, depth=4, likelihood="laplace", seed=2)
    train: TrainConfig = TrainConfig(steps=1000, batch_size=64, lr=1e-3, ckpt_every=250)
    score: CriticScoreConfig = CriticScoreConfig()
