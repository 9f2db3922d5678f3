"""The CViT backbone: patch dropping, timm ViT-B/16 key/shape compatibility, bad checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pipeline.models.vit import (
    VIT_B16, PretrainedMismatchError, VisionTransformer, VitArch, load_pretrained,
    read_state_dict, resample_pos_embed, vit_forward_flops,
)


def tiny_vit(num_classes: int = 5, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    # 32 px on a 4x4 latent grid -> 8 px patches, N = 16
    return VisionTransformer(VitArch.for_grid(32, 4, num_classes, dim=32, depth=2, heads=4)).eval()


def reference_logits(model: VisionTransformer, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The drop written out by hand: conv embedding of every patch, + positions, gather, blocks."""
    tokens = model.patch_embed.proj(images).flatten(2).transpose(1, 2)  # [B, N, D]
    tokens = tokens + model.pos_embed[:, 1:]
    gathered = torch.stack([tokens[b, keep[b]] for b in range(len(keep))])  # [B, k, D]
    cls = model.cls_token + model.pos_embed[:, :1]
    x = torch.cat([cls.expand(len(keep), -1, -1), gathered], dim=1)
    for blk in model.blocks:
        x = blk(x)
    return model.head(model.norm(x)[:, 0])


@torch.no_grad()
def test_dropping_patches_equals_running_on_the_gathered_sequence() -> None:
    model = tiny_vit()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    keep = torch.rand(3, 16, generator=g).argsort(dim=1)[:, :5]  # a different subset per image
    out = model(images, keep)
    assert out.shape == (3, 5)
    # the same fp32 network on other sequence lengths: matmul blocking reorders sums (~1e-6)
    torch.testing.assert_close(out, reference_logits(model, images, keep), atol=1e-5, rtol=1e-4)
    # the drop matters (this test could fail) and kept-token order does not (positions travel)
    assert not torch.allclose(out, model(images), atol=1e-3)
    torch.testing.assert_close(model(images, keep.flip(1)), out, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_keep_all_equals_plain_forward() -> None:
    model = tiny_vit()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    full = model(images)
    all_idx = torch.arange(16).expand(2, -1)
    # as above: only the gather differs
    torch.testing.assert_close(model(images, all_idx), full, atol=1e-5, rtol=1e-4)
    shuffled = torch.stack([torch.randperm(16), torch.randperm(16)])
    torch.testing.assert_close(model(images, shuffled), full, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_compute_falls_with_the_number_kept() -> None:
    model = tiny_vit()
    seen: list[int] = []
    model.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    images = torch.zeros(2, 3, 32, 32)
    model(images)
    model(images, torch.arange(4).expand(2, -1))
    assert seen == [17, 5]  # [cls] + 16, [cls] + 4
    arch = model.arch
    flops = [vit_forward_flops(arch, k) for k in (16, 8, 4, 1)]
    assert flops == sorted(flops, reverse=True)
    # ViT-B/16 at 256²: keeping 56 of 256 patches (78% dropped) costs under a quarter
    b16 = VitArch.for_grid(256, 16, 1000, **{k: v for k, v in VIT_B16.items() if k != "patch_size"})
    assert vit_forward_flops(b16, 56) / vit_forward_flops(b16, 256) < 0.25


def test_bad_keep_is_refused() -> None:
    model = tiny_vit()
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="patches per image"):
        model(images, torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="keep must be"):
        model(images, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="32x32"):
        model(torch.zeros(2, 3, 64, 64))


def test_patch_size_follows_the_latent_grid() -> None:
    assert VitArch.for_grid(256, 16, 10).patch_size == 16
    assert VitArch.for_grid(64, 8, 10).patch_size == 8
    with pytest.raises(ValueError, match="latent grid 7"):
        VitArch.for_grid(64, 7, 10)


# ----------------------------------------------------------------------------- timm ViT-B/16


def timm_vit_b16_shapes(num_classes: int = 21843) -> dict[str, tuple[int, ...]]:
    """vit_base_patch16_224 as timm publishes it: depth 12, width 768, 12 heads, MLP 3072,
    16 px patches on 224² -> 14x14 = 196 patches + [cls] = 197 positions."""
    D, depth, mlp, p, tokens = 768, 12, 3072, 16, (224 // 16) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, D), "pos_embed": (1, tokens, D),
        "patch_embed.proj.weight": (D, 3, p, p), "patch_embed.proj.bias": (D,),
        "norm.weight": (D,), "norm.bias": (D,),
        "head.weight": (num_classes, D), "head.bias": (num_classes,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (D,), b + "norm1.bias": (D,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "norm2.weight": (D,), b + "norm2.bias": (D,),
            b + "mlp.fc1.weight": (mlp, D), b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (D, mlp), b + "mlp.fc2.bias": (D,),
        }
    assert len(shapes) == 8 + 12 * 12
    return shapes


def marked_state(shapes: dict[str, tuple[int, ...]], offset: float = 0.0) -> dict[str, torch.Tensor]:
    """Key i filled with the value i + offset: a key loaded into the wrong place shows."""
    return {k: torch.full(s, i + offset) for i, (k, s) in enumerate(sorted(shapes.items()))}


@pytest.fixture(scope="module")
def vit_b16_256() -> VisionTransformer:
    arch = VitArch.for_grid(256, 16, 1000, **{k: v for k, v in VIT_B16.items() if k != "patch_size"})
    with torch.device("meta"):  # skip the (slow, here pointless) random init of 86M weights
        model = VisionTransformer(arch)
    return model.to_empty(device="cpu")


@torch.no_grad()
def test_timm_key_map_covers_every_vit_b16_key(vit_b16_256: VisionTransformer) -> None:
    model = vit_b16_256
    shapes = timm_vit_b16_shapes(num_classes=1000)
    # same keys, and every shape except the position table (197 vs 257 tokens) agrees
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(shapes)
    assert {k for k in shapes if got[k] != shapes[k]} == {"pos_embed"}
    assert got["pos_embed"] == (1, 257, 768)

    sd = marked_state(shapes)
    report = load_pretrained(model, sd)
    assert report.missing == [] and report.unexpected == [] and report.reinitialized == []
    assert report.loaded == sorted(shapes)
    assert report.pos_embed_resized == (14, 16)
    state = model.state_dict()
    for k in shapes:
        if k != "pos_embed":
            assert torch.equal(state[k], sd[k]), k
    torch.testing.assert_close(state["pos_embed"][:, :1], sd["pos_embed"][:, :1])  # [cls] kept


@torch.no_grad()
def test_in21k_head_is_reported_and_reinitialised(vit_b16_256: VisionTransformer) -> None:
    shapes = timm_vit_b16_shapes(num_classes=21843)
    sd = marked_state(shapes, offset=0.5)
    sd["pre_logits.fc.weight"] = torch.zeros(768, 768)  # the original in21k release has it
    sd["pre_logits.fc.bias"] = torch.zeros(768)
    report = load_pretrained(vit_b16_256, sd)
    assert sorted(report.reinitialized) == ["head.bias", "head.weight"]
    assert report.dropped == ["pre_logits.fc.bias", "pre_logits.fc.weight"]
    assert report.missing == [] and report.unexpected == []
    assert vit_b16_256.head.weight.shape == (1000, 768)
    assert torch.equal(vit_b16_256.blocks[11].mlp.fc2.weight, sd["blocks.11.mlp.fc2.weight"])


def test_pos_embed_resize_is_bicubic_on_the_grid_only() -> None:
    # A smooth field survives resampling: a constant grid stays that constant, the [cls] row
    # is untouched, and a separable ramp stays monotone along its axis.
    cls = torch.full((1, 1, 2), 7.0)
    grid = torch.stack(torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij"), -1)
    pos = torch.cat([cls, grid.reshape(1, 196, 2)], dim=1)  # channel 0 = row, channel 1 = col
    out = resample_pos_embed(pos, 16)
    assert out.shape == (1, 257, 2)
    assert torch.equal(out[:, 0], cls[:, 0])
    rows = out[0, 1:, 0].reshape(16, 16)
    cols = out[0, 1:, 1].reshape(16, 16)
    assert torch.allclose(rows, rows[:, :1].expand(-1, 16), atol=1e-5)  # row channel ignores col
    assert (rows[1:, 0] > rows[:-1, 0]).all() and (cols[0, 1:] > cols[0, :-1]).all()
    const = torch.cat([cls, torch.full((1, 196, 2), 3.0)], dim=1)
    torch.testing.assert_close(resample_pos_embed(const, 16)[:, 1:], torch.full((1, 256, 2), 3.0))
    assert resample_pos_embed(pos, 14) is pos


# ----------------------------------------------------------------------------- bad checkpoints


def small_timm_state(model: VisionTransformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() + 1.0 for k, v in model.state_dict().items()}


def test_missing_and_unexpected_keys_stop_unless_allowed() -> None:
    model = tiny_vit()
    sd = small_timm_state(model)
    del sd["blocks.1.mlp.fc1.weight"]
    sd["fc_norm.weight"] = torch.ones(32)
    with pytest.raises(PretrainedMismatchError) as err:
        load_pretrained(tiny_vit(), sd)
    assert "blocks.1.mlp.fc1.weight" in str(err.value) and "fc_norm.weight" in str(err.value)
    assert "allow_missing_keys" in str(err.value)
    fresh = tiny_vit()
    before = fresh.blocks[1].mlp.fc1.weight.clone()
    report = load_pretrained(fresh, sd, allow_missing_keys=True)
    assert report.missing == ["blocks.1.mlp.fc1.weight"] and report.unexpected == ["fc_norm.weight"]
    assert torch.equal(fresh.blocks[1].mlp.fc1.weight, before)  # kept its init
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_checkpoint_with_another_patch_size_or_width_is_refused() -> None:
    model = tiny_vit()  # 8 px patches
    sd = small_timm_state(model)
    sd["patch_embed.proj.weight"] = torch.zeros(32, 3, 16, 16)
    with pytest.raises(PretrainedMismatchError, match="patch size is 8") as err:
        load_pretrained(model, sd)
    assert "patch_embed.proj.weight: checkpoint (32, 3, 16, 16) vs model (32, 3, 8, 8)" in str(err.value)
    wide = VisionTransformer(VitArch.for_grid(32, 4, 5, dim=64, depth=2, heads=4))
    with pytest.raises(PretrainedMismatchError, match="cls_token"):
        load_pretrained(wide, small_timm_state(model))


def test_weight_files_load_from_safetensors_and_wrapped_pth(tmp_path) -> None:
    model = tiny_vit()
    sd = small_timm_state(model)
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = read_state_dict(tmp_path / name)
        assert set(loaded) == set(sd)
        fresh = tiny_vit(seed=5)
        load_pretrained(fresh, tmp_path / name)
        assert torch.equal(fresh.pos_embed, sd["pos_embed"])
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="npz"):
        read_state_dict(tmp_path / "w.npz")


# ----------------------------------------------------------------------------- the conv stem


def conv_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(VitArch.for_grid(32, 4, 5, dim=32, depth=2, heads=4, stem="conv",
                                              stem_width=8)).eval()


@torch.no_grad()
def test_conv_stem_never_looks_across_a_patch_border() -> None:
    model = conv_vit()
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    before = model.patch_embed(images)  # [2, 16, 32]
    changed = images.clone()
    changed[:, :, 8:16, 16:24] = torch.rand(2, 3, 8, 8, generator=g)  # patch (1, 2) = index 6
    after = model.patch_embed(changed)
    moved = (after - before).abs().amax(dim=(0, 2))  # [16]
    assert moved[6] > 1e-3  # the patch itself changes (this test could fail)
    assert float(moved[torch.arange(16) != 6].max()) == 0.0  # no other patch sees it: exactly


@torch.no_grad()
def test_conv_stem_drops_like_the_linear_one() -> None:
    model = conv_vit()
    g = torch.Generator().manual_seed(4)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    keep = torch.rand(3, 16, generator=g).argsort(dim=1)[:, :5]
    full = model.patch_embed(images)
    # embedding only the kept patches is a gather of embedding all (the same convs per patch)
    torch.testing.assert_close(model.patch_embed(images, keep),
                               full.gather(1, keep[:, :, None].expand(-1, -1, 32)), atol=1e-6, rtol=0)
    # forward from precomputed embeddings (eval_cvit's path) is the forward: same fp32 ops
    kept = full.gather(1, keep[:, :, None].expand(-1, -1, 32))
    torch.testing.assert_close(model.forward_embedded(kept, keep), model(images, keep), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.forward_embedded(full), model(images), atol=1e-5, rtol=1e-4)


def test_conv_stem_flops_count_every_layer() -> None:
    arch = VitArch.for_grid(32, 4, 5, dim=32, depth=2, heads=4, stem="conv", stem_width=8)
    stem = VisionTransformer(arch).patch_embed
    side = 4  # half of the 8 px patch: every conv's output
    by_hand = sum(2 * side * side * c.weight.numel() for c in stem.conv_layers())
    by_hand += 2 * stem.proj.weight.numel()
    linear = VitArch.for_grid(32, 4, 5, dim=32, depth=2, heads=4)
    assert vit_forward_flops(arch, 16) - vit_forward_flops(linear, 16) == \
        16 * (by_hand - 2 * 3 * 8 * 8 * 32)


def test_bad_stems_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown ViT stem"):
        VitArch.for_grid(32, 4, 5, stem="resnet")
    with pytest.raises(ValueError, match="must be even"):
        VitArch(img_size=36, patch_size=9, num_classes=5, dim=32, heads=4, stem="conv")
