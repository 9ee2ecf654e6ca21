"""Command line: ``python cli.py --help``.

Each command parses its options into the owning package's dataclass config and calls one
function. Imports are local to each command so ``--help`` is instant and ``train`` never imports
the teacher.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="CleverDistiller-style 2D→3D distillation: DINOv2 (cameras) → sparse-conv LiDAR student, "
    "through a Zarr v3 target cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Inspect and verify target caches.", no_args_is_help=True)
evaluate_app = typer.Typer(help="Evaluation protocols: linear probe, fine-tuning, RankMe, robustness.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(evaluate_app, name="evaluate")


# ---------------------------------------------------------------- data side (pipeline/) ----


@app.command("check-data")
def check_data_command(
    data: Path = typer.Option(..., "--data", help="nuScenes root (the folder holding v1.0-*/)."),
    version: str = typer.Option(None, "--version", help="Version directory; default: the only one."),
    split: str = typer.Option("all", "--split", help="Split to check (train, val, all, mini_train, ...)."),
) -> None:
    """Pre-flight check of a nuScenes dataset: files, sizes, calibration, image headers.

    Prints one line per problem and exits 1 if there is any.
    """
    from pipeline.datasets import DataError, NuScenesReader, check_data

    try:
        reader = NuScenesReader(data, version)
    except DataError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    problems = check_data(reader, split)
    for problem in problems:
        typer.echo(problem)
    typer.echo(f"{len(problems)} problem(s) in {reader.version} split {split}", err=True)
    raise typer.Exit(1 if problems else 0)


# ---------------------------------------------------------------- stage one (pipeline/ → cache/) ----

# ---------------------------------------------------------------- cache/ ----

# ---------------------------------------------------------------- stage two (trainer/) ----

# ---------------------------------------------------------------- evaluation (trainer/) ----

# ---------------------------------------------------------------- benchmarks ----


if __name__ == "__main__":
    app()
