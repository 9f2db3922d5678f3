"""Pictures of collapse orders: the paper's Fig. 4 (per image) and Fig. 5 (per class), as PNGs.

- Fig. 4, one file per image: left, a circle on every patch whose size grows with its collapse
  rank (rank 0 = largest); right, the top patches joined by a line in collapse order (the
  first one marked): the paper's top-64 of 256, i.e. a quarter of the grid by default (16 of
  an 8x8 grid; drawing "top-64" there would join every patch).
- Fig. 5, one file for the set: per class, a heat map of its images' orders (rows = images,
  columns = rank, colour = patch index: vertical lines = patches that many images put at the
  same rank), and the class's mean-score map on the patch grid.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.orders.shards import CollapseOrders  # noqa: E402

TOP_SHARE = 4  # path length = N / 4: the paper's 64 of a 16x16 grid
MAX_CLASSES = 8
DEFAULT_OUT = Path("orders-pictures")  # outside data/: DVC outputs are the stages' alone
MAX_ROWS = 32


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", key)


def _centres(grid: int, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    n = np.arange(grid * grid)
    return (n % grid + 0.5) * W / grid, (n // grid + 0.5) * H / grid


def path_length(num_tokens: int) -> int:
    return max(1, num_tokens // TOP_SHARE)


def fig4(image: np.ndarray, order: np.ndarray, grid: int, out: Path, title: str = "",
         top: int | None = None) -> Path:
    H, W = image.shape[:2]
    N = grid * grid
    xs, ys = _centres(grid, H, W)
    rank = np.empty(N, np.int64)
    rank[order] = np.arange(N)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3), dpi=100)
    cell = min(H, W) / grid
    # Marker size is an area in points²: rank 0 spans about one patch, the last rank a dot.
    pt_per_px = 3.6 * 72 / max(H, W)  # each panel is about 3.6 in wide
    area = ((1 - rank / N) * cell * 0.95 * pt_per_px) ** 2
    axes[0].imshow(image)
    axes[0].scatter(xs, ys, s=area, facecolors="none", edgecolors="yellow", linewidths=1.0)
    axes[0].set_title("collapse rank (circle size)")
    top = order[: min(top or path_length(N), N)]
    axes[1].imshow(image)
    axes[1].plot(xs[top], ys[top], "-", color="cyan", linewidth=1.2, alpha=0.9)
    axes[1].scatter(xs[top], ys[top], s=8, c=np.arange(top.size), cmap="autumn", zorder=3)
    axes[1].scatter(xs[top[:1]], ys[top[:1]], s=60, marker="*", color="red", zorder=4)
    axes[1].set_title(f"top-{top.size} patches in order")
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def fig5(orders: CollapseOrders, out: Path) -> Path:
    classes = list(orders.manifest.get("classes") or [])
    labels = orders.labels
    present = [c for c in range(max(len(classes), int(labels.max()) + 1 if len(labels) else 0))
               if (labels == c).any()][:MAX_CLASSES]
    if not present:
        raise ValueError(f"{orders.path} holds no images to draw")
    g = orders.grid
    fig, axes = plt.subplots(2, len(present), figsize=(2.6 * len(present), 5.2), dpi=100, squeeze=False)
    for col, c in enumerate(present):
        idx = np.flatnonzero(labels == c)[:MAX_ROWS]
        mat = orders.orders_for([int(i) for i in idx])
        axes[0, col].imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
        name = classes[c] if c < len(classes) else str(c)
        axes[0, col].set_title(f"{name} ({idx.size} img)", fontsize=8)
        axes[0, col].set_xlabel("collapse rank", fontsize=7)
        if orders.class_scores is not None:
            mean = orders.class_scores[c]
        else:
            mean = np.mean([orders.scores(int(i)) for i in idx], axis=0)
        axes[1, col].imshow(mean.reshape(g, g), cmap="magma", interpolation="nearest")
        axes[1, col].set_title("mean PageRank score", fontsize=7)
        axes[1, col].set_axis_off()
    axes[0, 0].set_ylabel("image (colour = patch index)", fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def pick_keys(orders: CollapseOrders, count: int) -> list[str]:
    """``count`` keys spread evenly over the set (so several classes show up)."""
    n = len(orders)
    if n == 0 or count <= 0:
        return []
    idx = np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(int))
    return [orders.keys[i] for i in idx]


class _RawImages:
    """A folder of raw images looked up by shard-set key (the relative path without extension,
    dots -> ``_``, as prepare and ``cop orders compute`` name them), center-cropped as they
    were for the orders."""

    def __init__(self, root: Path, crop_size: int) -> None:
        from pipeline.data.sources import normalize_key, walk_images

        self.root, self.crop_size = root, crop_size
        self._paths = {normalize_key(r.rsplit(".", 1)[0]): root / r for r in walk_images(root)}

    def image(self, key: str) -> np.ndarray:
        from pipeline.data.crop import center_crop_arr
        from pipeline.data.decode import decode_rgb, read_bytes

        if key not in self._paths:
            raise KeyError(f"no image for key {key!r} under {self.root}")
        return center_crop_arr(decode_rgb(read_bytes(self._paths[key])), self.crop_size)


def _image_source(co: CollapseOrders, images: str | Path | None) -> Any:
    """What to draw on: ``images`` (a prepared image set or a raw folder); with ``"auto"`` the
    images the set was made from: ``<orders>/.compute/images`` (``cop orders compute``), else
    ``data/images/<split of the manifest>``. None when there is nothing to draw on."""
    from pipeline.data.imageset import ImageSet

    if images is None:
        return None
    auto = str(images) == "auto"
    split = co.manifest.get("split", "train")
    candidates = [co.path / ".compute" / "images", Path("data/images") / split] if auto else [Path(images)]
    for path in candidates:
        if (path / "index.json").exists():
            imgs = ImageSet(path)
            return lambda key: imgs.image(imgs.index_of(key))
        if not auto and path.is_dir():
            crop = (co.manifest.get("identity", {}).get("latents") or {}).get("crop_size")
            if crop is None:
                raise ValueError(f"{co.path}: the manifest records no crop size to cut {path}'s images to")
            return _RawImages(path, int(crop)).image
    if not auto:
        raise FileNotFoundError(f"{images} is neither a prepared image set nor a folder of images")
    return None


def show_orders(orders: str | Path | CollapseOrders, images: str | Path | None = "auto",
                keys: Sequence[str] | None = None, count: int = 8,
                out: str | Path | None = None, top: int | None = None) -> list[Path]:
    """Write Fig. 4 for the chosen images and Fig. 5; return the paths.

    ``images``: a prepared image set, a raw image folder, ``"auto"`` (found from the
    manifest, see :func:`_image_source`) or None; without images only Fig. 5 is drawn. ``out`` defaults to
    ``orders-pictures/<split>`` in the working directory, outside every DVC output.
    ``top``: the length of the Fig. 4 path (default N / 4).
    """
    co = orders if isinstance(orders, CollapseOrders) else CollapseOrders(orders)
    out = Path(out) if out is not None else DEFAULT_OUT / str(co.manifest.get("split", "orders"))
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    chosen = list(keys) if keys else pick_keys(co, count)
    load = _image_source(co, images) if chosen else None
    if load is not None:
        for key in chosen:
            paths.append(fig4(load(key), co.order(key), co.grid, out / f"fig4_{_safe(key)}.png", key,
                              top=top))
    paths.append(fig5(co, out / "fig5_classes.png"))
    return paths
