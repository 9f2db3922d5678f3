"""params.yaml, profiles and dvc.yaml agree with the schema and with each other."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, load_params, params_dict

REPO = Path(__file__).resolve().parents[1]


def _dvc_param_keys() -> set[str]:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    keys = set()
    for stage in dvc["stages"].values():
        for p in stage.get("do", stage).get("params", []):
            if isinstance(p, str):
                keys.add(p)
    return keys


def _has(tree: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


@pytest.mark.parametrize("path", ["params.yaml", "profiles/full.yaml"])
def test_every_dvc_param_is_written_out(path):
    # DVC reads the params file literally: a key that only has a schema default is "missing".
    raw = yaml.safe_load((REPO / path).read_text())
    missing = sorted(k for k in _dvc_param_keys() if not _has(raw, k))
    assert not missing, f"{path} lacks keys that dvc.yaml tracks: {missing}"


@pytest.mark.parametrize("path", ["params.yaml", "profiles/full.yaml"])
def test_profiles_validate(path):
    params = load_params(REPO / path)
    assert params_dict(params)["comae"]["lambda"] == params.comae.lambda_


def test_bad_values_name_the_key_and_the_allowed_values(tmp_path):
    with pytest.raises(ParamsError) as err:
        load_params(REPO / "params.yaml", ["comae.lambda=-1", "tokenizer.kind=vq"])
    text = str(err.value)
    assert "comae.lambda" in text and "greater than or equal to 0" in text
    assert "tokenizer.kind" in text and "'patch' or 'kl16'" in text
    with pytest.raises(ParamsError, match=r"comae: .*enc_dim \(30\) must be divisible by enc_heads"):
        load_params(REPO / "params.yaml", ["comae.enc_dim=30"])


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ParamsError, match="comae.lamda"):
        load_params(REPO / "params.yaml", ["comae.lamda=0.1"])


def test_kl16_needs_a_checkpoint():
    with pytest.raises(ParamsError, match="tokenizer.checkpoint is required"):
        load_params(REPO / "params.yaml", ["tokenizer.kind=kl16"])
