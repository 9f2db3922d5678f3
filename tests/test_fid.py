"""Fréchet distance, precision/recall, Inception Score, ADM reference batches, the FID Inception."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.metrics.fid import (feature_stats, frechet_distance, frechet_distance_features,
                                  inception_score, precision_recall, read_reference_batch)


def _feats(n: int = 400, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def test_frechet_of_a_set_with_itself_is_zero():
    f = _feats()
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-6)


def test_frechet_grows_with_a_shift_and_matches_closed_form():
    f = _feats()
    dists = [frechet_distance_features(f, f + s) for s in (0.0, 0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(dists, dists[1:]))
    # a pure mean shift by s in every one of d dims adds exactly d·s² (covariances equal)
    assert dists[3] == pytest.approx(8 * 1.0 ** 2, rel=1e-6)
    # Gaussians with known statistics: N(0, I) vs N(0, 4I) in d dims -> d (1 + 4 - 2·2) = d
    d = 5
    assert frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), 4 * np.eye(d)) == pytest.approx(d)


def test_frechet_handles_singular_covariances_and_rejects_mismatch():
    f = _feats(n=4, d=10)  # fewer samples than dims: singular covariance
    assert np.isfinite(frechet_distance_features(f, f + 1))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        feature_stats(np.zeros((1, 3)))


def test_precision_recall():
    real = _feats(300, 4, seed=1)
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # fakes covering only half of the real distribution: precise but low recall
    half = real[real[:, 0] > 0]
    p, r = precision_recall(real, half)
    assert p == 1.0 and 0.3 < r < 0.8


def test_inception_score():
    n, c = 1000, 10
    assert inception_score(np.zeros((n, c)))[0] == pytest.approx(1.0)  # uninformative classifier
    confident = np.full((n, c), -50.0)
    confident[np.arange(n), np.arange(n) % c] = 50.0  # sure, and spread over all classes
    assert inception_score(confident, splits=10)[0] == pytest.approx(c, rel=1e-6)


def test_read_adm_reference_batch(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=6), np.eye(6)
    imgs = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=imgs, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=np.eye(2))
    ref = read_reference_batch(path)
    assert np.array_equal(ref.images, imgs) and np.allclose(ref.mu, mu) and ref.sigma.shape == (6, 6)
    assert ref.mu_s.shape == (2,)
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=np.eye(5))
    with pytest.raises(ValueError, match="do not match"):
        read_reference_batch(tmp_path / "bad.npz")
    np.savez(tmp_path / "empty.npz", other=mu)
    with pytest.raises(ValueError, match="neither"):
        read_reference_batch(tmp_path / "empty.npz")
    with pytest.raises(FileNotFoundError):
        read_reference_batch(tmp_path / "missing.npz")


def test_fid_inception_architecture_and_loading(tmp_path):
    from pipeline.models.inception import FIDInceptionV3, load_fid_inception

    torch.manual_seed(0)
    net = FIDInceptionV3()
    sd = net.state_dict()
    # torchvision/pytorch-fid names; 1008-way fc; the parameter count of Inception-v3 without
    # the aux head (23.8M) plus the 8 extra classes of the 2015 graph
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert sd["Conv2d_1a_3x3.bn.running_var"].shape == (32,)
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == pytest.approx(23.85e6, rel=0.01)
    # the 2015 port has no num_batches_tracked counters: they may be missing, nothing else
    published = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception.pth"
    torch.save(published, path)
    loaded = load_fid_inception(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        pool, logits = loaded(x)
        pool_ref, _ = net.eval()(x)
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.allclose(pool, pool_ref)
    del published["Mixed_5b.branch1x1.conv.weight"]
    torch.save(published, path)
    with pytest.raises(ValueError, match="missing"):
        load_fid_inception(path)
