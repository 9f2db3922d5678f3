"""The ViT classifier of CViT (paper Sec. 3.4, Tab. 5), laid out like timm's ``vision_transformer.py``.

timm cannot be imported on these machines (it imports torchvision), so the model is written
here, with timm's parameter names and shapes: a ``vit_base_patch16_224`` state dict (for the
paper, the ImageNet-21k ViT-B/16 weights saved as ``.safetensors`` or ``.pth``) loads into
``VisionTransformer`` as it is, apart from two adaptations that fine-tuning always makes:

- ``pos_embed`` is resampled from the checkpoint's 14×14 grid (224²) to this model's grid
  (16×16 at 256², so that patch n is latent token n and a collapse order maps one-to-one onto
  the patches): bicubic interpolation of the grid part, the [cls] entry kept, as timm's
  ``resample_abs_pos_embed`` does;
- a ``head`` for another number of classes (21k -> 1k) is reported and re-initialised.

Anything else that does not fit (a patch size or width that differs, missing or unexpected
keys) stops the load with an error that names the keys, unless ``allow_missing_keys``.

Dropping patches. ``forward(images, keep)`` takes, per image, the indices of the patches to
keep (row-major on the patch grid, any order) and builds the sequence [cls] + kept patches
*after* the positional embeddings are added, so a kept patch still knows where it sits and the
dropped ones cost nothing: the blocks run over 1 + k tokens, not 1 + N. (No mask tokens: the
paper drops the patches "for efficiency".) Only the pixels of kept patches are embedded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.layers import Block, attention_flops, init_vit_weights, trunc_normal_

STEMS = ("linear", "conv")
NUM_PREFIX_TOKENS = 1  # the [cls] token; timm's vit_base_patch16_224 has no register tokens

# timm's vit_base_patch16_224 (Dosovitskiy et al. 2021): what the paper fine-tunes.
VIT_B16 = dict(patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4.0)


# ----------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class VitArch:
    """Everything that fixes the shapes of a ``VisionTransformer``.

    The patch size is not a free choice in this project: it is ``img_size / grid``, where the
    grid is the latent (collapse-order) grid, so that patch n covers the pixels of token n.
    """

    img_size: int
    patch_size: int
    num_classes: int
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    in_chans: int = 3
    stem: str = "linear"  # linear (timm) | conv (PatchConvEmbed)
    stem_width: int = 32  # conv stem only: channels of its first layer

    def __post_init__(self) -> None:
        if self.stem not in STEMS:
            raise ValueError(f"unknown ViT stem {self.stem!r}: choose one of {', '.join(STEMS)}")
        if self.stem == "conv" and self.patch_size % 2:
            raise ValueError(f"the conv stem halves each patch: patch size {self.patch_size} must be even")
        if self.img_size % self.patch_size:
            raise ValueError(f"image size {self.img_size} is not a multiple of the patch size "
                             f"{self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"ViT width {self.dim} must be divisible by its heads {self.heads}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    @classmethod
    def for_grid(cls, img_size: int, grid: int, num_classes: int, **kw: Any) -> "VitArch":
        """The ViT whose patch grid is the latent ``grid``: patch size = img_size / grid."""
        if grid < 1 or img_size % grid:
            raise ValueError(f"image size {img_size} is not divisible by the latent grid {grid}: "
                             "the ViT's patches could not align with the collapse order")
        return cls(img_size=img_size, patch_size=img_size // grid, num_classes=num_classes, **kw)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VitArch":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ----------------------------------------------------------------------------- modules


def patches_of(x: Tensor, patch_size: int, keep: Tensor | None = None) -> Tensor:
    """[B, C, H, W] -> [B, k, C, p, p]: the image's patches row-major, or only the ``keep``
    [B, k] ones."""
    B, C, H, W = x.shape
    p = patch_size
    g = H // p
    patches = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # [B, g, g, C, p, p]
    patches = patches.reshape(B, g * g, C, p, p)
    if keep is None:
        return patches
    return patches.gather(1, keep[:, :, None, None, None].expand(-1, -1, C, p, p))


def check_image_size(x: Tensor, img_size: int) -> torch.Size:
    """x's shape [B, C, H, W], or a one-line error when it is not ``img_size`` square."""
    H, W = x.shape[-2:]
    if H != img_size or W != img_size:
        raise ValueError(f"expected {img_size}x{img_size} images, got {H}x{W}")
    return x.shape


class PatchEmbed(nn.Module):
    """timm's ``PatchEmbed``: a p×p stride-p convolution, flattened to a row-major sequence."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """x: [B, C, H, W] -> [B, N, D]; with ``keep`` [B, k] -> [B, k, D] (only kept patches)."""
        B, C, H, W = check_image_size(x, self.img_size)
        if keep is None:
            return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, g, g] -> [B, N, D]
        # Embed only the kept patches: the conv is a linear map of each p×p patch, flattened
        # in the conv weight's (c, i, j) order, so gather the patches and apply it as one.
        patches = patches_of(x, self.patch_size, keep).flatten(2)  # [B, k, C·p²]
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # [B, k, D]


class PatchConvEmbed(nn.Module):
    """A CNN inside each patch, then a linear map to the width: no pixel outside a patch
    reaches its embedding (every convolution zero-pads at the patch border).

    Layout = the judge's half-resolution stage (``pipeline.models.judge``), so its trained
    layers can be copied in (BatchNorm folded into the biases):

        patch [C, p, p] -> 4x4/2 conv w -> 3x3 w -> 3x3 2w -> 3x3 2w (ReLU after each)
              -> [2w, p/2, p/2] -> flatten -> linear -> [D]
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int, width: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(in_chans, w, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
        )
        self.proj = nn.Linear(2 * w * (patch_size // 2) ** 2, dim)

    def conv_layers(self) -> list[nn.Conv2d]:
        return [m for m in self.convs if isinstance(m, nn.Conv2d)]

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """x: [B, C, H, W] -> [B, N, D]; with ``keep`` [B, k] -> [B, k, D] (only kept patches)."""
        B, C, H, W = check_image_size(x, self.img_size)
        patches = patches_of(x, self.patch_size, keep)  # [B, k, C, p, p]
        k, p = patches.shape[1], self.patch_size
        feats = self.convs(patches.reshape(B * k, C, p, p))  # [B·k, 2w, p/2, p/2]
        return self.proj(feats.flatten(1)).reshape(B, k, -1)



def conv_stem_flops(arch: VitArch) -> float:
    """FLOPs (2 per multiply-accumulate) of :class:`PatchConvEmbed` on one patch."""
    w, side = arch.stem_width, arch.patch_size // 2  # every conv runs at half the patch side
    macs = side * side * (16 * arch.in_chans * w + 9 * w * w + 9 * w * 2 * w + 9 * 2 * w * 2 * w)
    return 2.0 * (macs + 2 * w * side * side * arch.dim)


class VisionTransformer(nn.Module):
    """ViT with a [cls] token and learned absolute positions; timm key names and shapes."""

    def __init__(self, arch: VitArch) -> None:
        super().__init__()
        self.arch = arch
        D = arch.dim
        if arch.stem == "conv":
            self.patch_embed: nn.Module = PatchConvEmbed(arch.img_size, arch.patch_size,
                                                         arch.in_chans, D, arch.stem_width)
        else:
            self.patch_embed = PatchEmbed(arch.img_size, arch.patch_size, arch.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))  # [1, 1, D]
        self.pos_embed = nn.Parameter(torch.zeros(1, NUM_PREFIX_TOKENS + arch.num_patches, D))
        self.blocks = nn.Sequential(*[
            Block(D, arch.heads, arch.mlp_ratio, qkv_bias=True, eps=1e-6) for _ in range(arch.depth)
        ])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, arch.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # timm: pos_embed ~ trunc-normal(0.02), cls_token ~ normal(1e-6); the linears follow
        # the project's shared (MAE/timm) init; the patch conv like a linear on flat patches.
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_vit_weights)
        if isinstance(self.patch_embed, PatchEmbed):
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.patch_embed.proj.bias)
        else:
            for conv in self.patch_embed.conv_layers():  # He init for the ReLU stack
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)

    def reset_head(self) -> None:
        """A fresh classifier, as fine-tuning on another label set does."""
        init_vit_weights(self.head)

    def no_weight_decay(self) -> set[str]:
        """timm's hook: parameters AdamW must not decay. Decaying the positional embeddings
        pulls every position towards the same vector, and the ViT drops patches after adding
        them, so position is all a kept patch knows of where it sits."""
        return {"pos_embed", "cls_token"}

    @property
    def num_patches(self) -> int:
        return self.arch.num_patches

    def check_keep(self, keep: Tensor, batch: int) -> None:
        if keep.dim() != 2 or keep.shape[0] != batch:
            raise ValueError(f"keep must be [B={batch}, k] patch indices, got {tuple(keep.shape)}")
        if keep.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"keep must hold integer patch indices, got {keep.dtype}")
        k = keep.shape[1]
        if not 1 <= k <= self.num_patches:
            raise ValueError(f"keep must name 1..{self.num_patches} patches per image, got {k}")

    def embed(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """images [B, C, H, W] -> the token sequence the blocks see: [B, 1 + k, D]."""
        if keep is not None:
            self.check_keep(keep, images.shape[0])
            keep = keep.long()
        return self.add_positions(self.patch_embed(images, keep), keep)

    def add_positions(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Patch embeddings [B, k, D] (all N row-major when ``keep`` is None, else those of
        ``keep`` [B, k]) -> [B, 1 + k, D] with positions and the [cls] token.

        Positional embeddings are added to every kept patch before the blocks, so the kept
        ones carry their grid position (the drop is a gather, not a mask token).
        """
        B = x.shape[0]
        if keep is None:
            x = x + self.pos_embed[:, NUM_PREFIX_TOKENS:]  # [B, N, D]
        else:
            x = x + self.pos_embed[0, NUM_PREFIX_TOKENS:][keep.long()]  # [B, k, D]
        cls = (self.cls_token + self.pos_embed[:, :NUM_PREFIX_TOKENS]).expand(B, -1, -1)
        return torch.cat((cls, x), dim=1)  # [B, 1 + k, D]

    def forward_embedded(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """``forward`` from patch embeddings: [B, k, D] of the patches ``keep`` [B, k] (or all
        N) -> logits. Each patch's embedding depends on that patch alone (both stems), so an
        evaluation that drops patches many ways embeds the image once and gathers."""
        if keep is not None:
            self.check_keep(keep, x.shape[0])
        return self.forward_head(self.norm(self.blocks(self.add_positions(x, keep))))

    def forward_features(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """images [B, C, H, W] in [-1, 1] -> the normalised sequence [B, 1 + k, D]."""
        return self.norm(self.blocks(self.embed(images, keep)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """[cls] pooling (timm's global_pool='token'), then the classifier unless ``pre_logits``."""
        x = x[:, 0]  # [B, D]
        return x if pre_logits else self.head(x)

    def forward(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """images [B, C, H, W] in [-1, 1]; keep [B, k] indices of patches to keep, or None."""
        return self.forward_head(self.forward_features(images, keep))


# ----------------------------------------------------------------------------- cost


def vit_forward_flops(arch: VitArch, kept: int) -> float:
    """FLOPs (2 per multiply-accumulate) of one image's forward pass with ``kept`` patches.

    Patch embedding of the kept patches (the conv stem's layers included), the blocks over 1 + kept tokens (linear and
    attention terms, ``layers.attention_flops``) and the head; LayerNorms, softmax and GELU
    are left out (they are linear in the tokens and small).
    """
    if arch.stem == "conv":
        embed = kept * conv_stem_flops(arch)
    else:
        embed = 2.0 * kept * arch.in_chans * arch.patch_size ** 2 * arch.dim
    blocks = attention_flops(NUM_PREFIX_TOKENS + kept, arch.dim, arch.depth, arch.mlp_ratio)
    head = 2.0 * arch.dim * arch.num_classes
    return embed + blocks + head


# ----------------------------------------------------------------------------- pretrained weights


class PretrainedMismatchError(ValueError):
    """A checkpoint that does not fit the model; the message lists every offending key."""


def resample_pos_embed(pos: Tensor, new_grid: int, num_prefix_tokens: int = NUM_PREFIX_TOKENS,
                       ) -> Tensor:
    """[1, P + g², D] -> [1, P + new_grid², D], like timm's ``resample_abs_pos_embed``.

    The grid part is viewed as a [D, g, g] image and resized with bicubic interpolation
    (float32, antialias — which only matters when shrinking); the prefix ([cls]) entries are
    kept as they are.
    """
    if pos.dim() != 3 or pos.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, L, D], got {tuple(pos.shape)}")
    n_old = pos.shape[1] - num_prefix_tokens
    old_grid = math.isqrt(n_old)
    if old_grid * old_grid != n_old:
        raise ValueError(f"pos_embed has {n_old} grid entries after {num_prefix_tokens} prefix "
                         "token(s): not a square grid")
    if old_grid == new_grid:
        return pos
    prefix, grid = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    D = grid.shape[-1]
    img = grid.float().reshape(1, old_grid, old_grid, D).permute(0, 3, 1, 2)  # [1, D, g, g]
    img = F.interpolate(img, size=(new_grid, new_grid), mode="bicubic", antialias=True,
                        align_corners=False)
    grid = img.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos.dtype)
    return torch.cat((prefix, grid), dim=1)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A ViT state dict from ``.safetensors`` or a torch pickle (``.pth``/``.pt``/``.bin``).

    Accepts the wrappers training scripts put around it ({"model": ...}, {"state_dict": ...})
    and DDP's ``module.`` prefix. Pickles load with ``weights_only=True`` (no code runs).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained ViT weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path), device="cpu")
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        sd = torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".npz":
        raise ValueError(f"{path}: Google/JAX .npz ViT checkpoints are not read here; convert it "
                         "to a timm state dict (.safetensors or .pth) first")
    else:
        raise ValueError(f"{path}: unknown weight format {path.suffix!r} "
                         "(expected .safetensors, .pth, .pt or .bin)")
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()
            if isinstance(v, Tensor)}


# timm checkpoint keys that exist in some ViT-B/16 releases but have no counterpart in
# vit_base_patch16_224 and are dropped by timm's own checkpoint filter: the original
# in21k release's "representation layer" (pre_logits), unused when fine-tuning.
DROPPED_PREFIXES = ("pre_logits.",)


def timm_key_map(keys: list[str] | set[str], model_keys: list[str] | set[str]) -> dict[str, str | None]:
    """checkpoint key -> model key (None: dropped on purpose, see ``DROPPED_PREFIXES``).

    The project's ViT uses timm's names, so the map is the identity wherever the model has
    the key; a key the model lacks and timm would not drop is left out of the map (it is
    "unexpected" to the loader).
    """
    model_keys = set(model_keys)
    out: dict[str, str | None] = {}
    for k in keys:
        if k in model_keys:
            out[k] = k
        elif k.startswith(DROPPED_PREFIXES):
            out[k] = None
    return out


@dataclass
class LoadReport:
    """What ``load_pretrained`` did, for the log and the training metrics."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model lacks
    dropped: list[str] = field(default_factory=list)  # known-unused keys (pre_logits)
    reinitialized: list[str] = field(default_factory=list)  # head for another class count
    pos_embed_resized: tuple[int, int] | None = None  # (old grid, new grid)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.pos_embed_resized:
            a, b = self.pos_embed_resized
            parts.append(f"pos_embed resized {a}x{a} -> {b}x{b}")
        if self.reinitialized:
            parts.append(f"re-initialised {self.reinitialized} (class count differs)")
        if self.dropped:
            parts.append(f"dropped {self.dropped}")
        if self.missing:
            parts.append(f"MISSING {self.missing}")
        if self.unexpected:
            parts.append(f"UNEXPECTED {self.unexpected}")
        return "; ".join(parts)


def load_pretrained(model: VisionTransformer, source: str | Path | Mapping[str, Tensor],
                    allow_missing_keys: bool = False) -> LoadReport:
    """Load timm ViT weights into ``model`` (in place) and say what happened.

    - ``pos_embed`` of another grid is resampled to the model's grid;
    - ``head.*`` of another class count is re-initialised (reported);
    - any other shape difference (patch size, width, MLP size) is an error naming the keys;
    - missing or unexpected keys are an error unless ``allow_missing_keys`` (then reported,
      and the missing ones keep their initialisation).
    """
    sd = dict(read_state_dict(source) if isinstance(source, (str, Path)) else source)
    target = model.state_dict()
    mapping = timm_key_map(list(sd), list(target))
    report = LoadReport()
    report.dropped = sorted(k for k, v in mapping.items() if v is None)
    report.unexpected = sorted(k for k in sd if k not in mapping)
    new_sd: dict[str, Tensor] = {}
    bad_shapes: list[str] = []
    for src, dst in mapping.items():
        if dst is None:
            continue
        t, want = sd[src], target[dst]
        if dst == "pos_embed" and t.shape != want.shape:
            if t.dim() == 3 and t.shape[-1] == want.shape[-1]:
                t = resample_pos_embed(t, model.arch.grid)
                report.pos_embed_resized = (math.isqrt(sd[src].shape[1] - NUM_PREFIX_TOKENS),
                                            model.arch.grid)
        if dst.startswith("head.") and t.shape != want.shape:
            report.reinitialized.append(dst)
            continue
        if t.shape != want.shape:
            bad_shapes.append(f"{src}: checkpoint {tuple(t.shape)} vs model {tuple(want.shape)}")
            continue
        new_sd[dst] = t.to(want.dtype)
    if bad_shapes:
        hint = ""
        if any(s.startswith("patch_embed.") for s in bad_shapes):
            hint = (f" (the model's patch size is {model.arch.patch_size} = image size "
                    f"{model.arch.img_size} / latent grid {model.arch.grid})")
        raise PretrainedMismatchError("pretrained ViT does not fit the model" + hint + ":\n  "
                                      + "\n  ".join(bad_shapes))
    report.missing = sorted(k for k in target if k not in new_sd and k not in report.reinitialized)
    report.loaded = sorted(new_sd)
    if (report.missing or report.unexpected) and not allow_missing_keys:
        raise PretrainedMismatchError(
            "pretrained ViT keys do not match the model (set cvit.allow_missing_keys=true to "
            f"continue anyway):\n  missing from the checkpoint: {report.missing}\n"
            f"  unexpected in the checkpoint: {report.unexpected}")
    model.load_state_dict(new_sd, strict=False)
    if report.reinitialized:
        model.reset_head()
    return report


__all__ = [
    "DROPPED_PREFIXES", "LoadReport", "NUM_PREFIX_TOKENS", "PatchConvEmbed", "PatchEmbed",
    "PretrainedMismatchError", "STEMS", "VIT_B16", "VisionTransformer", "VitArch",
    "conv_stem_flops", "load_pretrained", "patches_of", "read_state_dict", "resample_pos_embed",
    "timm_key_map", "vit_forward_flops",
]
