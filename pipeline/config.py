"""The one schema for ``params.yaml``.

Every stage loads its section through :func:`load_params`; an invalid value stops the stage
before any work with an error that names the key (``comae.lambda``) and what is allowed.
Sections are strict (``extra="forbid"``) so a typo in a key is an error, not a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.params_trace import TracedModel

Precision = Literal["auto", "fp32", "bf16"]


class Section(TracedModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class ParamsError(ValueError):
    """A bad value in params.yaml (or a ``-S key=value`` override); names the key."""


# ----------------------------------------------------------------------------- data


class SyntheticConfig(Section):
    """The embedded default image set: generated, labelled, with object masks."""

    num_classes: int = Field(6, ge=2, le=64)
    train_per_class: int = Field(64, ge=1)
    val_per_class: int = Field(16, ge=1)
    pretrain_per_class: int = Field(
        0, ge=0, description="images per class of the 'pretrain' split (judge, pretrain_vit, "
        "pretrain_mar); 0: no such split, those stages learn from train")
    image_size: int = Field(64, ge=16)
    seed: int = 0


class DataConfig(Section):
    source: Literal["synthetic", "imagefolder", "webdataset"] = "synthetic"
    synthetic: SyntheticConfig = SyntheticConfig()
    # imagefolder: ROOT/{train,val}/<class>/<file> (ImageNet's val layout is accepted too).
    root: str | None = None
    # webdataset: brace patterns (local paths, file:// or https://) per split.
    train_urls: str | None = None
    val_urls: str | None = None
    crop_size: int = Field(64, ge=8, description="ADM/MAR center crop side in pixels")
    min_size: int = Field(
        0, ge=0, description="skip images whose short side is below this (0: upsample any)"
    )
    image_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = Field(95, ge=50, le=100)
    shard_size: int = Field(1000, ge=1, description="images per prepared tar shard")
    strict: bool = Field(False, description="fail on the first bad input instead of skipping it")
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _source_has_location(self) -> "DataConfig":
        if self.source == "imagefolder" and not self.root:
            raise ValueError("data.root is required when data.source is 'imagefolder'")
        if self.source == "webdataset" and not self.train_urls:
            raise ValueError("data.train_urls is required when data.source is 'webdataset'")
        return self


# ----------------------------------------------------------------------------- tokenizer


class TokenizerConfig(Section):
    kind: Literal["patch", "kl16"] = Field(
        "patch",
        description="'patch' is the offline STAND-IN (a linear patch tokenizer fitted on the "
        "data); 'kl16' is MAR's KL-16 VAE and needs a local checkpoint",
    )
    # kl16: MAR's kl16.ckpt (LDM keys under "model"), a diffusers folder, or a .safetensors file.
    checkpoint: str | None = None
    # patch stand-in
    patch_size: int = Field(8, ge=1)
    dim: int = Field(16, ge=1)
    fit_images: int = Field(256, ge=1, description="training images used to fit the stand-in")
    # encoding
    batch_size: int = Field(16, ge=1)
    precision: Precision = "auto"
    channels_last: bool = True
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _kl16_needs_checkpoint(self) -> "TokenizerConfig":
        if self.kind == "kl16" and not self.checkpoint:
            raise ValueError(
                "tokenizer.checkpoint is required when tokenizer.kind is 'kl16' "
                "(download MAR's kl16.ckpt and pass its local path)"
            )
        return self


class LatentsConfig(Section):
    rows_per_chunk: int = Field(64, ge=1, description="Zarr chunk (rows) inside a shard")
    rows_per_shard: int = Field(1024, ge=1, description="Zarr shard (rows): the unit of work")
    compression_level: int = Field(3, ge=0, le=22)

    @model_validator(mode="after")
    def _shard_holds_whole_chunks(self) -> "LatentsConfig":
        # Zarr's sharding codec needs the shard shape to be a multiple of the chunk shape.
        if self.rows_per_shard % self.rows_per_chunk:
            raise ValueError(f"rows_per_shard ({self.rows_per_shard}) must be a multiple of "
                             f"rows_per_chunk ({self.rows_per_chunk})")
        return self


# ----------------------------------------------------------------------------- training


class TrainConfig(Section):
    """Shared by every trained model (CoMAE, CViT, CMAR): one trainer loop reads it."""

    steps: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1, description="global batch (split across ranks)")
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_frac: float = Field(0.0, ge=0, le=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(1.0, gt=0)
    ema: float | None = Field(None, gt=0, lt=1, description="EMA decay; null disables EMA")
    precision: Precision = "auto"
    ckpt_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    num_workers: int = Field(0, ge=0)
    seed: int = Field(0, description="this run's data order, flips and per-step noise (the "
                      "trainer's (seed, step) stream); the initial weights follow the root seed")

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


# ----------------------------------------------------------------------------- CoMAE


def _heads_divide(section: BaseModel) -> Any:
    """An encoder/decoder section's widths must split evenly over their attention heads."""
    for side in ("enc", "dec"):
        dim, heads = getattr(section, f"{side}_dim"), getattr(section, f"{side}_heads")
        if dim % heads:
            raise ValueError(f"{side}_dim ({dim}) must be divisible by {side}_heads ({heads})")
    return section


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
    train: TrainConfig = TrainConfig(steps=600, batch_size=16, lr=1e-3, ckpt_every=200)

    @model_validator(mode="after")
    def _check_heads(self) -> "ComaeConfig":
        return _heads_divide(self)


class ComaeProbeConfig(Section):
    """Stage ``probe_comae``: the same CoMAE (``comae``), trained on the copy-mechanism grids."""

    steps: int = Field(600, ge=1, description="training steps of the probe's CoMAE (its other "
                       "train settings are comae.train's)")


# ----------------------------------------------------------------------------- orders


class OrdersConfig(Section):
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


# ----------------------------------------------------------------------------- judge


class JudgeConfig(Section):
    """The classifier of real images that scores samples and teaches pretrain_vit."""

    width: int = Field(32, ge=8, description="channels at the stem (4x at the end)")
    max_shift: int = Field(4, ge=0, description="random shift (px) in training")
    roundtrip: float = Field(
        0.5, ge=0, le=1, description="share of training images rendered by the tokenizer "
        "(encode, decode) first, so the judge reads decoded samples as it reads images")
    train: TrainConfig = TrainConfig(steps=1000, batch_size=64, lr=2e-3, warmup_frac=0.05,
                                     betas=(0.9, 0.999), grad_clip=None, ckpt_every=250)


# ----------------------------------------------------------------------------- CViT

# The models of Tab. 5 (``train_cvit --variant``): full images, random drops, collapse drops.
VARIANTS = ("vit", "rvit", "cvit")


class CvitPretrainConfig(Section):
    """Stage ``pretrain_vit``: the ViT every variant starts from, trained on full images of
    the pretrain pool and distilled from the judge (DeiT's soft distillation). Skipped (the
    published weights are recorded instead) when ``cvit.model.pretrained`` is set."""

    distill: float = Field(0.5, ge=0, le=1, description="weight a of the distillation term: "
                           "(1 - a) CE(labels) + a T^2 KL(teacher/T || student/T)")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of both models")
    max_shift: int = Field(4, ge=0, description="random shift (px) besides the flip; the judge "
                           "sees the same augmented image")
    eval_every: int = Field(250, ge=1, description="val top-1 every N steps (learning curve)")
    train: TrainConfig = TrainConfig(steps=1500, batch_size=64, lr=2e-3, warmup_frac=0.05,
                                     weight_decay=0.05, ckpt_every=250)


class VitModelConfig(Section):
    """The ViT every CViT variant is (pretrain_vit, train_cvit). Its patch size follows from
    image size / latent grid; width and depth are the model's."""

    dim: int = Field(96, ge=8)
    depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    pretrained: str | None = Field(None, description="timm ViT-B/16 weights (.safetensors/.pth)")


class CvitEvalConfig(Section):
    """What eval_cvit measures (read by no training stage)."""

    ratios: list[float] = Field(
        default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.78, 0.85, 0.9, 0.95, 0.99]
    )
    batch_size: int = Field(64, ge=1)
    random_draws: int = Field(
        3, ge=1, description="random drops per image averaged in the random rows (ViT, RViT)")
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples of val images "
                           "for the 95% intervals")

    @model_validator(mode="after")
    def _ratios(self) -> "CvitEvalConfig":
        bad = [r for r in self.ratios if not 0.0 <= r < 1.0]
        if bad:
            raise ValueError(f"ratios must lie in [0, 1); got {bad}")
        for needed in (0.0, 0.3, 0.5, 0.78):
            if needed not in self.ratios:
                raise ValueError(f"ratios must include {needed} (a Tab. 5 column)")
        return self


class CvitConfig(Section):
    """Sections by reader: ``model`` (pretrain_vit, train_cvit), ``pretrain`` (pretrain_vit),
    the fine-tuning keys and ``train`` (train_cvit), ``eval`` (eval_cvit)."""

    model: VitModelConfig = VitModelConfig()
    allow_missing_keys: bool = False
    max_mask_ratio: float = Field(0.99, ge=0, lt=1)
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1], min_length=1,
        description="one fine-tuning run per variant and seed (dvc.yaml's train_cvit matrix); "
        "the seed decides the run: initial weights not loaded from pretraining, data order, "
        "flips, drops")
    pretrain: CvitPretrainConfig = CvitPretrainConfig()
    train: TrainConfig = TrainConfig(steps=300, batch_size=32, lr=1e-3, ema=None, ckpt_every=100)

    eval: CvitEvalConfig = CvitEvalConfig()

    @model_validator(mode="after")
    def _seeds(self) -> "CvitConfig":
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds has duplicates: {self.seeds}")
        return self


# ----------------------------------------------------------------------------- CMAR


class CmarModelConfig(Section):
    """The MAR that pretrain_mar, train_cmar and eval_cmar build, and where its weights start.
    MAR-B: enc/dec 768 x 12 (12 heads), buffer 64, diffloss 6 x 1024. The CPU default is tiny."""

    enc_dim: int = Field(64, ge=8)
    enc_depth: int = Field(2, ge=1)
    enc_heads: int = Field(4, ge=1)
    dec_dim: int = Field(64, ge=8)
    dec_depth: int = Field(2, ge=1)
    dec_heads: int = Field(4, ge=1)
    buffer_size: int = Field(8, ge=1)
    diffloss_d: int = Field(2, ge=1)
    diffloss_w: int = Field(128, ge=8)
    diffusion_batch_mul: int = Field(4, ge=1)
    label_drop_prob: float = Field(0.1, ge=0, le=1)
    mask_ratio_min: float = Field(0.7, ge=0, le=1)
    attn_dropout: float = Field(0.1, ge=0, lt=1)
    proj_dropout: float = Field(0.1, ge=0, lt=1)
    posterior_sample: bool = Field(True, description="train on posterior samples (MAR), not means")
    pretrained: str | None = Field(None, description="MAR checkpoint-last.pth to fine-tune")
    pretrained_key: Literal["model_ema", "model"] = Field(
        "model_ema", description="which state dict of the MAR checkpoint to start from")
    allow_missing_keys: bool = False

    @model_validator(mode="after")
    def _check_heads(self) -> "CmarModelConfig":
        return _heads_divide(self)


class CmarSampleConfig(Section):
    """What eval_cmar samples and scores with (read by no training stage)."""

    sample_order: Literal["class", "train_image", "random"] = "class"
    num_iter: int = Field(16, ge=1, description="autoregressive steps at sampling")
    num_sampling_steps: str = Field("100", pattern=r"^(|ddim\d+|\d+(,\d+)*)$",
                                    description="the diffusion head's respaced sampling steps")
    cfg: float = Field(3.0, ge=1.0, le=20.0)
    cfg_schedule: Literal["linear", "constant"] = "linear"
    temperature: float = Field(1.0, gt=0, le=5.0)
    samples_per_class: int = Field(16, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    inception_weights: str | None = Field(
        None, description="pt_inception-2015-12-05 weights (.pth); enables FID/IS")
    reference_batch: str | None = Field(
        None, description="ADM reference batch .npz (VIRTUAL_imagenet256_labeled.npz)")

    @model_validator(mode="after")
    def _fid_inputs(self) -> "CmarSampleConfig":
        if self.reference_batch and not self.inception_weights:
            raise ValueError("reference_batch needs inception_weights (FID is computed in Inception space)")
        return self


class CmarConfig(Section):
    """Sections by reader: ``model`` (pretrain_mar, train_cmar, eval_cmar), the order keys
    (train_cmar, eval_cmar), ``pretrain`` (pretrain_mar), ``train`` (train_cmar), ``sample``
    (eval_cmar), so a sampling key reruns eval_cmar alone."""

    model: CmarModelConfig = CmarModelConfig()
    order: Literal["collapse", "random"] = "collapse"
    direction: Literal["descending", "ascending"] = "descending"
    random_order_share: float = Field(0.1, ge=0, le=1)
    train: TrainConfig = TrainConfig(steps=300, batch_size=32, lr=1e-3, ema=0.999, ckpt_every=100)
    pretrain: TrainConfig = Field(
        TrainConfig(steps=3000, batch_size=32, lr=1e-3, ckpt_every=500),
        description="pretrain_mar: MAR in random order on the pretrain pool, the start of "
        "every train_cmar variant (unused when cmar.model.pretrained is set)")
    sample: CmarSampleConfig = CmarSampleConfig()


# ----------------------------------------------------------------------------- root


class Params(Section):
    seed: int = Field(0, description="initial weights (CoMAE, CViT), the generated data set, "
                      "eval_cvit's random drops and eval_cmar's sampling; each training run's "
                      "data order and noise follow its own train.seed")
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    latents: LatentsConfig = LatentsConfig()
    comae: ComaeConfig = ComaeConfig()
    comae_probe: ComaeProbeConfig = ComaeProbeConfig()
    orders: OrdersConfig = OrdersConfig()
    judge: JudgeConfig = JudgeConfig()
    cvit: CvitConfig = CvitConfig()
    cmar: CmarConfig = CmarConfig()


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {dotted!r}: {p!r} is not a section")
    node[leaf] = value


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read and validate params.yaml; ``overrides`` are ``key.sub=value`` (YAML values)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found (run from the repository root or pass --params)")
    raw = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        if "=" not in item:
            raise ParamsError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    return parse_params(raw, str(path))


def params_dict(params: BaseModel) -> dict[str, Any]:
    """The params as plain data with their params.yaml spelling (``lambda``, not ``lambda_``)."""
    return params.model_dump(mode="json", by_alias=True)
