"""RankMe protocol: effective rank of the backbone's point features (label-free quality signal).

Without a cache: features of (up to ``max_scans``) scans of a dataset split. With ``--cache``: the
cache's scans and points (no dataset needed), and the same number is also computed for the teacher
targets of the *paired* points and for the student features of exactly those points, so the two
ranks are comparable. Points are subsampled evenly across scans to at most ``max_points`` rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainer.evaluate.backbone import (
    EvalData,
    checkpoint_record,
    load_model,
    needs_out,
    open_reader,
    scan_features,
)
from trainer.evaluate.linear_probe import write_json_atomic
from trainer.evaluate.metrics import rankme


@dataclass(frozen=True)
class RankMeConfig:
    """A RankMe evaluation."""

    checkpoint: str
    """Run folder of the student, or "none"."""
    data: EvalData | None = None
    """Dataset and split (its ``val_split``) when no cache is given."""
    cache: Path | None = None
    """Cache directory: use its scans and points, and add the teacher targets' RankMe."""
    out: Path | None = None
    """Where results go; default RUN_DIR/eval."""
    like: Path | None = None
    """With checkpoint "none": architecture from this run folder."""
    max_scans: int = 50
    """Scans used (evenly spaced)."""
    max_points: int = 20_000
    """Feature rows the SVD sees."""
    device: str = "cpu"
    """torch device."""
    seed: int = 0
    """Seed of the point subsampling."""

    def __post_init__(self) -> None:
        if self.data is None and self.cache is None:
            raise ValueError("rankme needs --data or --cache")
        if self.out is None and (why := needs_out(self.checkpoint)):
            raise ValueError(why)

    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.checkpoint) / "eval"


def paired_targets(scan) -> np.ndarray:
    """(P, D) teacher targets of the paired points, in point order."""
    return np.asarray(scan.target)[scan.paired]


def _evenly(n: int, k: int) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, min(n, k)).round().astype(int).tolist()))


def run_rankme(cfg: RankMeConfig) -> dict:
    """Compute the RankMe numbers; writes ``<out>/rankme.json`` and returns its content."""
    model = load_model(
        cfg.checkpoint, cfg.like, cfg.device, cfg.seed, cfg.data.dataset if cfg.data else "nuscenes"
    )
    trained = checkpoint_record(cfg.checkpoint)  # warns on an unfinished run
    rng = np.random.default_rng(cfg.seed)
    student, student_paired, teacher = [], [], []
    if cfg.cache is not None:
        from cache.reader import open_cache

        cache = open_cache(cfg.cache)
        indices = _evenly(len(cache), cfg.max_scans)
        per_scan = max(1, cfg.max_points // len(indices))
        for i in tqdm(indices, desc="rankme (cache)", unit="scan"):
            scan = cache.read_scan(i)
            f = scan_features(model, np.asarray(scan.points), cfg.device)  # (N, D)
            take = rng.choice(len(f), min(per_scan, len(f)), replace=False)
            student.append(f[torch.from_numpy(take)])
            paired = np.flatnonzero(scan.paired)
            if len(paired):
                target = paired_targets(scan)  # (P, D_t), rows in the order of ``paired``
                rows = np.sort(rng.choice(len(paired), min(per_scan, len(paired)), replace=False))
                student_paired.append(f[torch.from_numpy(paired[rows])])
                teacher.append(torch.from_numpy(target[rows].astype(np.float32)))
        source = str(cfg.cache)
    else:
        reader = open_reader(cfg.data)
        scans = reader.scans(cfg.data.val_split)
        scans = [scans[i] for i in _evenly(len(scans), cfg.max_scans)]
        per_scan = max(1, cfg.max_points // len(scans))
        for scan in tqdm(scans, desc="rankme", unit="scan"):
            f = scan_features(model, reader.load_points(scan), cfg.device)
            take = rng.choice(len(f), min(per_scan, len(f)), replace=False)
            student.append(f[torch.from_numpy(take)])
        source = f"{cfg.data.root} ({cfg.data.val_split})"
    record: dict = {
        "protocol": "rankme",
        **trained,
        "source": source,
        "student": rankme(torch.cat(student), cfg.max_points, cfg.seed),
        "student_dim": int(student[0].shape[1]),
    }
    if teacher:
        record["student_paired"] = rankme(torch.cat(student_paired), cfg.max_points, cfg.seed)
        record["teacher_paired"] = rankme(torch.cat(teacher), cfg.max_points, cfg.seed)
        record["teacher_dim"] = int(teacher[0].shape[1])
        record["paired_points"] = int(sum(len(t) for t in teacher))
    record["config"] = asdict(cfg)
    write_json_atomic(cfg.out_dir() / "rankme.json", record)
    line = f"RankMe student {record['student']:.1f} / {record['student_dim']} dims"
    if teacher:
        line += (
            f"; on {record['paired_points']} paired points: student {record['student_paired']:.1f}, "
            f"teacher {record['teacher_paired']:.1f} / {record['teacher_dim']} dims"
        )
    print(line)
    return record
