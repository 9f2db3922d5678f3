"""The one schema for ``params.yaml``.

Every stage loads its section through :func:`load_params`; an invalid value stops the stage
before any work with an error that names the key (``comae.lambda``) and what is allowed.
Sections are strict (``extra="forbid"``) so a typo in a key is an error, not a silent default.

The sections live beside the stages that read them (:mod:`.data`, :mod:`.orders`,
:mod:`.downstream`; :mod:`.base` holds what they share); this module is the root and the loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from pipeline.config.base import ParamsError, Precision, Section, TrainConfig
from pipeline.config.data import DataConfig, LatentsConfig, SyntheticConfig, TokenizerConfig
from pipeline.config.downstream import (
    VARIANTS, CmarConfig, CmarModelConfig, CmarSampleConfig, CvitConfig, CvitEvalConfig,
    CvitPretrainConfig, JudgeConfig, VitModelConfig,
)
from pipeline.config.orders import (
    ComaeConfig, ComaeProbeConfig, CriticConfig, CriticModelConfig, CriticScoreConfig, OrdersConfig,
)


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
    critic: CriticConfig = CriticConfig()
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


__all__ = [
    "Params", "ParamsError", "Precision", "Section", "TrainConfig", "DataConfig", "SyntheticConfig",
    "TokenizerConfig", "LatentsConfig", "ComaeConfig", "ComaeProbeConfig", "OrdersConfig",
    "CriticConfig", "CriticModelConfig", "CriticScoreConfig",
    "JudgeConfig", "VARIANTS", "CvitConfig", "CvitEvalConfig", "CvitPretrainConfig",
    "VitModelConfig", "CmarConfig", "CmarModelConfig", "CmarSampleConfig",
    "load_params", "parse_params", "params_dict",
]
