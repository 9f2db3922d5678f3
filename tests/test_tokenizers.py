"""Tokenizers: the KL-16 converter against an independent LDM implementation, the loaders,
and the patch stand-in. Runs the full-width KL-16 on 64×64 inputs so it stays fast on CPU."""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from ldm_reference import LDMAutoencoderKL, randomize_  # noqa: E402

from pipeline.config import TokenizerConfig  # noqa: E402
from pipeline.tokenizers import (CheckpointError, KL16Tokenizer, PatchTokenizer,  # noqa: E402
                                 build_tokenizer, load_tokenizer)
from pipeline.utils.device import cpu_has_native_bf16  # noqa: E402
from pipeline.tokenizers.kl16 import (build_kl16_model, convert_ldm_state_dict,  # noqa: E402
                                      read_kl16_weights, to_diffusers_state_dict)

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference() -> LDMAutoencoderKL:
    return randomize_(LDMAutoencoderKL(), seed=0).eval()


@pytest.fixture(scope="module")
def ldm_state(reference) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in reference.state_dict().items()}


@pytest.fixture(scope="module")
def kl16(ldm_state) -> KL16Tokenizer:
    return KL16Tokenizer(ldm_state)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 64, 64, generator=g) * 2 - 1  # [B, 3, H, W] in [-1, 1]


# ----------------------------------------------------------------------------- KL-16 layout


def test_reference_has_mar_kl16_layout(ldm_state):
    """Spot checks against MAR's models/vae.py, so the yardstick itself is the right shape."""
    s = {k: tuple(v.shape) for k, v in ldm_state.items()}
    assert s["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert s["encoder.conv_out.weight"] == (32, 512, 3, 3)  # double_z
    assert s["quant_conv.weight"] == (32, 32, 1, 1)
    assert s["post_quant_conv.weight"] == (16, 16, 1, 1)
    assert s["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert s["encoder.down.4.block.0.nin_shortcut.weight"] == (512, 256, 1, 1)
    assert s["decoder.up.1.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    for j in (0, 1):  # attention at the 16×16 encoder level only
        for name in ("q", "k", "v", "proj_out"):
            assert s[f"encoder.down.4.attn.{j}.{name}.weight"] == (512, 512, 1, 1)
        assert s[f"encoder.down.4.attn.{j}.norm.weight"] == (512,)
    assert not any(".attn." in k for k in s if k.startswith(("encoder.down.0", "encoder.down.3")))
    assert not any(".attn." in k for k in s if k.startswith("decoder.up."))
    assert "encoder.down.4.downsample.conv.weight" not in s and "encoder.down.3.downsample.conv.weight" in s
    assert "decoder.up.0.upsample.conv.weight" not in s and "decoder.up.4.upsample.conv.weight" in s
    assert {k.split(".")[4] for k in s if k.startswith("decoder.up.4.block.")} == {"0", "1", "2"}
    assert "encoder.mid.attn_1.proj_out.weight" in s and "decoder.mid.attn_1.q.weight" in s
    assert not any("temb" in k for k in s)


def test_conversion_is_a_bijection(ldm_state):
    converted, unmapped = convert_ldm_state_dict(ldm_state)
    with torch.device("meta"):  # names and shapes only
        target = build_kl16_model().state_dict()
    assert unmapped == []  # every LDM key consumed
    assert len(converted) == len(ldm_state)  # none merged
    assert set(converted) == set(target)  # every diffusers parameter/buffer filled, no extra
    for k, v in converted.items():
        assert v.shape == target[k].shape, k
    # The decoder levels are reversed and the attention convs become Linear weights.
    assert torch.equal(converted["decoder.up_blocks.0.resnets.0.conv1.weight"],
                       ldm_state["decoder.up.4.block.0.conv1.weight"])
    assert torch.equal(converted["encoder.down_blocks.4.attentions.1.to_out.0.weight"],
                       ldm_state["encoder.down.4.attn.1.proj_out.weight"][:, :, 0, 0])
    # All LDM tensors are distinct random values, so equal multisets of values means no
    # tensor was dropped or duplicated on the way.
    sums = sorted(float(v.double().sum()) for v in ldm_state.values())
    assert sorted(float(v.double().sum()) for v in converted.values()) == pytest.approx(sums)


def test_encode_moments_match_reference(reference, kl16, images):
    with torch.no_grad():
        want = reference.moments(images)  # [2, 32, 4, 4]
    got = kl16.encode_moments(images)
    assert got.shape == (2, 2 * kl16.dim, 64 // kl16.patch_size, 64 // kl16.patch_size)
    assert got.dtype == torch.float32
    # the same fp32 KL-16 against the LDM reference module: op order differs (~1e-6 on latents ~1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_decode_matches_reference(reference, kl16):
    z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference.decode(z)  # [2, 3, 64, 64]
    got = kl16.decode(z)
    assert got.shape == (2, 3, 64, 64)
    # ~25 fp32 convs deep, summation order alone moves outputs of size ~2 by ~2e-5.
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)


def test_float64_forward_is_identical(reference, kl16, images):
    """In float64 rounding vanishes, so any mapping error would stand out by many orders."""
    ref64, vae64 = copy.deepcopy(reference).double(), copy.deepcopy(kl16.vae).double()
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = images[:1].double()
    with torch.no_grad():
        torch.testing.assert_close(vae64.quant_conv(vae64.encoder(x)), ref64.moments(x),
                                   atol=1e-11, rtol=1e-9)
        torch.testing.assert_close(vae64.decode(z).sample, ref64.decode(z), atol=1e-11, rtol=1e-9)


def test_fast_path_close_to_fp32(kl16, images):
    exact = kl16.encode_moments(images)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16 warns (slow)
            kl16.set_precision("bf16", channels_last=True)
            fast = kl16.encode_moments(images)
        kl16.set_precision("fp32", channels_last=True)
        fp32_cl = kl16.encode_moments(images)
        kl16.set_precision("auto", channels_last=True)
        auto = kl16.encode_moments(images)
        assert kl16.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    finally:
        kl16.set_precision("fp32", channels_last=False)
    assert fast.dtype == torch.float32 and fast.is_contiguous()
    assert not torch.equal(fast, exact)  # the bf16 path really ran in bf16
    err = (fast - exact).abs().max() / exact.abs().max()
    assert err < 0.05, float(err)
    torch.testing.assert_close(fp32_cl, exact, atol=1e-5, rtol=1e-4)  # layout only reorders sums
    # 'auto' is bf16 only where the CPU runs bf16 natively; fp32 (+ channels_last) otherwise.
    assert torch.equal(auto, fast if cpu_has_native_bf16() else fp32_cl)
    assert torch.equal(kl16.encode_moments(images), exact)  # fp32 again is exact again


# ----------------------------------------------------------------------------- loaders


def test_three_loaders_agree(tmp_path, ldm_state, kl16):
    want = to_diffusers_state_dict(ldm_state)
    torch.save({"model": ldm_state}, tmp_path / "kl16.ckpt")  # MAR's layout
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ldm_state.items()}, str(tmp_path / "ldm.safetensors"))
    save_file(want, str(tmp_path / "diffusers.safetensors"))
    kl16.vae.save_pretrained(str(tmp_path / "folder"))
    for source in ("kl16.ckpt", "ldm.safetensors", "diffusers.safetensors", "folder"):
        got = read_kl16_weights(tmp_path / source)
        assert set(got) == set(want), source
        assert all(torch.equal(got[k], want[k]) for k in want), source
    tok = build_tokenizer(TokenizerConfig(kind="kl16", checkpoint=str(tmp_path / "kl16.ckpt"),
                                          precision="fp32", channels_last=False))
    assert tok.weights_sha256() == kl16.weights_sha256()


def test_missing_and_unexpected_keys_are_named(tmp_path, ldm_state):
    broken = {k: v for k, v in ldm_state.items() if k != "encoder.down.4.attn.0.q.weight"}
    broken["loss.logvar"] = torch.zeros(())
    torch.save({"model": broken}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError) as err:
        read_kl16_weights(tmp_path / "bad.ckpt")
    msg = str(err.value)
    assert "missing keys (1, diffusers names)" in msg
    assert "encoder.down_blocks.4.attentions.0.to_q.weight" in msg
    assert "unexpected keys (1)" in msg and "loss.logvar" in msg
    with pytest.raises(CheckpointError, match="shape mismatches"):
        to_diffusers_state_dict({**ldm_state, "quant_conv.weight": torch.zeros(32, 32, 3, 3)})


def test_pickled_objects_are_refused(tmp_path, ldm_state):
    torch.save({"model": ldm_state, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickle.ckpt")
    with pytest.raises(CheckpointError, match="weights-only"):
        read_kl16_weights(tmp_path / "pickle.ckpt")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        read_kl16_weights(tmp_path / "absent.ckpt")


def test_kl16_save_load_and_identity(tmp_path, kl16, images):
    ident = kl16.identity()
    assert ident["kind"] == "kl16" and len(ident["weights_sha256"]) == 64
    assert ident["config"]["diffusers"]["scaling_factor"] == kl16.scale_factor == 0.2325
    loaded = load_tokenizer(kl16.save(tmp_path / "tok"))
    assert loaded.identity() == ident
    assert torch.equal(loaded.encode_moments(images), kl16.encode_moments(images))
    with torch.no_grad():
        loaded.vae.quant_conv.bias[0] += 1e-3
    assert loaded.weights_sha256() != ident["weights_sha256"]


# ----------------------------------------------------------------------------- patch stand-in


def smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: bilinearly upsampled 4×4 noise, natural-image-like spectra."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def test_patch_fit_is_deterministic():
    imgs = smooth_images(24)
    a = PatchTokenizer(8, 16).fit(imgs)
    b = PatchTokenizer(8, 16).fit(imgs.copy())
    assert a.identity() == b.identity()
    sub1 = PatchTokenizer(8, 16).fit(imgs, max_patches=100)  # seeded subsample
    sub2 = PatchTokenizer(8, 16).fit(imgs, max_patches=100)
    assert sub1.identity() == sub2.identity() != a.identity()
    assert int(sub1.fit_count) == 100 and int(a.fit_count) == 24 * 16


def test_patch_round_trip_grid_and_scale():
    imgs = smooth_images(32)
    tok = PatchTokenizer(8, 16).fit(imgs)
    x = to_input(imgs)
    m = tok.encode_moments(x)
    assert m.shape == (32, 32, 32 // 8, 32 // 8)  # [B, 2·dim, H/p, W/p]
    mean, logvar = m[:, :16], m[:, 16:]
    assert torch.equal(logvar, logvar[:1, :, :1, :1].expand_as(logvar))  # constant per component
    assert torch.isfinite(logvar).all()
    rec = tok.decode(mean)
    rel = ((rec - x).pow(2).mean() / x.var()).item()
    assert rel < 0.02, rel  # 16 of 192 components keep >98% of a smooth image's variance
    std = (mean * tok.scale_factor).std().item()
    assert 0.95 < std < 1.05, std
    full = PatchTokenizer(8, 192).fit(imgs)  # all components: the transpose is the inverse
    # an orthogonal projection and its transpose in fp32 over 192 dims: ~192 * eps32 * |x| ~ 3e-5
    torch.testing.assert_close(full.decode(full.encode_moments(x)[:, :192]), x, atol=1e-4, rtol=0)
    assert tok.grid_for(64) == 8


def test_patch_save_load_identity_and_errors(tmp_path):
    imgs = smooth_images(8)
    tok = PatchTokenizer(4, 8).fit(imgs)
    loaded = load_tokenizer(tok.save(tmp_path / "tok"))
    assert isinstance(loaded, PatchTokenizer) and loaded.identity() == tok.identity()
    x = to_input(imgs)
    assert torch.equal(loaded.encode_moments(x), tok.encode_moments(x))
    with torch.no_grad():
        loaded.components[0, 0, 0, 0] += 1e-4
    assert loaded.weights_sha256() != tok.weights_sha256()
    loaded.save(tmp_path / "tampered")
    (tmp_path / "tampered" / "model.safetensors").write_bytes(
        (tmp_path / "tok" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not match the hash"):
        load_tokenizer(tmp_path / "tampered")
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchTokenizer(4, 8).encode_moments(x)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tok.encode_moments(x[:, :, :30, :30])


def test_build_patch_tokenizer_from_config():
    imgs = smooth_images(12)
    cfg = TokenizerConfig(kind="patch", patch_size=8, dim=16, fit_images=10, precision="auto")
    tok = build_tokenizer(cfg, fit_images=imgs)
    assert tok.kind == "patch" and int(tok.fit_count) == 10 * 16  # only fit_images used
    assert tok.compute_dtype() == torch.float32  # 'auto' keeps the stand-in exact
    with pytest.raises(ValueError, match="fit_images"):
        build_tokenizer(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16 warns (slow)
        bf16 = build_tokenizer(cfg.model_copy(update={"precision": "bf16"}), fit_images=imgs)
        assert bf16.compute_dtype() == torch.bfloat16
    x = to_input(imgs)
    # bf16 (8 mantissa bits) through one linear map of 192 inputs: ~1% of values ~1
    torch.testing.assert_close(bf16.encode_moments(x), tok.encode_moments(x), atol=0.05, rtol=0.02)
