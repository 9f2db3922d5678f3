"""``cop orders ...``: reuse, compute and inspect collapse-order shard sets outside DVC.

Kept apart from :mod:`stages.cli` (the stage commands), which mounts ``orders_app`` under
``cop orders``. Every command calls the library and prints a summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

orders_app = typer.Typer(help="Reuse, compute and inspect collapse-order shard sets.",
                         no_args_is_help=True)


@orders_app.command("fetch")
def orders_fetch(
    source: Annotated[str, typer.Argument(help="folder, manifest URL (file://, https://) or brace pattern")],
    dest: Annotated[Path, typer.Option(help="where to put the shard set")] = Path("data/orders-fetched"),
) -> None:
    """Download a published shard set: verify every sha256 and shard, then write the manifest."""
    from pipeline.orders.fetch import fetch_orders

    fetch_orders(source, dest, log=typer.echo)


@orders_app.command("publish")
def orders_publish(
    src: Annotated[Path, typer.Argument(help="a finished shard set, e.g. data/orders/train")],
    dest: Annotated[Path, typer.Argument(help="folder to serve over HTTP or upload")],
) -> None:
    """Copy a shard set for others to fetch, verifying every file and shard on the way."""
    from pipeline.orders.fetch import publish_orders

    publish_orders(src, dest, log=typer.echo)


@orders_app.command("compute")
def orders_compute(
    images: Annotated[str, typer.Argument(help="folder of images (any layout; sub-folders become classes) "
                                               "or a tar pattern such as 'shards/part-{0000..0009}.tar'")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the shard set (created)")],
    comae: Annotated[Path, typer.Option(help="trained CoMAE folder")] = Path("data/comae"),
    tokenizer: Annotated[Path, typer.Option(help="saved stand-in tokenizer folder, or a KL-16 checkpoint")
                         ] = Path("data/latents/tokenizer"),
    training_latents: Annotated[Path, typer.Option(
        help="the CoMAE's training latents, to check the tokenizer against (skipped if absent)")
    ] = Path("data/latents/train.zarr"),
    params: Annotated[Path, typer.Option("--params", "-p", help="its 'orders' section is used if the file exists")
                      ] = Path("params.yaml"),
    batch_size: Annotated[int, typer.Option(help="images per tokenizer batch")] = 32,
) -> None:
    """Collapse orders for your own images with a trained CoMAE (no DVC graph; resumable)."""
    from pipeline.config import OrdersConfig, load_params
    from pipeline.tasks.orders import compute_orders

    cfg = load_params(params).orders if params.exists() else OrdersConfig()
    compute_orders(images, out, comae=comae, tokenizer=tokenizer, training_latents=training_latents,
                   orders_cfg=cfg, batch_size=batch_size, log=typer.echo)
    typer.echo(f"next: cop orders show --orders {out}")


@orders_app.command("show")
def orders_show(
    orders: Annotated[Path, typer.Option(help="shard set folder")] = Path("data/orders/train"),
    images: Annotated[Optional[Path], typer.Option(
        help="prepared image set or raw image folder [default: the set's own: <orders>/.compute/images "
             "or data/images/<split from the manifest>]")] = None,
    keys: Annotated[Optional[list[str]], typer.Option("--key", "-k", help="image keys (repeatable)")] = None,
    count: Annotated[int, typer.Option(help="images to draw when no key is given")] = 8,
    top: Annotated[Optional[int], typer.Option(help="patches on the Fig. 4 path [default: a quarter of "
                                                    "the grid, the paper's 64 of 256]")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="output folder for PNGs [default: orders-pictures/<split>, outside DVC's outputs]")] = None,
) -> None:
    """Draw Fig. 4 (rank circles, path of the top patches) and Fig. 5 (class heat maps) as PNGs."""
    from pipeline.orders.viz import show_orders

    for path in show_orders(orders, images or "auto", keys=keys, count=count, out=out, top=top):
        typer.echo(str(path))
