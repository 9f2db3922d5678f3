"""The whole pipeline through DVC, on a tiny profile, in a scratch copy of the repository.

This is the user's path (`dvc repro`, `dvc exp run -S comae.lambda=...`, `dvc metrics show`),
so it checks dvc.yaml, the stage scripts and the contracts between modules together.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import expand_items, scratch_repo

REPO = Path(__file__).resolve().parents[1]

# The smoke profile: every stage on a tiny generated set, a few steps each.
TINY = yaml.safe_load((REPO / "profiles" / "smoke.yaml").read_text())


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = scratch_repo(tmp_path_factory.mktemp("repo"))
    # The smoke profile writes out every key dvc.yaml tracks, as DVC needs.
    shutil.copy2(REPO / "profiles" / "smoke.yaml", root / "params.yaml")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "COP_NO_PROGRESS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    env.pop("PYTHONPATH", None)
    _run(["git", "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "tiny"], root, env)
    return root, env


# (stage, key): tracked by the stage although this smoke run does not read it, with the reason.
# Every other tracked key must be read, and every read key tracked (test below).
# (list_source runs on every repro, `always_changed`: its params record values, never decide.)
TRACKED_UNREAD = {
    ("probe_comae", "comae.train.steps"): "replaced by comae_probe.steps, the probe's length",
    ("probe_comae", "comae.report_images"): "train_comae's report cap; the probe tracks the comae "
                                            "section whole (its model is that section)",
    ("train_judge", "tokenizer.checkpoint"): "read when tokenizer.kind is kl16",
    ("eval_cmar", "tokenizer.checkpoint"): "read when tokenizer.kind is kl16",
    ("eval_cvit", "tokenizer.checkpoint"): "read when tokenizer.kind is kl16 (its FLOPs are counted)",
    ("train_cvit", "cvit.allow_missing_keys"): "read when cvit.model.pretrained is set",
}
# Keys whose edit is checked through `dvc status`: every key of the probe, sampling and
# evaluation sections, and a sample of the others (all of them would take minutes).
STATUS_KEYS = (
    "comae_probe.steps", *(f"cmar.sample.{k}" for k in TINY["cmar"]["sample"]),
    "cvit.seeds", *(f"cvit.eval.{k}" for k in TINY["cvit"]["eval"]), "orders.report_images",
    "seed", "comae.lambda", "comae.train.log_every", "comae.select_head", "cmar.model.enc_dim",
    "cmar.order", "cmar.train.steps", "cmar.pretrain.steps", "cvit.pretrain.distill",
    "cvit.train.lr", "cvit.train.seed", "judge.width", "tokenizer.kind", "latents.rows_per_chunk",
    "data.synthetic.seed", "data.crop_size", "orders.damping",
    *(f"critic.score.{k}" for k in TINY["critic"]["score"]), "critic.builder.dim", "critic.train.steps",
)


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_leaves(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _other(value: object) -> object:
    """Another value of the same kind (dvc status compares values; nothing validates them)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return value[::-1] if len(value) > 1 else value + value
    return 1 if value is None else f"{value}x"


def _check_params_follow_readers(root: Path, env: dict[str, str], trace: Path) -> None:
    """dvc.yaml's params are exactly what each stage's code reads (``COP_PARAMS_TRACE``: the
    keys read from the params, or dumped into a stored config, during the repro), and editing
    a key makes `dvc status` report exactly its readers."""
    from dvc.repo import Repo

    raw = yaml.safe_load((root / "params.yaml").read_text())
    keys = _leaves(raw)
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    reads = {name: set(json.loads((trace / f"{name}.json").read_text()))
             if (trace / f"{name}.json").exists() else set() for name in stages}
    problems = []
    for name, stage in stages.items():
        if stage.get("always_changed"):
            continue
        tracked_at = expand_items(stage)
        tracked = {k for k in keys if any(k == t or k.startswith(f"{t}.") for t in tracked_at)}
        allowed = {k for (s, k) in TRACKED_UNREAD if s == name}
        problems += [f"{name} reads {k}, which dvc.yaml does not track" for k in sorted(reads[name] - tracked)]
        problems += [f"{name} tracks {k}, which it does not read" for k in sorted(tracked - reads[name] - allowed)]
        problems += [f"TRACKED_UNREAD: {name} does read {k}" for k in sorted(allowed & reads[name])]
    assert not problems, "\n".join(problems)

    original = (root / "params.yaml").read_text()
    try:
        for key in STATUS_KEYS:
            edited = yaml.safe_load(original)
            *parents, leaf = key.split(".")
            node = edited
            for p in parents:
                node = node[p]
            node[leaf] = _other(node[leaf])
            (root / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
            with Repo(str(root)) as repo_:  # `dvc status --json`, without a process per key
                status = repo_.status()
            # names: "[path/dvc.yaml:]stage[@item]" -> stage
            bases = {name: name.split(":")[-1].split("@")[0] for name in status}
            changed = {bases[name] for name, why in status.items()
                       if not stages[bases[name]].get("always_changed")
                       and any(isinstance(w, dict) and "params.yaml" in w.get("changed deps", {})
                               for w in why)}
            readers = {name for name in stages if not stages[name].get("always_changed")
                       and (key in reads[name] or (name, key) in TRACKED_UNREAD)}
            assert changed == readers, (key, changed, readers)
    finally:
        (root / "params.yaml").write_text(original)


@pytest.mark.slow
def test_dvc_repro_and_experiments(repo):
    root, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    trace = root.parent / f"{root.name}-params-read"
    _run(dvc + ["repro"], root, {**env, "COP_PARAMS_TRACE": str(trace)})
    _check_params_follow_readers(root, env, trace)
    # Every file the stages wrote is inside an output dvc.yaml declares (pipeline/paths.py).
    from pipeline.paths import OUTS

    def inside(rel: Path, out: str) -> bool:  # a matrix item's out: any item
        if "{" in out:
            head, tail = out.split("{")[0], out.split("}")[-1]
            return any(str(Path(*rel.parts[:i])).startswith(head) and str(Path(*rel.parts[:i])).endswith(tail)
                       for i in range(1, len(rel.parts) + 1))
        return rel.parts[:len(Path(out).parts)] == Path(out).parts

    outs = [p for stage in OUTS.values() for p in stage.values()]
    strays = [str(f.relative_to(root / "data")) for f in sorted((root / "data").rglob("*"))
              if f.is_file() and f.name != ".gitignore"
              and not any(inside(f.relative_to(root / "data"), o) for o in outs)]
    assert not strays, f"written by no declared output: {strays}"

    metrics = json.loads(_run(dvc + ["metrics", "show", "--json"], root, env).stdout)
    flat = json.dumps(metrics)
    for name in ("prepare.json", "extract_latents.json", "comae.json", "orders.json",
                 "cvit.json", "cmar.json"):
        assert name in flat, f"{name} missing from dvc metrics show"
    comae = json.loads((root / "data/metrics/comae.json").read_text())
    for key in ("L_r", "L_c", "H_mask"):
        assert key in comae and comae[key] == comae[key]  # present and not NaN
    assert (root / "data/orders/train/manifest.json").exists()
    orders = json.loads((root / "data/metrics/orders.json").read_text())
    for name in ("collapse", "random", "fixed", "centre", "pixel_variance", "token_saliency"):
        assert 0.0 <= orders[f"auc_{name}"] <= 1.0, name  # every order scored beside the others
    assert orders["auc_random"] == pytest.approx(0.5, abs=0.25)
    probe = json.loads((root / "data/metrics/comae_probe.json").read_text())
    assert 0.0 <= probe["precision_at_1"] <= 1.0 and probe["chance"] == pytest.approx(1 / 15)
    assert "L_r_own" in json.loads((root / "data/reports/comae.json").read_text())["val"]
    assert (root / "data/plots/cvit_accuracy.csv").exists()
    # CViT's honest cost: the tokenizer counted, the collapse order's compute on top of the ViT's
    cost = json.loads((root / "data/reports/cvit.json").read_text())["order_cost"]
    assert cost["tokenizer_mflop"] > 0 and cost["rows"]["CViT"]["order"] == "collapse"
    assert cost["rows"]["CViT"]["vs_full_vit"] > cost["rows"]["ViT"]["vs_full_vit"] > 0
    # Declared metrics are headline figures: flat, a dozen or so per stage; the rest is in reports.
    for path in sorted((root / "data/metrics").glob("*.json")):
        m = json.loads(path.read_text())
        assert len(m) <= 16 and not any(isinstance(v, (dict, list)) for v in m.values()), path.name
    for name in ("prepare", "extract_latents", "comae", "orders", "pretrain_vit", "cvit_train_cvit_s0", "cvit",
                 "judge", "pretrain_mar", "cmar_train_cmar", "cmar_train_mar", "cmar"):
        assert (root / "data/reports" / f"{name}.json").exists(), name
    # Every plot DVC draws is one dvc.yaml declares (x and y given), or an image.
    plots = json.loads(_run(dvc + ["plots", "show", "--json"], root, env).stdout)["data"]
    declared = {next(iter(p)) for p in yaml.safe_load((root / "dvc.yaml").read_text())["plots"]}
    assert {k for k, v in plots.items() if v[0]["type"] == "vega"} == declared
    assert all(k.endswith(".png") for k, v in plots.items() if v[0]["type"] != "vega")
    # The offline report, rebuilt by the last stage.
    page = (root / "data/report.html").read_text()
    assert "https://" not in page and "http://" not in page and '<table class="orders">' in page
    assert '<h2 id="cvit">' in page and "cost × full ViT" in page

    # Nothing changed: a second repro runs no stage.
    out = _run(dvc + ["repro"], root, env).stdout
    assert "didn't change" in out or "is up to date" in out or "Data and pipelines are up to date" in out

    # The Tab. 1 ablation as an experiment, compared side by side.
    _run(dvc + ["exp", "run", "-S", "comae.lambda=0", "--name", "no-contrastive"], root, env)
    shown = json.loads(_run(dvc + ["exp", "show", "--json"], root, env).stdout)
    assert "no-contrastive" in json.dumps(shown)
    # The README's experiment table fits 120 columns and shows the Tab. 1 figures.
    line = next(ln for ln in (REPO / "README.md").read_text().splitlines()
                if ln.startswith("dvc exp show"))
    table = _run([*dvc, *shlex.split(line)[1:], "--no-pager"], root,
                 {**env, "COLUMNS": "1000"}).stdout
    assert max(len(ln.rstrip()) for ln in table.splitlines()) <= 120, table
    for col in ("Experiment", "comae.lambda", "L_r", "L_c", "H_mask", "auc_collapse"):
        assert col in table, (col, table)
    assert "no-contrastive" in table

    # The export's other estimator (docs/criterion.md): same shard format, named in the set,
    # and score_orders times the estimator that made the exported orders.
    py = [sys.executable, "-m"]
    _run(py + ["stages.export_orders", "-S", "orders.estimator=critic"], root, env)
    _run(py + ["stages.score_orders", "-S", "orders.estimator=critic"], root, env)
    ident = json.loads((root / "data/orders/val/manifest.json").read_text())["identity"]
    assert ident["estimator"] == "critic" and ident["critic"]["variant"] == "builder"
    scored = json.loads((root / "data/reports/order_scores.json").read_text())
    assert scored["costs"]["collapse"]["built_by"] == "critic"
    assert set(scored["l1"]["area"]) == set(scored["summary"]["area"])


@pytest.mark.slow
def test_changed_data_retrains_from_scratch(repo):
    """Switching the data and running ``dvc repro`` must retrain, not resume the finished runs
    that ``persist: true`` keeps in data/comae, data/cmar, data/cvit/<v>_s<seed> (it once did 0 steps)."""
    root, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    _run(dvc + ["repro", "train_comae", "train_cmar@cmar", "train_cvit@cvit-0"], root, env)  # up to date
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["synthetic"]["seed"] += 1  # other images, same shapes and sizes
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(dvc + ["repro", "train_comae", "train_cmar@cmar", "train_cvit@cvit-0"], root, env).stdout
    for metrics, steps in (("reports/comae.json", TINY["comae"]["train"]["steps"]),
                           ("reports/cmar_train_cmar.json", TINY["cmar"]["train"]["steps"]),
                           ("reports/pretrain_vit.json", TINY["cvit"]["pretrain"]["train"]["steps"]),
                           ("reports/cvit_train_cvit_s0.json", TINY["cvit"]["train"]["steps"])):
        m = json.loads((root / "data" / metrics).read_text())
        assert m["steps_this_run"] == steps, (metrics, m)
    # comae, judge, pretrain_vit, train_cvit@cvit-0, pretrain_mar, train_cmar@cmar (the critics
    # are upstream of export_orders only with orders.estimator: critic)
    assert out.count("starting over") == 6, out[-3000:]
