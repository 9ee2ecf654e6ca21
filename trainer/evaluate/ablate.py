"""Ablations from one cache: a grid of train-config overrides → one train run each → linear probe
and RankMe (val split) of each → one table (Markdown + CSV).

The cache is extracted once and only read: before and after every run the cache folder's files are
fingerprinted (path, size, mtime, and the sha256 of the manifest and unit markers, which hold the
checksums of the arrays) and compared; the teacher module must never have been imported. Either
check failing stops the ablation with an error.

Re-running reuses what a run folder holds only when it was made with the same settings: the
training config recorded in ``config.yaml`` (every field that changes the trajectory, and the
cache digest), the probe's and RankMe's recorded configs. A folder made with other settings is
refused before anything runs, naming the folder and the differing keys (one-valued axes are not
in the run names, so ``epochs=2`` then ``epochs=12`` name the same folders).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    RESUMABLE_CHANGES,
    SUMMARY,
    config_changes,
    read_run_record,
)

FORBIDDEN_MODULES = ("pipeline.teacher", "pipeline.extract")


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``["head=linear,mlp", "occupancy_weight=0,1"]`` → ``{"head": ["linear", "mlp"], ...}``."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values:
            raise ValueError(f"grid axis {spec!r}: expected key=value1,value2,...")
        if key in grid:
            raise ValueError(f"grid axis {key!r} given twice")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def grid_runs(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Cartesian product of the axes, in the order given (last axis varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def run_name(overrides: dict[str, str], grid: dict[str, list[str]]) -> str:
    """Folder-safe name from the axes that vary (one-valued axes are fixed settings)."""
    varying = [k for k in overrides if len(grid[k]) > 1] or list(overrides)
    name = "_".join(f"{k.split('.')[-1]}={overrides[k]}" for k in varying)
    return "".join(c if c.isalnum() or c in "=._-" else "-" for c in name) or "run"


def _coerce(text: str, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _coerce(text, args[0], key)
    if origin is typing.Literal:
        if text not in typing.get_args(hint):
            raise ValueError(f"{key}={text}: expected one of {typing.get_args(hint)}")
        return text
    if origin is tuple:
        return tuple(_coerce(t, typing.get_args(hint)[0], key) for t in text.split("x"))
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key}={text}: expected true or false")
        return text.lower() in ("true", "1", "yes")
    if hint in (int, float, str, Path):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"{key}={text}: expected {hint.__name__}") from None
    return text


def apply_overrides(cfg: Any, overrides: dict[str, str]) -> Any:
    """A copy of dataclass ``cfg`` with ``key=value`` strings applied (dotted keys reach nested
    dataclasses), each value converted to the field's annotated type."""
    for key, text in overrides.items():
        cfg = _replace_path(cfg, key.split("."), text, key)
    return cfg


def _replace_path(obj: Any, path: list[str], text: str, key: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"{key}: {type(obj).__name__} has no fields")
    hints = typing.get_type_hints(type(obj))
    name = path[0]
    if name not in hints or name not in {f.name for f in dataclasses.fields(obj)}:
        fields = ", ".join(f.name for f in dataclasses.fields(obj))
        raise ValueError(f"unknown setting {key!r} (fields of {type(obj).__name__}: {fields})")
    if len(path) == 1:
        value = _coerce(text, hints[name], key)
    else:
        value = _replace_path(getattr(obj, name), path[1:], text, key)
    return dataclasses.replace(obj, **{name: value})


def cache_fingerprint(path: str | Path) -> dict[str, tuple]:
    """relative path → (size, mtime_ns[, sha256]) of every file under the cache folder; the
    small bookkeeping files (manifest, markers) are also hashed."""
    root = Path(path)
    out: dict[str, tuple] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            st = p.stat()
            entry: tuple = (st.st_size, st.st_mtime_ns)
            if p.suffix in (".json", ".done") or f == "COMPLETE":
                entry += (hashlib.sha256(p.read_bytes()).hexdigest(),)
            out[str(p.relative_to(root))] = entry
    if not out:
        raise FileNotFoundError(f"{root}: no cache files found")
    return out


def check_cache_untouched(
    before: dict[str, tuple], path: str | Path, run: str, preloaded: frozenset[str] = frozenset()
) -> None:
    """Raise if any cache file was added, removed or changed, or a teacher/extraction module was
    imported (``preloaded``: those already imported before the ablation started, e.g. by an
    embedding program; the CLI starts with none)."""
    after = cache_fingerprint(path)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        raise RuntimeError(
            f"ablation run {run!r} modified cache {path}: {', '.join(changed[:5])}"
            + (" ..." if len(changed) > 5 else "")
        )
    imported = [m for m in FORBIDDEN_MODULES if m in sys.modules and m not in preloaded]
    if imported:
        raise RuntimeError(f"ablation run {run!r} imported {imported}: training must not extract")


def write_tables(
    out: Path, rows: list[dict[str, Any]], class_names: list[str]
) -> tuple[Path, Path]:
    """``results.md`` (run, settings, mIoU) and ``results.csv`` (also per-class IoU), atomically."""
    keys = [k for k in rows[0] if k not in ("run", "miou", "iou", "run_dir")]
    md = ["| run | " + " | ".join(keys) + " | mIoU % |", "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        md.append(
            f"| {r['run']} | " + " | ".join(str(r[k]) for k in keys) + f" | {100 * r['miou']:.1f} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / "results.md", out / "results.csv"
    tmp = md_path.with_name(f".results.md.tmp-{os.getpid()}")
    tmp.write_text("\n".join(md) + "\n")
    tmp.replace(md_path)
    tmp = csv_path.with_name(f".results.csv.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run", *keys, "miou", *[f"iou_{n}" for n in class_names]])
        for r in rows:
            ious = [r["iou"].get(n) for n in class_names]
            writer.writerow([r["run"], *[r[k] for k in keys], r["miou"],
                             *["" if v is None or np.isnan(v) else v for v in ious]])  # fmt: skip
    tmp.replace(csv_path)
    return md_path, csv_path


def last_epoch_distill(run_dir: Path) -> float:
    """Mean distillation (cosine) loss of the run's last epoch, from its metrics.jsonl: comparable
    across runs of any occupancy weight, where the total loss (final_loss: one batch, distill +
    weight x occupancy) is not."""
    lines = [json.loads(t) for t in (run_dir / METRICS).read_text().splitlines() if t]
    last = max(line["epoch"] for line in lines)
    return float(np.mean([line["distill"] for line in lines if line["epoch"] > last - 1]))


PROBE_FREE_KEYS = ("checkpoint", "device", "out")  # where and on what it ran, not what it did


def differing_keys(saved: dict[str, Any], wanted: dict[str, Any], ignore: tuple = ()) -> list[str]:
    """``"key (saved -> wanted)"`` for every (dotted) key whose values differ, ``ignore`` left out
    (a top-level key ignores its nested keys too)."""
    return [f"{k} ({a!r} -> {b!r})" for k, a, b in config_changes(saved, wanted, ignore=ignore)]


def stale_results(
    run_dir: Path, train_cfg: Any, digest: str, probe_cfg: Any, rankme_cfg: Any
) -> list[str]:
    """What in ``run_dir`` was made with other settings than asked now, one line per file:
    ``config.yaml`` (training config fields other than ``RESUMABLE_CHANGES``, cache digest),
    ``eval/linear_probe.json`` and ``eval/rankme.json`` (their recorded configs). [] when the
    folder is new or everything in it matches."""
    found = []
    config_path = run_dir / CONFIG
    if config_path.is_file():
        record = read_run_record(run_dir)
        diff = differing_keys(record.get("config", {}), train_cfg.to_dict(), RESUMABLE_CHANGES)
        if record.get("cache", {}).get("digest") != digest:
            diff.append(f"cache digest ({record.get('cache', {}).get('digest')!r} -> {digest!r})")
        if diff:
            found.append(f"{config_path} (training): " + ", ".join(diff))
    for name, cfg in (("linear_probe.json", probe_cfg), ("rankme.json", rankme_cfg)):
        path = run_dir / "eval" / name
        if path.is_file():
            saved = json.loads(path.read_text()).get("config", {})
            diff = differing_keys(saved, dataclasses.asdict(cfg), PROBE_FREE_KEYS)
            if diff:
                found.append(f"{path}: " + ", ".join(diff))
    return found


@dataclass(frozen=True)
class AblateConfig:
    """An ablation grid over one cache."""

    cache: Path
    """Cache directory (extracted once; only read)."""
    data: Path
    """Dataset root (points and labels for training and the probe)."""
    out: Path
    """Output folder: one run folder per grid point, results.md, results.csv."""
    grid: tuple[str, ...]
    """Axes "key=v1,v2"; a one-valued axis is a fixed setting of every run."""
    version: str | None = None
    """nuScenes version folder."""
    probe_steps: int = 1000
    """AdamW steps of each run's linear probe."""
    max_train_scans: int | None = None
    """Probe: at most this many training scans."""
    max_val_scans: int | None = None
    """Probe: at most this many val scans."""
    device: str = "cpu"
    """torch device."""

    def __post_init__(self) -> None:
        if not self.grid:
            raise ValueError("ablate needs at least one grid axis (key=v1,v2)")
        parse_grid(list(self.grid))


def run_ablation(cfg: AblateConfig) -> list[dict[str, Any]]:
    """Train + linear-probe every grid point; writes results.md / results.csv, returns the rows.

    Re-running the same command reuses what each run folder holds: a finished training
    (``summary.json``) is not redone, an interrupted one (checkpoint, no summary) is resumed, and
    the probe and RankMe run where their results are missing. Folders made with other settings
    are refused first (``stale_results``): nothing is overwritten or mixed into the table.
    """
    from cache.reader import open_cache
    from cache.store import resolve_cache
    from trainer.config import load_config
    from trainer.evaluate.backbone import EvalData
    from trainer.evaluate.linear_probe import LinearProbeConfig, run_linear_probe
    from trainer.evaluate.probe import ProbeConfig
    from trainer.evaluate.rankme import RankMeConfig, run_rankme
    from trainer.loop import train

    grid = parse_grid(list(cfg.grid))
    runs = grid_runs(grid)
    names = [run_name(r, grid) for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"grid gives duplicate run names: {names}")
    cache_path = resolve_cache(cfg.cache)
    before = cache_fingerprint(cache_path)
    preloaded = frozenset(m for m in FORBIDDEN_MODULES if m in sys.modules)
    base = load_config(None, cache=cache_path, data=cfg.data, out=cfg.out, version=cfg.version)
    base = dataclasses.replace(base, device=cfg.device)
    configs = [apply_overrides(dataclasses.replace(base, out=cfg.out / n), r) for n, r in zip(names, runs, strict=True)]  # fmt: skip
    probe_data = EvalData(
        root=cfg.data, version=cfg.version, max_train_scans=cfg.max_train_scans,
        max_val_scans=cfg.max_val_scans,
    )  # fmt: skip

    def probe_config(run_dir: Path) -> LinearProbeConfig:
        return LinearProbeConfig(
            checkpoint=str(run_dir), data=probe_data, probe=ProbeConfig(steps=cfg.probe_steps),
            device=cfg.device,
        )  # fmt: skip

    def rankme_config(run_dir: Path) -> RankMeConfig:
        data = EvalData(root=cfg.data, version=cfg.version)
        return RankMeConfig(checkpoint=str(run_dir), data=data, device=cfg.device)

    digest = open_cache(cache_path).key.digest()
    stale = [
        line
        for c in configs
        for line in stale_results(c.out, c, digest, probe_config(c.out), rankme_config(c.out))
    ]
    if stale:
        raise ValueError(
            f"{cfg.out} holds results made with other settings than asked now (saved -> asked):\n  "
            + "\n  ".join(stale)
            + "\nNothing was run. Use another --out, or delete those run folders (only the named"
            " eval/*.json file when only the probe or RankMe settings changed) to redo them."
        )
    rows: list[dict[str, Any]] = []
    class_names: list[str] = []
    for i, (name, overrides, train_cfg) in enumerate(zip(names, runs, configs, strict=True)):
        print(f"[ablate {i + 1}/{len(runs)}] {name}")
        run_dir = train_cfg.out
        probe_path = run_dir / "eval" / "linear_probe.json"
        summary_path = run_dir / SUMMARY
        if not summary_path.is_file():  # new, or interrupted during training: resume it
            resume = (run_dir / CHECKPOINT).is_file()
            train(dataclasses.replace(train_cfg, resume=resume))
            check_cache_untouched(before, cache_path, name, preloaded)
        if not probe_path.is_file():  # new, or interrupted during the probe
            run_linear_probe(probe_config(run_dir))
            check_cache_untouched(before, cache_path, name, preloaded)
        rankme_path = run_dir / "eval" / "rankme.json"
        if not rankme_path.is_file():
            run_rankme(rankme_config(run_dir))
            check_cache_untouched(before, cache_path, name, preloaded)
        probe = json.loads(probe_path.read_text())
        summary = json.loads(summary_path.read_text())
        class_names = list(probe["iou"])
        rows.append({
            "run": name, **overrides, "final_loss": round(summary["final_loss"], 5),
            "distill_last_epoch": round(last_epoch_distill(run_dir), 5),
            "steps": summary["steps"],
            "rankme": round(json.loads(rankme_path.read_text())["student"], 2),
            "miou": probe["miou"], "iou": probe["iou"],
            "run_dir": str(run_dir),
        })  # fmt: skip
    md_path, _ = write_tables(cfg.out, rows, class_names)
    print(md_path.read_text())
    return rows
