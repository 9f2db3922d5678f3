"""CViT: drop policies, the mask-ratio schedule, the task, bad inputs and the two stages."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import VARIANTS, parse_params
from pipeline.data.imageset import ImageSet
from pipeline.models.vit import VisionTransformer, VitArch
from pipeline.orders.shards import CollapseOrders
from pipeline.tasks.cvit import (
    CvitImageDataset, CvitTask, OrdersMismatchError, build_vit, cosine_mask_ratio,
    load_cvit, num_keep, orders_tokenizer_fingerprint, random_order,
)
from pipeline.tasks.cvit_eval import check_model_fits
from pipeline.train.trainer import StepContext
from pipeline.utils.images import images_to_input
from tests.cvit_data import TOKENIZER, make_data_dir, make_imageset, make_orders, make_pretrained_vit


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("cvit"))


def test_num_keep_and_the_cosine_ratio_schedule() -> None:
    assert num_keep(0.78, 256) == 56 and num_keep(0.99, 256) == 3 and num_keep(0.0, 256) == 256
    assert num_keep(0.78, 64) == 14 and num_keep(0.99, 64) == 1 and num_keep(0.5, 16) == 8
    with pytest.raises(ValueError):
        num_keep(1.0, 16)
    assert cosine_mask_ratio(0.0, 0.99) == 0.0
    assert cosine_mask_ratio(1.0, 0.99) == pytest.approx(0.99)
    r = cosine_mask_ratio(torch.rand(200_000, generator=torch.Generator().manual_seed(0)), 0.99)
    assert float(r.min()) >= 0 and float(r.max()) <= 0.99
    # favours low ratios: P(r < max/2) = P(u < 2/3) = 2/3, mean = max (1 - 2/pi)
    assert float((r < 0.495).float().mean()) == pytest.approx(2 / 3, abs=0.01)
    assert float(r.mean()) == pytest.approx(0.99 * (1 - 2 / math.pi), abs=0.005)


def test_dataset_joins_images_and_orders_by_key(data: Path) -> None:
    images = ImageSet(data / "images" / "train")
    orders = CollapseOrders(data / "orders" / "train")
    ds = CvitImageDataset(images, orders, random_seed=3)
    item = ds[5]
    key = images.keys[5]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (32, 32, 3)
    assert item["label"] == int(images.labels[5])
    assert torch.equal(item["order"], torch.from_numpy(orders.order(key)))
    assert torch.equal(item["order_flip"], torch.from_numpy(orders.order(key, flip=True)))
    assert torch.equal(ds[5]["random_order"], item["random_order"])  # seeded per index
    assert torch.equal(item["random_order"], random_order(5, 16, 3))
    assert not torch.equal(random_order(5, 16, 3), random_order(6, 16, 3))
    assert sorted(item["random_order"].tolist()) == list(range(16))


def test_orders_missing_for_some_images_are_named(data: Path, tmp_path: Path) -> None:
    images = ImageSet(data / "images" / "train")
    partial = make_orders(tmp_path / "partial", images, 4, "val", tmp_path, keep_keys=20)
    with pytest.raises(OrdersMismatchError, match=r"4 of 24 images .* no collapse order.*'c2/img_004'"):
        CvitImageDataset(images, partial)
    with pytest.raises(OrdersMismatchError, match="no collapse order"):
        CvitImageDataset(images, None, check_orders=partial)  # the ViT variant checks them too


def test_orders_of_other_crops_or_grids_are_refused(data: Path, tmp_path: Path) -> None:
    images = ImageSet(data / "images" / "train")
    other = make_orders(tmp_path / "other", images, 4, "val", tmp_path, crop_size=256)
    with pytest.raises(OrdersMismatchError, match="256px crops.*'patch'.*32px"):
        CvitImageDataset(images, other)
    big = make_imageset(tmp_path / "img30", "val", per_class=2, size=30)
    odd = make_orders(tmp_path / "odd", big, 3, "val", tmp_path)  # 30 px / 3 = 10 px: fine
    assert CvitImageDataset(big, odd).num_patches == 9
    with pytest.raises(OrdersMismatchError, match="does not divide the 32px"):
        bad = make_orders(tmp_path / "bad", images, 4, "val", tmp_path)
        bad.grid = 5  # orders for a 5x5 grid over 32 px images
        bad.manifest["identity"]["latents"].pop("crop_size")
        CvitImageDataset(images, bad)


def test_a_trained_model_must_match_grid_and_tokenizer(data: Path, tmp_path: Path) -> None:
    images = ImageSet(data / "images" / "val")
    orders = CollapseOrders(data / "orders" / "val")
    fp = orders_tokenizer_fingerprint(orders)
    meta = {"task": {"orders_tokenizer": fp}}
    ok = VisionTransformer(VitArch.for_grid(32, 4, 3, dim=16, depth=1, heads=2))
    check_model_fits("cvit", ok, meta, orders, images)
    coarse = VisionTransformer(VitArch.for_grid(32, 2, 3, dim=16, depth=1, heads=2))
    with pytest.raises(OrdersMismatchError, match="2x2 patch grid.*16px patches.*4x4 grid"):
        check_model_fits("cvit", coarse, meta, orders, images)
    kl16 = dict(TOKENIZER, kind="kl16", sha256="d" * 64)
    other = make_orders(tmp_path / "kl16", images, 4, "val", tmp_path, tokenizer=kl16)
    with pytest.raises(OrdersMismatchError, match="tokenizer 'kl16'"):
        check_model_fits("cvit", ok, meta, other, images)


def capture_keeps(task: CvitTask, batch: dict, step: int) -> tuple[torch.Tensor, list]:
    calls: list = []
    model = task.model

    def spy(x, keep=None):
        calls.append((x.detach().clone(), None if keep is None else keep.clone()))
        return VisionTransformer.forward(model, x, keep)

    ctx = StepContext(step, torch.arange(len(batch["label"])), len(batch["label"]),
                      torch.device("cpu"), seed=7, dtype=torch.float32)
    loss, metrics = task.loss(spy, batch, ctx)
    assert torch.isfinite(loss)
    return metrics, calls


@pytest.mark.parametrize("variant", ["vit", "rvit", "cvit"])
def test_task_drops_the_variants_patches_with_flipped_orders(data: Path, variant: str) -> None:
    images = ImageSet(data / "images" / "train")
    orders = CollapseOrders(data / "orders" / "train")
    ds = CvitImageDataset(images, orders)
    batch = torch.utils.data.default_collate([ds[i] for i in range(12)])
    model = VisionTransformer(VitArch.for_grid(32, 4, 3, dim=16, depth=1, heads=2))
    task = CvitTask(model, variant, 0.99, orders_tokenizer_fingerprint(orders))
    assert task.config()["arch"]["patch_size"] == 8 and task.config()["drop"] == {
        "vit": "none", "rvit": "random", "cvit": "collapse"}[variant]
    plain = images_to_input(batch["image"])
    ratios, flipped_rows = [], 0
    for step in range(6):
        metrics, [(x, keep)] = capture_keeps(task, batch, step)
        ratios.append(metrics["mask_ratio"])
        k = num_keep(metrics["mask_ratio"], 16)
        flip = torch.tensor([torch.equal(x[b], plain[b].flip(-1)) and not torch.equal(x[b], plain[b])
                             for b in range(12)])
        flipped_rows += int(flip.sum())
        if variant == "vit" or k == 16:
            assert keep is None
            continue
        assert keep.shape == (12, k)
        if variant == "cvit":  # the first k of the order of the image as seen (flipped or not)
            want = torch.where(flip[:, None], batch["order_flip"], batch["order"])[:, :k]
            assert torch.equal(keep, want)
        else:
            assert not torch.equal(keep, batch["order"][:, :k])
            assert all(len(set(row.tolist())) == k for row in keep)
    assert 0 < flipped_rows < 6 * 12
    if variant == "vit":
        assert ratios == [0.0] * 6
    else:
        assert len(set(ratios)) == 6 and all(0 <= r <= 0.99 for r in ratios)
        # the same step draws the same ratio (resume/DDP determinism)
        assert capture_keeps(task, batch, 3)[0]["mask_ratio"] == ratios[3]


TINY_CVIT = {
    "model": {"dim": 32, "depth": 2, "heads": 2}, "seeds": [0, 1],
    "eval": {"batch_size": 8, "ratios": [0.0, 0.3, 0.5, 0.6, 0.78, 0.99], "random_draws": 2,
             "bootstrap": 200},
    "pretrain": {"eval_every": 5, "train": {"steps": 10, "batch_size": 8, "lr": 3e-3, "ckpt_every": 5,
                                             "log_every": 5, "precision": "fp32"}},
    "train": {"steps": 20, "batch_size": 8, "lr": 3e-3, "ckpt_every": 10, "log_every": 10,
              "precision": "fp32"}}


def test_train_and_eval_stages(data: Path, capsys) -> None:
    from stages import eval_cvit, train_cvit

    params = parse_params({"seed": 0, "cvit": TINY_CVIT})
    make_pretrained_vit(data, params)
    for seed in (0, 1):
        for v in VARIANTS:
            m = train_cvit.run(params, variant=v, seed=seed, data_dir=data)
            assert m["variant"] == v and m["train_steps"] == 20 and m["grid"] == 4
            assert m["seed"] == seed and m["start"] == "pretrain_vit"
            name = f"{v}_s{seed}"
            assert (data / "cvit" / name / "model.safetensors").exists()
            assert json.loads((data / "reports" / f"cvit_train_{name}.json").read_text())["patch_size"] == 8
            headline = json.loads((data / "metrics" / f"cvit_train_{name}.json").read_text())
            assert set(headline) == set(train_cvit.HEADLINE) and headline["train_steps"] == 20
    again = train_cvit.run(params, variant="cvit", seed=1, data_dir=data)  # finished: resumes at the end
    assert again["steps_this_run"] == 0
    with pytest.raises(ValueError, match="unknown CViT variant"):
        train_cvit.run(params, variant="dvit", data_dir=data)

    metrics = eval_cvit.run(params, data_dir=data)
    table = capsys.readouterr().out
    assert "CViT - CViT-other" in table and "CViT-pixvar" in table
    saved = json.loads((data / "reports" / "cvit.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    headline = json.loads((data / "metrics" / "cvit.json").read_text())
    assert headline == eval_cvit.headline(saved)
    assert all(not isinstance(v, (dict, list)) for v in headline.values())
    rows = ("ViT", "ViT+C", "RViT", "CViT", "CViT-fixed", "CViT-centre", "CViT-pixvar", "CViT-pss",
            "CViT-halton", "CViT-other", "CViT[pss]", "CViT[pss]-other")
    assert set(headline) == ({f"top1@78_{r}" for r in rows} | {"AuC_CViT", "own_minus_other@78",
                             "own_minus_other@78_pm", "order_quality_spearman"})
    assert headline["own_minus_other@78"] == saved["contrasts"]["CViT - CViT-other"]["top1@78"]
    assert headline["AuC_CViT"] == saved["CViT"]["AuC"]
    # no score_orders report in this data dir: the figure is skipped, and says why
    assert "order_scores.json not produced" in saved["order_quality"]["skipped"]
    assert "order_scores.json not produced" in saved["order_cost"]["skipped"]
    assert headline["order_quality_spearman"] is None
    assert headline["top1@78_RViT"] == saved["RViT"]["top1@78"]
    n_ratios = len(params.cvit.eval.ratios)
    for row in rows:
        e = saved[row]
        lo, hi = e["AuC_ci"]
        assert lo <= e["AuC"] <= hi and len(e["AuC_per_seed"]) == 2
        assert e["AuC"] == pytest.approx(sum(e["AuC_per_seed"]) / 2, abs=1e-3)  # mean over seeds
        assert len(e["top1"]["mean"]) == len(e["top1"]["lo"]) == n_ratios
        assert np.shape(e["top1"]["per_seed"]) == (2, n_ratios)
        assert 0 <= e["top1@78"] <= e["top5@78"] == 100.0  # 3 classes: top-5 is trivial
        assert e["knee"] is None or 0 < e["knee"] < 1
    # ViT and ViT+C share the weights, every control is the CViT model, CViT[pss] and its
    # control share theirs: identical without drops
    assert saved["ViT"]["top1@0"] == saved["ViT+C"]["top1@0"]
    assert {saved[r]["top1@0"] for r in rows[3:10]} == {saved["CViT"]["top1@0"]}
    assert saved["CViT[pss]"]["top1@0"] == saved["CViT[pss]-other"]["top1@0"]
    assert set(saved["contrasts"]) >= {"CViT - CViT-other", "CViT - RViT"}
    assert saved["eval"]["seeds"] == [0, 1] and saved["interval"]["resamples"] == 200
    cost = saved["cost"]
    assert cost["kept@78"] == 4 and cost["flop_ratio@0"] == 1.0
    assert cost["flop_ratio@78"] < cost["flop_ratio@50"] < 1.0
    with open(data / "plots" / "cvit_accuracy.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert list(csv_rows[0])[:len(rows) + 1] == ["mask_ratio", *rows]
    assert [float(r["mask_ratio"]) for r in csv_rows] == sorted(params.cvit.eval.ratios)
    assert float(csv_rows[0]["CViT"]) == saved["CViT"]["top1@0"]
    assert float(csv_rows[0]["CViT_lo"]) <= float(csv_rows[0]["CViT"]) <= float(csv_rows[0]["CViT_hi"])
    assert (data / "plots" / "cvit_fig8.png").read_bytes()[:4] == b"\x89PNG"

    model, meta = load_cvit(data / "cvit" / "cvit_s0")
    assert meta["task"]["variant"] == "cvit" and model.arch.grid == 4
    assert np.isfinite(model.pos_embed.detach().numpy()).all()


def test_model_starts_from_pretrained_timm_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from pipeline.models.vit import PretrainedMismatchError
    from pipeline.tasks.cvit import published_record

    # a "timm" checkpoint of the same width on a 2x2 grid with 10 classes
    src = VisionTransformer(VitArch.for_grid(32, 2, 10, dim=32, depth=2, heads=2))
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    sd["patch_embed.proj.weight"] = torch.randn(32, 3, 8, 8)  # 8 px patches like the target
    save_file(sd, str(tmp_path / "vit.safetensors"))
    vit = {"dim": 32, "depth": 2, "heads": 2, "pretrained": str(tmp_path / "vit.safetensors")}
    cvit = {"model": vit}
    params = parse_params({"cvit": cvit})
    pre = tmp_path / "pretrain_vit"  # what pretrain_vit writes when the published weights stand in
    pre.mkdir()
    (pre / "published.json").write_text(json.dumps(published_record(params)))
    model, info = build_vit(params, 32, 4, 3, pre)
    assert info["start"] == "published"
    assert info["pos_embed_resized"] == (2, 4) and sorted(info["reinitialized"]) == ["head.bias", "head.weight"]
    assert torch.equal(model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    # the re-initialised head follows the run's seed
    other, _ = build_vit(parse_params({"seed": 1, "cvit": cvit}), 32, 4, 3, pre)
    again, _ = build_vit(params, 32, 4, 3, pre)
    assert torch.equal(model.head.weight, again.head.weight)
    assert not torch.equal(model.head.weight, other.head.weight)
    with pytest.raises(ValueError, match="re-run pretrain_vit"):  # the record names other weights
        build_vit(parse_params({"cvit": {"model": {**vit, "pretrained": str(tmp_path / "x.safetensors")}}}),
                  32, 4, 3, pre)
    del sd["norm.bias"]
    save_file(sd, str(tmp_path / "vit.safetensors"))
    (pre / "published.json").write_text(json.dumps(published_record(params)))
    with pytest.raises(PretrainedMismatchError, match="norm.bias"):
        build_vit(params, 32, 4, 3, pre)
    _, info = build_vit(parse_params({"cvit": {**cvit, "allow_missing_keys": True}}), 32, 4, 3, pre)
    assert info["missing"] == ["norm.bias"]


def test_another_images_order_is_a_derangement() -> None:
    from pipeline.tasks.cvit_eval import EvalOrders, derangement

    for n in (2, 3, 7, 100):
        perm = derangement(n, seed=3)
        assert sorted(perm.tolist()) == list(range(n)) and not (perm == np.arange(n)).any()
        assert np.array_equal(perm, derangement(n, seed=3))  # fixed: every seed and model alike
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)
    g = torch.Generator().manual_seed(0)
    own = torch.stack([torch.randperm(16, generator=g) for _ in range(6)]).numpy()
    pss = own[::-1].copy()
    orders = EvalOrders(own, np.arange(16.0), grid=4, run_seed=1, draws=3, token_orders=pss)
    batch = {"index": torch.tensor([0, 2, 5]), "image": torch.zeros(3, 32, 32, 3, dtype=torch.uint8)}
    got = orders.for_batch(batch)
    assert np.array_equal(got["collapse"][0].numpy(), own[[0, 2, 5]])
    assert np.array_equal(got["other"][0].numpy(), own[orders.other_of[[0, 2, 5]]])
    assert got["fixed"][0][0].tolist() == list(range(15, -1, -1))  # highest mean score first
    assert set(got["centre"][0][0, :4].tolist()) == {5, 6, 9, 10}  # the 4 central patches of 4x4
    assert len(got["random"]) == 3 and not torch.equal(got["random"][0], got["random"][1])
    assert np.array_equal(got["token_l1"][0].numpy(), pss[[0, 2, 5]])
    from pipeline.orders.baselines import halton_order

    first = got["halton"][0][0].tolist()
    assert first == halton_order(4).tolist() and torch.equal(got["halton"][0][0], got["halton"][0][2])
    assert first[0] // 4 != first[1] // 4 and first[0] % 4 != first[1] % 4  # spread: row and column
    with pytest.raises(ValueError, match="token orders"):
        EvalOrders(own, np.arange(16.0), grid=4, run_seed=1, draws=3, token_orders=pss[:2])
    for rows in got.values():
        assert all(sorted(o.tolist()) == list(range(16)) for t in rows for o in t)


def test_order_quality_correlates_criterion_and_accuracy_across_orders() -> None:
    from pipeline.tasks.cvit_eval import ORDER_OF_ROW, format_order_quality, order_quality

    rng = np.random.default_rng(0)
    ratios = [0.0, 0.78]
    rows = list(ORDER_OF_ROW)
    # order r collapses the image by 0.1 nats less than order r-1, and CViT gains 10 points
    per_seed = {r: [{"top1": np.stack([np.ones(300), rng.random(300) < 0.2 + 0.1 * i], 1)}
                    for _ in (0, 1)] for i, r in enumerate(rows)}
    scored = {"per_image_at22": {ORDER_OF_ROW[r]: (1.0 - 0.1 * i + 0.05 * rng.standard_normal(100)).tolist()
                                 for i, r in enumerate(rows)}}
    q = order_quality(per_seed, ratios, scored, resamples=300, seed=0)
    assert q["spearman"] == pytest.approx(-1.0) and q["spearman_ci"][1] < 0  # the claim holds here
    assert q["rows"]["CViT-pss"]["order"] == "token_l1" and q["images"] == {"cvit": 300, "criterion": 100}
    e = q["rows"]["CViT"]
    assert e["at22_ci"][0] < e["at22"] < e["at22_ci"][1] and e["top1_ci"][0] < e["top1"] < e["top1_ci"][1]
    # no relation: the interval covers 0
    flat = {r: [{"top1": np.stack([np.ones(300), rng.random(300) < 0.5], 1)}] for r in rows}
    assert order_quality(flat, ratios, scored, 300, 0)["spearman_ci"][0] < 0 < order_quality(
        flat, ratios, scored, 300, 0)["spearman_ci"][1]
    few = order_quality(per_seed, ratios, {"per_image_at22": {"collapse": [1.0]}}, 300, 0)
    assert few["rows"] == {} and "3 needed" in few["skipped"] and "not measured" in format_order_quality(few)
    assert "Spearman rho over 7 orders" in format_order_quality(q)


def test_token_l1_orders_read_every_flip_in_one_pass(data: Path) -> None:
    from pipeline.latents.store import LatentStore
    from pipeline.orders.baselines import token_l1_scores
    from pipeline.orders.pagerank import collapse_order
    from pipeline.tasks.cvit import token_l1_orders

    store = LatentStore(data / "latents" / "train.zarr", in_memory=False)
    keys = list(reversed(store.keys))[:7]  # not the store's order, and chunks split mid-way
    own, flipped = token_l1_orders(store, keys, flips=(False, True), chunk=3)
    rows = [store.keys.index(k) for k in keys]
    for flip, got in ((False, own), (True, flipped)):
        grids = store.tokens(np.asarray(rows), flip=flip).flatten(2).transpose(1, 2).numpy()
        assert np.array_equal(got, collapse_order(token_l1_scores(grids)))
    assert own.dtype == np.uint8 and own.shape == (7, store.num_tokens)
    assert not np.array_equal(own, flipped)  # the flip's tokens are its own, not a mirror
    alone, = token_l1_orders(store, keys)
    assert np.array_equal(alone, own)
    with pytest.raises(ValueError, match="no latents.*nope"):
        token_l1_orders(store, ["nope", *keys])


def test_order_costs_add_the_orders_and_the_tokenizers_flops_to_the_vit() -> None:
    from pipeline.models.vit import vit_forward_flops
    from pipeline.tasks.cvit_eval import ORDER_COST_OF_ROW, format_costs, order_costs

    arch = VitArch(img_size=32, patch_size=8, dim=32, depth=2, heads=2, num_classes=3)
    made = {"collapse": {"flops": 4e9}, "token_l1": {"flops": 32.0}, "random": {"flops": 0.0},
            "fixed": {"flops": 0.0}, "centre": {"flops": 0.0}, "halton": {"flops": 0.0},
            "pixel_variance": {"flops": 9e3}}
    c = order_costs(made, tokenizer_flops=2e3, arch=arch)
    full, kept = vit_forward_flops(arch, 16), vit_forward_flops(arch, 4)  # 78% of 16 dropped: 4 kept
    assert c["kept"] == 4 and c["full_vit_mflop"] == pytest.approx(full / 1e6)
    rows = c["rows"]
    assert set(rows) == set(ORDER_COST_OF_ROW)
    assert rows["ViT"]["vs_full_vit"] == pytest.approx(kept / full)  # random drops cost nothing
    assert rows["CViT"]["total_mflop"] == pytest.approx((kept + 2e3 + 4e9) / 1e6)  # tokens, then CoMAE
    assert rows["CViT"]["vs_full_vit"] > 1 > rows["CViT[pss]"]["vs_full_vit"]
    assert rows["CViT-pixvar"]["tokenizer_mflop"] == 0.0  # read from pixels
    assert rows["CViT-other"]["vs_full_vit"] is None and rows["CViT[pss]-other"]["order"] is None
    text = format_costs(c)
    assert "x full ViT" in text and "(control)" in text
    assert order_costs({}, 0.0, arch)["rows"]["CViT"]["total_mflop"] is None  # not costed: no figure
    assert "not measured (why)" in format_costs({"rows": {}, "skipped": "why"})
