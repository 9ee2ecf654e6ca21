"""Robustness protocol: the clean-trained linear probe evaluated on corrupted val scans.

The probe is fitted once on clean training features (as in ``linear_probe``); every val scan is
then corrupted (``trainer/evaluate/corruptions.py``, seeded per scan), re-encoded by the frozen
backbone and classified; labels follow the surviving points. Summary per corruption:

- ``miou``: mIoU on the corrupted val split;
- ``rr`` (resilience ratio, Robo3D): ``miou / miou_clean``; ``mRR`` = mean over corruptions;
- ``ce`` (corruption error, nuScenes-C / Robo3D): ``(1 - miou) / (1 - miou_baseline)`` for the same
  corruption of a *baseline* model's result file (``--baseline``, e.g. the random-init probe's
  robustness.json); per corruption, ``CE_i`` pools the severities (Σ errors / Σ baseline errors)
  and ``mCE`` is the mean of ``CE_i`` over corruptions (Robo3D). Without a baseline, ``ce`` is
  ``1 - miou`` (the error itself).

Beams: the ring ids of a scan's file when it carries valid ones (nuScenes), otherwise elevation
bins; ``ring_source`` records which was used, with the number of val scans of each. A corruption
that removes every point of a scan (possible for ``beam_missing`` / ``fog`` on a tiny scan) leaves
that scan out of its confusion matrix: its points are not counted as missed (``points_kept``
still counts them as lost).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainer.config import config_changes
from trainer.evaluate.backbone import (
    EvalData,
    checkpoint_record,
    load_model,
    needs_out,
    open_reader,
    scan_features,
)
from trainer.evaluate.corruptions import CORRUPTIONS, corrupt
from trainer.evaluate.linear_probe import (
    LinearProbeConfig,
    evaluate_head,
    train_features,
    write_json_atomic,
)
from trainer.evaluate.metrics import iou_per_class, mean_iou
from trainer.evaluate.probe import ProbeConfig, fit_linear_probe, probe_confusion

BEAMS = {"nuscenes": 32, "semantickitti": 64}  # HDL-32E / HDL-64E


@dataclass(frozen=True)
class RobustnessConfig:
    """A robustness evaluation."""

    checkpoint: str
    """Run folder of the pretrained student, or "none"."""
    data: EvalData
    """Dataset, splits and scan limits."""
    out: Path | None = None
    """Where results go; default RUN_DIR/eval."""
    like: Path | None = None
    """With checkpoint "none": architecture from this run folder."""
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    """Corruptions to apply (names in corruptions.CORRUPTIONS)."""
    severities: tuple[int, ...] = (2,)
    """Severities (1..3) evaluated for each corruption."""
    beams: int | None = None
    """Beams for the elevation-bin ring estimate; None = the dataset's sensor (32 / 64)."""
    baseline: Path | None = None
    """robustness.json of a baseline model, for the corruption error (CE)."""
    probe: ProbeConfig = ProbeConfig()
    """How the linear layer is fitted."""
    points_per_scan: int | None = 2_000
    """Training points kept per scan for the probe."""
    device: str = "cpu"
    """torch device."""
    seed: int = 0
    """Seed of the corruptions (scan i uses seed + i) and of the probe."""

    def __post_init__(self) -> None:
        unknown = [c for c in self.corruptions if c not in CORRUPTIONS]
        if unknown:
            raise ValueError(f"unknown corruptions {unknown}; known: {', '.join(CORRUPTIONS)}")
        if not self.severities or any(s not in (1, 2, 3) for s in self.severities):
            raise ValueError(f"severities must be among 1, 2, 3, got {self.severities}")
        if self.out is None and (why := needs_out(self.checkpoint)):
            raise ValueError(why)

    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.checkpoint) / "eval"


def ring_ids(reader, scan, points: np.ndarray, beams: int) -> np.ndarray | None:
    """True ring ids where the dataset's files carry them (`load_rings`: nuScenes), else None
    (SemanticKITTI, or ids that cannot be rings of a ``beams``-beam sensor): the corruptions
    then use elevation bins."""
    ring = reader.load_rings(scan)  # (N,) | None
    if ring is None or len(ring) != len(points):
        return None
    valid = ring.min() >= 0 and ring.max() < beams and len(np.unique(ring)) > 1
    return ring if valid else None


def describe_ring_sources(per_scan: list[bool], beams: int) -> str:
    """What gave the beam ids: ``per_scan`` is True where a scan's own ring ids were used."""
    n, rings = len(per_scan), sum(per_scan)
    bins = f"elevation bins ({beams})"
    if rings == n:
        return "ring channel"
    if rings == 0:
        return bins
    return f"ring channel ({rings} of {n} scans), {bins} ({n - rings} of {n} scans)"


def load_baseline(cfg: RobustnessConfig) -> dict | None:
    """The baseline's robustness.json, refused (before any work) unless it holds every
    corruption and severity asked: a CE relative to the baseline and a raw 1 - mIoU are not
    averaged into one mCE."""
    if cfg.baseline is None:
        return None
    path = Path(cfg.baseline)
    try:
        baseline = json.loads(path.read_text())
        held = baseline["corruptions"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a robustness.json ({type(e).__name__}: {e})") from None
    missing = [
        f"{name}@{s}"
        for name in cfg.corruptions
        for s in cfg.severities
        if f"{name}@{s}" not in held
    ]
    if missing:
        raise ValueError(
            f"baseline {path} lacks {', '.join(missing)}: run the baseline with those corruptions "
            "and severities too, or leave --baseline out (CE = 1 - mIoU)"
        )
    # CE divides by the baseline's errors: both must be measured on the same corrupted scans
    saved = baseline.get("config") or {}
    differing = [
        f"{name} ({theirs!r} in the baseline, {ours!r} here)"
        for name, theirs, ours in config_changes(saved, asdict(cfg), only=BASELINE_FIELDS)
    ]
    if saved and differing:
        raise ValueError(
            f"baseline {path} was measured on other scans or corruptions: "
            + ", ".join(differing)
            + "; run both models with the same settings"
        )
    return baseline


BASELINE_FIELDS = (
    "data.dataset", "data.version", "data.val_split", "data.max_val_scans", "beams", "seed",
)  # fmt: skip
"""Settings that define the corrupted val scans: a baseline must share them (load_baseline)."""


def summarise(results: dict[str, dict], clean: float, baseline: dict | None) -> dict:
    """mRR and mCE over the corruption entries ``{"fog@2": {"miou": ...}, ...}``; with a
    baseline, every entry must be in it (`load_baseline`).

    As in Robo3D / ImageNet-C, the CE of a corruption pools its severities before dividing:
    ``CE_i = Σ_l (1 - mIoU_i,l) / Σ_l (1 - mIoU^base_i,l)`` (without a baseline: the mean error
    over the severities); ``mCE`` is the mean of ``CE_i`` over corruptions, not of the per-level
    ratios (each entry's ``ce`` is that one level's ratio)."""
    base = None if baseline is None else baseline["corruptions"]
    errors: dict[str, list[float]] = {}  # corruption -> 1 - mIoU per severity
    base_errors: dict[str, list[float]] = {}
    for key, r in results.items():
        name = key.split("@")[0]
        r["rr"] = r["miou"] / clean if clean > 0 else float("nan")
        errors.setdefault(name, []).append(1 - r["miou"])
        if base is not None:
            base_errors.setdefault(name, []).append(1 - base[key]["miou"])
            r["ce"] = (1 - r["miou"]) / max(1 - base[key]["miou"], 1e-12)
        else:
            r["ce"] = 1 - r["miou"]
    if base is not None:
        ce = {n: sum(e) / max(sum(base_errors[n]), 1e-12) for n, e in errors.items()}
    else:
        ce = {n: float(np.mean(e)) for n, e in errors.items()}
    return {
        "mRR": float(np.mean([r["rr"] for r in results.values()])),
        "mCE": float(np.mean(list(ce.values()))),
        "ce_per_corruption": ce,
        "ce_relative_to_baseline": baseline is not None,
    }


def run_robustness(cfg: RobustnessConfig) -> dict:
    """Run the protocol; writes ``<out>/robustness.json`` and returns its content."""
    baseline = load_baseline(cfg)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.checkpoint, cfg.like, cfg.device, cfg.seed, cfg.data.dataset)
    trained = checkpoint_record(cfg.checkpoint)  # warns on an unfinished run
    reader = open_reader(cfg.data)
    names = list(reader.class_names)
    c = len(names)
    beams = cfg.beams or BEAMS[cfg.data.dataset]
    probe_cfg = LinearProbeConfig(
        checkpoint=cfg.checkpoint, data=cfg.data, out=cfg.out_dir(), probe=cfg.probe,
        points_per_scan=cfg.points_per_scan, device=cfg.device, seed=cfg.seed,
    )  # fmt: skip
    feats, labels = train_features(model, reader, cfg.data.train_scans(reader), probe_cfg)
    head = fit_linear_probe(feats, labels, c, cfg.probe, cfg.device)
    val_scans = cfg.data.val_scans(reader)
    clean_conf = evaluate_head(model, head, reader, val_scans, c, cfg.device)
    keys = [f"{name}@{s}" for name in cfg.corruptions for s in cfg.severities]
    confs = {k: np.zeros((c, c), dtype=np.int64) for k in keys}
    kept = dict.fromkeys(keys, 0)
    total = 0
    from_rings: list[bool] = []  # per val scan: its own ring ids (else elevation bins)
    for i, scan in enumerate(tqdm(val_scans, desc="corrupted val", unit="scan")):
        points, y = reader.load_points(scan), reader.load_labels(scan)
        ring = ring_ids(reader, scan, points, beams)
        from_rings.append(ring is not None)
        total += len(points)
        for name in cfg.corruptions:
            for s in cfg.severities:
                out = corrupt(name, points, s, seed=cfg.seed + i, beam=ring, n_beams=beams)
                key = f"{name}@{s}"
                kept[key] += len(out.index)
                if len(out.index) == 0:  # nothing left to classify: the scan adds nothing to the
                    continue  # confusion matrix (its points are not counted as missed)
                f = scan_features(model, out.points, cfg.device)
                confs[key] += probe_confusion(head, f, y[out.index], c)
    clean = mean_iou(clean_conf)
    results = {
        k: {"miou": mean_iou(confs[k]), "points_kept": kept[k] / max(total, 1),
            "iou": dict(zip(names, map(_none_if_nan, iou_per_class(confs[k])), strict=True))}
        for k in keys
    }  # fmt: skip
    summary = summarise(results, clean, baseline)
    record = {
        "protocol": "robustness",
        **trained,
        "clean_miou": clean,
        "corruptions": results,
        **summary,
        "ring_source": describe_ring_sources(from_rings, beams),
        "config": asdict(cfg),
    }
    write_json_atomic(cfg.out_dir() / "robustness.json", record)
    print(robustness_table(record))
    return record


def _none_if_nan(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def robustness_table(record: dict) -> str:
    """Plain-text summary: one corruption a line."""
    lines = [
        f"robustness: {record['checkpoint']}",
        f"{'corruption':<18} mIoU %   RR     CE    kept",
    ]
    lines.append(f"{'clean':<18} {100 * record['clean_miou']:6.1f}")
    for key, r in record["corruptions"].items():
        lines.append(
            f"{key:<18} {100 * r['miou']:6.1f}  {r['rr']:5.2f}  {r['ce']:5.2f}  {r['points_kept']:5.2f}"
        )
    per = ", ".join(f"{n} {v:.2f}" for n, v in record["ce_per_corruption"].items())
    lines.append(f"CE per corruption (severities pooled): {per}")
    lines.append(f"mRR {record['mRR']:.3f}   mCE {record['mCE']:.3f}"
                 + ("" if record["ce_relative_to_baseline"] else " (no baseline: CE = 1 - mIoU)"))  # fmt: skip
    return "\n".join(lines)
