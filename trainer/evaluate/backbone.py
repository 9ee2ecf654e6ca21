"""What every protocol shares: the evaluation data (reader, splits) and the backbone's features.

This is the one module of ``trainer/evaluate`` that talks to the student model (``trainer.model``):
the protocols load it with ``load_model`` (or ``load_projection_head``), take features with
``scan_features`` (one scan, eval mode) or ``forward_points`` (a batch, with grad), and record
which checkpoint they measured with ``checkpoint_record``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import CHECKPOINT, read_run_record

DATASETS = ("nuscenes", "semantickitti")


@dataclass(frozen=True)
class EvalData:
    """Which labelled scans an evaluation uses."""

    root: Path
    """Dataset root (nuScenes: the folder holding the version folder; SemanticKITTI: holds sequences/)."""
    dataset: str = "nuscenes"
    """"nuscenes" or "semantickitti"."""
    version: str | None = None
    """nuScenes version folder (v1.0-trainval, v1.0-mini, ...); None = the only one present."""
    train_split: str = "train"
    """Split the classifier is trained on."""
    val_split: str = "val"
    """Split the metrics are computed on."""
    max_train_scans: int | None = None
    """Use at most this many labelled training scans (evenly spaced over the split); None = all."""
    max_val_scans: int | None = None
    """Use at most this many labelled val scans (evenly spaced over the split); None = all."""

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        for name in ("max_train_scans", "max_val_scans"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be ≥ 1 or None, got {value}")

    def train_scans(self, reader: Any) -> list:
        """Labelled scans of the training split."""
        return _labelled(reader, self.train_split, self.max_train_scans)

    def val_scans(self, reader: Any) -> list:
        """Labelled scans of the validation split (a warning on stderr when some of them are in
        the training split too: the metric is then partly measured on training data)."""
        import sys

        scans = _labelled(reader, self.val_split, self.max_val_scans)
        train = {s.token for s in reader.scans(self.train_split)}
        shared = sum(s.token in train for s in scans)
        if shared:
            print(
                f"warning: {shared} of the {len(scans)} val scans ({self.val_split!r}) are in the "
                f"training split ({self.train_split!r}) too: the metric is measured partly on "
                "the classifier's own training data",
                file=sys.stderr,
            )
        return scans


def _labelled(reader: Any, split: str, limit: int | None) -> list:
    scans = [s for s in reader.scans(split) if s.label_path is not None]
    if not scans:
        raise ValueError(f"split {split!r} of {reader.root} has no labelled scans")
    if limit is not None and len(scans) > limit:
        scans = [scans[i] for i in np.linspace(0, len(scans) - 1, limit).round().astype(int)]
    return scans


def open_reader(data: EvalData) -> Any:
    """The dataset reader (``pipeline.datasets``: pure readers of points and labels)."""
    if data.dataset == "semantickitti":
        from pipeline.datasets.semantickitti import SemanticKITTIReader

        return SemanticKITTIReader(data.root)
    from pipeline.datasets.nuscenes import NuScenesReader

    return NuScenesReader(data.root, data.version)


# Input intensity → the student's [0, 1] input feature: nuScenes intensities are 0..255 (the
# trainer's default scale 1/255), SemanticKITTI remissions are already 0..1.
INTENSITY_SCALE = {"nuscenes": 1.0 / 255.0, "semantickitti": 1.0}


def is_exported(checkpoint: str) -> bool:
    """``checkpoint`` names a file (``cli.py export``), not a run folder or "none"."""
    return checkpoint != "none" and Path(checkpoint).is_file()


def needs_out(checkpoint: str) -> str | None:
    """Why an evaluation of ``checkpoint`` needs ``--out`` (None: it defaults to RUN_DIR/eval)."""
    if checkpoint == "none" or is_exported(checkpoint):
        return f"--checkpoint {checkpoint} needs --out (there is no run folder to write into)"
    return None


def load_model(
    checkpoint: str, like: Path | str | None, device: str, seed: int = 0, dataset: str = "nuscenes"
) -> torch.nn.Module:
    """The backbone in eval mode on ``device``; its StudentConfig is ``model.cfg``.

    ``checkpoint`` is a run folder, a file of ``cli.py export``, or "none" for a
    random-initialised backbone (seeded) with the architecture of ``like``: a run folder, an
    exported file, or an architecture name ("minkunet34", "tiny"); the trainer's defaults
    without one. The input intensity scale is set for ``dataset``.
    """
    import dataclasses

    from trainer.model import (
        ARCHITECTURES,
        StudentConfig,
        build_student,
        load_backbone,
        student_config_of_run,
    )

    if is_exported(checkpoint):
        from trainer.export import load_exported

        model = load_exported(checkpoint, device)
        cfg = model.cfg
    elif checkpoint != "none":
        model, cfg = load_backbone(checkpoint, device)
    else:
        if like is None:
            cfg = StudentConfig()
        elif str(like) in ARCHITECTURES and not Path(like).is_dir():
            cfg = StudentConfig(backbone=str(like))
        elif is_exported(str(like)):
            from trainer.export import load_exported

            cfg = load_exported(like).cfg
        else:
            cfg = student_config_of_run(like)
        torch.manual_seed(seed)
        model = build_student(cfg).to(device).eval()
    cfg = dataclasses.replace(cfg, intensity_scale=INTENSITY_SCALE[dataset])
    model.cfg = cfg
    return model


def checkpoint_record(checkpoint: str) -> dict[str, Any]:
    """What an evaluation's JSON says of its backbone: ``checkpoint`` (a run folder, an exported
    file or "none"), ``checkpoint_step`` (the training step its weights are from) and
    ``run_steps`` (the run's total). A run that has not reached its last step (still training,
    or killed) is evaluated, with a warning on stderr: its numbers are not the run's."""
    import sys

    if checkpoint == "none":
        return {"checkpoint": checkpoint, "checkpoint_step": None, "run_steps": None}
    if is_exported(checkpoint):
        from trainer.export import read_exported

        # mmap: the provenance without reading the weights (load_model reads them)
        provenance = read_exported(checkpoint, mmap=True)["provenance"]
        where, step, total = Path(checkpoint), provenance["step"], provenance["steps"]
    else:
        from trainer.model import load_checkpoint

        where = Path(checkpoint) / CHECKPOINT
        # mmap: the step without reading the weights (the backbone itself is loaded elsewhere)
        step = int(load_checkpoint(where, mmap=True)["step"])
        total = read_run_record(checkpoint).get("steps")
    if total is not None and step < total:
        print(
            f"warning: {where} holds step {step} of {total}: an unfinished "
            "run (still training, or stopped); these results are not the finished run's",
            file=sys.stderr,
        )
    return {"checkpoint": checkpoint, "checkpoint_step": step, "run_steps": total}


@torch.no_grad()
def scan_features(model: torch.nn.Module, points: np.ndarray, device: str) -> torch.Tensor:
    """(N, D) float32 backbone features of every input point (eval mode, no grad)."""
    from trainer.model import point_features as student_point_features

    if model.training:
        raise RuntimeError("scan_features needs the backbone in eval mode (frozen BN statistics)")
    return student_point_features(model, [points], device)[0].float()


def forward_points(
    model: torch.nn.Module, batch: list[np.ndarray], device: str
) -> list[torch.Tensor]:
    """Per-scan (N_i, D) features of a batch of clouds, with grad (fine-tuning)."""
    from trainer.model import point_features as student_point_features

    return student_point_features(model, batch, device)


def load_projection_head(checkpoint: str, device: str) -> torch.nn.Module | None:
    """The run's projection head (backbone features → teacher space) in eval mode, or None when
    the checkpoint holds none (an exported file holds the backbone only)."""
    from trainer.heads import build_head
    from trainer.model import ARCHITECTURES, load_checkpoint

    if is_exported(checkpoint):
        return None
    run_dir = Path(checkpoint)
    state = load_checkpoint(run_dir / CHECKPOINT)
    head_state = state["model"].get("head")
    if head_state is None or "feature_dim" not in state:
        return None
    run_cfg = read_run_record(run_dir)["config"]
    c_in = ARCHITECTURES[run_cfg["backbone"]][1][-1]  # backbone output = last decoder width
    head = build_head(run_cfg["head"], c_in, state["feature_dim"], run_cfg["head_hidden"])
    head.load_state_dict(head_state)
    return head.to(device).eval()
