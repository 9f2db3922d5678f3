"""Imports run one way: stages -> tasks -> models/orders/latents -> train/data/tokenizers/metrics
-> config/paths/utils -> params_trace, never back up and never sideways between packages of one layer."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [("stages",), ("tasks",), ("models", "orders", "latents"),
          ("train", "data", "tokenizers", "metrics"), ("config", "paths", "utils"), ("params_trace",)]
RANK = {pkg: i for i, names in enumerate(LAYERS) for pkg in names}


def _package(module: str) -> str | None:
    """``stages.x`` -> "stages"; ``pipeline.models.vit`` -> "models"; ``pipeline.config`` -> "config"."""
    parts = module.split(".")
    if parts[0] == "stages":
        return "stages"
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 and parts[1] in RANK else None


def test_imports_run_one_way():
    bad = []
    for path in sorted(REPO.glob("pipeline/**/*.py")) + sorted(REPO.glob("stages/*.py")):
        mine = _package(".".join(path.relative_to(REPO).with_suffix("").parts))
        if mine is None:  # pipeline/__init__.py
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
            else:
                continue
            for target in targets:
                theirs = _package(target)
                if theirs is None or theirs == mine:
                    continue
                if RANK[theirs] <= RANK[mine]:
                    bad.append(f"{path.relative_to(REPO)}: imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_networks_are_built_from_their_own_arch():
    """A network is built from an arch dataclass of its module (``ComaeArch``, ``MarArch``,
    ``VitArch``, ``JudgeArch``), as nanoGPT's from ``GPTConfig``: ``pipeline/models`` never reads
    the params schema; the tasks map params onto archs."""
    bad = []
    for path in sorted(REPO.glob("pipeline/models/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad += [f"{path.name}: imports {n}" for n in names
                    if n == "pipeline.config" or n.startswith("pipeline.config.")]
    assert not bad, bad


def test_stage_outputs_are_dvc_yamls():
    """``pipeline/paths.py`` is the one table of stage outputs: it names exactly the outs,
    metrics and plots dvc.yaml declares for every stage (matrix items as dvc.yaml spells them)."""
    import yaml

    from pipeline.paths import OUTS, outputs

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    item = {"train_cvit": {"name": "${item.variant}_s${item.seed}"}, "train_cmar": {"variant": "${item}"},
            "train_critic": {"variant": "${item}"}}
    assert set(OUTS) == set(stages)
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        declared = {next(iter(o)) if isinstance(o, dict) else o
                    for key in ("outs", "metrics", "plots") for o in stage.get(key, [])}
        ours = {str(p) for p in vars(outputs(name, "data", **item.get(name, {}))).values()}
        assert ours == declared, (name, sorted(ours ^ declared))

