"""params.yaml, profiles and dvc.yaml agree with the schema and with each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, load_params, params_dict
from tests.support import expand_items

REPO = Path(__file__).resolve().parents[1]


def _dvc_param_keys() -> set[str]:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    keys = set()
    for stage in dvc["stages"].values():
        keys |= set(expand_items(stage))
    return keys



def _has(tree: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


@pytest.mark.parametrize("path", ["params.yaml", "profiles/full.yaml", "profiles/smoke.yaml"])
def test_every_dvc_param_is_written_out(path):
    # DVC reads the params file literally: a key that only has a schema default is "missing".
    raw = yaml.safe_load((REPO / path).read_text())
    missing = sorted(k for k in _dvc_param_keys() if not _has(raw, k))
    assert not missing, f"{path} lacks keys that dvc.yaml tracks: {missing}"


@pytest.mark.parametrize("path", ["params.yaml", "profiles/full.yaml", "profiles/smoke.yaml"])
def test_profiles_write_out_every_key_of_the_schema(path):
    # DVC sees only what the file spells out: a key left to its schema default could change
    # (in pipeline/config/) without re-running anything. The file must be the schema's full dump.
    raw = yaml.safe_load((REPO / path).read_text())
    assert raw == params_dict(load_params(REPO / path))


def test_train_cmar_tracks_exactly_the_training_keys():
    # train_cmar must re-run when a training key changes and must not when only a
    # sampling/eval key does (eval_cmar re-runs alone for Tab. 3's CFG sweep).
    from pipeline.tasks.cmar import train_config

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train_cmar"]["do"]  # foreach variant
    training = {f"cmar.{k}" for k in train_config(load_params(REPO / "params.yaml").cmar)}
    assert set(stage["params"]) == {"seed", "cmar.train"} | training


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


# ----------------------------------------------------------------------------- stage deps

# stages/cli.py only turns the command line into params (pipeline/config/, a dep of every
# stage); pipeline/__init__.py holds a docstring and the version. Package __init__ files with
# no code (a docstring at most) are no deps either.
NOT_DEPS = {"stages/cli.py", "pipeline/__init__.py"}


def _has_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def _module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    for cand in (path.with_suffix(".py"), path / "__init__.py"):
        if cand.exists():
            return cand
    return None


def _imported_files(start: Path) -> set[str]:
    """Every project file ``start`` imports, directly or not (imports inside functions too)."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen or str(path.relative_to(REPO)) in NOT_DEPS:
            continue
        seen.add(path)
        names: list[str] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] not in ("pipeline", "stages"):
                continue
            parts = name.split(".")
            for i in range(2, len(parts) + 1):  # a module runs its packages' __init__ first
                f = _module_file(".".join(parts[:i]))
                if f is not None:
                    todo.append(f)
    return {str(p.relative_to(REPO)) for p in seen if _has_code(p)}


def test_every_stage_depends_on_the_code_it_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        module = stage["cmd"].split("-m ")[1].split()[0]
        deps = [d for d in stage["deps"] if (REPO / d).exists()]
        for f in sorted(_imported_files(_module_file(module))):
            if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps):
                problems.append(f"{name}: {f}")
    assert not problems, "stages import code they do not depend on:\n" + "\n".join(problems)
