"""``cop``: one subcommand per pipeline stage (generated from :data:`STAGES`), plus utilities.

``cop prepare`` and ``python -m stages.prepare`` are the same thing: every stage module ends
with ``stage_entry("prepare")``. DVC calls the module form (see dvc.yaml); ``torchrun -m
stages.<name>`` scales a stage out. This module sits on top of the stages and imports a stage
only when its command runs, so ``cop --help`` stays fast; the library never imports it.

Errors: one line on stderr, the cause and a hint, exit status 1. ``cop --debug ...`` (or
``COP_DEBUG=1``, which also reaches ``python -m stages.<name>`` under DVC) re-raises instead,
with the traceback.
"""

# No ``from __future__ import annotations``: typer reads the annotations of the generated
# commands at runtime, and they close over the table entry.
import enum
import importlib
import json
import os
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.exceptions import TyperException  # typer's usage errors (bad option, bad choice)

from pipeline.config import VARIANTS, ParamsError, load_params, params_dict
from pipeline.params_trace import trace_reads
from pipeline.utils.io import atomic_write_json
from stages.orders_cli import orders_app

DISTRIBUTION = "collapse-of-patches"


@dataclass(frozen=True)
class Stage:
    name: str  # the module in stages/ and the DVC stage
    help: str
    examples: tuple[str, ...]
    variants: tuple[str, ...] = ()  # choices of --variant, when the stage has them
    # takes --seed, the one seed that decides the run (train_cvit: dvc.yaml's variant x seed matrix)
    seeded: bool = False

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")


STAGES = (
    Stage("list_source", "List the image source (files, sizes, mtimes) into data/source.json, so DVC "
          "reruns prepare when a folder or tar pattern changes.",
          ("cop list-source", "cop list-source -S data.source=imagefolder -S data.root=/data/photos")),
    Stage("prepare", "Build the prepared image set (train/val shards of center crops, labels, masks; the "
          "synthetic pretrain pool).",
          ("cop prepare", "cop prepare -S data.source=imagefolder -S data.root=/data/imagenet")),
    Stage("extract_latents", "Encode the prepared images (and their flips) into the Zarr latent store. "
          "Resumes; torchrun-able.",
          ("cop extract-latents", "torchrun --nproc-per-node 8 -m stages.extract_latents")),
    Stage("train_comae", "Train the Collapse Masked Autoencoder on the latent store. Resumes; torchrun-able.",
          ("cop train-comae -S comae.lambda=0", "torchrun --nproc-per-node 8 -m stages.train_comae")),
    Stage("probe_comae", "Train CoMAE on copy-mechanism grids (known sources) and score precision@1.",
          ("cop probe-comae", "cop probe-comae -S comae_probe.steps=2000")),
    Stage("export_orders", "Dependency matrices -> PageRank -> collapse-order shards (+ class orders, plots).",
          ("cop export-orders", "cop export-orders -S orders.flip=map -S orders.topk=16")),
    Stage("train_critic", "Train a critic (scorer or builder): an any-order masked token predictor "
          "whose NLL of the hidden tokens scores orders (stage score_orders).",
          ("cop train-critic --variant builder", "cop train-critic -S critic.train.steps=3000"),
          ("builder", "scorer")),
    Stage("score_orders", "Score every order (CoMAE's, the cheap ones, critic-built ones) by how fast "
          "revealing it lowers the hidden patches' NLL under the scorer critic; prints the table.",
          ("cop score-orders", "cop score-orders -S critic.score.images=768")),
    Stage("train_judge", "Train the judge: a CNN classifier of real images that scores samples and "
          "teaches pretrain_vit.", ("cop train-judge", "cop train-judge -S judge.roundtrip=0")),
    Stage("pretrain_vit", "Pretrain the ViT every CViT variant starts from: full images of the "
          "pretrain pool, distilled from the judge (nothing to train when cvit.model.pretrained is set).",
          ("cop pretrain-vit", "cop pretrain-vit -S cvit.pretrain.train.steps=4000")),
    Stage("train_cvit", "Fine-tune one CViT variant from pretrain_vit (ViT on full images, RViT random "
          "drops, CViT collapse drops) with one seed.",
          ("cop train-cvit --variant rvit --seed 1",
           "torchrun --nproc-per-node 8 -m stages.train_cvit --variant cvit --seed 0"),
          VARIANTS, seeded=True),
    Stage("eval_cvit", "Accuracy vs mask ratio for ViT, ViT+C, RViT, CViT and the controls (the CViT "
          "model with fixed, centre, pixel-variance and another image's orders) over cvit.seeds "
          "(Tab. 5, Fig. 8).",
          ("cop eval-cvit", "cop eval-cvit -S cvit.eval.batch_size=256")),
    Stage("pretrain_mar", "Train MAR in random order on the pretrain pool: the start of every "
          "train_cmar variant.", ("cop pretrain-mar", "cop pretrain-mar -S cmar.pretrain.steps=6000")),
    Stage("train_cmar", "Fine-tune MAR from pretrain_mar: cmar (collapse order), mar (random order, "
          "the baseline), cmar_asc (ascending collapse order).",
          ("cop train-cmar --variant mar", "torchrun --nproc-per-node 8 -m stages.train_cmar --variant cmar"),
          ("mar", "cmar_asc", "cmar")),
    Stage("eval_cmar", "Sample CMAR, MAR and CMAR-ascending in class / training-image / random order and score them "
          "beside real, decoded and shuffled controls with the judge (Tab. 2-4).",
          ("cop eval-cmar", "cop eval-cmar -S cmar.sample.cfg=1.5 -S cmar.sample.num_iter=64")),
    Stage("report", "Write data/report.html: metrics tables, orders vs baselines, curves, order "
          "pictures, Fig. 8 and samples in one self-contained page (no network needed).",
          ("cop report", "xdg-open data/report.html")),
)

app = typer.Typer(
    name="cop",
    help="The Collapse of Patches: latents -> CoMAE -> collapse orders -> CMAR / CViT.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: FILE / KEY=VALUE placeholders, no type names
)
app.add_typer(orders_app, name="orders")  # cop orders fetch | compute | show

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", metavar="FILE", help="params file to read")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-S", metavar="KEY=VALUE", help="override a param, e.g. -S comae.lambda=0 (repeatable)")]


def _version(show: bool) -> None:
    if show:
        try:
            typer.echo(f"cop {version(DISTRIBUTION)}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("cop (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="on an error, show the traceback "
                                        "(also COP_DEBUG=1)")] = False,
    show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="print the version and exit")] = False,
) -> None:
    """The Collapse of Patches: latents -> CoMAE -> collapse orders -> CMAR / CViT."""
    if debug:  # read by main(); set here too so a stage's subprocesses inherit it
        os.environ["COP_DEBUG"] = "1"


def _run_stage(stage: Stage, params_path: Path, overrides: list[str] | None, **kwargs) -> None:
    params = load_params(params_path, overrides)
    trace = os.environ.get("COP_PARAMS_TRACE")  # a folder: record the params this stage reads
    reads = trace_reads(params) if trace else None
    importlib.import_module(f"stages.{stage.name}").run(params, **kwargs)
    if reads is not None:
        path = Path(trace) / f"{stage.name}.json"  # a matrix stage's runs add to one file
        old = set(json.loads(path.read_text())) if path.exists() else set()
        atomic_write_json(path, sorted(old | reads))


def _examples(stage: Stage) -> str:
    # "\b" keeps click from re-wrapping the example lines into one paragraph
    return "Examples:\n\n\b\n" + "\n".join(f"  {e}" for e in stage.examples)


def _add_stage_command(stage: Stage) -> None:
    if stage.variants:
        # an Enum makes typer list the choices in --help and refuse any other value
        choice = enum.Enum(f"{stage.name}_variant", {v: v for v in stage.variants}, type=str)
        VariantOpt = Annotated[choice, typer.Option(help="which model to train")]
        SeedOpt = Annotated[int, typer.Option(
            metavar="SEED", help="the run's seed: initial weights not loaded from pretraining, data "
            "order, flips, drops (replaces seed and cvit.train.seed for this run)")]

        if stage.seeded:
            def command(
                variant: VariantOpt = choice(stage.variants[-1]), seed: SeedOpt = 0,
                params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
            ) -> None:
                _run_stage(stage, params, set_, variant=variant.value, seed=seed)
        else:
            def command(
                variant: VariantOpt = choice(stage.variants[-1]),
                params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
            ) -> None:
                _run_stage(stage, params, set_, variant=variant.value)
    else:
        def command(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
            _run_stage(stage, params, set_)
    app.command(stage.command, help=stage.help, epilog=_examples(stage))(command)


for _stage in STAGES:
    _add_stage_command(_stage)


@app.command("params", epilog="Examples:\n\n\b\n  cop params\n  cop params -S comae.lambda=0")
def show_params(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate the params file and print the full, resolved configuration."""
    import yaml

    typer.echo(yaml.safe_dump(params_dict(load_params(params, set_)), sort_keys=False), nl=False)


def _hint(err: BaseException, command: str) -> str:
    if getattr(err, "hint", None):  # an error that knows what the user should do
        return err.hint
    if isinstance(err, TyperException):
        return f"`{command} --help` lists the options"
    if isinstance(err, ParamsError):
        return "fix params.yaml or the -S override; `cop params` prints the resolved values"
    if isinstance(err, FileNotFoundError):
        return "run the stages before this one (`dvc repro`) or fix the path"
    return "rerun with --debug (or COP_DEBUG=1) for the traceback"


def _fail(err: BaseException, command: str) -> None:
    if isinstance(err, TyperException):
        cause = err.format_message()
    else:
        cause = str(err) or type(err).__name__
        if not isinstance(err, (ParamsError, FileNotFoundError, ValueError)):
            cause = f"{type(err).__name__}: {cause}"
    one_line = ""
    for line in filter(None, (ln.strip() for ln in cause.splitlines())):
        one_line += (" " if one_line.endswith(":") else "; ") + line if one_line else line
    cause = one_line
    typer.secho(f"error: {cause} (hint: {_hint(err, command)})", fg=typer.colors.RED, err=True)
    sys.exit(1)


def main(args: list[str] | None = None, prog_name: str = "cop", command: str | None = None) -> None:
    """The ``cop`` entry point: runs the app and turns an error into one line and exit status 1.
    ``command``: how the user called the subcommand, for the hint (default ``cop <name>``)."""
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args or os.environ.get("COP_DEBUG", "") not in ("", "0")
    names = [a for a in args if not a.startswith("-")]
    command = command or " ".join([prog_name, *names[:1]])
    try:
        code = app(args=args or ["--help"], prog_name=prog_name, standalone_mode=False)
    except typer.Abort:
        typer.secho("error: interrupted", fg=typer.colors.RED, err=True)
        sys.exit(130)
    except Exception as err:
        if debug and not isinstance(err, TyperException):
            raise
        _fail(err, command)
    sys.exit(code or 0)


def stage_entry(command: str) -> None:
    """``python -m stages.<x>`` runs ``cop <command>`` with the same options."""
    args = sys.argv[1:]
    flags = [a for a in args if a == "--debug"]  # a root option: it goes before the command
    module = f"python -m stages.{command.replace('-', '_')}"
    main([*flags, command, *[a for a in args if a != "--debug"]], prog_name=module, command=module)
