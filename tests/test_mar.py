"""MAR / CMAR model: order masking, order-following sampling, the diffusion head, checkpoints."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from pipeline.models.diffusion import GaussianDiffusion, cosine_betas, create_diffusion, space_timesteps
from pipeline.models.mar import (MAR, check_orders, load_mar_checkpoint, load_mar_state, mar_base,
                                 mask_by_order, read_mar_checkpoint)


def tiny(**kw) -> MAR:
    torch.manual_seed(0)
    args = dict(grid=4, token_dim=4, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=4,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, num_classes=3,
                buffer_size=2, diffloss_d=1, diffloss_w=32, num_sampling_steps="5",
                diffusion_batch_mul=2)
    args.update(kw)
    return MAR(**args)


# ----------------------------------------------------------------------------- masking


def test_mask_by_order_masks_exactly_the_head():
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    for k in (1, 5, 16):
        m = mask_by_order(orders, k)
        assert m.sum(1).tolist() == [k] * 3
        for b in range(3):
            assert set(torch.nonzero(m[b]).flatten().tolist()) == set(orders[b, :k].tolist())


def test_num_masked_follows_truncated_normal():
    m = tiny(mask_ratio_min=0.7)
    counts = [m.num_masked(u) for u in np.linspace(0.001, 0.999, 50)]
    assert counts == sorted(counts)  # the inverse CDF is monotone
    assert min(counts) >= math.ceil(16 * 0.7) and max(counts) == 16
    # the median of the left half-normal at 1 with sd 0.25, truncated at 0.7
    import scipy.stats as st
    ratio = st.truncnorm((0.7 - 1) / 0.25, 0, loc=1, scale=0.25).ppf(0.5)
    assert m.num_masked(0.5) == math.ceil(16 * ratio)


def test_forward_loss_uses_only_masked_tokens():
    """Masked tokens are only targets (no gradient reaches them: they never enter the
    encoder); visible tokens are the context the loss depends on."""
    m = tiny(attn_dropout=0.0, proj_dropout=0.0).eval()
    with torch.no_grad():  # leave the zero-initialised head, so z (and the context) matters
        for p in m.diffloss.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = torch.randn(2, 16, 4, requires_grad=True)
    lab = torch.tensor([0, 2])
    orders = torch.stack([torch.arange(16), torch.arange(16).flip(0)])
    t = torch.randint(0, 1000, (2, 2, 16), generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 2, 16, 4, generator=torch.Generator().manual_seed(2))
    loss = m(x, lab, orders, 10, drop_labels=torch.zeros(2, dtype=torch.bool), t=t, noise=noise)
    loss.backward()
    masked = mask_by_order(orders, 10)
    assert torch.all(x.grad[masked] == 0)
    assert x.grad[~masked].abs().sum() > 0


# ----------------------------------------------------------------------------- sampling


def test_sampling_reveals_in_the_given_order():
    m = tiny().eval()
    gen = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(16, generator=gen) for _ in range(2)])
    lab = torch.tensor([1, 2])
    tokens, step = m.sample_tokens(lab, orders, num_iter=4, cfg=2.0, generator=gen, return_reveal_step=True)
    assert tokens.shape == (2, 16, 4) and torch.isfinite(tokens).all()
    assert (step >= 0).all()
    for b in range(2):
        along = step[b][orders[b].flip(0)]  # MAR reveals the tail of its order first
        assert torch.all(along[1:] >= along[:-1])
    # the cosine schedule: masked after step s = floor(N cos(pi/2 (s+1)/T))
    left = [int(np.floor(16 * np.cos(np.pi / 2 * (s + 1) / 4))) for s in range(3)] + [0]
    revealed = [16 - left[0]] + [left[s - 1] - left[s] for s in range(1, 4)]
    assert [(step[0] == s).sum().item() for s in range(4)] == revealed


def test_sampling_one_token_per_step_follows_order_exactly():
    m = tiny().eval()
    orders = torch.randperm(16, generator=torch.Generator().manual_seed(3))[None]
    _, step = m.sample_tokens(torch.tensor([0]), orders, num_iter=16, cfg=1.0,
                              generator=torch.Generator().manual_seed(0), return_reveal_step=True)
    assert step[0][orders[0].flip(0)].tolist() == list(range(16))


def test_sampling_is_reproducible_with_a_generator():
    m = tiny().eval()
    orders = torch.arange(16)[None].repeat(2, 1)
    a = m.sample_tokens(torch.tensor([0, 1]), orders, num_iter=3, cfg=1.5, generator=torch.Generator().manual_seed(5))
    b = m.sample_tokens(torch.tensor([0, 1]), orders, num_iter=3, cfg=1.5, generator=torch.Generator().manual_seed(5))
    c = m.sample_tokens(torch.tensor([0, 1]), orders, num_iter=3, cfg=1.5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- diffusion


def test_cosine_schedule_and_respacing():
    b = cosine_betas(1000)
    ab = np.cumprod(1 - b)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert ab[499] == pytest.approx(f(0.5) / f(0.0), rel=1e-9)
    keep = space_timesteps(1000, "100")
    assert len(keep) == 100 and keep[0] == 0 and keep[-1] == 999
    d = create_diffusion("100")
    # respacing keeps alpha_bar at the kept steps, and the model sees the original indices
    assert np.allclose(d.alphas_cumprod, ab[keep])
    assert d.timestep_map.tolist() == keep
    assert space_timesteps(1000, "") == list(range(1000))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))  # avoids t=999
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def _zero_model(x, t, c):
    """A denoiser that outputs eps = 0 and the variance interpolant v = 0."""
    return torch.zeros(x.shape[0], 2 * x.shape[1])


def test_diffusion_training_loss_closed_form():
    """With eps = 0 and v = 0: mse = mean(noise²); vb = KL(q(x_{t-1}|x_t,x_0) || p) in bits,
    p having mean = posterior mean at x0_hat = x_t/sqrt(ab) and log-variance halfway between
    log(posterior variance) and log(beta)."""
    d = GaussianDiffusion(cosine_betas(1000))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, generator=g)
    noise = torch.randn(6, 4, generator=g)
    t = torch.tensor([3, 10, 100, 500, 900, 999])
    out = d.training_losses(_zero_model, x0, t, noise, c=None)
    assert torch.allclose(out["mse"], (noise ** 2).mean(1))
    ab = np.cumprod(1 - d.betas)
    ab_prev = np.append(1.0, ab[:-1])
    for i, ti in enumerate(t.tolist()):
        xt = math.sqrt(ab[ti]) * x0[i].double() + math.sqrt(1 - ab[ti]) * noise[i].double()
        beta = d.betas[ti]
        c1 = beta * math.sqrt(ab_prev[ti]) / (1 - ab[ti])
        c2 = (1 - ab_prev[ti]) * math.sqrt(1 - beta) / (1 - ab[ti])
        true_mean = c1 * x0[i].double() + c2 * xt
        post_var = d.posterior_variance
        true_logvar = math.log(post_var[ti] if ti > 0 else post_var[1])
        x0_hat = xt / math.sqrt(ab[ti])
        p_mean = c1 * x0_hat + c2 * xt
        p_logvar = 0.5 * math.log(beta) + 0.5 * true_logvar
        kl = 0.5 * (-1 + p_logvar - true_logvar + math.exp(true_logvar - p_logvar)
                    + (true_mean - p_mean) ** 2 * math.exp(-p_logvar))
        # the model computes in fp32, the reference in float64: fp32 rounding of a KL of ~1 bit
        assert out["vb"][i].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-4, abs=1e-6)
    # fixed seeds -> the same loss, twice
    again = d.training_losses(_zero_model, x0, t, noise, c=None)
    assert torch.equal(out["loss"], again["loss"])


def test_diffusion_sampling_step_closed_form():
    """One reverse step with eps = 0 and v = 0 at temperature tau:
    x_{t-1} = c1 x_t/sqrt(ab) + c2 x_t + exp(½ log var) · tau · z."""
    d = create_diffusion("10")
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    ti = 6
    t = torch.full((5,), ti)
    for tau in (1.0, 0.5):
        y = d.p_sample(_zero_model, x, t, z, temperature=tau, c=None)
        ab = d.alphas_cumprod[ti]
        mean = d.posterior_mean_coef1[ti] * x.double() / math.sqrt(ab) + d.posterior_mean_coef2[ti] * x.double()
        logvar = 0.5 * d.posterior_log_variance_clipped[ti] + 0.5 * math.log(d.betas[ti])
        # fp32 sampler against a float64 reference on values ~1: rounding of a few ops (~1e-6)
        assert torch.allclose(y.double(), mean + math.exp(0.5 * logvar) * tau * z.double(), atol=1e-5)
    # the last step adds no noise
    y0 = d.p_sample(_zero_model, x, torch.zeros(5, dtype=torch.long), z, c=None)
    assert torch.allclose(y0.double(), d.posterior_mean_coef1[0] * x.double() / math.sqrt(d.alphas_cumprod[0])
                          + d.posterior_mean_coef2[0] * x.double(), atol=1e-5)


def test_diffloss_fixed_seed_loss_and_sample():
    m = tiny()
    torch.manual_seed(0)
    target, z = torch.randn(8, 4), torch.randn(8, 32)
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(0))
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    l1 = m.diffloss(target, z, t=t, noise=noise)
    l2 = m.diffloss(target, z, t=t, noise=noise)
    assert torch.equal(l1, l2) and torch.isfinite(l1)
    # zero-initialised output layer: eps = 0 at init, so the mse part is mean(noise²)
    mse_only = (noise ** 2).mean()
    assert l1.item() >= mse_only.item() - 1e-6
    s1 = m.diffloss.sample(z, temperature=1.0, cfg=1.0, generator=torch.Generator().manual_seed(3))
    s2 = m.diffloss.sample(z, temperature=1.0, cfg=1.0, generator=torch.Generator().manual_seed(3))
    assert s1.shape == (8, 4) and torch.equal(s1, s2)
    sc = m.diffloss.sample(z, temperature=1.0, cfg=3.0, generator=torch.Generator().manual_seed(3))
    # CFG: [cond; uncond] rows in, the guided samples are the first half (MAR drops the rest);
    # the same seed gives the same guided samples
    sc2 = m.diffloss.sample(z, temperature=1.0, cfg=3.0, generator=torch.Generator().manual_seed(3))
    assert sc.shape == (8, 4) and torch.equal(sc[:4], sc2[:4])


# ----------------------------------------------------------------------------- bad input


def test_bad_orders_labels_cfg_temperature():
    m = tiny().eval()
    lab = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="shape"):
        check_orders(torch.arange(64)[None].repeat(2, 1), 2, 16)  # an 8x8 grid's orders
    with pytest.raises(ValueError, match="shape"):
        m.sample_tokens(lab, torch.arange(64)[None].repeat(2, 1), num_iter=4)
    with pytest.raises(ValueError, match="permutation"):
        m.sample_tokens(lab, torch.zeros(2, 16, dtype=torch.long), num_iter=4)
    good = torch.arange(16)[None].repeat(2, 1)
    with pytest.raises(ValueError, match="class ids"):
        m.sample_tokens(torch.tensor([0, 3]), good, num_iter=4)
    with pytest.raises(ValueError, match="cfg"):
        m.sample_tokens(lab, good, num_iter=4, cfg=0.5)
    with pytest.raises(ValueError, match="temperature"):
        m.sample_tokens(lab, good, num_iter=4, temperature=0.0)
    with pytest.raises(ValueError, match="num_iter"):
        m.sample_tokens(lab, good, num_iter=17)  # more steps than tokens
    with pytest.raises(ValueError, match="class ids"):
        m(torch.randn(2, 16, 4), torch.tensor([0, -1]), good, 4)


def test_config_rejects_out_of_range_values():
    from pipeline.config import ParamsError, parse_params

    for bad in ({"sample": {"cfg": 0.5}}, {"sample": {"temperature": 0}}, {"sample": {"temperature": 9}},
                {"random_order_share": 1.5}, {"direction": "sideways"},
                {"model": {"enc_dim": 30, "enc_heads": 4}}, {"sample": {"num_sampling_steps": "abc"}}):
        with pytest.raises(ParamsError):
            parse_params({"cmar": bad})


def test_checkpoint_roundtrip_and_missing_keys(tmp_path):
    src = tiny()
    state = {k: v.clone() for k, v in src.state_dict().items()}
    ema = {k: v + 1 for k, v in state.items()}
    path = tmp_path / "checkpoint-last.pth"
    # as MAR's own training writes it: args (an argparse.Namespace) included
    torch.save({"model": state, "model_ema": ema, "epoch": 3, "args": argparse.Namespace(model="mar_base")}, path)
    dst = tiny()
    torch.manual_seed(99)
    dst.apply(lambda mod: None)
    load_mar_checkpoint(dst, path)  # EMA weights by default
    assert torch.equal(dst.state_dict()["z_proj.weight"], ema["z_proj.weight"])
    load_mar_checkpoint(dst, path, key="model")
    assert torch.equal(dst.state_dict()["diffloss.net.input_proj.weight"], state["diffloss.net.input_proj.weight"])

    partial = {k: v for k, v in state.items() if not k.startswith("diffloss.")}
    torch.save({"model": partial, "model_ema": partial}, path)
    with pytest.raises(ValueError, match="missing keys"):
        load_mar_checkpoint(tiny(), path)
    missing = load_mar_checkpoint(tiny(), path, allow_missing=True)
    assert missing and all(k.startswith("diffloss.") for k in missing)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_mar_state(tiny(grid=5), state)  # another grid: position embeddings differ
    with pytest.raises(FileNotFoundError):
        read_mar_checkpoint(tmp_path / "nope.pth")


# ----------------------------------------------------------------------------- MAR-B keys


def _mar_b_published_shapes() -> dict[str, tuple[int, ...]]:
    """MAR-B's state dict as released (LTH14/mar models/mar.py + diffloss.py, mar_base with
    --diffloss_d 6 --diffloss_w 1024, img 256 / vae_stride 16 / patch 1, 16-dim KL-16 tokens,
    buffer 64, 1000 classes, timm Blocks). Written from the published architecture."""
    E = Dd = 768
    N, buf, C, W, T = 256, 64, 16, 1024, 256  # tokens, buffer, token dim, diffloss width, freq dim
    s: dict[str, tuple[int, ...]] = {
        "class_emb.weight": (1000, E), "fake_latent": (1, E),
        "z_proj.weight": (E, C), "z_proj.bias": (E,), "z_proj_ln.weight": (E,), "z_proj_ln.bias": (E,),
        "encoder_pos_embed_learned": (1, N + buf, E),
        "encoder_norm.weight": (E,), "encoder_norm.bias": (E,),
        "decoder_embed.weight": (Dd, E), "decoder_embed.bias": (Dd,), "mask_token": (1, 1, Dd),
        "decoder_pos_embed_learned": (1, N + buf, Dd),
        "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
        "diffusion_pos_embed_learned": (1, N, Dd),
    }
    for side, dim in (("encoder_blocks", E), ("decoder_blocks", Dd)):
        for i in range(12):
            p = f"{side}.{i}."
            s.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                      p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
                      p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                      p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                      p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
                      p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,)})
    n = "diffloss.net."
    s.update({n + "time_embed.mlp.0.weight": (W, T), n + "time_embed.mlp.0.bias": (W,),
              n + "time_embed.mlp.2.weight": (W, W), n + "time_embed.mlp.2.bias": (W,),
              n + "cond_embed.weight": (W, Dd), n + "cond_embed.bias": (W,),
              n + "input_proj.weight": (W, C), n + "input_proj.bias": (W,),
              n + "final_layer.linear.weight": (2 * C, W), n + "final_layer.linear.bias": (2 * C,),
              n + "final_layer.adaLN_modulation.1.weight": (2 * W, W),
              n + "final_layer.adaLN_modulation.1.bias": (2 * W,)})
    for i in range(6):
        p = f"{n}res_blocks.{i}."
        s.update({p + "in_ln.weight": (W,), p + "in_ln.bias": (W,),
                  p + "mlp.0.weight": (W, W), p + "mlp.0.bias": (W,),
                  p + "mlp.2.weight": (W, W), p + "mlp.2.bias": (W,),
                  p + "adaLN_modulation.1.weight": (3 * W, W), p + "adaLN_modulation.1.bias": (3 * W,)})
    return s


def test_mar_b_state_dict_maps_key_for_key():
    published = _mar_b_published_shapes()
    with torch.device("meta"):
        model = mar_base(grid=16, token_dim=16, num_classes=1000, buffer_size=64)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(published) == set(ours), (sorted(set(published) - set(ours))[:5], sorted(set(ours) - set(published))[:5])
    assert all(published[k] == ours[k] for k in published)
    assert sum(math.prod(v) for v in published.values()) == pytest.approx(208e6, rel=0.01)  # README: 208M
    # and a state dict of those shapes loads (meta tensors: shapes only, no data)
    fake = {k: torch.empty(v, device="meta") for k, v in published.items()}
    assert load_mar_state(model, fake) == []
