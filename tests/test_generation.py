"""Generation metrics (judge space) and the judge's training pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.metrics.generation import (neighbour_correlation, score_images, shuffle_tokens,
                                         wilson)
from pipeline.models.judge import ConvJudge, JudgeArch
from pipeline.tasks.cmar import CMAR_VARIANTS, variant_config
from pipeline.tasks.cmar_eval import headline, split_val
from pipeline.tasks.judge import JudgeTask, augment
from pipeline.tokenizers import PatchTokenizer, decode_to_images, roundtrip_images
from tests.support import step_ctx as ctx, tiny_cmar_cfg as cmar_cfg


def test_wilson_matches_known_values():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and 0.0 < wilson(0, 10)[1] < 0.35


def test_neighbour_correlation_tells_smooth_from_shuffled():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    # a random colour ramp per image: adjacent patches alike, images unlike
    base, gx, gy = rng.uniform(70, 180, (16, 1, 1, 3)), rng.uniform(-2, 2, (16, 1, 1, 3)), rng.uniform(-2, 2, (16, 1, 1, 3))
    smooth = np.clip(base + gx * (xx[None, ..., None] - 16) + gy * (yy[None, ..., None] - 16), 0, 255).astype(np.uint8)
    # shuffle whole 8x8 patches across images and positions: no neighbour relation is left
    p = smooth.reshape(16, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 8, 8, 3)
    p = p[rng.permutation(len(p))].reshape(16, 4, 4, 8, 8, 3).transpose(0, 1, 3, 2, 4, 5)
    shuffled = p.reshape(16, 32, 32, 3)
    assert neighbour_correlation(smooth, 4) > 0.5
    assert abs(neighbour_correlation(shuffled, 4)) < 0.2


def test_shuffle_tokens_keeps_the_tokens_and_moves_them():
    g = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    s = shuffle_tokens(g, np.random.default_rng(0))
    tok = lambda a: sorted(map(tuple, np.moveaxis(a, 1, -1).reshape(-1, 3)))
    assert s.shape == g.shape and tok(s) == tok(g) and not np.array_equal(s, g)


def test_score_images_of_the_reference_itself():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    feats = rng.normal(size=(40, 4))
    labels = np.arange(40) % 2
    logits = np.eye(2)[labels]
    r = score_images(images, labels, feats, logits, feats, grid=4, boots=20)
    assert r["judge_acc"] == 1.0 and r["fd"] == pytest.approx(0.0, abs=1e-6)
    assert r["judge_acc_ci"][0] > 0.9 and r["fd_ci"][0] >= 0.0 and r["n"] == 40


def test_split_val_keeps_reference_and_controls_apart():
    labels = np.repeat(np.arange(3), 6)
    ref, ctl = split_val(labels, 3, 3)
    assert not set(ref) & set(ctl) and len(ctl) == 9 and np.bincount(labels[ctl]).tolist() == [3, 3, 3]
    # ImageNet: 50 val images a class and 50 samples a class -> the controls get the 25 left
    ref, ctl = split_val(np.repeat(np.arange(3), 50), 3, 50)
    assert len(ref) == 75 and len(ctl) == 75 and not set(ref) & set(ctl)
    with pytest.raises(ValueError, match="class 2 has 1 val image"):
        split_val(np.array([0, 0, 1, 1, 2]), 3, 1)


def test_measure_streams_batches_and_keeps_few_pictures():
    """A row measured a batch at a time equals the whole set measured at once; it keeps
    features and patch means, and pictures of the first classes only."""
    from pipeline.metrics.generation import patch_means
    from pipeline.models.judge import ConvJudge, JudgeArch
    from pipeline.tasks.cmar_eval import PICTURE_CLASSES, PICTURE_PER_CLASS, measure
    from pipeline.tasks.judge import judge_outputs

    torch.manual_seed(0)
    judge = ConvJudge(JudgeArch(num_classes=PICTURE_CLASSES + 2, width=4)).eval()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(PICTURE_CLASSES + 2), PICTURE_PER_CLASS + 1)
    images = rng.integers(0, 256, (len(labels), 16, 16, 3), dtype=np.uint8)
    batches = (images[s:s + 7] for s in range(0, len(images), 7))
    m = measure(batches, labels, judge, None, grid=4, batch=7)
    feats, logits = judge_outputs(judge, images)
    # the same network on batches of 7 vs 256: blocking reorders fp32 sums (~1e-6)
    np.testing.assert_allclose(m.feats, feats, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m.logits, logits, rtol=1e-4, atol=1e-5)
    assert np.array_equal(m.means, patch_means(images, 4)) and m.pool is None
    assert len(m.pictures) == PICTURE_CLASSES * PICTURE_PER_CLASS
    assert np.bincount(m.picture_labels).tolist() == [PICTURE_PER_CLASS] * PICTURE_CLASSES
    with pytest.raises(RuntimeError, match="measured"):
        measure(iter([images[:5]]), labels, judge, None, grid=4, batch=7)


def test_headline_is_flat_and_names_the_rows():
    row = {"judge_acc": 0.5, "fd": 1.0, "neighbour_corr": 0.7}
    rows = {"CMAR, class order": row, "MAR, random order": row, "real val images": row}
    h = headline(rows, "CMAR, class order")
    assert h["judge_acc_CMAR"] == 0.5 and h["fd_MAR"] == 1.0 and h["neighbour_corr_real"] == 0.7
    assert not any(isinstance(v, (dict, list)) for v in h.values())
    full = {**rows, "MAR, class order (MAR+C)": row, "real val latents, decoded": row,
            "real val tokens, shuffled": row}
    full = {k: {**v, "fid": 9.0} for k, v in full.items()}
    h = headline(full, "CMAR, class order")
    assert {"fid_CMAR", "fid_MAR", "fid_MARC"} <= set(h) and len(h) <= 14


def test_cmar_variants_differ_only_in_order_settings():
    base = cmar_cfg()
    assert variant_config(base, "cmar") == base
    assert variant_config(base, "mar").order == "random"
    assert variant_config(base, "cmar_asc").direction == "ascending"
    assert set(CMAR_VARIANTS) == {"cmar", "mar", "cmar_asc"}
    with pytest.raises(ValueError, match="unknown CMAR variant"):
        variant_config(base, "nope")


def test_augment_is_a_function_of_the_step():
    x = torch.randn(4, 3, 16, 16)
    a, b, c = augment(x, ctx(1), 2), augment(x, ctx(1), 2), augment(x, ctx(2), 2)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape


def test_roundtrip_is_what_decoding_the_latents_gives():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    tok = PatchTokenizer(8, 4).fit(imgs)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    rt = roundtrip_images(tok, x)
    z = tok.encode_moments(x)[:, :4] * tok.scale_factor
    via_decode = decode_to_images(tok, z, tok.scale_factor, 8, "cpu")
    assert rt.requires_grad is False and rt.min() >= -1 and rt.max() <= 1
    assert np.abs(((rt + 1) * 127.5).round().permute(0, 2, 3, 1).numpy() - via_decode).max() <= 1


def test_judge_task_learns_a_step_and_needs_a_tokenizer_for_roundtrips():
    model = ConvJudge(JudgeArch(3, width=8))
    with pytest.raises(ValueError, match="needs the tokenizer"):
        JudgeTask(model, 2, 0.5, None)
    task = JudgeTask(model, 2, 0.0, None)
    batch = {"image": torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8), "label": torch.tensor([0, 1, 2, 0])}
    loss, logs = task.loss(model, batch, ctx())
    loss.backward()
    assert torch.isfinite(loss) and model.head.weight.grad is not None and logs["roundtrip_share"] == 0.0
    assert model.features(torch.zeros(2, 3, 16, 16)).shape == (2, JudgeArch(3, width=8).feature_dim)


def test_pretrain_split_falls_back_to_train(tmp_path):
    from pipeline.data.imageset import pretrain_split

    (tmp_path / "train").mkdir()
    assert pretrain_split(tmp_path) == tmp_path / "train"
    (tmp_path / "pretrain.zarr").mkdir()
    assert pretrain_split(tmp_path, ".zarr") == tmp_path / "pretrain.zarr"


def test_synthetic_pretrain_pool_is_its_own_draw():
    from pipeline.data.synthetic import render

    a, _ = render(0, 0, "train", 32, 0)
    b, _ = render(0, 0, "pretrain", 32, 0)
    assert a.shape == b.shape and not np.array_equal(a, b)
