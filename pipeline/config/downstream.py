"""Sections of the stages that consume the orders: the judge, CViT and CMAR."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Section, TrainConfig, _heads_divide

class JudgeConfig(Section):
    """The classifier of real images that scores samples and teaches pretrain_vit."""

    width: int = Field(32, ge=8, description="channels at the stem (4x at the end)")
    max_shift: int = Field(4, ge=0, description="random shift (px) in training")
    roundtrip: float = Field(
        0.5, ge=0, le=1, description="share of training images rendered by the tokenizer "
        "(encode, decode) first, so the judge reads decoded samples as it reads images")
    train: TrainConfig = TrainConfig(steps=1000, batch_size=64, lr=2e-3, warmup_frac=0.05,
                                     betas=(0.9, 0.999), grad_clip=None, ckpt_every=250)



# The models of Tab. 5 (``train_cvit --variant``): full images, random drops, collapse drops;
# and the cheap competitor, drops by PSS's token norm (issue 20).
VARIANTS = ("vit", "rvit", "cvit", "cvit_pss")


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
    stem_from_judge: bool = Field(
        False, description="copy the judge's half-resolution layers (BatchNorm folded in) into "
        "the conv stem before training; needs cvit.model.stem=conv and stem_width=judge.width")
    train: TrainConfig = TrainConfig(steps=1500, batch_size=64, lr=2e-3, warmup_frac=0.05,
                                     weight_decay=0.05, ckpt_every=250)


class VitModelConfig(Section):
    """The ViT every CViT variant is (pretrain_vit, train_cvit). Its patch size follows from
    image size / latent grid; width and depth are the model's."""

    dim: int = Field(96, ge=8)
    depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    stem: Literal["linear", "conv"] = Field(
        "linear", description="patch embedding: linear (timm's, the paper's) or conv (a small "
        "CNN inside each patch, nothing crosses a patch border)")
    stem_width: int = Field(32, ge=1, description="conv stem: channels of its first layer")
    freeze_stem: bool = Field(
        False, description="keep the stem as loaded, in pretrain_vit and train_cvit: a conv "
        "stem's convolutions (from the judge; its projection still learns) or the whole linear "
        "patch embedding (published weights)")
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

    @model_validator(mode="after")
    def _stem(self) -> "CvitConfig":
        m = self.model
        if self.pretrain.stem_from_judge and m.stem != "conv":
            raise ValueError("pretrain.stem_from_judge copies the judge's layers into a conv stem: "
                             f"set model.stem=conv (it is {m.stem!r})")
        if m.pretrained and m.stem != "linear":
            raise ValueError("model.pretrained (timm ViT-B/16) has a linear patch embedding: set "
                             f"model.stem=linear (it is {m.stem!r})")
        if m.freeze_stem and not (m.pretrained or self.pretrain.stem_from_judge):
            raise ValueError("model.freeze_stem would freeze a random patch embedding: set "
                             "pretrain.stem_from_judge (conv stem) or model.pretrained")
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
    teaser_images: int = Field(
        128, ge=0, description="val images of the paper's teaser: each model's diffusion loss of "
        "the tokens not yet generated, revealing real tokens in its generation order (0: off)")
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
