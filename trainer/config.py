"""The training run's configuration: one frozen dataclass, one docstring per field.

`python cli.py train` builds it from (lowest to highest priority) the field defaults, a YAML file
(`--config`, keys exactly the field names) and the command-line options. The resolved config is
saved to RUN_DIR/config.yaml under the key ``config``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

BACKBONES = ("minkunet34", "tiny")
HEADS = ("mlp", "linear")


# The files of a run folder (TrainConfig.out), by name: written by trainer/loop.py, read by
# resume, evaluation and ablate.
CHECKPOINT = "checkpoint.pt"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (besides the cache contents)."""

    # ---- data ----
    cache: Path
    """Cache folder (ROOT/<digest>) or a cache root holding exactly one cache."""
    data: Path
    """nuScenes root the cache was extracted from: its fingerprint must match the cache key."""
    out: Path
    """Run folder: config.yaml, metrics.jsonl, checkpoint.pt, summary.json (when finished)."""
    version: str | None = None
    """nuScenes version folder (v1.0-trainval, v1.0-mini, ...); None = the only one present."""
    split: str = "train"
    """Split to train on; must equal the cache key's split."""
    verify_cache: bool = False
    """Recompute every checksum of the cache before the first step (reads the whole cache);
    without it only the cheap structural check runs (each unit's marker and files, by size)."""
    skip_bad_scans: bool = False
    """Train on the scans of the units that pass the check (skipped scans are counted and
    reported) instead of refusing a cache that fails it."""

    # ---- student ----
    backbone: str = "minkunet34"
    """"minkunet34" (full width, MinkUNet34C planes/depths) or "tiny" (tests, CPU demos)."""
    voxel_size: float = 0.1
    """Voxel edge of the sparse-conv input, metres."""
    head: str = "mlp"
    """Projection head to the teacher dimension: "mlp" (3 Linear + LayerNorm + GELU) or "linear"."""
    head_hidden: int = 512
    """Hidden width of the MLP head."""

    # ---- occupancy (auxiliary) ----
    occupancy_weight: float = 0.5
    """Weight W of the occupancy loss in total = distill + W * occupancy; 0 disables it (no
    masking, no decoder)."""
    occupancy_stride: int = 8
    """Coarse cell edge in voxels (2, 4 or 8: a decoder stride): 8 x 0.1 m = 0.8 m cells."""
    occupancy_range: float = 32.0
    """Cells with |x| or |y| beyond this (metres, lidar frame) get no occupancy target."""
    occupancy_z: tuple[float, float] = (-4.0, 4.0)
    """z range (metres, lidar frame) of cells that get an occupancy target."""
    mask_block: int = 2
    """Edge of a masked block, in coarse cells (2 x 0.8 m = 1.6 m blocks)."""
    mask_ratio: float = 0.3
    """Share of the occupied blocks whose points are dropped from the student input."""
    rays_per_scan: int = 4096
    """LiDAR rays traced per scan for free-space (negative) cells."""

    # ---- augmentation ----
    augment: bool = True
    """Random z-rotation, x/y flips and scaling of each scan (targets are per point: they follow)."""
    scale_range: tuple[float, float] = (0.95, 1.05)
    """Uniform range of the random isotropic scale factor."""

    # ---- optimisation ----
    epochs: int = 50
    """Passes over the cache's scans."""
    batch_size: int = 4
    """Scans per step and process."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup: float = 0.05
    """Share of the steps with a linear warm-up from 0 to ``lr``; a cosine decay follows."""
    min_lr_ratio: float = 0.01
    """Final learning rate as a share of ``lr``."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping)."""
    amp: bool = True
    """Mixed precision (bfloat16 autocast) when the device is CUDA; ignored on CPU."""

    # ---- runtime ----
    workers: int = 2
    """DataLoader worker processes (0 = load in the main process)."""
    seed: int = 0
    """Seed of the initialisation, the epoch permutations and the augmentations."""
    device: str = "cpu"
    """torch device: "cpu" or "cuda" (under torchrun: cuda:LOCAL_RANK)."""
    threads: int = 0
    """torch CPU threads (0 = torch's default). Results are bit-reproducible (resume, reruns)
    for a fixed thread count."""
    kernel_map_threads: int = 1
    """Threads ME builds its kernel maps with (0 = ME's default: all cores). 1 was the fastest
    on the 2-core VM (a tiny-backbone step 5.5 s with 1, 10 s with 2, under load) and makes the summation order fixed.
    ME sets it process-wide through OpenMP, so torch's CPU ops then use it too (docs/training.md)."""
    log_every: int = 1
    """Write a metrics line every this many steps."""
    checkpoint_every: int = 500
    """Write RUN_DIR/checkpoint.pt every this many steps (and at the end)."""
    resume: bool = False
    """Continue from RUN_DIR/checkpoint.pt (same config required)."""
    progress: bool = True
    """Show the tqdm bar (rank 0)."""

    def __post_init__(self) -> None:
        for name in ("cache", "data", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        for name in ("occupancy_z", "scale_range"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"{name} must be two numbers (low, high), got {value}")
            object.__setattr__(self, name, value)
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.occupancy_stride not in (2, 4, 8):
            raise ValueError(f"occupancy_stride must be 2, 4 or 8, got {self.occupancy_stride}")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        positive = ("voxel_size", "epochs", "batch_size", "lr", "head_hidden", "mask_block")
        for name in positive + ("log_every", "checkpoint_every", "rays_per_scan"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "occupancy_weight",
            "weight_decay",
            "grad_clip",
            "workers",
            "warmup",
            "threads",
            "kernel_map_threads",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-able dict (paths as strings, tuples as lists)."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
            elif isinstance(v, tuple):
                d[k] = list(v)
        return d


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# Fields that may differ between a run and its resumption (they do not change the trajectory).
RESUMABLE_CHANGES = (
    "resume",
    "verify_cache",
    "workers",
    "threads",
    "kernel_map_threads",
    "progress",
    "log_every",
    "checkpoint_every",
    "device",
    "cache",
    "data",
    "out",
)


ABSENT = "<absent>"
"""The value `config_changes` gives a key that one side lacks."""


def config_changes(
    saved: dict[str, Any],
    wanted: dict[str, Any],
    only: tuple[str, ...] | None = None,
    ignore: tuple[str, ...] = (),
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, wanted value)`` for every key whose values differ, compared in
    their JSON form (paths as strings, tuples as lists; nested dicts by dotted key, e.g.
    ``data.dataset``). ``only``: the keys compared (default: every key of either side);
    ``ignore``: top-level keys left out. A key one side lacks has the value `ABSENT`.

    The one rule for "was this made with the settings asked now?": resume (`trainer.loop`),
    ablate's stale folders and robustness baselines use it."""
    saved, wanted = _flat(_plain(saved)), _flat(_plain(wanted))
    keys = only if only is not None else tuple(dict.fromkeys([*saved, *wanted]))
    return [
        (k, saved.get(k, ABSENT), wanted.get(k, ABSENT))
        for k in keys
        if k.split(".")[0] not in ignore and saved.get(k, ABSENT) != wanted.get(k, ABSENT)
    ]


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a number (YAML 1.2; PyYAML's YAML 1.1 rules want
    a dot, ``1.0e-3``, and make ``1e-3`` the string "1e-3")."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in ``path`` (``1e-3`` read as a number); ValueError on one line naming
    the file, ``what`` it should hold and the problem (a syntax error: its line and column)."""
    try:
        text = path.read_text()
    except OSError as e:  # missing, a folder, no permission
        raise ValueError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: cannot read the {what}: not text ({e})") from None
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = " ".join(str(e).split())  # PyYAML's message spans lines, with the source
        if mark is not None:
            context = getattr(e, "context", None)
            problem = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}" + (
                f" ({context})" if context else ""
            )
        raise ValueError(f"{path}: not valid YAML, cannot read the {what} ({problem})") from None


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """RUN_DIR/config.yaml as trainer/loop.py wrote it (``config``: the TrainConfig fields,
    ``cache``, ``steps``, ...). FileNotFoundError when the folder has none; ValueError naming
    the file when it is unreadable or not such a record."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a training run folder (no {CONFIG})")
    record = read_yaml(path, "run's config")
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ValueError(f"{path}: not a training run's config (no `config:` mapping)")
    return record


def _typed(name: str, value: Any, source: str) -> Any:
    """``value`` checked against field ``name``'s annotation (an int is a valid float and is
    converted); a wrong type is refused naming the field and ``source``."""
    hint = typing.get_type_hints(TrainConfig)[name]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if hint is bool:
        ok, what = isinstance(value, bool), "true or false"
    elif hint is int:
        ok, what = number and isinstance(value, int), "an integer"
    elif hint is float:
        ok, what = number, "a number"
        value = float(value) if ok else value
    elif hint is Path:
        ok, what = isinstance(value, str | Path), "a path"
    elif hint is str:
        ok, what = isinstance(value, str), "a string"
    elif hint == str | None:
        ok, what = value is None or isinstance(value, str), "a string or null"
    elif hint == tuple[float, float]:  # the length and order are checked by TrainConfig
        ok, what = isinstance(value, list | tuple), "a list of two numbers"
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    else:  # a new field type needs its check here
        raise TypeError(f"TrainConfig.{name}: no check for values of type {hint}")
    if not ok:
        raise ValueError(f"{source}: {name} must be {what}, got {value!r}")
    return value


def load_config(yaml_path: Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < YAML file < ``overrides`` (None = not given). The YAML holds the field names, or
    is a run's own ``config.yaml`` (its ``config:`` block is used: rerun or resume a run as it
    was)."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        yaml_path = Path(yaml_path)
        loaded = read_yaml(yaml_path, "config") or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of config fields")
        if isinstance(loaded.get("config"), dict) and "config" not in FIELDS:
            # a run folder's config.yaml: the config it ran with; its `resume` says how that run
            # was last started (true once resumed), not a setting: --resume decides
            loaded = {k: v for k, v in loaded["config"].items() if k != "resume"}
        unknown = sorted(set(loaded) - set(FIELDS))
        if unknown:
            raise ValueError(
                f"{yaml_path}: unknown config key(s) {unknown}; known: {', '.join(FIELDS)}"
            )
        values.update({k: _typed(k, v, str(yaml_path)) for k, v in loaded.items()})
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}")
    values.update({k: _typed(k, v, "option") for k, v in overrides.items() if v is not None})
    missing = [n for n in ("cache", "data", "out") if n not in values]
    if missing:
        raise ValueError(f"config needs {missing} (from --config or the command line)")
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ValueError(f"bad config: {e}") from e
