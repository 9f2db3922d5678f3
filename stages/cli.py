"""``cop``: one subcommand per pipeline stage, plus utilities.

``cop prepare`` and ``python -m stages.prepare`` are the same thing: every stage module
ends with ``stage_entry("<name>")``, which runs the command of that name here. DVC calls
the module form (see dvc.yaml); ``torchrun -m stages.<name>`` scales a stage out.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import ParamsError, load_params, params_dict

app = typer.Typer(
    name="cop",
    help="The Collapse of Patches: latents -> CoMAE -> collapse orders -> CMAR / CViT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
orders_app = typer.Typer(help="Reuse and inspect collapse-order shard sets.", no_args_is_help=True)
app.add_typer(orders_app, name="orders")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file to read")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-S", help="override a param, e.g. -S comae.lambda=0 (repeatable)"),
]


def _params(path: Path, overrides: list[str] | None):
    try:
        return load_params(path, overrides)
    except ParamsError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _run_stage(module: str, params_path: Path, overrides: list[str] | None, **kwargs) -> None:
    params = _params(params_path, overrides)
    stage = importlib.import_module(f"stages.{module}")
    stage.run(params, **kwargs)


@app.command()
def prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Build the prepared image set (train/val shards of center crops, labels, masks)."""
    _run_stage("prepare", params, set_)


@app.command("extract-latents")
def extract_latents(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Encode the prepared images (and their flips) into the Zarr latent store. torchrun-able."""
    _run_stage("extract_latents", params, set_)


@app.command("train-comae")
def train_comae(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Train the Collapse Masked Autoencoder on the latent store. Resumes; torchrun-able."""
    _run_stage("train_comae", params, set_)


@app.command("export-orders")
def export_orders(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Dependency matrices -> PageRank -> collapse-order shards (+ class orders, plots)."""
    _run_stage("export_orders", params, set_)


@app.command("train-cvit")
def train_cvit(
    variant: Annotated[str, typer.Option(help="vit | rvit | cvit (Tab. 5)")] = "cvit",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Train one CViT variant (ViT on full images, RViT random drops, CViT collapse drops)."""
    _run_stage("train_cvit", params, set_, variant=variant)


@app.command("eval-cvit")
def eval_cvit(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Accuracy vs mask ratio for ViT, ViT+C, RViT, CViT (Tab. 5, Fig. 8)."""
    _run_stage("eval_cvit", params, set_)


@app.command("train-cmar")
def train_cmar(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Fine-tune MAR in collapse order (or train the small default from scratch)."""
    _run_stage("train_cmar", params, set_)


@app.command("eval-cmar")
def eval_cmar(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Sample from (C)MAR in the configured order and score the samples."""
    _run_stage("eval_cmar", params, set_)


@app.command("params")
def show_params(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate the params file and print the full, resolved configuration."""
    import yaml

    typer.echo(yaml.safe_dump(params_dict(_params(params, set_)), sort_keys=False))


@orders_app.command("fetch")
def orders_fetch(
    source: Annotated[str, typer.Argument(help="folder, manifest URL (file://, https://) or brace pattern")],
    dest: Annotated[Path, typer.Option(help="where to put the shard set")] = Path("data/orders-fetched"),
) -> None:
    """Download a published collapse-order shard set, checking every sha256."""
    from pipeline.orders.fetch import fetch_orders

    fetch_orders(source, dest)


@orders_app.command("show")
def orders_show(
    orders: Annotated[Path, typer.Option(help="shard set folder")] = Path("data/orders/train"),
    images: Annotated[Path, typer.Option(help="prepared image set folder")] = Path("data/images/train"),
    keys: Annotated[Optional[list[str]], typer.Option("--key", "-k", help="image keys (repeatable)")] = None,
    count: Annotated[int, typer.Option(help="images to draw when no key is given")] = 8,
    out: Annotated[Path, typer.Option(help="output folder for PNGs")] = Path("data/plots/orders"),
) -> None:
    """Draw Fig. 4 (rank circles, top-64 path) and Fig. 5 (class heat maps) as PNGs."""
    from pipeline.orders.viz import show_orders

    for path in show_orders(orders, images, keys=keys, count=count, out=out):
        typer.echo(str(path))


def stage_entry(command: str) -> None:
    """``python -m stages.<x>`` runs ``cop <command>`` with the same options."""
    app(args=[command, *sys.argv[1:]], prog_name=f"python -m stages.{command.replace('-', '_')}")
