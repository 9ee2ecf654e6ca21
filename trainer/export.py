"""The pretrained backbone as one self-describing file, for use outside this project.

``export_backbone(run_dir, out)`` writes the student backbone of a training run (no projection
head, occupancy decoder or optimiser) with what is needed to rebuild and feed it:

- ``format`` / ``format_version``: ``"cleverdistill-backbone"`` / 1;
- ``architecture``: the ``ARCHITECTURES`` name and its numbers (stem width, 8 stage widths and
  depths), ``in_channels``, ``out_channels``;
- ``input``: ``voxel_size`` (metres), ``intensity_scale`` and, in words, the input features and
  the voxel rule (``trainer.model.points_field``);
- ``state_dict``: the backbone's tensors (CPU, float32);
- ``provenance``: the run folder, the checkpoint's step and the run's total, the cache digest and
  key (teacher, image size, split, dataset fingerprint), ``feature_dim``, head, occupancy
  weight, the run's git SHA and versions.

Only plain types and tensors: ``torch.load(path, weights_only=True)`` reads it, so a file from
someone else can be opened without running their code. ``load_exported(path)`` rebuilds the
model (``trainer.model.build_student``, strict state-dict load, eval mode); the evaluation
protocols take such a file as ``--checkpoint``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from trainer.config import CHECKPOINT, CONFIG, read_run_record
from trainer.loop import save_checkpoint
from trainer.model import (
    ARCHITECTURES,
    IN_CHANNELS,
    MinkUNet,
    StudentConfig,
    build_student,
    load_checkpoint,
    student_config_of_run,
)

FORMAT = "cleverdistill-backbone"
FORMAT_VERSION = 1
INPUT_FEATURES = ("1 (constant)", "intensity * intensity_scale")
VOXEL_RULE = (
    "points x, y, z in the LiDAR sensor frame (metres); voxel index floor(xyz / voxel_size); "
    "the input features of the points in a voxel are averaged (MinkowskiEngine "
    "UNWEIGHTED_AVERAGE); the output of a point is its voxel's feature"
)


def export_backbone(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Write RUN_DIR's backbone to ``out`` (see the module docstring); returns the provenance.

    Refuses (FileExistsError) to replace an existing ``out``; writes under a temporary name and
    renames, so ``out`` is either absent or complete. ValueError naming the file when the run's
    checkpoint does not fit its recorded architecture."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out}: already exists (delete it or choose another --out)")
    if out.suffix != ".pt":
        raise ValueError(f"{out}: the exported file is a torch file; name it *.pt")
    nearest = next(p for p in out.absolute().parents if p.exists() or p.is_symlink())
    if not nearest.is_dir():  # before reading the checkpoint; nothing is created on a failure
        raise NotADirectoryError(f"{out}: {nearest} exists and is not a folder")
    record = read_run_record(run_dir)
    cfg = student_config_of_run(run_dir)
    state = load_checkpoint(run_dir / CHECKPOINT)
    model = build_student(cfg)
    try:
        model.load_state_dict(state["model"]["backbone"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(
            f"{run_dir / CHECKPOINT}: the backbone weights do not fit the architecture "
            f"{cfg.backbone!r} of {run_dir / CONFIG} ({type(e).__name__}: {e})"
        ) from None
    run_cfg = record["config"]
    provenance = {
        "run": str(run_dir.resolve()),
        "step": int(state["step"]),
        "steps": record.get("steps"),
        "cache_digest": state.get("cache_digest"),
        "cache_key": record.get("cache", {}).get("key"),
        "feature_dim": state.get("feature_dim"),
        "head": run_cfg.get("head"),
        "occupancy_weight": run_cfg.get("occupancy_weight"),
        "git_sha": record.get("git_sha"),
        "versions": record.get("versions"),
    }
    stem, widths, depths = ARCHITECTURES[cfg.backbone]
    exported = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {
            "name": cfg.backbone,
            "stem": stem,
            "widths": list(widths),
            "depths": list(depths),
            "in_channels": IN_CHANNELS,
            "out_channels": model.out_channels,
        },
        "input": {
            "voxel_size": cfg.voxel_size,
            "intensity_scale": cfg.intensity_scale,
            "features": list(INPUT_FEATURES),
            "rule": VOXEL_RULE,
        },
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "provenance": provenance,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, exported)  # temp name, fsync, os.replace: complete or absent
    return provenance


def read_exported(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The exported file's dict (``torch.load(weights_only=True)``; ``mmap``: tensors are read
    when used); ValueError naming the file when it is not a readable export of a version this
    code knows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        exported = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:
        if path.name == CHECKPOINT and (path.parent / CONFIG).is_file():
            raise ValueError(
                f"{path}: a training checkpoint, not an exported backbone: pass its run folder "
                f"({path.parent}), or `cli.py export` it"
            ) from None
        raise ValueError(  # torch's own message runs to many lines and suggests weights_only=False
            f"{path}: not an exported backbone (`cli.py export`): torch.load(weights_only=True) "
            f"cannot read it ({type(e).__name__})"
        ) from None
    if not isinstance(exported, dict) or exported.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not an exported backbone (`cli.py export`): no format {FORMAT!r}"
        )
    if exported.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: exported backbone format_version {exported.get('format_version')!r}; this "
            f"code reads {FORMAT_VERSION}"
        )
    return exported


def load_exported(path: str | Path, device: str = "cpu") -> MinkUNet:
    """The backbone of an exported file in eval mode on ``device``; its StudentConfig is
    ``model.cfg``. ValueError naming the file when its architecture or weights do not fit."""
    exported = read_exported(path)
    try:
        arch, inputs = exported["architecture"], exported["input"]
        cfg = StudentConfig(
            backbone=arch["name"],
            voxel_size=float(inputs["voxel_size"]),
            intensity_scale=float(inputs["intensity_scale"]),
        )
        stem, widths, depths = ARCHITECTURES[cfg.backbone]
        if [arch["stem"], list(arch["widths"]), list(arch["depths"])] != [
            stem,
            list(widths),
            list(depths),
        ]:
            raise ValueError(f"architecture {cfg.backbone!r} differs from this code's")
        model = build_student(cfg)
        model.load_state_dict(exported["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path}: exported backbone does not load ({type(e).__name__}: {e})"
        ) from None
    return model.to(device).eval()
