"""pretrain_vit and what fine-tuning takes from it: the distillation loss, the stage and its
learning curve, loading the pretrained weights, one seed per run, timm's weight-decay rule."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig, parse_params
from pipeline.models.vit import VisionTransformer, VitArch
from pipeline.tasks.cvit import build_vit, run_params
from pipeline.tasks.cvit_pretrain import distill_loss
from pipeline.train.checkpoint import load_run
from pipeline.train.trainer import Trainer, TrainTask
from tests.cvit_data import make_data_dir, make_pretrained_vit

TRAIN = {"batch_size": 8, "lr": 3e-3, "log_every": 2, "precision": "fp32"}
CVIT = {"model": {"dim": 16, "depth": 1, "heads": 2},
        "pretrain": {"eval_every": 3, "train": {**TRAIN, "steps": 6, "ckpt_every": 3}},
        "train": {**TRAIN, "steps": 4, "ckpt_every": 2}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    data = make_data_dir(tmp_path_factory.mktemp("pretrain"))
    make_pretrained_vit(data, parse_params({"cvit": CVIT}))
    return data


def test_distill_loss_mixes_labels_and_the_teachers_soft_labels() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0])
    total, ce, kl = distill_loss(s, t, y, 0.0, 2.0)
    assert torch.allclose(total, F.cross_entropy(s, y)) and kl > 0
    total, _, kl = distill_loss(s, s, y, 1.0, 3.0)  # a student that matches its teacher
    # KL(p||p) = 0 up to log-softmax rounding (~1e-7 per class); total also carries T^2 = 9
    assert abs(float(kl)) < 1e-6 and abs(float(total)) < 1e-5
    total, ce, kl = distill_loss(s, t, y, 0.5, 2.0)
    assert torch.allclose(total, 0.5 * ce + 0.5 * 4.0 * kl)  # T^2 scales the soft term


def test_pretrain_stage_writes_weights_metrics_and_learning_curve(data: Path) -> None:
    from stages import pretrain_vit

    run = load_run(data / "pretrain_vit")
    assert run.task["kind"] == "vit_pretrain" and run.task["distill"] == 0.5
    assert set(run.meta["inputs"]) == {"images", "teacher"}
    with open(data / "plots" / "pretrain_vit_val.csv") as f:
        curve = list(csv.DictReader(f))
    assert [int(r["step"]) for r in curve] == [3, 6]  # every eval_every steps and the last
    assert all(0.0 <= float(r["val_top1"]) <= 1.0 for r in curve)
    headline = json.loads((data / "metrics" / "pretrain_vit.json").read_text())
    assert set(headline) == set(pretrain_vit.HEADLINE) and headline["train_steps"] == 6
    assert headline["val_top1"] == float(curve[-1]["val_top1"])
    report = json.loads((data / "reports" / "pretrain_vit.json").read_text())
    assert [c["step"] for c in report["val_curve"]] == [3.0, 6.0]


def test_every_variant_starts_from_the_pretrained_weights(data: Path) -> None:
    pre = load_run(data / "pretrain_vit").state
    params = parse_params({"cvit": CVIT})
    for seed in (0, 1):
        model, info = build_vit(params.model_copy(update={"seed": seed}), 32, 4, 3, data / "pretrain_vit")
        assert info["start"] == "pretrain_vit" and info["pretrained_sha256"]
        assert all(torch.equal(v, pre[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="another architecture"):
        build_vit(parse_params({"cvit": {**CVIT, "model": {**CVIT["model"], "dim": 32}}}), 32, 4, 3,
                  data / "pretrain_vit")
    with pytest.raises(ValueError, match="re-run pretrain_vit"):  # published weights asked for
        build_vit(parse_params({"cvit": {**CVIT, "model": {**CVIT["model"], "pretrained": "vit_b16.safetensors"}}}), 32, 4, 3,
                  data / "pretrain_vit")


def test_published_weights_stand_in_for_pretraining(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from stages import pretrain_vit

    src = VisionTransformer(VitArch.for_grid(16, 2, 10, dim=16, depth=1, heads=2))  # 8 px patches
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    params = parse_params({"cvit": {**CVIT, "model": {**CVIT["model"], "pretrained": str(tmp_path / "vit.safetensors")}}})
    data = tmp_path / "data"
    out = pretrain_vit.run(params, data_dir=data)  # needs no images, judge or latents
    assert out["train_steps"] == 0 and out["published"] == str(tmp_path / "vit.safetensors")
    assert not (data / "pretrain_vit" / "model.safetensors").exists()
    model, info = build_vit(params, 32, 4, 3, data / "pretrain_vit")
    assert info["start"] == "published" and info["pos_embed_resized"] == (2, 4)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)


def test_one_seed_decides_the_fine_tuning_run(data: Path) -> None:
    from stages import train_cvit

    params = parse_params({"seed": 5, "cvit": {**CVIT, "train": {**CVIT["train"], "seed": 7}}})
    p1 = run_params(params, 1)
    assert p1.seed == 1 and p1.cvit.train.seed == 1 and p1.cvit.train.steps == 4
    assert params.seed == 5 and params.cvit.train.seed == 7  # the caller's params are untouched

    def weights(seed: int, out: str) -> dict[str, torch.Tensor]:
        train_cvit.run(params, variant="rvit", seed=seed, data_dir=data)
        src = data / "cvit" / f"rvit_s{seed}"
        dst = data / out
        src.rename(dst)
        return load_run(dst).state

    a, b, c = weights(1, "a"), weights(1, "b"), weights(0, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the seed alone decides: reproducible
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed, another run
    meta = json.loads((data / "a" / "config.json").read_text())
    assert meta["train"]["seed"] == 1 and meta["task"]["init_seed"] == 1


class _Wrapped(TrainTask):
    """A task whose trained module wraps the ViT (the hook is found on the submodule)."""

    def __init__(self) -> None:
        self.model = torch.nn.ModuleDict({"vit": VisionTransformer(VitArch.for_grid(32, 4, 3, dim=16,
                                                                                     depth=1, heads=2))})

    def config(self) -> dict:
        return {}


def test_pos_embed_and_cls_token_get_no_weight_decay(tmp_path: Path) -> None:
    task = _Wrapped()
    trainer = Trainer(task, [0], TrainConfig(weight_decay=0.3), tmp_path)
    (opt,) = trainer._optimizers(task.model).values()
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in task.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert {"vit.pos_embed", "vit.cls_token"} <= exempt  # timm's no_weight_decay()
    assert {"vit.patch_embed.proj.weight", "vit.blocks.0.attn.qkv.weight", "vit.head.weight"} <= decayed
    assert {"vit.head.bias", "vit.norm.weight", "vit.blocks.0.norm1.weight"} <= exempt  # ndim/bias rule
    assert decayed.isdisjoint(exempt) and len(decayed | exempt) == len(names)


def test_train_cvit_tracks_every_training_key_but_the_seed() -> None:
    # --seed replaces seed and cvit.train.seed, so DVC must not re-run the matrix for them,
    # and must re-run it for every other key of cvit.train (a key added to TrainConfig too).
    import yaml

    stage = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]["train_cvit"]
    tracked = {p for p in stage["params"] if p.startswith("cvit.train.")}
    assert tracked == {f"cvit.train.{k}" for k in TrainConfig.model_fields if k != "seed"}
    assert "seed" not in stage["params"] and "cvit.train" not in stage["params"]
    assert "--seed ${item.seed}" in stage["cmd"] and stage["matrix"]["seed"] == "${cvit.seeds}"


@torch.no_grad()
def test_judge_stem_is_the_judges_first_layers_inside_each_patch() -> None:
    from pipeline.models.judge import ConvJudge, JudgeArch
    from pipeline.tasks.cvit import freeze_stem
    from pipeline.tasks.cvit_pretrain import load_judge_stem

    torch.manual_seed(0)
    judge = ConvJudge(JudgeArch(num_classes=3, width=8))
    for m in judge.modules():  # BatchNorm statistics away from (0, 1), so folding them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    judge.eval()
    vit = VisionTransformer(VitArch.for_grid(32, 4, 3, dim=16, depth=1, heads=2, stem="conv", stem_width=8))
    assert load_judge_stem(vit, judge) == 4
    patch = torch.rand(5, 3, 8, 8) * 2 - 1  # one patch alone: the judge zero-pads its border too
    # conv + folded BatchNorm against conv then BatchNorm: the same sums regrouped (~1e-6)
    torch.testing.assert_close(vit.patch_embed.convs(patch), judge.body[:6](patch), atol=1e-5, rtol=1e-4)
    freeze_stem(vit)
    assert not any(p.requires_grad for p in vit.patch_embed.convs.parameters())
    assert vit.patch_embed.proj.weight.requires_grad  # the projection to the width still learns
    narrow = VisionTransformer(VitArch.for_grid(32, 4, 3, dim=16, depth=1, heads=2, stem="conv", stem_width=4))
    with pytest.raises(ValueError, match="stem_width=4 must equal the judge's width 8"):
        load_judge_stem(narrow, judge)


def test_stem_options_that_cannot_work_are_refused() -> None:
    from pipeline.config import ParamsError

    with pytest.raises((ValueError, ParamsError), match="stem_from_judge"):
        parse_params({"cvit": {"pretrain": {"stem_from_judge": True}}})  # linear stem
    with pytest.raises((ValueError, ParamsError), match="freeze a random"):
        parse_params({"cvit": {"model": {"stem": "conv", "freeze_stem": True}}})
    with pytest.raises((ValueError, ParamsError), match="linear patch embedding"):
        parse_params({"cvit": {"model": {"stem": "conv", "pretrained": "x.safetensors"}}})
