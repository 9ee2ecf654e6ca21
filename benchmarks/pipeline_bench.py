"""End-to-end benchmarks of issue 9, each printed as a table of RATIOS measured in one run.

    python cli.py bench extraction --data DATA --teacher DIR [--image-size 448x896]
    python cli.py bench online     --data DATA --teacher DIR [--image-size 224x448]
    python cli.py bench loader     --data DATA --teacher DIR
    python cli.py bench size       [--dim 384]
    python cli.py bench scaling    --data DATA --teacher DIR
    python cli.py bench feed       --data DATA --teacher DIR [--gpu-rate 200 --workers 4]

- extraction: `extract-teacher` images/s ÷ bare teacher forward images/s (same model, image size,
  batch, device, threads), plus a time breakdown of one process doing the same work piece by piece
  (image decode, resize, teacher, pairing, sampling, write) with the pipeline's own functions.
- online: training scans/s reading targets from the cache ÷ training scans/s computing them
  online each step (load the 6 images, teacher, pairing, sampling, then the same student step).
- loader: data-wait share of real `train()` runs (summary.json), and cache random scan reads ÷
  raw `.npy` memmap reads of the same rows (same arrays, same random scans).
- size: stored bytes per point and per paired point, compression ratio (cache_layout.measure),
  and per target format (point-f16, point-i8, grid-f16 at --image-size) bytes per paired point.
- scaling: extraction images/s with 2 LocalCluster workers ÷ 1 worker, and --workers ÷ 1 when
  more than 2 (each worker as --processes / --threads-per-worker make it).
- feed: extraction images/s with a stand-in GPU teacher (sleeps, no CPU) ÷ its rate, and with
  a free stand-in: can this machine's CPU side keep a GPU of --gpu-rate images/s busy?

``--replicate K`` runs extraction / feed on K copies of the set (benchmarks/replicate.py): a
GPU needs thousands of images for a steady-state rate, a synthetic set has a few hundred.

Every benchmark returns rows of (name, value, unit) and prints them; ratios are what to compare
between machines (the absolute rates depend on the load of a shared machine).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.teacher import Teacher

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

WHATS = ("extraction", "online", "loader", "size", "scaling", "feed")


@dataclass(frozen=True)
class BenchConfig:
    """Inputs shared by the benchmarks (each uses the fields it needs)."""

    data: Path | None = None
    """Synthetic (or real) nuScenes root."""
    split: str = "all"
    """Split extracted (and trained on by `loader`)."""
    teacher: str = ""
    """DINOv2 folder or HF id (a RANDOM one from `make-teacher` is fine: timing only)."""
    image_size: tuple[int, int] = (448, 896)
    """(H, W) fed to the teacher."""
    batch_size: int = 6
    """Images per teacher forward."""
    scans: int = 4
    """Scans used (the first ones of the split)."""
    steps: int = 4
    """Timed training steps (online / loader); one more untimed warm-up step."""
    backbone: str = "tiny"
    """Student backbone for the training comparisons."""
    dim: int = 384
    """Feature dim for `size` and the `.npy` read comparison (384 = ViT-S/14, 768 = ViT-B/14)."""
    points_per_scan: int = 34_700
    """Points per synthetic scan of `size` / the read comparison (nuScenes sweep)."""
    reads: int = 40
    """Random scan reads per reader."""
    threads: int = 2
    """torch threads (the bare forward and the single-process runs)."""
    device: str = "cpu"
    """Teacher device of `extraction` (bare forward and extract-teacher alike): cpu or cuda."""
    dtype: str = "float32"
    """Teacher autocast dtype of `extraction` (float16 needs CUDA)."""
    workers: int = 2
    """extract-teacher LocalCluster workers in `extraction` and `feed` (a GPU wants several);
    `scaling` compares 1, 2 and this many."""
    processes: bool = False
    """extract-teacher workers are processes (`extraction`, `feed`, `scaling`)."""
    threads_per_worker: int = 1
    """Units each extract-teacher worker runs at once (`extraction`, `feed`, `scaling`)."""
    replicate: int = 1
    """`extraction` and `feed` run extract-teacher on K copies of the split's scenes (same
    files, new tokens: benchmarks/replicate.py): long runs for steady-state rates on a GPU."""
    gpu_rate: float = 200.0
    """`feed`: images/s of the stand-in GPU teacher (H100, ViT-S/14 float16, 448x896: ~206)."""
    image_decode: str = "auto"
    """extract-teacher's image decoding in `extraction` and `feed`: auto, cpu or device."""
    target_format: str = "point-f16"
    """extract-teacher's target format in `extraction` and `feed` (bytes per image differ 2x)."""
    workdir: Path | None = None
    """Scratch folder (None: a temp dir, removed at the end)."""


Row = tuple[str, float, str]


def print_table(title: str, rows: list[Row]) -> None:
    """Print rows as `name | value | unit` (the format tests/test_bench.py checks)."""
    print(f"## {title}")
    print(f"{'measure':52s} | {'value':>12s} | unit")
    for name, value, unit in rows:
        print(f"{name:52s} | {value:12.4g} | {unit}")


def _scans(cfg: BenchConfig):
    from pipeline.datasets.nuscenes import NuScenesReader

    reader = NuScenesReader(cfg.data)
    return reader, reader.scans(cfg.split)[: cfg.scans]


def _extract(
    cfg: BenchConfig,
    cache_root: Path,
    workers: int,
    scans_per_unit: int,
    data: tuple[Path, str] | None = None,
    processes: bool = False,
    threads_per_worker: int = 1,
):
    from pipeline.extract import ExtractConfig, extract_teacher

    root, split = data or (cfg.data, cfg.split)
    return extract_teacher(
        ExtractConfig(
            data=root,
            cache_root=cache_root,
            teacher=cfg.teacher,
            split=split,
            image_size=cfg.image_size,
            n_workers=workers,
            processes=processes,
            threads_per_worker=threads_per_worker,
            batch_size=cfg.batch_size,
            scans_per_unit=scans_per_unit,
            device=cfg.device,
            dtype=cfg.dtype,
            image_decode=cfg.image_decode,
            target_format=cfg.target_format,
            progress=False,
        )
    )


def _run_data(cfg: BenchConfig, work: Path) -> tuple[Path, str]:
    """(root, split) extract-teacher runs on: ``cfg.data`` and ``cfg.split``, or a set of
    ``cfg.replicate`` copies of that split's scenes and its split "all"."""
    if cfg.replicate <= 1:
        return cfg.data, cfg.split
    from replicate import replicate

    from pipeline.datasets.nuscenes import NuScenesReader

    scenes = NuScenesReader(cfg.data).scene_names(cfg.split)
    out = work / f"replicated-x{cfg.replicate}"
    replicate(cfg.data, out, cfg.replicate, scenes=scenes)
    return out, "all"


def _run_scans_per_unit(cfg: BenchConfig) -> int:
    """Scans per unit of the extract-teacher runs on `_run_data`: one, or two with --replicate
    (the run is long anyway, and a GPU wants fewer, larger tasks)."""
    return 1 if cfg.replicate <= 1 else 2


def _workers_label(workers: int, processes: bool, threads_per_worker: int) -> str:
    kind = "process" if processes else "thread"
    per = f" x {threads_per_worker} threads" if threads_per_worker > 1 else ""
    return f"{workers} {kind} workers{per}"


def _shares(seconds: dict[str, float]) -> dict[str, float]:
    """Each value's share of their sum (0 for all when the sum is 0)."""
    total = sum(seconds.values())
    return {k: v / total if total > 0 else 0.0 for k, v in seconds.items()}


# ---------------------------------------------------------------- 1. extraction efficiency ----
def _bare_rate(teacher: Teacher, images: np.ndarray, cfg: BenchConfig) -> float:
    """The teacher's own images/s (`teacher_forward.images_per_second`, forward only). On a GPU
    the best of 3 trials of >= 1 s each: a ViT-S/14 batch takes ~8 ms there, and single 0.4-s
    trials of it ranged 455-740 images/s on one H200 (2026-11-27, launch-bound: any other load
    on the CPU shows); on a CPU one trial of the run's images (seconds per batch)."""
    from teacher_forward import images_per_second

    if cfg.device == "cpu":
        repeats = max(1, cfg.scans * 6 // cfg.batch_size)
        return images_per_second(teacher, images, repeats, forward_only=True)[0]
    probe, _ = images_per_second(teacher, images, 20, forward_only=True)
    repeats = max(20, math.ceil(probe / len(images)))  # ~1 s a trial
    return max(images_per_second(teacher, images, repeats, forward_only=True)[0] for _ in range(3))


def _fixed_seconds(compute_s: float, images: int, steady_images_per_s: float) -> float:
    """Seconds of a run not explained by its steady rate: the ramp-up (every unit starts at
    once, the GPU waits for the first decodes) and the tail (the last units finish one by one).
    Fixed per run, so a run of N images reaches N / (N / steady + fixed) images/s."""
    if steady_images_per_s <= 0:
        return 0.0
    return max(0.0, compute_s - images / steady_images_per_s)


def extraction(cfg: BenchConfig, work: Path) -> list[Row]:
    """extract-teacher images/s ÷ bare forward images/s, and where one process spends its time."""
    from machine_load import LoadSampler

    from cache.sampling import sample_features
    from cache.schema import CacheKey, UnitData
    from cache.store import CacheWriter
    from pipeline.pairing import PairingConfig, pair_points
    from pipeline.teacher import Teacher, TeacherConfig, patch_tokens

    torch.set_num_threads(cfg.threads)
    reader, scans = _scans(cfg)
    teacher = Teacher(
        TeacherConfig(cfg.teacher, cfg.image_size, device=cfg.device, dtype=cfg.dtype)
    )
    cam0 = scans[0].cameras[0]
    images = np.random.default_rng(0).integers(
        0, 256, (cfg.batch_size, cam0.height, cam0.width, 3), dtype=np.uint8
    )
    # the denominator: the teacher alone (input already resized, grid left on the device)
    bare_before = _bare_rate(teacher, images, cfg)

    # the real extract-teacher (default: 2 thread workers x 1 torch thread)
    label = _workers_label(cfg.workers, cfg.processes, cfg.threads_per_worker)
    data = _run_data(cfg, work)
    with LoadSampler() as load:  # which resource bounds the run: CPU, disk or GPU
        summary = _extract(
            cfg,
            work / "cache-extract",
            workers=cfg.workers,
            scans_per_unit=_run_scans_per_unit(cfg),
            data=data,
            processes=cfg.processes,
            threads_per_worker=cfg.threads_per_worker,
        )
    torch.set_num_threads(cfg.threads)
    # bare again after it, once the cache's pages are on disk (the kernel's write-back of the
    # run's last seconds would otherwise compete with it); the ratio divides by the better of
    # the two: a slow moment of the machine during a measurement cannot raise the ratio
    os.sync()
    bare_after = _bare_rate(teacher, images, cfg)
    bare = max(bare_before, bare_after)

    # the same work in one process, piece by piece, with the pipeline's functions
    t = dict.fromkeys(("decode", "resize", "teacher", "pairing", "sampling", "write"), 0.0)
    pairing_cfg = PairingConfig()
    writer = CacheWriter.create(
        work / "cache-breakdown",
        CacheKey("bench", cfg.split, cfg.teacher, "", cfg.image_size, "last", "{}"),
        [[s.token for s in scans]],
        teacher.feature_dim,
        {},
    )
    points, labels, pairings, targets = [], [], [], []
    for scan in scans:
        t0 = time.perf_counter()
        xyzi = reader.load_points(scan)  # (N, 4)
        labels.append(reader.load_labels(scan))
        pairings.append(pair_points(xyzi[:, :3], scan, pairing_cfg))
        t["pairing"] += time.perf_counter() - t0
        points.append(xyzi)
        targets.append(np.zeros((len(xyzi), teacher.feature_dim), np.float16))  # (N, D)
    views = [(j, c) for j, s in enumerate(scans) for c in range(len(s.cameras))]
    with torch.inference_mode():
        for start in range(0, len(views), cfg.batch_size):
            batch = views[start : start + cfg.batch_size]
            t0 = time.perf_counter()
            imgs = [reader.load_image(scans[j].cameras[c]) for j, c in batch]  # (H0, W0, 3)
            t1 = time.perf_counter()
            pixels = teacher.preprocess(imgs)  # (B, 3, H, W)
            t2 = time.perf_counter()
            tokens = teacher.model(pixel_values=pixels).last_hidden_state  # (B, T, D)
            grids = patch_tokens(tokens, teacher.num_register_tokens, teacher.grid_size).cpu()
            t3 = time.perf_counter()
            for k, (j, c) in enumerate(batch):
                mask = pairings[j].camera == c  # (N_j,)
                if mask.any():
                    f = sample_features(grids[k], pairings[j].uv[mask], imgs[k].shape[:2])
                    targets[j][mask] = f.half().numpy()
            t4 = time.perf_counter()
            t["decode"] += t1 - t0
            t["resize"] += t2 - t1
            t["teacher"] += t3 - t2
            t["sampling"] += t4 - t3
    t0 = time.perf_counter()
    write_steps: dict[str, float] = {}
    writer.write_unit(
        0,
        UnitData(
            tokens=[s.token for s in scans],
            lidar_paths=[s.lidar_path for s in scans],
            points=points,
            target=targets,
            camera=[p.camera for p in pairings],
            uv=[p.uv for p in pairings],
            label=labels,
        ),
        timings=write_steps,
    )
    t["write"] = time.perf_counter() - t0
    total = sum(t.values())
    n_img = len(views)
    paired = sum(int((p.camera >= 0).sum()) for p in pairings) / sum(len(p) for p in points)
    rows: list[Row] = [
        ("bare teacher forward, before extract", bare_before, "images/s"),
        ("bare teacher forward, after extract", bare_after, "images/s"),
        ("bare teacher forward (resized input), best of both", bare, "images/s"),
        (f"extract-teacher ({label})", summary.images_per_s, "images/s"),
        ("extract-teacher images", summary.images, "images"),
        (
            "extract-teacher MB written per image",
            summary.bytes_written / max(1, summary.images) / 1e6,
            "MB",
        ),
        (
            "extract-teacher write rate (the disk must sustain it)",
            summary.bytes_written / max(summary.compute_s, 1e-9) / 1e6,
            "MB/s",
        ),
        ("extract-teacher start-up (not in images/s)", max(summary.startup_s, 1e-3), "s"),
        ("RATIO extract / bare", summary.images_per_s / bare, "ratio"),
        (
            "extract-teacher steady state (10-90 % of units)",
            summary.steady_images_per_s,
            "images/s",
        ),
        ("RATIO steady state / bare", summary.steady_images_per_s / bare, "ratio"),
        (
            "extract-teacher ramp-up + tail (fixed per run: compute s - images / steady rate)",
            _fixed_seconds(summary.compute_s, summary.images, summary.steady_images_per_s),
            "s",
        ),
        *[
            (f"extract-teacher worker time: {name.removesuffix('_s')}", share, "fraction")
            for name, share in _shares(summary.step_s).items()
        ],
        *[(f"during extract-teacher: {n}", v, u) for n, v, u in load.rows(*summary.compute_window)],
        ("single process, all pieces", n_img / total, "images/s"),
        ("RATIO single process / bare", n_img / total / bare, "ratio"),
    ]
    rows += [(f"share: {k}", v / total, "fraction") for k, v in t.items()]
    rows += [(f"time per image: {k}", v / n_img * 1e3, "ms") for k, v in t.items()]
    rows += [
        (f"time per image: write, {k.removesuffix('_s')}", v / n_img * 1e3, "ms")
        for k, v in write_steps.items()
    ]
    rows.append(("paired share of points", paired, "fraction"))
    return rows


# ---------------------------------------------------------------- 2. cache vs online teacher ----
class OnlineTargets:
    """Duck-types `CacheReader` for `ScanDataset`: `read_scan(i)` computes scan i's targets now
    (load the 6 images, teacher, pairing, sampling) instead of reading them from the cache."""

    def __init__(self, data: Path, scans: list, teacher_cfg) -> None:
        from pipeline.datasets.nuscenes import NuScenesReader
        from pipeline.pairing import PairingConfig
        from pipeline.teacher import Teacher

        self.reader = NuScenesReader(data)
        self.scans = scans
        self.teacher = Teacher(teacher_cfg)
        self.pairing = PairingConfig()

    def __len__(self) -> int:
        return len(self.scans)

    def read_scan(self, i: int):
        from cache.sampling import sample_features
        from cache.schema import ScanTargets
        from pipeline.pairing import pair_points

        scan = self.scans[i]
        xyzi = self.reader.load_points(scan)  # (N, 4)
        pairing = pair_points(xyzi[:, :3], scan, self.pairing)
        images = [self.reader.load_image(c) for c in scan.cameras]  # 6 x (H0, W0, 3)
        grids = self.teacher.patch_grid(images)  # (6, D, h, w)
        target = np.zeros((len(xyzi), self.teacher.feature_dim), np.float16)  # (N, D)
        for c in range(len(images)):
            mask = pairing.camera == c
            if mask.any():
                f = sample_features(grids[c], pairing.uv[mask], images[c].shape[:2])
                target[mask] = f.half().numpy()
        return ScanTargets(
            token=scan.token,
            lidar_path=scan.lidar_path,
            points=xyzi,
            target=target,
            camera=pairing.camera,
            uv=pairing.uv,
            label=self.reader.load_labels(scan),
        )


def _train_steps(readers: dict, train_cfg, steps: int) -> dict[str, tuple[float, float]]:
    """Per source (name → reader): (scans/s, share of the step spent getting the batch) of the
    training step (trainer/loop.py's sections), data loaded in this process (workers 0).

    The sources' steps are interleaved (A B, B A, A B, ...) and summarised by their medians,
    so a shared machine's drifting load hits every source alike; step 0 (warm-up) is left out.
    """
    from torch.utils.data import DataLoader

    from trainer.data import ScanDataset, collate
    from trainer.loop import DistillModel
    from trainer.loss import distill_loss
    from trainer.occupancy import occupancy_loss

    threads = torch.get_num_threads()
    bs = train_cfg.batch_size
    runs = {}
    for name, reader in readers.items():
        torch.manual_seed(0)
        model = DistillModel(train_cfg, reader.read_scan(0).target.shape[1])
        batches = [[(0, (s * bs + k) % len(reader)) for k in range(bs)] for s in range(steps + 1)]
        loader = DataLoader(
            ScanDataset(reader, train_cfg), batch_sampler=batches, collate_fn=collate
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        runs[name] = (model, opt, iter(loader), [], [])
    names = list(readers)
    for s in range(steps + 1):
        for name in names if s % 2 == 0 else names[::-1]:
            model, opt, batches_iter, step_s, wait_s = runs[name]
            # ME's kernel-map setup (make_field) sets this thread's OpenMP count to 1: restore
            # it, so the data side (the online teacher) gets the same threads every step
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            batch = next(batches_iter)
            t1 = time.perf_counter()
            paired = batch["paired"]
            pred, logits = model(batch["coords"], batch["feats"], batch["queries"], paired)
            loss = distill_loss(pred, batch["target"][paired])
            if logits is not None:
                loss = loss + train_cfg.occupancy_weight * occupancy_loss(
                    logits, batch["occ_labels"]
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            if s >= 1:
                step_s.append(time.perf_counter() - t0)
                wait_s.append(t1 - t0)
    return {
        name: (bs / float(np.median(r[3])), float(np.sum(r[4]) / np.sum(r[3])))
        for name, r in runs.items()
    }


def online(cfg: BenchConfig, work: Path) -> list[Row]:
    """Training scans/s with cached targets ÷ with the teacher run online each step."""
    from cache.reader import open_cache
    from pipeline.teacher import TeacherConfig
    from trainer.config import TrainConfig

    torch.set_num_threads(cfg.threads)
    summary = _extract(cfg, work / "cache-online", workers=2, scans_per_unit=1)
    torch.set_num_threads(cfg.threads)
    cached = open_cache(summary.cache_path)
    _, scans = _scans(cfg)
    live = OnlineTargets(cfg.data, scans, TeacherConfig(cfg.teacher, cfg.image_size))
    train_cfg = TrainConfig(
        cache=Path(summary.cache_path), data=cfg.data, out=work / "run",
        backbone=cfg.backbone, batch_size=min(2, cfg.scans), workers=0, amp=False,
    )  # fmt: skip
    rates = _train_steps({"cache": cached, "online": live}, train_cfg, cfg.steps)
    (rate_cache, wait_cache), (rate_online, wait_online) = rates["cache"], rates["online"]
    return [
        ("train from cache", rate_cache, "scans/s"),
        ("train with online teacher", rate_online, "scans/s"),
        ("RATIO cache / online", rate_cache / rate_online, "ratio"),
        ("cache: share of step getting the batch", wait_cache, "fraction"),
        ("online: share of step getting the batch", wait_online, "fraction"),
    ]


# ---------------------------------------------------------------- 3. loader ----
def _npy_read(folder: Path, i: int, dim: int) -> np.ndarray:
    """One scan from .npy memmaps of the cache's on-disk arrays, scattered like read_scan."""
    off = np.load(folder / "offsets.npy")
    toff = np.load(folder / "target_offsets.npy")
    s, e = int(off[i]), int(off[i + 1])
    fields = {
        n: np.array(np.load(folder / f"{n}.npy", mmap_mode="r")[s:e])
        for n in ("points", "camera", "uv", "label")
    }
    paired = fields["camera"] >= 0
    target = np.zeros((e - s, dim), np.float16)  # (N, D)
    target[paired] = np.load(folder / "target.npy", mmap_mode="r")[int(toff[i]) : int(toff[i + 1])]
    return target


def loader(cfg: BenchConfig, work: Path) -> list[Row]:
    """Data-wait share of real training runs and cache reads ÷ raw .npy memmap reads."""
    from cache_layout import synthetic_unit

    from cache.reader import open_cache
    from cache.schema import CacheKey
    from cache.store import CacheWriter
    from trainer.config import SUMMARY, TrainConfig
    from trainer.loop import train

    rows: list[Row] = []
    # (a) the trainer's own measure, 2 loader workers (the default)
    summary = _extract(cfg, work / "cache-loader", workers=2, scans_per_unit=1)
    for workers in (2, 0):
        result = train(
            TrainConfig(
                cache=Path(summary.cache_path), data=cfg.data, out=work / f"run-w{workers}",
                split=cfg.split, backbone=cfg.backbone, batch_size=2, workers=workers,
                epochs=max(1, -(-(cfg.steps + 1) * 2 // summary.scans)), progress=False,
                checkpoint_every=10_000, threads=cfg.threads,
            )
        )  # fmt: skip
        saved = json.loads((result.run_dir / SUMMARY).read_text())
        rows.append(
            (f"data_wait_share, {workers} loader workers", saved["data_wait_share"], "fraction")
        )
        rows.append((f"train scans/s, {workers} loader workers", saved["scans_per_s"], "scans/s"))
    # (b) random scan reads: cache vs .npy memmaps of the same on-disk arrays
    rng = np.random.default_rng(0)
    units = [
        synthetic_unit(rng, [f"u{u}s{j}" for j in range(4)], cfg.dim, cfg.points_per_scan)
        for u in range(2)
    ]
    key = CacheKey("bench", "train", "loader", "", (224, 448), "last", "{}")
    writer = CacheWriter.create(work / "cache-read", key, [u.tokens for u in units], cfg.dim, {})
    for u, data in enumerate(units):
        writer.write_unit(u, data)
    writer.finalize({})
    reader = open_cache(writer.path)
    npy = work / "npy"
    npy.mkdir()
    cam = np.concatenate([c for u in units for c in u.camera])
    tgt = np.concatenate([t for u in units for t in u.target])[cam >= 0]  # (P, D) paired rows
    rows_per_scan = [len(c) for u in units for c in u.camera]
    paired_per_scan = [int((c >= 0).sum()) for u in units for c in u.camera]
    np.save(npy / "offsets.npy", np.concatenate([[0], np.cumsum(rows_per_scan)]))
    np.save(npy / "target_offsets.npy", np.concatenate([[0], np.cumsum(paired_per_scan)]))
    np.save(npy / "target.npy", tgt)
    for name in ("points", "camera", "uv", "label"):
        np.save(npy / f"{name}.npy", np.concatenate([a for u in units for a in getattr(u, name)]))
    order = rng.integers(0, len(reader), cfg.reads)
    for i in range(len(reader)):  # warm: open every unit, load every file into the page cache
        reader.read_scan(i)
        _npy_read(npy, i, cfg.dim)
    t_cache, t_npy = [], []
    for i in order:
        t0 = time.perf_counter()
        a = reader.read_scan(int(i)).target
        t1 = time.perf_counter()
        b = _npy_read(npy, int(i), cfg.dim)
        t_cache.append(t1 - t0)
        t_npy.append(time.perf_counter() - t1)
        if not np.array_equal(a, b):
            raise AssertionError(f"scan {i}: cache and .npy targets differ")
    ms_cache, ms_npy = np.median(t_cache) * 1e3, np.median(t_npy) * 1e3
    rows += [
        (f"cache read_scan (D={cfg.dim}, ~{cfg.points_per_scan} pts)", ms_cache, "ms/scan"),
        ("raw .npy memmap read, same rows", ms_npy, "ms/scan"),
        ("RATIO cache / npy throughput", ms_npy / ms_cache, "ratio"),
    ]
    return rows


# ---------------------------------------------------------------- 4. cache size ----
def size(cfg: BenchConfig, work: Path) -> list[Row]:
    """Stored bytes per point and per paired point, and the ratio dense input / stored, of the
    default target format (point-f16); then per target format the bytes per paired point (all
    arrays, and the target arrays alone), the ratio point-f16 bytes / format bytes and the
    median `read_scan` time (``cfg.reads`` random scans; grid-f16 samples its grids there). The
    grid-f16 grids are those of 6 cameras at ``cfg.image_size`` (patch 14)."""
    from cache_layout import add_grids, measure, synthetic_unit

    from cache.schema import TARGET_FORMATS
    from cache.store import StorageLayout

    grid = (cfg.image_size[0] // 14, cfg.image_size[1] // 14)
    rows: list[Row] = []
    for dim in sorted({cfg.dim, 384, 768} if cfg.dim >= 384 else {cfg.dim}):
        rng, grid_rng = np.random.default_rng(0), np.random.default_rng(1)
        units = [
            add_grids(
                grid_rng,
                synthetic_unit(rng, [f"u{u}s{j}" for j in range(4)], dim, cfg.points_per_scan),
                grid,
            )
            for u in range(2)
        ]
        points = sum(sum(u.rows()) for u in units)
        paired = sum(int((c >= 0).sum()) for u in units for c in u.camera)
        per_paired = points / paired
        m = {}
        for fmt in TARGET_FORMATS:
            folder = work / f"size-{dim}-{fmt}"
            folder.mkdir()
            m[fmt] = measure(
                fmt, StorageLayout(), units, folder, cfg.reads, repeats=1, seed=0, target_format=fmt
            )
        f16 = m["point-f16"]
        rows += [
            (f"D={dim}: bytes per point", f16["bytes/point"], "bytes"),
            (f"D={dim}: bytes per paired point", f16["bytes/point"] * per_paired, "bytes"),
            (f"D={dim}: RATIO dense input / stored", f16["ratio"], "ratio"),
            (f"D={dim}: paired share (synthetic)", paired / points, "fraction"),
        ]
        for fmt, r in m.items():
            rows += [
                (f"D={dim} {fmt}: bytes per paired point", r["bytes/point"] * per_paired, "bytes"),
                (
                    f"D={dim} {fmt}: target bytes per paired point",
                    r["target bytes/point"] * per_paired,
                    "bytes",
                ),
            ]
            if fmt != "point-f16":
                ratio = f16["bytes/point"] / r["bytes/point"]
                rows.append((f"D={dim} {fmt}: RATIO point-f16 / {fmt} bytes", ratio, "ratio"))
            read_ms = float(np.median(r["scan read ms"]))
            rows.append((f"D={dim} {fmt}: scan read (median of {cfg.reads})", read_ms, "ms"))
    return rows


# ---------------------------------------------------------------- 5. scaling ----
def scaling(cfg: BenchConfig, work: Path) -> list[Row]:
    """Extraction images/s with 2 Dask workers ÷ 1 worker, and ``cfg.workers`` ÷ 1 when it is
    more than 2 (a GPU node: `--processes --threads-per-worker 2 --workers 8`), each worker of
    the layout of `--processes` / `--threads-per-worker`, on `--replicate` copies of the set
    like `extraction`."""
    data = _run_data(cfg, work)
    counts = sorted({1, 2, cfg.workers})
    rates = {}
    for n in counts:
        rates[n] = _extract(
            cfg,
            work / f"cache-w{n}",
            workers=n,
            scans_per_unit=_run_scans_per_unit(cfg),
            data=data,
            processes=cfg.processes,
            threads_per_worker=cfg.threads_per_worker,
        ).images_per_s
    rows: list[Row] = [
        (f"extract, {n} worker{'s' if n > 1 else ''}", rates[n], "images/s") for n in counts
    ]
    rows += [(f"RATIO {n} workers / 1 worker", rates[n] / rates[1], "ratio") for n in counts[1:]]
    return rows


# ---------------------------------------------------------------- 6. feeding a GPU ----
def feed(cfg: BenchConfig, work: Path) -> list[Row]:
    """extract-teacher with a stand-in GPU teacher (benchmarks/standin_gpu.py) of
    ``cfg.gpu_rate`` images/s ÷ that rate, and with a free stand-in: the CPU side's ceiling."""
    from machine_load import LoadSampler
    from standin_gpu import standin_gpu

    from pipeline.extract import available_cores

    data = _run_data(cfg, work)
    label = _workers_label(cfg.workers, cfg.processes, cfg.threads_per_worker)
    runs, loads = {}, {}
    decode = cfg.image_decode == "device"  # the stand-in decodes too (no torchvision here)
    for name, rate in (("stand-in GPU", cfg.gpu_rate), ("free stand-in", None)):
        with (
            standin_gpu(rate, work / "gpu.lock", cfg.processes, decode),
            LoadSampler() as loads[name],
        ):
            runs[name] = _extract(
                cfg,
                work / f"cache-{'gpu' if rate else 'free'}",
                workers=cfg.workers,
                scans_per_unit=2,
                data=data,
                processes=cfg.processes,
                threads_per_worker=cfg.threads_per_worker,
            )
    cores = available_cores()
    gpu, free = runs["stand-in GPU"], runs["free stand-in"]
    busy = loads["free stand-in"].busy_cores(*free.compute_window)
    return [
        ("stand-in GPU teacher rate", cfg.gpu_rate, "images/s"),
        (f"extract-teacher, stand-in GPU ({label})", gpu.images_per_s, "images/s"),
        ("RATIO extract / stand-in GPU rate", gpu.images_per_s / cfg.gpu_rate, "ratio"),
        *[
            (f"stand-in GPU run worker time: {name.removesuffix('_s')}", share, "fraction")
            for name, share in _shares(gpu.step_s).items()
        ],
        (f"extract-teacher, free stand-in ({label})", free.images_per_s, "images/s"),
        ("CPU side: core-ms per image (cores / free rate)", 1e3 * cores / free.images_per_s, "ms"),
        ("free stand-in run: busy CPU cores (machine-wide)", busy, "cores"),
        ("CPU side: busy core-ms per image (measured)", 1e3 * busy / free.images_per_s, "ms"),
        ("images per run", gpu.images, "images"),
    ]


BENCHMARKS = {
    "extraction": extraction,
    "online": online,
    "loader": loader,
    "size": size,
    "scaling": scaling,
    "feed": feed,
}


def run_benchmark(what: str, cfg: BenchConfig) -> list[Row]:
    """Run one benchmark (a name of WHATS), print its table and return its rows."""
    if what not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {what!r}: choose from {', '.join(WHATS)}")
    if what != "size" and (cfg.data is None or not cfg.teacher):
        raise ValueError(f"benchmark {what!r} needs --data and --teacher")
    work = Path(tempfile.mkdtemp(prefix=f"bench-{what}-", dir=cfg.workdir))
    try:
        rows = BENCHMARKS[what](cfg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    extra = (
        f", teacher {cfg.teacher}, image {cfg.image_size[0]}x{cfg.image_size[1]}"
        if cfg.teacher
        else ""
    )
    if what in ("extraction", "feed"):
        from pipeline.images import resolve_image_decode

        if what == "feed" and cfg.image_decode == "device":
            decode = "device (stand-in: read, not decoded)"
        else:
            decode = resolve_image_decode(cfg.image_decode, cfg.device)
        extra += f", {cfg.device} {cfg.dtype}, decode {decode}, {cfg.target_format}"
    print_table(f"{what} (torch {torch.__version__}, --torch-threads {cfg.threads}{extra})", rows)
    return rows
