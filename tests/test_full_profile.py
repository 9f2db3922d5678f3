"""The full profile (ImageNet, KL-16, MAR-B, ViT-B) at miniature size, through the README's route.

``profiles/full.yaml`` with only sizes, steps and paths overridden (every ``kind``, source,
read-out and precision stays), inputs in the published formats (tests/published.py): an
ImageNet-style folder, MAR's KL-16 checkpoint at full size, a MAR ``checkpoint-last.pth``, a
timm ViT ``.safetensors`` (14×14 positions, in21k head), the FID Inception and an ADM reference
batch. The route is the README's: ``dvc repro prepare``; ``torchrun --nproc-per-node 2`` (gloo)
for extract_latents, train_comae and export_orders; ``dvc commit``; ``dvc repro`` for the rest.
The latent stores refuse to be decompressed whole (``COP_MEMORY_BUDGET``), as ImageNet's 84 GB
would be: every stage must stream them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import published
from tests.support import free_port, scratch_repo

REPO = Path(__file__).resolve().parents[1]
FULL = yaml.safe_load((REPO / "profiles" / "full.yaml").read_text())
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]

TINY_TRAIN = {"steps": 2, "batch_size": 4, "ckpt_every": 1, "log_every": 1, "num_workers": 0}
# Only sizes, steps and paths (checked below against full.yaml: every other value stays).
OVERRIDES = {
    "data": {"root": "imagenet", "num_workers": 0, "shard_size": 4},
    "tokenizer": {"checkpoint": "pretrained/kl16.ckpt", "batch_size": 4, "num_workers": 0},
    "latents": {"rows_per_chunk": 2, "rows_per_shard": 4},
    "comae": {"enc_dim": 16, "enc_depth": 1, "enc_heads": 2, "dec_dim": 16, "dec_depth": 1,
              "dec_heads": 2, "head_layers": 1, "targets_per_image": 8, "train": TINY_TRAIN},
    "comae_probe": {"steps": 2},
    "orders": {"images_per_batch": 2, "samples_per_shard": 4, "report_images": 8},
    "critic": {"scorer": {"dim": 16, "depth": 1, "heads": 2}, "builder": {"dim": 16, "depth": 1, "heads": 2},
               "train": TINY_TRAIN, "score": {"images": 6, "points": 4, "greedy_images": 1,
                                               "batch_size": 256, "bootstrap": 100}},
    "judge": {"width": 8, "train": TINY_TRAIN},
    "cvit": {"model": {"dim": 32, "depth": 1, "heads": 2,
                       "pretrained": "pretrained/vit_base_patch16_224.augreg_in21k.safetensors"},
             "seeds": [0], "eval": {"ratios": [0.0, 0.3, 0.5, 0.78], "batch_size": 8, "random_draws": 1, "bootstrap": 100},
             "pretrain": {"train": TINY_TRAIN}, "train": TINY_TRAIN},
    "cmar": {"model": {"enc_dim": 32, "enc_depth": 1, "enc_heads": 2, "dec_dim": 32, "dec_depth": 1,
                       "dec_heads": 2, "buffer_size": 4, "diffloss_d": 1, "diffloss_w": 32,
                       "diffusion_batch_mul": 1, "pretrained": "pretrained/mar_base/checkpoint-last.pth"},
             "train": TINY_TRAIN, "pretrain": {"num_workers": 0},
             "sample": {"num_sampling_steps": "4", "num_iter": 4, "samples_per_class": 1, "eval_batch_size": 4,
                        "inception_weights": "pretrained/pt_inception-2015-12-05-6726825d.pth",
                        "reference_batch": "pretrained/VIRTUAL_imagenet256_labeled.npz"}},
}
PATH_KEYS = {"data.root", "tokenizer.checkpoint", "cvit.model.pretrained", "cmar.model.pretrained",
             "cmar.sample.inception_weights", "cmar.sample.reference_batch"}


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _merge(base: dict, over: dict) -> dict:
    return {k: _merge(base[k], over[k]) if isinstance(over.get(k), dict) else over.get(k, base[k])
            for k in base}


def test_overrides_change_only_sizes_steps_and_paths():
    full = _leaves(FULL)
    for key, value in _leaves(OVERRIDES).items():
        assert key in full, f"{key} is not a key of profiles/full.yaml"
        old = full[key]
        assert key in PATH_KEYS or isinstance(old, (int, float, list)) and not isinstance(old, bool) \
            or key.endswith("num_sampling_steps"), (key, old, value)


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_full_profile_in_miniature(tmp_path):
    root = scratch_repo(tmp_path / "repo")
    params = _merge(FULL, OVERRIDES)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    from pipeline.config import parse_params

    cfg = parse_params(params)
    special = published.write_imagenet_folder(root / "imagenet", WNIDS, train_per_class=3, val_per_class=2)
    pre = root / "pretrained"
    published.write_kl16(pre / "kl16.ckpt")
    published.write_mar(pre / "mar_base" / "checkpoint-last.pth", cfg.cmar)
    m = cfg.cvit.model
    published.write_timm_vit(pre / "vit_base_patch16_224.augreg_in21k.safetensors", m.dim, m.depth, m.heads)
    published.write_fid_inception(pre / "pt_inception-2015-12-05-6726825d.pth")
    published.write_adm_reference(pre / "VIRTUAL_imagenet256_labeled.npz")

    # the DVC stages run one process each (all cores, or what OMP_NUM_THREADS says); the
    # torchrun stages two processes of one thread
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "COP_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1))),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "COP_MEMORY_BUDGET": "4096",  # bytes: no store may be decompressed whole
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    env.pop("PYTHONPATH", None)
    env.pop("WORLD_SIZE", None)
    for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "full"]):
        _run(args, root, env)
    dvc = [sys.executable, "-m", "dvc"]

    # The README's route.
    _run(dvc + ["repro", "prepare"], root, env)
    for stage in ("extract_latents", "train_comae", "export_orders"):
        _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
              "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", f"stages.{stage}"],
             root, {**env, "OMP_NUM_THREADS": "1"})
    _run(dvc + ["commit", "-f", "extract_latents", "train_comae", "export_orders"], root, env)
    _run(dvc + ["repro"], root, env)

    data = root / "data"
    read = lambda rel: json.loads((data / rel).read_text())  # noqa: E731
    prep = read("reports/prepare.json")["splits"]
    # the greyscale and the CMYK JPEG are converted, not skipped
    assert (prep["train"]["count"], prep["train"]["skipped"], prep["val"]["count"]) == (12, 0, 8), prep
    assert special["grey"] and special["cmyk"]
    ext = read("metrics/extract_latents.json")
    assert (ext["grid"], ext["dim"], ext["train_images"], ext["val_images"]) == (16, 16, 12, 8)
    assert read("reports/extract_latents.json")["world"] == 2
    assert read("orders/train/manifest.json")["num_tokens"] == 256
    orders = read("reports/orders.json")
    assert orders["baselines"]["val"] is not None  # LOC_val_solution.csv's boxes became masks
    assert "LOC_" in orders["baselines_skipped"]["train"]  # no train boxes given: said so

    assert read("reports/pretrain_vit.json")["published"].endswith(".safetensors")
    vit = read("cvit/vit_s0/pretrained.json")
    assert vit["start"] == "published" and vit["pos_embed_resized"] == [14, 16]
    assert set(vit["reinitialized"]) == {"head.weight", "head.bias"}  # 21,843 in21k classes -> 4
    # CViT's cost counts KL-16's encoder at 256² (~138 GFLOP: far above the patch stand-in's)
    cost = read("reports/cvit.json")["order_cost"]
    assert cost["tokenizer_mflop"] > 1e4 and cost["rows"]["CViT"]["tokenizer_mflop"] == cost["tokenizer_mflop"]
    assert read("reports/pretrain_mar.json")["published"].endswith("checkpoint-last.pth")
    assert read("cmar/cmar/pretrained.json")["pretrained_key"] == "model_ema"
    from safetensors.torch import load_file

    from pipeline.models.mar import read_mar_checkpoint

    start = read_mar_checkpoint(pre / "mar_base" / "checkpoint-last.pth", "model")
    tuned = load_file(str(data / "cmar" / "cmar" / "model.safetensors"))
    key = next(k for k in tuned if k.endswith("weight") and tuned[k].ndim == 2)
    # lr 1e-7 for 2 steps moves a weight by ~2e-7: the run started at model_ema = model + 0.01
    assert (tuned[key] - start[key]).mean().item() == pytest.approx(published.MAR_EMA_OFFSET, abs=1e-3)

    cmar = read("reports/cmar.json")
    for row in ("CMAR, class order", "MAR, random order", "MAR, class order (MAR+C)", "real val images"):
        assert {"fid", "is_mean", "inception_precision"} <= set(cmar["rows"][row]), row
    assert cmar["inception_reference"].endswith(".npz")
    assert {"fid_CMAR", "fid_MAR", "fid_MARC"} <= set(read("metrics/cmar.json"))
    assert "CMAR" in (data / "report.html").read_text()
