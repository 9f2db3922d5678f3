"""Stand-ins for what a full-profile user downloads, in the published formats, random-initialised.

Each maker writes one file the way its publisher does, so the loaders meet the real layout:

- KL-16 (MAR's ``kl16.ckpt``): LDM key names under ``"model"``, at full size (the tokenizer's
  architecture is fixed; only the values are random);
- MAR (``checkpoint-last.pth``): ``{"model", "model_ema", "args"}``; the EMA differs from the
  raw weights by a known offset so a test can tell which one a run started from;
- timm ViT (``.safetensors``): timm's key names, 16-px patches on 224² (a 14×14 ``pos_embed``
  after the [cls] entry) and the in21k head of 21,843 classes;
- the FID Inception (``pt_inception-2015-12-05-*.pth``): a plain state dict;
- ADM's reference batch (``VIRTUAL_imagenet256_labeled.npz``): ``arr_0`` images, ``mu``/``sigma``
  (2048-d pool features) and ``mu_s``/``sigma_s`` (spatial features).
And an ImageNet-style folder: ``train/<wnid>/*.JPEG`` of mixed sizes with a greyscale and a CMYK
file among them, flat ``val/`` labelled by ``LOC_val_solution.csv`` (class word then boxes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

MAR_EMA_OFFSET = 0.01  # model_ema = model + this, everywhere


def write_kl16(path: Path, seed: int = 0) -> Path:
    from ldm_reference import LDMAutoencoderKL, randomize_

    state = randomize_(LDMAutoencoderKL(), seed=seed).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return path


def write_mar(path: Path, cmar_cfg, grid: int = 16, token_dim: int = 16, num_classes: int = 1000,
              seed: int = 0) -> Path:
    """A MAR checkpoint of ``cmar_cfg.model``'s width for a ``grid``² token grid."""
    from pipeline.tasks.cmar import build_mar

    torch.manual_seed(seed)
    model = build_mar(cmar_cfg, grid, token_dim, num_classes)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v + MAR_EMA_OFFSET if v.is_floating_point() else v.clone() for k, v in raw.items()}
    m = cmar_cfg.model
    args = argparse.Namespace(model="mar_base", img_size=grid * 16, vae_stride=16, patch_size=1,
                              vae_embed_dim=token_dim, class_num=num_classes, buffer_size=m.buffer_size,
                              diffloss_d=m.diffloss_d, diffloss_w=m.diffloss_w,
                              diffusion_batch_mul=m.diffusion_batch_mul, ema_rate=0.9999)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": raw, "model_ema": ema, "args": args, "epoch": 799}, path)
    return path


def write_timm_vit(path: Path, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                   num_classes: int = 21843, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    from pipeline.models.vit import VisionTransformer, VitArch

    torch.manual_seed(seed)
    arch = VitArch.for_grid(224, 14, num_classes, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio)
    state = VisionTransformer(arch).state_dict()
    assert state["pos_embed"].shape == (1, 197, dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_fid_inception(path: Path, seed: int = 0) -> Path:
    from pipeline.models.inception import FIDInceptionV3

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(FIDInceptionV3().state_dict(), path)
    return path


def write_adm_reference(path: Path, n: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(max(n, 4), 2048))
    spatial = rng.normal(size=(max(n, 4), 2023))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=rng.integers(0, 256, size=(n, 256, 256, 3), dtype=np.uint8),
             mu=feats.mean(0), sigma=np.cov(feats, rowvar=False) + np.eye(2048),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False) + np.eye(2023))
    return path


def write_imagenet_folder(root: Path, wnids: list[str], train_per_class: int, val_per_class: int,
                          seed: int = 0) -> dict[str, list[str]]:
    """An ImageNet-layout folder; returns {"grey": [...], "cmyk": [...]} (train file names)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(300, 260), (256, 256), (500, 375), (280, 400)]
    special: dict[str, list[str]] = {"grey": [], "cmyk": []}

    def picture(c: int, k: int) -> np.ndarray:
        w, h = sizes[k % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx + c), np.cos(5 * yy - c), xx * yy], -1)
        return ((base * 0.5 + 0.5) * 255 * rng.uniform(0.7, 1.0)).clip(0, 255).astype(np.uint8)

    for c, wnid in enumerate(wnids):
        folder = root / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(train_per_class):
            name = f"{wnid}_{k + 1}.JPEG"
            img = Image.fromarray(picture(c, k))
            if c == 0 and k == 0:
                img, kind = img.convert("L"), "grey"
            elif c == 1 and k == 0:
                img, kind = img.convert("CMYK"), "cmyk"
            else:
                kind = None
            img.save(folder / name, quality=90)
            if kind:
                special[kind].append(name)
    val = root / "val"
    val.mkdir(parents=True, exist_ok=True)
    lines, n = ["ImageId,PredictionString"], 0
    for k in range(val_per_class):
        for c, wnid in enumerate(wnids):
            n += 1
            stem = f"ILSVRC2012_val_{n:08d}"
            img = picture(c, k + 1)
            Image.fromarray(img).save(val / f"{stem}.JPEG", quality=90)
            h, w = img.shape[:2]
            lines.append(f"{stem},{wnid} {w // 4} {h // 4} {3 * w // 4} {3 * h // 4} ")
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return special
