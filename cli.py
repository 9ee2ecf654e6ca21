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

# ---------------------------------------------------------------- stage one (pipeline/ → cache/) ----

# ---------------------------------------------------------------- cache/ ----

# ---------------------------------------------------------------- stage two (trainer/) ----

# ---------------------------------------------------------------- evaluation (trainer/) ----

# ---------------------------------------------------------------- benchmarks ----


if __name__ == "__main__":
    app()
