"""Command line: ``python cli.py --help``.

Each command parses its options into the owning package's dataclass config and calls one
function. Imports are local to each command so ``--help`` is instant and ``train`` never imports
the teacher.

Errors: every command body runs inside ``_errors()``: bad input (a missing or unreadable file, a
file where a folder belongs, a bad value, a damaged cache or dataset) ends in one ``error: ...``
line on stderr and exit status 1; typer's usage errors (a missing option, a value of the wrong
type, ``typer.BadParameter``) exit 2; Ctrl-C exits 130 where a command handles it (train,
extract-teacher). Anything else is a bug and keeps its traceback; ``DISTILL_TRACEBACK=1`` shows
the traceback behind an ``error:`` line too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
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


@contextlib.contextmanager
def _errors(*also: type[Exception]) -> Iterator[None]:
    """Bad input → ``error: <message>`` on stderr and exit status 1. The messages name the file
    or option and the problem (the modules raising them do).

    Caught: OSError (a missing or unreadable file, a file where a folder belongs), ValueError (a
    bad value, bad data: DataError and TeacherError are ValueErrors), CacheError (a missing,
    incomplete, damaged or mismatching cache), FloatingPointError (a diverged run, NaN targets)
    and a command's own ``also``. Not caught: typer's usage errors (exit 2) and exits,
    KeyboardInterrupt, and every other exception (AssertionError, TypeError, KeyError...): a bug
    keeps its traceback. ``DISTILL_TRACEBACK=1`` in the environment prints the traceback of a
    caught error too (a ValueError deep in torch may be a bug of ours: report it with this)."""
    from cache.schema import CacheError

    try:
        yield
    except (OSError, ValueError, CacheError, FloatingPointError, *also) as e:
        if os.environ.get("DISTILL_TRACEBACK") == "1":
            import traceback

            traceback.print_exc()
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


# ---------------------------------------------------------------- data side (pipeline/) ----


@app.command("make-synthetic")
def make_synthetic_command(
    out: Path = typer.Option(..., "--out", help="Output root (the nuScenes dataroot) to create."),
    scenes: int = typer.Option(2, "--scenes", help="Number of scenes (one log each)."),
    samples_per_scene: int = typer.Option(
        4, "--samples-per-scene", help="Keyframes per scene (2 Hz)."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Random seed; same arguments give byte-identical output."
    ),
    width: int = typer.Option(
        None, "--width", help="Image width, default 640 (nuScenes 1600; intrinsics scaled). nuscenes only."
    ),
    height: int = typer.Option(
        None, "--height", help="Image height, default 360 (nuScenes 900; intrinsics scaled). nuscenes only."
    ),
    workers: int = typer.Option(
        None, "--workers", help="Rendering processes, default 2 (does not change the output). nuscenes only."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace OUT if it exists and is not empty."
    ),
    format: str = typer.Option(
        "nuscenes", "--format", help="nuscenes | semantickitti (sequences = scenes, scans = samples)."
    ),
) -> None:
    """Generate a synthetic dataset in the nuScenes-lidarseg format (version v1.0-synthetic), or
    with --format semantickitti a LiDAR-only set in the SemanticKITTI layout."""
    import time

    if format not in ("nuscenes", "semantickitti"):
        raise typer.BadParameter(f"{format!r}: one of nuscenes, semantickitti", param_hint="--format")
    if format == "semantickitti":  # evaluation's writer (pipeline/synthetic/semantickitti.py)
        from pipeline.synthetic.semantickitti import SyntheticKittiConfig, kitti_sequences
        from pipeline.synthetic.semantickitti import write_synthetic_semantickitti as write_kitti

        given = [f"--{n}" for n, v in (("width", width), ("height", height), ("workers", workers)) if v is not None]
        if given:  # a LiDAR-only set, written in one process: these would be silently ignored
            raise typer.BadParameter("apply to --format nuscenes only (SemanticKITTI is LiDAR only, written in one process)", param_hint=", ".join(given))
        with _errors():
            kitti = SyntheticKittiConfig(
                sequences=kitti_sequences(scenes), frames_per_sequence=samples_per_scene, seed=seed
            )
            root = write_kitti(out, kitti, overwrite=overwrite)
        typer.echo(f"wrote SemanticKITTI sequences {', '.join(kitti.sequences)} to {root}")
        return

    from pipeline.synthetic import VERSION, SyntheticConfig, make_synthetic

    start = time.perf_counter()
    with _errors():
        given = {"width": width, "height": height, "workers": workers}
        cfg = SyntheticConfig(
            out=out,
            scenes=scenes,
            samples_per_scene=samples_per_scene,
            seed=seed,
            overwrite=overwrite,
            **{k: v for k, v in given.items() if v is not None},  # the rest: the config's defaults
        )
        root = make_synthetic(cfg)
    typer.echo(
        f"wrote {VERSION} to {root}: {scenes} scenes x {samples_per_scene} samples "
        f"in {time.perf_counter() - start:.1f} s"
    )


@app.command("check-data")
def check_data_command(
    data: Path = typer.Option(..., "--data", help="nuScenes root (the folder holding v1.0-*/)."),
    version: str = typer.Option(None, "--version", help="Version directory; default: the only one."),
    split: str = typer.Option("all", "--split", help="Split to check (train, val, all, mini_train, ...)."),
) -> None:
    """Pre-flight check of a nuScenes dataset: files, sizes, calibration, image headers.

    Prints one line per problem and exits 1 if there is any.
    """
    from pipeline.datasets import NuScenesReader, check_data

    with _errors():
        reader = NuScenesReader(data, version)
        problems = check_data(reader, split)
    for problem in problems:
        typer.echo(problem)
    typer.echo(f"{len(problems)} problem(s) in {reader.version} split {split}", err=True)
    raise typer.Exit(1 if problems else 0)


# ---------------------------------------------------------------- stage one (pipeline/ → cache/) ----


@app.command("make-teacher")
def make_teacher_command(
    out: Path = typer.Option(..., "--out", help="Folder to create (must not exist or be empty)."),
    size: str = typer.Option("tiny", "--size", help="tiny (D=64, 2 layers), small (D=96, 4 layers), vits14 / vitb14 / vitl14 (the shapes of DINOv2 ViT-S/14, ViT-B/14, ViT-L/14: timing only; --family dinov2)."),
    family: str = typer.Option("dinov2", "--family", help="dinov2 (Dinov2Model, patch 14) or dinov3 (DINOv3ViTModel, patch 16, 4 registers; not with --fit-on)."),
    registers: int = typer.Option(None, "--registers", help="Register tokens (default: 0 for dinov2, 4 for dinov3; dinov2 with >0: Dinov2WithRegistersModel; not with --fit-on)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random initialisation."),
    fit_on: Path = typer.Option(None, "--fit-on", help="nuScenes-format dataset (the synthetic one): fit the teacher to its labels so its features carry class content (a stand-in for real DINOv2 weights)."),
    fit_split: str = typer.Option("train", "--fit-split", help="With --fit-on: the split fitted on (keep val for scoring)."),
    fit_epochs: int = typer.Option(20, "--fit-epochs", help="With --fit-on: passes over the split's images."),
    image_size: str = typer.Option("224x392", "--image-size", help="With --fit-on: HEIGHTxWIDTH the images are resized to (multiples of 14)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="With --fit-on: show progress bars."),
) -> None:
    """Save a small DINOv2 (save_pretrained) for demos and tests: RANDOM weights, or with
    --fit-on a stand-in fitted to a dataset's labels.

    Neither is a real DINOv2: they stand in for one where no weights can be downloaded.
    """
    from pipeline.teacher import FAMILIES, parse_image_size, save_random_teacher

    if family not in FAMILIES:
        raise typer.BadParameter(f"{family!r} is not one of {', '.join(FAMILIES)}", param_hint="--family")
    if fit_on is None:
        with _errors():  # an unknown size, an existing or non-folder --out
            path = save_random_teacher(out, size=size, registers=registers, seed=seed, family=family)
        shown = FAMILIES[family][1] if registers is None else registers
        typer.echo(f"saved a RANDOM {size} {family} teacher ({shown} registers) to {path} (demo/test only)")
        return
    from pipeline.synthetic.teacher_fit import FitConfig, fit_teacher

    if registers:
        raise typer.BadParameter("--fit-on fits a teacher without registers", param_hint="--registers")
    if family != "dinov2":
        raise typer.BadParameter("--fit-on fits a DINOv2 (Dinov2Model)", param_hint="--family")
    try:
        fit_size = parse_image_size(image_size)
    except ValueError as e:  # as extract-teacher and bench: a usage error
        raise typer.BadParameter(str(e), param_hint="--image-size") from None
    with _errors():
        cfg = FitConfig(
            data=fit_on, out=out, size=size, split=fit_split, image_size=fit_size,
            epochs=fit_epochs, seed=seed, progress=progress,
        )  # fmt: skip
        stats = fit_teacher(cfg)
    val = stats["val_accuracy"]
    typer.echo(
        f"saved a STAND-IN {size} DINOv2 fitted to {fit_on} ({fit_split}, {fit_epochs} epochs, "
        f"{stats['seconds']:.0f} s) to {out} (demo/test only): point accuracy of its linear "
        f"classifier {stats['accuracy']:.1%} on {fit_split}"
        + ("" if val is None else f", {val:.1%} on val")
    )


@app.command("extract-teacher")
def extract_teacher_command(
    data: Path = typer.Option(..., "--data", help="nuScenes root (the folder holding v1.0-*/)."),
    cache: Path = typer.Option(..., "--cache", help="Cache root; the cache is CACHE/<key digest>/."),
    teacher: str = typer.Option(..., "--teacher", help="DINOv2 Hugging Face id or local folder (see make-teacher)."),
    version: str = typer.Option(None, "--version", help="nuScenes version directory; default: the only one."),
    split: str = typer.Option("train", "--split", help="Split to extract (train, val, mini_train, all, ...)."),
    image_size: str = typer.Option("448x896", "--image-size", help="HEIGHTxWIDTH fed to the teacher; multiples of 14."),
    scheduler: str = typer.Option(None, "--scheduler", help="Address of a running Dask scheduler; default: a LocalCluster."),
    workers: int = typer.Option(None, "--workers", min=1, help="LocalCluster workers (each runs --threads-per-worker units at once). Default: 2 on the CPU, cores / 2 on a GPU."),
    threads: int = typer.Option(0, "--torch-threads", help="torch threads per worker; 0: cores / (workers x threads-per-worker), at least 1."),
    processes: bool = typer.Option(None, "--processes/--threads", help="LocalCluster workers as processes or threads of this process. Default: threads on the CPU (measured faster), processes on a GPU."),
    threads_per_worker: int = typer.Option(None, "--threads-per-worker", min=1, help="Units each LocalCluster worker runs at once. Default: 1 on the CPU, 2 on a GPU (16 cores: 8 processes x 2, docs/extraction.md)."),
    batch_size: int = typer.Option(6, "--batch-size", help="Images per teacher forward."),
    device: str = typer.Option("cpu", "--device", help="Teacher device on the workers (cpu, cuda)."),
    dtype: str = typer.Option("float32", "--dtype", help="Teacher autocast dtype: float32, float16 (CUDA), bfloat16."),
    image_decode: str = typer.Option("auto", "--image-decode", help="Where JPEGs are decoded and resized: cpu (PIL), device (torchvision, nvJPEG on CUDA), auto (device on CUDA when torchvision is installed)."),
    scans_per_unit: int = typer.Option(4, "--scans-per-unit", help="Scans per work unit (one task, one atomic cache unit)."),
    min_depth: float = typer.Option(1.0, "--min-depth", help="Pairing: minimum camera depth (m)."),
    occlusion: bool = typer.Option(True, "--occlusion/--no-occlusion", help="Pairing: reject occluded points."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out scans failing the pre-flight check (listed in the cache's meta) instead of failing."),
    target_format: str = typer.Option("point-f16", "--target-format", help="How targets are stored (part of the cache key): point-f16 (float16 per paired point), point-i8 (int8 + float16 scale per paired point), grid-f16 (float16 patch grid of every image, sampled when read), grid-i8 (those grids as int8 + float16 scale per cell)."),
) -> None:
    """Stage one: DINOv2 features at every paired LiDAR point → the Zarr target cache (Dask).

    Resumable and idempotent: finished units are kept, a re-run with the same arguments does no
    teacher work. Prints the cache path and a summary line.
    """
    from pipeline.extract import (
        ExtractConfig,
        UnitFailedError,
        available_cores,
        default_layout,
        extract_teacher,
    )
    from pipeline.pairing import PairingConfig
    from pipeline.teacher import parse_image_size

    try:
        size = parse_image_size(image_size)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--image-size") from None
    from cache.schema import target_format as check_format

    try:
        check_format(target_format)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--target-format") from None
    layout = default_layout(device, available_cores())  # what the options left unset get
    with _errors():  # a bad combination of options, named
        cfg = ExtractConfig(
            data=data,
            cache_root=cache,
            teacher=teacher,
            version=version,
            split=split,
            image_size=size,
            scheduler=scheduler,
            n_workers=layout.workers if workers is None else workers,
            torch_threads=threads,
            processes=layout.processes if processes is None else processes,
            threads_per_worker=layout.threads_per_worker if threads_per_worker is None else threads_per_worker,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            image_decode=image_decode,
            scans_per_unit=scans_per_unit,
            pairing=PairingConfig(min_depth=min_depth, occlusion=occlusion),
            progress=progress,
            skip_bad=skip_bad,
            target_format=target_format,
        )
    if scheduler is None:
        kind = "process" if cfg.processes else "thread"
        typer.echo(f"LocalCluster: {cfg.n_workers} {kind} workers x {cfg.threads_per_worker} unit(s) at once")
    else:
        given = {"--workers": workers, "--processes" if processes else "--threads": processes,
                 "--threads-per-worker": threads_per_worker}  # fmt: skip
        ignored = [name for name, value in given.items() if value is not None]
        if ignored:
            typer.echo(f"warning: {', '.join(ignored)} set the layout of a LocalCluster: ignored with --scheduler (the cluster's workers run as `dask worker` started them)", err=True)
    if device.startswith("cuda") and target_format == "point-f16":
        typer.echo("note: on a GPU node the cache's disk bounds point-f16 (~2.9 MB per nuScenes image at D = 384); --target-format grid-i8 writes ~0.9 MB and ran 1.3-1.6x faster on an H200 (docs/extraction.md)", err=True)
    try:
        with _errors(UnitFailedError):  # OSError also: an unreachable --scheduler
            summary = extract_teacher(cfg)
    except KeyboardInterrupt as e:  # the lock is released and finished units are kept
        typer.echo(str(e) or "interrupted (finished units are kept: the same command goes on)", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # Units already running in thread workers cannot be stopped, and tearing the interpreter
        # down under them (inside torch) aborts the process ("terminate called without an active
        # exception"): leave at once. Their unfinished units are temporary folders the next run
        # removes; worker processes exit with their parent.
        os._exit(130)
    if summary.teacher_random:
        typer.echo("warning: the teacher is a RANDOM model (make-teacher): demo/test targets only", err=True)
    if summary.scans_unlabelled:
        typer.echo(f"warning: {summary.scans_unlabelled} of {summary.scans} scans have no lidarseg labels (label 255 on every point; evaluation leaves them out)", err=True)
    if summary.teacher_fitted:
        typer.echo("warning: the teacher is a stand-in fitted to dataset labels (make-teacher --fit-on): demo/test targets only", err=True)
    typer.echo(f"cache: {summary.cache_path}")
    typer.echo(summary.line())

# ---------------------------------------------------------------- cache/ ----
@cache_app.command("info")
def cache_info_command(
    root_or_path: Path = typer.Argument(
        ..., help="A cache folder (ROOT/<digest>) or a cache root (lists its caches)."
    ),
) -> None:
    """Key, scans, points, paired share, size and completeness of a cache."""
    from cache.store import describe

    with _errors():
        typer.echo(describe(root_or_path))


@cache_app.command("verify")
def cache_verify_command(
    path: Path = typer.Argument(..., help="A cache folder, or a root holding exactly one cache."),
) -> None:
    """Recompute every checksum and check offsets and row counts; exit 1 on any problem."""
    from cache import resolve_cache, verify_cache

    with _errors():
        cache = resolve_cache(path)
        problems = verify_cache(cache)
    for problem in problems:
        typer.echo(problem)
    if problems:
        typer.echo(f"{cache}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"{cache}: ok (complete, all checksums match)")


# ---------------------------------------------------------------- stage two (trainer/) ----


@app.command("train")
def train_command(
    cache: Path = typer.Option(None, "--cache", help="Cache folder (ROOT/<digest>) or a root holding one cache."),
    data: Path = typer.Option(None, "--data", help="nuScenes root the cache was extracted from (fingerprint check)."),
    out: Path = typer.Option(None, "--out", help="Run folder: config.yaml, metrics.jsonl, checkpoint.pt, summary.json (when finished)."),
    version: str = typer.Option(None, "--version", help="nuScenes version folder; default: the only one."),
    split: str = typer.Option(None, "--split", help="Split to train on (must match the cache) (default train)."),
    head: str = typer.Option(None, "--head", help="Projection head: mlp or linear (default mlp)."),
    occupancy_weight: float = typer.Option(None, "--occupancy-weight", help="Weight of the occupancy loss; 0 = off (default 0.5)."),
    epochs: int = typer.Option(None, "--epochs", help="Passes over the cache (default 50)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Scans per step and process (default 4)."),
    lr: float = typer.Option(None, "--lr", help="Peak AdamW learning rate (default 1e-3)."),
    workers: int = typer.Option(None, "--workers", help="DataLoader worker processes (default 2)."),
    seed: int = typer.Option(None, "--seed", help="Seed (default 0)."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default cpu)."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads; 0 = torch's default (default 0)."),
    backbone: str = typer.Option(None, "--backbone", help="minkunet34 or tiny (default minkunet34)."),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints (default 500)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from RUN_DIR/checkpoint.pt, with RUN_DIR/config.yaml's settings (train --out RUN_DIR --resume)."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Show the progress bar."),
    config: Path = typer.Option(None, "--config", help="YAML with TrainConfig fields, or a run's config.yaml (options given here win)."),
    verify_cache: bool = typer.Option(None, "--verify-cache/--no-verify-cache", help="Recompute every cache checksum before training (default: structural check only)."),
    skip_bad_scans: bool = typer.Option(None, "--skip-bad-scans/--no-skip-bad-scans", help="Train without the scans of units that fail the check (default: refuse the cache)."),
) -> None:  # fmt: skip
    """Stage two: train the sparse-conv student on the cache's targets (no teacher, no images).

    Multi-process: torchrun --nproc_per_node N cli.py train ... (gloo on CPU, nccl on CUDA).
    """
    from trainer.config import CONFIG, load_config
    from trainer.loop import train

    if resume and config is None and out is not None and (out / CONFIG).is_file():
        config = out / CONFIG  # resume as the run was configured; options given here win
    try:
        with _errors():
            cfg = load_config(
                config, cache=cache, data=data, out=out, version=version, split=split, head=head,
                occupancy_weight=occupancy_weight, epochs=epochs, batch_size=batch_size, lr=lr,
                workers=workers, seed=seed, device=device, threads=threads, backbone=backbone,
                checkpoint_every=checkpoint_every, resume=resume or None, progress=progress,
                verify_cache=verify_cache, skip_bad_scans=skip_bad_scans,
            )  # fmt: skip
            result = train(cfg)
    except KeyboardInterrupt as e:  # the loop says which step the checkpoint holds
        typer.echo(str(e) or "interrupted", err=True)
        raise typer.Exit(130) from None
    if result.rank != 0:
        return
    import math

    def measured(value: float, text: str) -> str:  # a run of one step times none
        return "n/a" if math.isnan(value) else text

    typer.echo(
        f"trained {result.steps} steps, final loss {result.final_loss:.4f}, "
        f"{measured(result.scans_per_s, f'{result.scans_per_s:.2f}')} scans/s, "
        f"data wait {measured(result.data_wait_share, f'{100 * result.data_wait_share:.0f}%')} "
        f"-> {result.run_dir}"
    )


@app.command("export")
def export_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Run folder of `train` (holds checkpoint.pt, config.yaml)."),
    out: Path = typer.Option(..., "--out", help="The file to write (*.pt); an existing file is refused."),
) -> None:  # fmt: skip
    """The pretrained backbone as one file for other code: weights, architecture, input
    definition, provenance (torch.load(..., weights_only=True) reads it; docs/training.md)."""
    from trainer.config import CHECKPOINT
    from trainer.export import export_backbone

    with _errors():
        provenance = export_backbone(checkpoint, out)
    step, steps = provenance["step"], provenance["steps"]
    if steps is not None and step < steps:
        typer.echo(f"warning: {checkpoint / CHECKPOINT} holds step {step} of {steps}: an unfinished run", err=True)
    typer.echo(f"exported the backbone of {checkpoint} (step {step}) -> {out}")


# ---------------------------------------------------------------- evaluation (trainer/) ----
# Shared options of the evaluation commands (typer needs them per command; defaults live here).
_CKPT = typer.Option(
    ...,
    "--checkpoint",
    help='Run folder of the trained student, a file of `cli.py export`, or "none" (random init).',
)
_DATA = typer.Option(
    ..., "--data", help="Dataset root (nuScenes: holds v1.0-*/; SemanticKITTI: holds sequences/)."
)
_DATASET = typer.Option("nuscenes", "--dataset", help="nuscenes | semantickitti.")
_VERSION = typer.Option(None, "--version", help="nuScenes version folder; default: the only one.")
_TRAIN_SPLIT = typer.Option("train", "--train-split", help="Split the classifier is trained on.")
_VAL_SPLIT = typer.Option("val", "--val-split", help="Split the metrics are computed on.")
_MAX_TRAIN = typer.Option(
    None, "--max-train-scans", help="At most this many training scans (evenly spaced)."
)
_MAX_VAL = typer.Option(
    None, "--max-val-scans", help="At most this many val scans (evenly spaced)."
)
_OUT = typer.Option(
    None, "--out", help="Output folder (default RUN_DIR/eval; required with --checkpoint none or an exported file)."
)
_LIKE = typer.Option(
    None,
    "--like",
    help="With --checkpoint none: architecture of this run folder or exported file, or a name (tiny, minkunet34).",
)
_DEVICE = typer.Option("cpu", "--device", help="torch device (cpu, cuda).")
_SEED = typer.Option(0, "--seed", help="Seed.")


def _eval_data(data, dataset, version, train_split, val_split, max_train, max_val):
    from trainer.evaluate.backbone import EvalData

    return EvalData(
        root=data, dataset=dataset, version=version, train_split=train_split,
        val_split=val_split, max_train_scans=max_train, max_val_scans=max_val,
    )  # fmt: skip


@evaluate_app.command("linear-probe")
def evaluate_linear_probe_command(
    checkpoint: str = _CKPT, data: Path = _DATA, dataset: str = _DATASET, version: str = _VERSION,
    train_split: str = _TRAIN_SPLIT, val_split: str = _VAL_SPLIT,
    max_train_scans: int = _MAX_TRAIN, max_val_scans: int = _MAX_VAL,
    points_per_scan: int = typer.Option(2_000, "--points-per-scan", help="Training points kept per scan (0 = all)."),
    steps: int = typer.Option(1000, "--steps", help="AdamW steps of the linear layer (convex: fixed budget)."),
    lr: float = typer.Option(1e-2, "--lr", help="AdamW learning rate of the linear layer."),
    out: Path = _OUT, like: Path = _LIKE, device: str = _DEVICE, seed: int = _SEED,
) -> None:  # fmt: skip
    """Frozen backbone + one linear layer per point: mIoU and per-class IoU on the val split.

    Writes RUN_DIR/eval/linear_probe.json (or OUT/linear_probe.json) and prints the IoU table.
    """
    with _errors():
        from trainer.evaluate.linear_probe import LinearProbeConfig, run_linear_probe
        from trainer.evaluate.probe import ProbeConfig

        cfg = LinearProbeConfig(
            checkpoint=checkpoint,
            data=_eval_data(data, dataset, version, train_split, val_split, max_train_scans, max_val_scans),
            out=out, like=like, probe=ProbeConfig(steps=steps, lr=lr, seed=seed),
            points_per_scan=points_per_scan or None, device=device, seed=seed,
        )  # fmt: skip
        run_linear_probe(cfg)


@evaluate_app.command("finetune")
def evaluate_finetune_command(
    checkpoint: str = _CKPT, data: Path = _DATA, dataset: str = _DATASET, version: str = _VERSION,
    fraction: float = typer.Option(0.01, "--fraction", help="Share of labelled training scans: 0.01, 0.05, 0.1, 0.25, 1."),
    epochs: int = typer.Option(30, "--epochs", help="Passes over the subset."),
    batch_scans: int = typer.Option(4, "--batch-scans", help="Scans per step."),
    backbone_lr: float = typer.Option(None, "--backbone-lr", help="Backbone AdamW lr; default head-lr/10 (pretrained) or head-lr (none)."),
    head_lr: float = typer.Option(1e-2, "--head-lr", help="Classifier AdamW lr."),
    subset_seed: int = typer.Option(0, "--subset-seed", help="Seed of the subset choice (keep fixed across models)."),
    subset: Path = typer.Option(None, "--subset", help="File of scan tokens, one a line (an earlier run's subset.txt, a published list): used instead of --fraction's choice."),
    train_split: str = _TRAIN_SPLIT, val_split: str = _VAL_SPLIT,
    max_train_scans: int = _MAX_TRAIN, max_val_scans: int = _MAX_VAL,
    out: Path = _OUT, like: Path = _LIKE, device: str = _DEVICE, seed: int = _SEED,
) -> None:  # fmt: skip
    """Fine-tune backbone + linear classifier on a fixed subset of labelled scans; mIoU on val.

    Writes finetune.json and subset.txt (the scan tokens used) to RUN_DIR/eval/finetune_<p>pct/.
    """
    with _errors():
        from trainer.evaluate.finetune import FinetuneConfig, run_finetune

        cfg = FinetuneConfig(
            checkpoint=checkpoint,
            data=_eval_data(data, dataset, version, train_split, val_split, max_train_scans, max_val_scans),
            fraction=fraction, out=out, like=like, epochs=epochs, batch_scans=batch_scans,
            backbone_lr=backbone_lr, head_lr=head_lr, subset_seed=subset_seed, subset_file=subset,
            device=device, seed=seed,
        )  # fmt: skip
        run_finetune(cfg)


@evaluate_app.command("rankme")
def evaluate_rankme_command(
    checkpoint: str = _CKPT,
    data: Path = typer.Option(None, "--data", help="Dataset root (its val split is used when no --cache)."),
    cache: Path = typer.Option(None, "--cache", help="Cache folder (or a root holding one cache): its scans, plus the teacher targets' RankMe."),
    dataset: str = _DATASET, version: str = _VERSION, val_split: str = _VAL_SPLIT,
    max_scans: int = typer.Option(50, "--max-scans", help="Scans used (evenly spaced)."),
    max_points: int = typer.Option(20_000, "--max-points", help="Feature rows given to the SVD."),
    out: Path = _OUT, like: Path = _LIKE, device: str = _DEVICE, seed: int = _SEED,
) -> None:  # fmt: skip
    """RankMe (effective rank) of the backbone point features; with --cache also of the teacher."""
    with _errors():
        from cache import resolve_cache
        from trainer.evaluate.rankme import RankMeConfig, run_rankme

        cache = None if cache is None else resolve_cache(cache)  # a root holding one cache, too
        eval_data = None
        if data is not None:
            eval_data = _eval_data(data, dataset, version, "train", val_split, None, None)
        run_rankme(
            RankMeConfig(
                checkpoint=checkpoint, data=eval_data, cache=cache, out=out, like=like,
                max_scans=max_scans, max_points=max_points, device=device, seed=seed,
            )
        )  # fmt: skip


@evaluate_app.command("robustness")
def evaluate_robustness_command(
    checkpoint: str = _CKPT, data: Path = _DATA, dataset: str = _DATASET, version: str = _VERSION,
    corruptions: str = typer.Option("all", "--corruptions", help="Comma list (beam_missing, fewer_beams, cross_sensor, point_drop, jitter, fog) or all."),
    severity: str = typer.Option("2", "--severity", help="Comma list of severities 1..3."),
    beams: int = typer.Option(None, "--beams", help="Beams for the elevation-bin ring estimate (default 32 nuScenes, 64 KITTI)."),
    baseline: Path = typer.Option(None, "--baseline", help="robustness.json of a baseline model, for the corruption error."),
    train_split: str = _TRAIN_SPLIT, val_split: str = _VAL_SPLIT,
    max_train_scans: int = _MAX_TRAIN, max_val_scans: int = _MAX_VAL,
    points_per_scan: int = typer.Option(2_000, "--points-per-scan", help="Training points kept per scan (0 = all)."),
    probe_steps: int = typer.Option(1000, "--probe-steps", help="AdamW steps of the linear probe."),
    probe_lr: float = typer.Option(1e-2, "--probe-lr", help="AdamW learning rate of the linear probe (as linear-probe's --lr)."),
    out: Path = _OUT, like: Path = _LIKE, device: str = _DEVICE, seed: int = _SEED,
) -> None:  # fmt: skip
    """Clean-trained linear probe under LiDAR corruptions: mIoU per corruption, mRR, mCE."""
    try:
        severities = tuple(int(s) for s in severity.split(","))
    except ValueError:
        raise typer.BadParameter(f"{severity!r} is not a comma list of integers", param_hint="--severity") from None
    with _errors():
        from trainer.evaluate.corruptions import CORRUPTIONS
        from trainer.evaluate.probe import ProbeConfig
        from trainer.evaluate.robustness import RobustnessConfig, run_robustness

        names = (
            tuple(CORRUPTIONS)
            if corruptions == "all"
            else tuple(c.strip() for c in corruptions.split(","))
        )
        cfg = RobustnessConfig(
            checkpoint=checkpoint,
            data=_eval_data(data, dataset, version, train_split, val_split, max_train_scans, max_val_scans),
            out=out, like=like, corruptions=names, severities=severities,
            beams=beams, baseline=baseline, points_per_scan=points_per_scan or None, device=device, seed=seed,
            probe=ProbeConfig(steps=probe_steps, lr=probe_lr, seed=seed),
        )  # fmt: skip
        run_robustness(cfg)


@app.command("visualize")
def visualize_command(
    checkpoint: str = _CKPT,
    cache: Path = typer.Option(..., "--cache", help="Cache folder (or a root holding one cache) with the scan's teacher targets."),
    data: Path = typer.Option(None, "--data", help="Dataset root, for the camera images (nuScenes)."),
    dataset: str = _DATASET, version: str = _VERSION,
    scan: str = typer.Option(None, "--scan", help="Scan token; default: the cache's first scan."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNG files."),
    extent: float = typer.Option(40.0, "--extent", help="Half-width of the bird's-eye view, m."),
    like: Path = _LIKE, device: str = _DEVICE,
) -> None:  # fmt: skip
    """PCA pictures: teacher targets vs student features (bird's-eye view) and the teacher's
    features drawn on the camera images."""
    with _errors():
        from cache import resolve_cache
        from trainer.evaluate.visualize import VisualizeConfig, run_visualize

        cache = resolve_cache(cache)  # a root holding one cache, too
        run_visualize(
            VisualizeConfig(
                checkpoint=checkpoint, cache=cache, data=data, dataset=dataset, version=version,
                scan=scan, out=out, extent=extent, device=device, like=like,
            )
        )  # fmt: skip


@app.command("ablate")
def ablate_command(
    cache: Path = typer.Option(..., "--cache", help="Cache folder (or a root holding one cache): extracted once, only read."),
    data: Path = typer.Option(..., "--data", help="nuScenes root the cache was extracted from."),
    out: Path = typer.Option(..., "--out", help="Output folder: one run folder per grid point, results.md, results.csv."),
    grid: list[str] = typer.Option([], "--grid", help="Axis key=v1,v2 (train-config field; repeatable)."),
    axes: list[str] = typer.Argument(None, help="More axes key=v1,v2; a one-valued axis (epochs=2) is a fixed setting."),
    version: str = _VERSION,
    probe_steps: int = typer.Option(1000, "--probe-steps", help="AdamW steps of each run's linear probe."),
    max_train_scans: int = _MAX_TRAIN, max_val_scans: int = _MAX_VAL, device: str = _DEVICE,
) -> None:  # fmt: skip
    """Several train runs from ONE cache (grid of train-config overrides), each linear-probed;
    one table. Fails if a run modifies the cache or imports the teacher.

    Example: ablate --cache C --data D --out O --grid head=linear,mlp occupancy_weight=0,1 epochs=2
    """
    with _errors():
        from trainer.evaluate.ablate import AblateConfig, run_ablation

        run_ablation(
            AblateConfig(
                cache=cache, data=data, out=out, grid=tuple(grid) + tuple(axes or ()), version=version,
                probe_steps=probe_steps, max_train_scans=max_train_scans, max_val_scans=max_val_scans,
                device=device,
            )
        )  # fmt: skip


# ---------------------------------------------------------------- benchmarks ----
@app.command("bench")
def bench_command(
    what: str = typer.Argument(..., help="extraction | online | loader | size | scaling | feed | all"),
    data: Path = typer.Option(None, "--data", help="nuScenes (or synthetic) root."),
    teacher: str = typer.Option("", "--teacher", help="DINOv2 folder or HF id (random is fine)."),
    split: str = typer.Option("all", "--split", help="Split to extract (and train on: loader)."),
    image_size: str = typer.Option("448x896", "--image-size", help="HxW fed to the teacher."),
    batch_size: int = typer.Option(6, "--batch-size", help="Images per teacher forward."),
    scans: int = typer.Option(4, "--scans", help="Scans used (the first of the set)."),
    steps: int = typer.Option(4, "--steps", help="Timed training steps (online, loader)."),
    backbone: str = typer.Option("tiny", "--backbone", help="Student backbone (online, loader)."),
    dim: int = typer.Option(384, "--dim", help="Feature dim of size / read benchmarks."),
    points: int = typer.Option(34_700, "--points", help="Points per synthetic scan (size, loader)."),
    reads: int = typer.Option(40, "--reads", help="Random scan reads (loader)."),
    threads: int = typer.Option(2, "--torch-threads", help="torch threads of single-process parts."),
    device: str = typer.Option("cpu", "--device", help="Teacher device (extraction): cpu, cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="Teacher autocast dtype (extraction): float32, float16 (CUDA), bfloat16."),
    workers: int = typer.Option(2, "--workers", help="extract-teacher workers (extraction, feed; scaling: 1, 2 and this many)."),
    processes: bool = typer.Option(False, "--processes/--threads", help="extract-teacher workers as processes (extraction, feed, scaling)."),
    threads_per_worker: int = typer.Option(1, "--threads-per-worker", help="Units each extract-teacher worker runs at once (extraction, feed, scaling)."),
    replicate: int = typer.Option(1, "--replicate", help="Run extraction/feed on K copies of the set's scenes (long runs for GPU rates)."),
    gpu_rate: float = typer.Option(200.0, "--gpu-rate", min=0.001, help="feed: images/s of the stand-in GPU teacher."),
    image_decode: str = typer.Option("auto", "--image-decode", help="extract-teacher image decoding (extraction, feed): auto, cpu, device."),
    target_format: str = typer.Option("point-f16", "--target-format", help="extract-teacher target format (extraction, feed): point-f16, point-i8, grid-f16, grid-i8."),
) -> None:
    """Issue-9 benchmarks: print tables of rates and RATIOS (docs/benchmarks.md)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
    from pipeline_bench import WHATS, BenchConfig, run_benchmark

    from pipeline.teacher import parse_image_size

    try:
        size = parse_image_size(image_size)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--image-size") from None
    with _errors():
        cfg = BenchConfig(
            data=data, teacher=teacher, split=split, image_size=size,
            batch_size=batch_size, scans=scans, steps=steps, backbone=backbone, dim=dim,
            points_per_scan=points, reads=reads, threads=threads, device=device, dtype=dtype,
            workers=workers, processes=processes, threads_per_worker=threads_per_worker,
            replicate=replicate, gpu_rate=gpu_rate, image_decode=image_decode,
            target_format=target_format,
        )  # fmt: skip
        for name in WHATS if what == "all" else [what]:
            run_benchmark(name, cfg)


if __name__ == "__main__":
    app()
