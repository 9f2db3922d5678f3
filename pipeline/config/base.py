"""What every section shares: strict frozen sections, the error type, the trainer's config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.params_trace import TracedModel

Precision = Literal["auto", "fp32", "bf16"]


class Section(TracedModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class ParamsError(ValueError):
    """A bad value in params.yaml (or a ``-S key=value`` override); names the key."""



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



def _heads_divide(section: BaseModel) -> Any:
    """An encoder/decoder section's widths must split evenly over their attention heads."""
    for side in ("enc", "dec"):
        dim, heads = getattr(section, f"{side}_dim"), getattr(section, f"{side}_heads")
        if dim % heads:
            raise ValueError(f"{side}_dim ({dim}) must be divisible by {side}_heads ({heads})")
    return section

