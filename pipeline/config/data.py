"""Sections of the data stages: the source (``data``), the tokenizer and the latent store."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Precision, Section

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
