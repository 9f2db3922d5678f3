"""The embedded default image set: generated, labelled, with the object's pixel mask.

Each class is one (shape, texture) pair; 8 shapes x 8 textures give up to 64 classes. The first
8 classes pair shape k with texture k, so in the default (6 classes) every class has its own
shape AND its own texture; further classes walk the off-diagonals (class c: shape c % 8,
texture (c % 8 + c // 8) % 8), so all pairs are distinct. Per image the object varies in pose
(rotation, anisotropic scale), position, size, colours and texture phase/frequency.

Backgrounds are clutter drawn from a distribution that does not depend on the class: a smooth
random colour field, random ellipse blobs (some filled with textures from the same texture
family as the objects, so texture alone is not a giveaway), random thick lines, pixel noise.
The object is drawn last (never occluded) and its mask is the ground truth "where the object
is" for checking which patches a model relies on.

Everything is a pure function of ``(seed, split, class, index within class)``, so it does not
depend on the order of generation or on the number of processes.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPES = ("star", "ring", "cross", "triangle", "heart", "crescent", "hexagon", "arrow")
TEXTURES = ("stripes", "checker", "dots", "rings", "spokes", "waves", "grid", "solid")
# "pretrain": a pool the pretraining stages (judge, pretrain_vit, pretrain_mar) learn from,
# drawn independently of train and val, so the models fine-tuned on train start from weights
# that never saw a train or val image.
SPLIT_IDS = {"train": 0, "val": 1, "pretrain": 2}
MAX_CLASSES = len(SHAPES) * len(TEXTURES)


def class_pair(c: int) -> tuple[str, str]:
    """(shape, texture) of class ``c``: the diagonal first, then the off-diagonals."""
    if not 0 <= c < MAX_CLASSES:
        raise ValueError(f"class index {c} outside [0, {MAX_CLASSES})")
    n = len(SHAPES)
    return SHAPES[c % n], TEXTURES[(c % n + c // n) % n]


def class_names(num_classes: int) -> list[str]:
    """Sorted, stable class names ``"00_star_stripes"``, ... (zero-padded so sort = index)."""
    return [f"{c:02d}_{'_'.join(class_pair(c))}" for c in range(num_classes)]


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Frame:
    """Object-local coordinates of every pixel: unit radius, rotated and scaled."""

    u: np.ndarray
    v: np.ndarray

    @property
    def r(self) -> np.ndarray:
        return np.hypot(self.u, self.v)

    @property
    def a(self) -> np.ndarray:
        return np.arctan2(self.v, self.u)


def _frame(size: int, cx: float, cy: float, radius: float, angle: float, sx: float, sy: float) -> Frame:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    return Frame((c * dx + s * dy) / (radius * sx), (-s * dx + c * dy) / (radius * sy))


def _polygon(f: Frame, n: int, circumradius: float) -> np.ndarray:
    """Regular n-gon with a vertex on +v; inside where every edge's half-plane holds."""
    inside = np.ones(f.u.shape, bool)
    apothem = circumradius * np.cos(np.pi / n)
    for k in range(n):
        t = np.pi / 2 + np.pi / n + 2 * np.pi * k / n
        inside &= f.u * np.cos(t) + f.v * np.sin(t) <= apothem
    return inside


def shape_mask(shape: str, f: Frame) -> np.ndarray:
    u, v, r = f.u, f.v, f.r
    if shape == "star":
        frac = np.mod(f.a * 5 / (2 * np.pi), 1.0)
        tip = np.abs(frac - 0.5) * 2  # 1 on the 5 arms, 0 between them
        return r <= 0.4 + 0.65 * tip**1.5
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "cross":
        w = 0.33
        return ((np.abs(u) <= w) & (np.abs(v) <= 1)) | ((np.abs(v) <= w) & (np.abs(u) <= 1))
    if shape == "triangle":
        return _polygon(f, 3, 1.15)
    if shape == "hexagon":
        return _polygon(f, 6, 1.0)
    if shape == "heart":
        x, y = 1.15 * u, 1.15 * v + 0.12
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.78)
    if shape == "arrow":
        shaft = (u >= -1.0) & (u <= 0.1) & (np.abs(v) <= 0.22)
        head = (u >= 0.1) & (u <= 1.0) & (np.abs(v) <= 0.8 * (1.0 - u) / 0.9)
        return shaft | head
    raise ValueError(f"unknown shape {shape!r}")


def texture_pattern(texture: str, f: Frame, rng: np.random.Generator) -> np.ndarray:
    """Mixing weight in [0, 1] between a texture's two colours, in object-local coordinates."""
    freq = rng.uniform(2.2, 3.2)  # cycles per object radius: scale-invariant textures
    p1, p2 = rng.uniform(0, 1, 2)
    u, v = f.u * freq, f.v * freq
    if texture == "stripes":
        return (np.sin(2 * np.pi * (u + p1)) > 0).astype(np.float64)
    if texture == "checker":
        return (np.mod(np.floor(u + p1) + np.floor(v + p2), 2) > 0).astype(np.float64)
    if texture == "dots":
        du, dv = np.mod(u + p1, 1) - 0.5, np.mod(v + p2, 1) - 0.5
        return (du**2 + dv**2 < 0.3**2).astype(np.float64)
    if texture == "rings":
        return (np.sin(2 * np.pi * (f.r * freq + p1)) > 0).astype(np.float64)
    if texture == "spokes":
        k = int(rng.integers(5, 9))
        return (np.sin(k * f.a + 2 * np.pi * p1) > 0).astype(np.float64)
    if texture == "waves":
        return (np.sin(2 * np.pi * (u + p1) + 1.6 * np.sin(np.pi * (v + p2))) > 0).astype(np.float64)
    if texture == "grid":
        lines_u = np.abs(np.mod(u + p1, 1) - 0.5) < 0.17
        lines_v = np.abs(np.mod(v + p2, 1) - 0.5) < 0.17
        return (lines_u | lines_v).astype(np.float64)
    if texture == "solid":
        return 0.35 * np.clip((f.u + 1) / 2, 0, 1)  # a faint shading gradient
    raise ValueError(f"unknown texture {texture!r}")


# ----------------------------------------------------------------------------- colour


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated colours (hue apart, one bright, one dark) for a textured region."""
    h = rng.uniform()
    a = colorsys.hsv_to_rgb(h, rng.uniform(0.55, 1.0), rng.uniform(0.7, 1.0))
    b = colorsys.hsv_to_rgb((h + rng.uniform(0.3, 0.7)) % 1, rng.uniform(0.5, 1.0), rng.uniform(0.15, 0.5))
    return np.array(a) * 255, np.array(b) * 255


def _paint(canvas: np.ndarray, region: np.ndarray, weight: np.ndarray, ca: np.ndarray, cb: np.ndarray) -> None:
    w = weight[region][:, None]
    canvas[region] = ca * (1 - w) + cb * w


# ----------------------------------------------------------------------------- image


def _smooth_field(size: int, rng: np.random.Generator) -> np.ndarray:
    """A low-contrast colour field: bicubic upsampling of a random 4x4 colour grid."""
    grid = rng.uniform(30, 225, (4, 4, 3)).astype(np.uint8)
    smooth = Image.fromarray(grid, "RGB").resize((size, size), resample=Image.BICUBIC)
    return np.asarray(smooth, dtype=np.float64).copy()


def _noise_blobs(canvas: np.ndarray, size: int, radius: float, ca: np.ndarray, cb: np.ndarray,
                 rng: np.random.Generator) -> None:
    """Distractors as contrasted as the object but with nothing to predict: ellipses of
    independent per-pixel draws between the object's own two colours (same pixel variance as
    a two-colour texture, no spatial structure)."""
    for _ in range(int(rng.integers(BLOBS[0], BLOBS[1] + 1))):
        cx, cy = _uniform_centre(size, radius, rng)
        f = _frame(size, cx, cy, radius * rng.uniform(0.9, 1.4), rng.uniform(0, np.pi),
                   rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        region = f.r <= 1.0
        _paint(canvas, region, (rng.uniform(size=region.shape) < 0.5).astype(np.float64), ca, cb)


def _uniform_centre(size: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A centre such that every pixel is equally likely to be covered: drawn from the image
    widened by ``radius`` on each side, so objects may be cut by the border and position
    tells nothing about where an object is."""
    return rng.uniform(-radius, size + radius, 2)


BLOBS = (9, 12)  # noise blobs per image (inclusive range)
MIN_VISIBLE = 0.35  # redraw an object position that leaves less of the object in the frame


def render(cls: int, index: int, split: str, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of class ``cls`` in ``split``: (uint8 [size, size, 3], bool mask).

    Layout: smooth colour field, then noise blobs in the object's colours, then the object
    (never occluded) at a position uniform over the image and cut by the border if it falls
    there. Position, pixel contrast and colour therefore carry no information about which
    patches are object; the object's texture and outline do (they predict its other patches).
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    rng = np.random.default_rng([seed % (1 << 63), SPLIT_IDS[split], cls, index])
    shape, texture = class_pair(cls)
    canvas = _smooth_field(size, rng)
    radius = size * rng.uniform(0.2, 0.3)
    ca, cb = _colour_pair(rng)
    _noise_blobs(canvas, size, radius, ca, cb, rng)
    angle, sx, sy = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    whole = shape_mask(shape, _frame(4 * size, 2 * size, 2 * size, radius, angle, sx, sy)).sum()
    for _ in range(16):  # rejection keeps enough of the object in view to be classifiable
        f = _frame(size, *_uniform_centre(size, radius, rng), radius, angle, sx, sy)
        mask = shape_mask(shape, f)
        if mask.sum() >= MIN_VISIBLE * whole:
            break
    _paint(canvas, mask, texture_pattern(texture, f, rng), ca, cb)
    canvas += rng.normal(0, rng.uniform(2, 8), canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mask


def synthetic_keys(split: str, num_classes: int, per_class: int) -> list[tuple[str, int, int]]:
    """(key, class, index within class) for a split, in key order (= class-major order)."""
    names = class_names(num_classes)
    return [(f"{names[c]}/{split}_{j:06d}", c, j) for c in range(num_classes) for j in range(per_class)]
