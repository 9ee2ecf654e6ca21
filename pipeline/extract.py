"""Stage one: teacher features at every paired LiDAR point, written to the target cache by Dask.

What happens (docs/extraction.md has the details and measurements):
1. The client reads the split's scan records, cuts them into units of ``scans_per_unit`` scans (in
   the reader's order: scene, then time) and builds the `CacheKey` (dataset fingerprint, split,
   teacher name + weights sha256, image size, feature layer, pairing settings, target format,
   schema version).
   With ``--scheduler`` (an existing cluster) a client without CUDA loads the teacher on its CPU
   for the key.
2. ``CacheWriter.create`` makes or re-opens ``cache_root/<digest>/``; under the cache's writer
   lock only the units without a valid ``.done`` marker are submitted, one Dask task per unit.
   With ``--scheduler`` the client first waits for a worker (saying so when there is none yet)
   and refuses a scheduler or worker that does not import this code (`pipeline/environment.py`).
3. A task (`extract_unit`) loads its scans' points, labels and images, pairs the points with the
   cameras, runs the teacher over the unit's images in batches across cameras, samples the patch
   grid of each point's camera at its pixel (grid formats: keeps the grids instead, grid-i8
   quantized on the teacher's device; the reader samples them), and writes the unit atomically
   through the writer.
   Unpaired points get camera -1 and no stored target row (zeros when read).
4. The client shows a progress bar over units, then finalizes the cache and returns a summary.

A unit's result depends only on its scans and the settings, never on which worker ran it, when,
or next to which other unit: the cache is bit-identical whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache import (
    CacheError,
    CacheKey,
    CacheWriter,
    UnitData,
    dataset_files,
    dataset_fingerprint,
)
from cache.sampling import sample_features
from cache.schema import DEFAULT_TARGET_FORMAT, quantize_rows, target_format
from pipeline.datasets import DataError, NuScenesReader, Scan
from pipeline.datasets.check import check_scan
from pipeline.images import IMAGE_DECODES, decode_on_device, read_encoded, resolve_image_decode
from pipeline.pairing import UNPAIRED, Pairing, PairingConfig, pair_points
from pipeline.teacher import FEATURE_LAYER, Teacher, TeacherConfig, cached_teacher


class UnitFailedError(RuntimeError):
    """Work on a Dask worker failed (a unit's extraction, or a worker's start-up); its message
    names the cause. Units finished before stay done: a re-run resumes."""


@dataclass(frozen=True)
class ExtractConfig:
    """One extraction run: which data, which teacher, where the cache goes, how Dask runs it."""

    data: Path
    """nuScenes root (the folder holding v1.0-*/, samples/, sweeps/)."""
    cache_root: Path
    """Folder of caches; this run's cache is ``cache_root/<key digest>/``."""
    teacher: str
    """Hugging Face id or local save_pretrained folder of a DINOv2 (with or without registers)."""
    version: str | None = None
    """nuScenes version directory ("v1.0-mini", ...); None: the only one under ``data``."""
    split: str = "train"
    """Split to extract ("train", "val", "mini_train", "all", ...)."""
    image_size: tuple[int, int] = (448, 896)
    """(H, W) the camera images are resized to; multiples of the patch size (14)."""
    scheduler: str | None = None
    """Address of a running Dask scheduler ("tcp://host:8786"); None: start a LocalCluster."""
    n_workers: int = 2
    """LocalCluster workers, each running ``threads_per_worker`` units at a time (ignored with
    ``scheduler``)."""
    torch_threads: int = 0
    """torch intra-op threads per unit; 0: CPU cores / (workers x threads_per_worker) on a
    LocalCluster, untouched on an existing cluster."""
    processes: bool = False
    """LocalCluster workers are processes (True) or threads of this process (False, measured
    faster on CPU: no per-process start-up, imports and teacher copy; docs/extraction.md)."""
    threads_per_worker: int = 1
    """Units each LocalCluster worker runs at once (threads sharing its teacher). With
    ``processes``, N processes x M threads spread the Python-side work (GIL, Zarr's I/O loop)
    over N interpreters, for GPUs the CPU side must keep up with (docs/scaling.md)."""
    batch_size: int = 6
    """Images per teacher forward (batched across the cameras and scans of a unit)."""
    device: str = "cpu"
    """torch device of the teacher on the workers."""
    dtype: str = "float32"
    """Teacher autocast dtype: "float32", "float16" (CUDA) or "bfloat16"."""
    image_decode: str = "auto"
    """Where camera JPEGs are decoded and resized: "cpu" (PIL, in each unit's prefetch thread),
    "device" (torchvision's decode_jpeg on the teacher's device: nvJPEG on CUDA, then a float
    resize there; needs torchvision) or "auto" (device when the teacher is on CUDA and
    torchvision is installed, else cpu). The run's meta records the mode used
    (pipeline/images.py)."""
    scans_per_unit: int = 4
    """Scans per work unit (one Dask task, one atomic cache unit)."""
    pairing: PairingConfig = field(default_factory=PairingConfig)
    """How points are paired with camera pixels (part of the cache key)."""
    target_format: str = DEFAULT_TARGET_FORMAT
    """How targets are stored (part of the cache key): "point-f16" (float16 per paired point),
    "point-i8" (int8 + a float16 scale per paired point), "grid-f16" (the float16 patch grid
    of every camera image, sampled by the reader) or "grid-i8" (those grids as int8 + a float16
    scale per cell); docs/cache-format.md."""
    progress: bool = True
    """Show a progress bar over units."""
    skip_bad: bool = False
    """Scans failing the pre-flight check (`check_scan`) are left out of the cache and listed in
    its manifest meta (``skipped_scans``); False: the run fails listing them, before any work."""

    def __post_init__(self) -> None:
        if re.match(r"[A-Za-z][A-Za-z0-9+.\-]*:/", str(self.cache_root)):  # s3://, gs://, ...
            # (a pathlib.Path, e.g. from the CLI, has already folded "s3://b" into "s3:/b")
            raise ValueError(
                f"cache root {self.cache_root}: URLs are not supported; the cache needs a POSIX "
                "file system shared by every worker (rename, fsync: docs/scaling.md)"
            )
        # Absolute: workers of a running cluster (--scheduler) have other working directories.
        object.__setattr__(self, "data", Path(self.data).expanduser().absolute())
        object.__setattr__(self, "cache_root", Path(self.cache_root).expanduser().absolute())
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        if self.n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {self.n_workers}")
        if self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.scans_per_unit < 1:
            raise ValueError(f"scans_per_unit must be >= 1, got {self.scans_per_unit}")
        target_format(self.target_format)  # ValueError naming the known formats
        if self.image_decode not in IMAGE_DECODES:
            raise ValueError(
                f"image_decode must be one of {IMAGE_DECODES}, got {self.image_decode!r}"
            )
        self.teacher_config()  # ValueError on a bad dtype / device pair, before any work
        if self.scheduler is None and torch.device(self.device).type == "cuda":
            if not torch.cuda.is_available():  # (an existing cluster's workers may have GPUs)
                why = "built without CUDA" if torch.version.cuda is None else "no GPU visible"
                raise ValueError(
                    f"device {self.device!r}: torch {torch.__version__} here has no CUDA ({why})"
                )

    def teacher_config(self) -> TeacherConfig:
        return TeacherConfig(
            model=self.teacher, image_size=self.image_size, device=self.device, dtype=self.dtype
        )


@dataclass(frozen=True)
class ExtractSummary:
    """What one run did (printed by the CLI and stored in the cache's COMPLETE marker)."""

    cache_path: str  # cache_root/<digest>
    scans: int  # scans in the split (all units)
    units: int  # units in the cache
    units_computed: int  # units this run wrote
    units_skipped: int  # units already complete before this run
    images: int  # camera images this run passed through the teacher
    points: int  # LiDAR points of the units this run wrote
    points_paired: int  # of those, points paired with a camera
    bytes_written: int  # bytes of the units this run wrote
    teacher_forwards: int  # teacher forward calls (batches) this run made
    wall_s: float  # seconds of the whole run (cluster start included)
    compute_s: float  # seconds from workers ready (teacher loaded) to last unit written
    images_per_s: float  # images / compute_s
    teacher_random: bool  # the teacher is a RANDOM test/demo model
    teacher_fitted: bool = False  # the teacher is a stand-in fitted to dataset labels (demo/test)
    scans_skipped: int = 0  # scans left out by --skip-bad (listed in the manifest meta)
    scans_unlabelled: int = 0  # scans without a label file: label 255 (ignore) on every point
    startup_s: float = 0.0  # cluster start + every worker loading (and warming up) its teacher
    steady_images_per_s: float = 0.0
    """Images/s between the completions of the first and the last 10 % of the units (runs of 10
    units or more; else images_per_s): the rate of a long run, without the ramp-up (every
    worker pairs at once) and the tail (the last units finish on idle workers)."""
    compute_window: tuple[float, float] = (0.0, 0.0)
    """Unix times (time.time()) of the start and end of ``compute_s``: workers ready, last unit
    written (the cluster's shutdown comes after)."""
    step_s: dict[str, float] = field(default_factory=dict)
    """Worker-seconds summed over the units this run wrote, per step: pair_s (load points,
    labels, pairing), image_wait_s (decode + resize not hidden by the prefetch thread),
    teacher_s (forwards + sampling), write_s (the atomic unit write)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        """One-line human summary."""
        paired = self.points_paired / self.points if self.points else 0.0
        return (
            f"{self.units_computed} units computed, {self.units_skipped} skipped; "
            f"{self.scans} scans, {self.images} images, {self.points} points "
            f"({paired:.1%} paired), {self.bytes_written / 1e6:.1f} MB written; "
            f"{self.images_per_s:.2f} images/s after {self.startup_s:.1f} s start-up, "
            f"{self.wall_s:.1f} s wall; "
            f"{self.teacher_forwards} teacher forwards"
            + (f"; {self.scans_skipped} bad scans skipped" if self.scans_skipped else "")
        )


# ---------------------------------------------------------------- one unit (runs on a worker) ----
# Units running in this process (thread workers). A failed run waits for them before it lets
# its lock go: a thread cannot be cancelled and would otherwise go on writing while a re-run in
# the same process cleans the temp dirs and writes the same units (tests/test_reliability.py).
_running = threading.Condition()
_running_units = 0


def _wait_for_running_units(timeout: float = 600.0) -> None:
    with _running:
        _running.wait_for(lambda: _running_units == 0, timeout=timeout)


def extract_unit(
    writer: CacheWriter,
    unit_id: int,
    scans: list[Scan],
    reader: NuScenesReader,
    teacher_cfg: TeacherConfig,
    pairing: PairingConfig,
    batch_size: int,
    torch_threads: int = 0,
    image_decode: str = "cpu",
) -> dict[str, Any]:
    """Compute and write one unit; returns its statistics (counts and seconds per step).
    ``image_decode``: "cpu" or "device" (`resolve_image_decode`)."""
    global _running_units
    with _running:
        _running_units += 1
    try:
        stream = _unit_stream(teacher_cfg.device)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            return _extract_unit(
                writer,
                unit_id,
                scans,
                reader,
                teacher_cfg,
                pairing,
                batch_size,
                torch_threads,
                image_decode,
            )
    finally:
        with _running:
            _running_units -= 1
            _running.notify_all()


def _unit_stream(device: str) -> torch.cuda.Stream | None:
    """A CUDA stream of its own for a unit on a CUDA teacher (None elsewhere): units running
    at once in one process (threads) then queue their work independently, and the memory a
    unit frees is reused only by that unit's later work (what `decode_on_device` relies on)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.Stream(device=device)  # from torch's per-device pool: not created anew


def _extract_unit(
    writer: CacheWriter,
    unit_id: int,
    scans: list[Scan],
    reader: NuScenesReader,
    teacher_cfg: TeacherConfig,
    pairing: PairingConfig,
    batch_size: int,
    torch_threads: int = 0,
    image_decode: str = "cpu",
) -> dict[str, Any]:
    """Compute and write one unit; returns its statistics (counts and seconds per step)."""
    t_start = time.perf_counter()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    teacher = cached_teacher(teacher_cfg)

    # 1. points, labels and their pairing with the cameras, scan by scan
    points, labels, pairings = _pair_scans(reader, scans, pairing)
    t_paired = time.perf_counter()

    # 2. teacher over all (scan, camera) images of the unit, batch_size images per forward
    views = [(j, c) for j, scan in enumerate(scans) for c in range(len(scan.cameras))]
    batches = [views[s : s + batch_size] for s in range(0, len(views), batch_size)]
    targets, t_images = _teacher_targets(
        writer.key.target_format, reader, scans, pairings, teacher, batches, image_decode, unit_id
    )
    t_teacher = time.perf_counter()

    # 3. one atomic unit
    data = UnitData(
        tokens=[s.token for s in scans],
        lidar_paths=[s.lidar_path for s in scans],
        points=points,
        target=None,
        camera=[p.camera for p in pairings],
        uv=[p.uv for p in pairings],
        label=labels,
        **targets,
    )
    written = writer.write_unit(unit_id, data)
    t_end = time.perf_counter()
    return {
        "unit": unit_id,
        "scans": len(scans),
        "images": len(views),
        "points": int(sum(len(p) for p in points)),
        "paired": int(sum((p.camera != UNPAIRED).sum() for p in pairings)),
        "bytes": int(written),
        # one per batch, counted here: with thread workers the teacher (and its counter) is shared
        "forwards": len(batches),
        "seconds": t_end - t_start,
        "pair_s": t_paired - t_start,
        "image_wait_s": t_images,  # decode + resize the prefetch thread did not hide
        "teacher_s": t_teacher - t_paired - t_images,
        "write_s": t_end - t_teacher,
        "worker_pid": os.getpid(),
    }


def _pair_scans(
    reader: NuScenesReader, scans: list[Scan], pairing: PairingConfig
) -> tuple[list[np.ndarray], list[np.ndarray], list[Pairing]]:
    """Each scan's points (N_i, 4) float32, labels (N_i,) uint8 and their pairing with the
    scan's cameras."""
    points, labels, pairings = [], [], []
    for scan in scans:
        xyzi = reader.load_points(scan)  # (N, 4) float32
        points.append(xyzi)
        labels.append(reader.load_labels(scan))  # (N,) uint8
        pairings.append(pair_points(xyzi[:, :3], scan, pairing))
    return points, labels, pairings


def _teacher_targets(
    fmt: str,
    reader: NuScenesReader,
    scans: list[Scan],
    pairings: list[Pairing],
    teacher: Teacher,
    batches: list[list[tuple[int, int]]],
    image_decode: str,
    unit_id: int,
) -> tuple[dict[str, list[np.ndarray] | None], float]:
    """The teacher over ``batches`` of the unit's (scan, camera) images, one forward each:
    point formats sample each paired point's feature now, grid formats keep the grids (float16;
    grid-i8 quantizes them) and the reader samples them (the same `sample_features`). Returns
    the target fields of the unit's `UnitData` for format ``fmt`` (`_targets_on_cpu`) and the
    seconds spent waiting for images (decode + resize not hidden behind the teacher)."""
    keep_grids = not target_format(fmt).paired_rows
    device = torch.device(teacher.cfg.device)
    # point formats: each scan's paired rows (in point order), filled camera by camera on the
    # teacher's device, copied back once per scan: (P_i, D) float16
    targets = [
        torch.zeros(
            (int((p.camera != UNPAIRED).sum()), teacher.feature_dim),
            dtype=torch.float16,
            device=device,
        )
        for p in ([] if keep_grids else pairings)
    ]
    rank = [np.cumsum(p.camera != UNPAIRED) - 1 for p in pairings]  # (N_i,): row in targets[i]
    grids = [[None] * len(scan.cameras) for scan in scans]  # grid formats: (h, w, D) per camera
    image_sizes = [np.zeros((len(scan.cameras), 2), np.int64) for scan in scans]  # (C_i, 2)
    t_images = 0.0  # waiting for images: decode + resize not hidden behind the teacher
    threads = torch.get_num_threads()
    on_device = image_decode == "device"
    # One prefetch thread decodes and resizes batch b + 1 while batch b is in the teacher (PIL
    # and torch release the GIL); a bad image raises here, from result(), as it did inline.
    # With on-device decoding it only reads the files; this thread decodes them on the device.
    with ThreadPoolExecutor(1, thread_name_prefix=f"images-u{unit_id}") as prefetch:
        load = functools.partial(
            _read_batch if on_device else _load_batch, reader, scans, teacher, threads
        )
        pending = prefetch.submit(load, batches[0]) if batches else None
        for b, batch in enumerate(batches):
            t0 = time.perf_counter()
            loaded = pending.result()
            if b + 1 < len(batches):
                pending = prefetch.submit(load, batches[b + 1])
            if on_device:
                pixels, sizes = _decode_batch(scans, teacher, batch, loaded)
            else:
                pixels, sizes = loaded  # (B, H, W, 3) uint8, [(H0, W0)] * B
            t_images += time.perf_counter() - t0
            # on a GPU the grids stay there: points are sampled on it, only float16 comes back
            grids_batch = teacher.patch_grid(pixels, on_device=True)  # (B, D, h, w) float32
            for k, (j, c) in enumerate(batch):
                if keep_grids:  # stays on the device until the scan's grids go back together
                    grids[j][c] = grids_batch[k].permute(1, 2, 0).half()  # (h, w, D)
                    image_sizes[j][c] = sizes[k]
                    continue
                points_c = np.flatnonzero(pairings[j].camera == c)  # (M,)
                if len(points_c):
                    uv = pairings[j].uv[points_c]  # (M, 2) float32, exactly what the cache stores
                    features = sample_features(grids_batch[k], uv, sizes[k])  # (M, D)
                    rows = torch.from_numpy(rank[j][points_c]).to(device, non_blocking=True)
                    targets[j][rows] = features.half()
    return _targets_on_cpu(fmt, teacher, targets, grids, image_sizes), t_images


def _targets_on_cpu(
    fmt: str,
    teacher: Teacher,
    targets: list[torch.Tensor],
    grids: list[list[torch.Tensor]],
    image_sizes: list[np.ndarray],
) -> dict[str, list[np.ndarray] | None]:
    """The target fields of a unit's `UnitData` for format ``fmt`` (the other formats' None),
    from `_teacher_targets`' results on the teacher's device: point formats' ``targets``
    ((P_i, D) float16 per scan), grid formats' ``grids`` ((h, w, D) float16 per scan and camera)
    and ``image_sizes`` ((C_i, 2) per scan)."""
    # back to the CPU once per scan (waits for the unit's last forwards); point-i8 is quantized
    # where the rows are (`quantize_rows`: the same bytes on every device)
    keep_grids = not target_format(fmt).paired_rows
    scales = None
    if fmt == "point-i8":
        quantized = [quantize_rows(t) for t in targets]  # [(q (P_i, D) int8, scale (P_i,))]
        targets = [q for q, _ in quantized]
        scales = [scale.cpu().numpy() for _, scale in quantized]
    paired_target = [t.cpu().numpy() for t in targets]
    grid_scales = None
    if keep_grids:  # (C_i, h, w, D) float16 per scan; grid-i8: int8 + (C_i, h, w) float16 scales
        stacked = [_stack(g, teacher, quantize=fmt == "grid-i8") for g in grids]
        grids = [g for g, _ in stacked]
        if fmt == "grid-i8":
            grid_scales = [s for _, s in stacked]
    return {
        "paired_target": None if keep_grids else paired_target,
        "paired_target_scale": scales,
        "grids": grids if keep_grids else None,
        "grid_scales": grid_scales,
        "image_sizes": image_sizes if keep_grids else None,
    }


def prepare_worker(
    teacher_cfg: TeacherConfig, batch_size: int, torch_threads: int = 0, image_decode: str = "cpu"
) -> int:
    """Make a worker ready before the clock starts: its torch thread count, its teacher loaded
    (one per process) and, off the CPU, one forward of a blank batch (CUDA context, allocator,
    kernel choice) and, with on-device decoding, one decode (the decoder's start-up), so that a
    bad teacher fails here, once, and images/s is the steady rate. Returns the worker's pid."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    teacher = cached_teacher(teacher_cfg)
    if image_decode == "device":
        _warm_up_decoder(teacher_cfg.device)
    if torch.device(teacher_cfg.device).type != "cpu":
        h, w = teacher_cfg.image_size
        teacher.patch_grid(torch.zeros(batch_size, h, w, 3, dtype=torch.uint8), on_device=True)
        teacher.forward_count -= 1  # a warm-up, not work
        teacher.image_count -= batch_size
    return os.getpid()


def _warm_up_decoder(device: str) -> None:
    """Decode one small JPEG on ``device`` (torchvision): its decoder starts before the clock."""
    import io

    from PIL import Image
    from torchvision.io import decode_jpeg

    buf = io.BytesIO()
    Image.new("RGB", (64, 32)).save(buf, format="JPEG")
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    decode_jpeg([data], device=device)


def _prepare_workers(
    client: Any, teacher_cfg: TeacherConfig, batch_size: int, threads: int, image_decode: str
) -> None:
    """`prepare_worker` on every worker of ``client``, as ordinary tasks (one pinned to each)."""
    workers = list(client.scheduler_info()["workers"])
    futures = [
        client.submit(
            prepare_worker,
            teacher_cfg,
            batch_size,
            threads,
            image_decode,
            workers=[w],
            allow_other_workers=False,
            pure=False,
            key=f"prepare-worker-{i}-{time.time_ns()}",
        )
        for i, w in enumerate(workers)
    ]
    try:
        client.gather(futures)
    except Exception as e:
        raise UnitFailedError(
            f"a worker could not load teacher {teacher_cfg.model!r} (or start its image decoder, "
            f"image_decode {image_decode!r}): {e}"
        ) from e


def _check_cluster(client: Any, address: str) -> None:
    """Refuse an existing cluster whose scheduler or workers present now cannot import this
    project, or import other code than this client (`environment.code_identity`, sent by
    value): the scheduler unpickles every task, the workers run them by name, and a worker with
    other code would write units of other bytes into this cache. Raises UnitFailedError naming
    each such process and how to start them."""
    import cloudpickle

    from pipeline import environment

    mine = environment.code_identity()
    cloudpickle.register_pickle_by_value(environment)
    try:
        seen = {"scheduler": client.run_on_scheduler(environment.code_identity)}
        for worker, theirs in client.run(environment.code_identity, on_error="return").items():
            seen[f"worker {worker}"] = theirs
    finally:
        cloudpickle.unregister_pickle_by_value(environment)
    problems = []
    for who, theirs in seen.items():
        if isinstance(theirs, BaseException):
            problems.append(f"{who}: could not be asked ({type(theirs).__name__}: {theirs})")
            continue
        where = f"{who} (host {theirs['host']})"
        missing = [name for name, folder in theirs["packages"].items() if folder is None]
        if missing:
            problems.append(f"{where}: cannot import {', '.join(missing)}")
        elif theirs["sha256"] != mine["sha256"]:
            folders = ", ".join(f"{n} from {f}" for n, f in theirs["packages"].items())
            problems.append(f"{where}: other code ({folders}; source sha256 {theirs['sha256']})")
    if problems:
        ours = ", ".join(f"{n} from {f}" for n, f in mine["packages"].items())
        repo = Path(mine["packages"]["pipeline"]).parent
        raise UnitFailedError(
            f"the Dask cluster at {address} does not run this code (this client: {ours}; "
            f"source sha256 {mine['sha256']}):\n  "
            + "\n  ".join(problems)
            + f"\nStart `dask scheduler` and every `dask worker` with PYTHONPATH={repo} (this "
            "checkout on shared storage, or the same code elsewhere; docs/scaling.md)"
        )
    workers = {who: theirs for who, theirs in seen.items() if who.startswith("worker ")}
    if differing := version_differences(workers):
        raise UnitFailedError(
            f"the workers of the Dask cluster at {address} have other versions of packages that "
            "shape the targets (their units would differ within one cache):\n  "
            + "\n  ".join(differing)
            + "\nInstall the same versions on every worker (one environment on shared storage, "
            "or one container image; docs/scaling.md)"
        )


def version_differences(identities: dict[str, dict[str, Any]]) -> list[str]:
    """One line per package whose version differs between the processes of ``identities``
    (name -> `environment.code_identity`), naming who has which: ``"zarr: 3.1.6 on worker a,
    worker b; 0.0.1 on worker c"``. [] when they agree. The client is not compared: a head
    node without CUDA runs another torch build than its GPU workers, and runs no unit."""
    lines = []
    for package in sorted({p for ident in identities.values() for p in ident["versions"]}):
        holders: dict[str | None, list[str]] = {}
        for who, ident in identities.items():
            holders.setdefault(ident["versions"].get(package), []).append(who)
        if len(holders) > 1:
            lines.append(
                f"{package}: "
                + "; ".join(f"{v or 'not installed'} on {', '.join(w)}" for v, w in holders.items())
            )
    return lines


def _same(value: Any) -> Any:
    return value


def _shared(client: Any, value: Any) -> Any:
    """A future holding ``value``, for every unit's task to take as an argument: it travels to
    each worker once. A task's result, not scattered data: when the workers holding it die
    (kill -9, pre-emption, the only worker of a cluster), the scheduler computes it again from
    its task, where scattered data would be lost and every unit still to run would fail."""
    name = type(value).__name__.lower()
    return client.submit(_same, value, key=f"{name}-{uuid.uuid4().hex}", pure=False)


def _read_batch(
    reader: NuScenesReader,
    scans: list[Scan],
    teacher: Teacher,
    threads: int,
    batch: list[tuple[int, int]],
) -> list[torch.Tensor]:
    """The encoded files of ``batch`` ((scan, camera) pairs): the prefetch thread's part of
    on-device decoding (I/O only)."""
    return [read_encoded(scans[j].cameras[c]) for j, c in batch]


def _decode_batch(
    scans: list[Scan], teacher: Teacher, batch: list[tuple[int, int]], encoded: list[torch.Tensor]
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Decode and resize ``batch`` on the teacher's device: ((B, H, W, 3) uint8 there, original
    (H0, W0) of each). Runs on the unit's stream, after the unit's earlier work on it finished:
    torchvision's decoder writes from a stream of its own (pipeline/images.py)."""
    if torch.device(teacher.cfg.device).type == "cuda":
        torch.cuda.current_stream().synchronize()
    cameras = [scans[j].cameras[c] for j, c in batch]
    images = decode_on_device(cameras, encoded, teacher.cfg.device)  # (H0, W0, 3) uint8 each
    sizes = [tuple(im.shape[:2]) for im in images]
    same = len(set(sizes)) == 1  # nuScenes: one resize call for the batch
    return teacher.resize(torch.stack(images) if same else images), sizes


def _load_batch(
    reader: NuScenesReader,
    scans: list[Scan],
    teacher: Teacher,
    threads: int,
    batch: list[tuple[int, int]],
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Decode the images of ``batch`` ((scan, camera) pairs) and resize them for the teacher:
    ((B, H, W, 3) uint8, original (H0, W0) of each). Runs in the unit's prefetch thread, with
    the worker's torch thread count (OpenMP counts are per thread)."""
    torch.set_num_threads(threads)
    images = [reader.load_image(scans[j].cameras[c]) for j, c in batch]  # (H0, W0, 3) uint8
    return teacher.resize(images), [tuple(im.shape[:2]) for im in images]


def _stack(
    grids: list[torch.Tensor], teacher: Teacher, quantize: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """The (h, w, D) float16 grids of a scan's cameras (on the teacher's device) → one
    (C, h, w, D) float16 array on the CPU (C may be 0): one copy back per scan. ``quantize``
    (grid-i8): int8 cells and their (C, h, w) float16 scales instead (`quantize_rows`, on the
    device); else the scales are None."""
    h, w = teacher.grid_size
    d = teacher.feature_dim
    if not grids:
        empty = np.zeros((0, h, w, d), np.int8 if quantize else np.float16)
        return empty, (np.zeros((0, h, w), np.float16) if quantize else None)
    stacked = torch.stack(grids)  # (C, h, w, D) float16, on the device
    if not quantize:
        return stacked.cpu().numpy(), None
    q, scale = quantize_rows(stacked.reshape(-1, d))  # (C*h*w, D) int8, (C*h*w,) float16
    c = len(grids)
    return q.reshape(c, h, w, d).cpu().numpy(), scale.reshape(c, h, w).cpu().numpy()


# ---------------------------------------------------------------- the client ----
def split_units(scans: list[Scan], scans_per_unit: int) -> list[list[Scan]]:
    """Consecutive blocks of ``scans_per_unit`` scans (the last one may be shorter)."""
    return [scans[i : i + scans_per_unit] for i in range(0, len(scans), scans_per_unit)]


def teacher_key_name(model: str) -> str:
    """The teacher's name in the cache key: a local folder's own name (however it was reached),
    else the hub id as given."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def cache_key(cfg: ExtractConfig, reader: NuScenesReader, teacher: Teacher) -> CacheKey:
    """Everything that determines the targets of this run (``cfg.image_decode`` resolved)."""
    return CacheKey(
        dataset_fingerprint=dataset_fingerprint(reader.metadata_files()),
        split=cfg.split,
        # A local folder is named by its folder name only: the weights and config hashes identify
        # it, so the same teacher reached by another path (., ~/t, /abs/t, a copy) keeps its cache.
        teacher=teacher_key_name(cfg.teacher),
        teacher_weights_sha256=teacher.identity.weights_sha256,
        teacher_config_sha256=teacher.identity.config_sha256,
        image_decode=cfg.image_decode,
        image_size=cfg.image_size,
        feature_layer=FEATURE_LAYER,
        pairing=json.dumps(cfg.pairing.to_dict(), sort_keys=True, separators=(",", ":")),
        teacher_dtype=cfg.dtype,
        teacher_weights_dtype=teacher.identity.weights_dtype,
        target_format=cfg.target_format,
    )


def _git_sha() -> str:
    """HEAD's sha, "+dirty" with uncommitted changes to tracked files (the rule of the training
    run's record, trainer/loop.py), "unknown" outside a git checkout."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        sha, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if sha and dirty else "")


def preflight(reader: NuScenesReader, scans: list[Scan], progress: bool) -> dict[str, list[str]]:
    """Problems of each bad scan (token -> lines naming the file and the problem): every scan's
    points, labels, calibration and image headers, read before any teacher work."""
    from tqdm import tqdm

    bad = {}
    for scan in tqdm(scans, desc="check", unit="scan", disable=not progress, dynamic_ncols=True):
        if problems := check_scan(reader, scan):
            bad[scan.token] = problems
    return bad


def _run_meta(
    cfg: ExtractConfig, reader: NuScenesReader, teacher: Teacher, skipped: dict[str, list[str]]
) -> dict[str, Any]:
    import dask
    import transformers

    config = dataclasses.asdict(cfg)
    config["pairing"] = cfg.pairing.to_dict()
    return {
        "extract_config": json.loads(json.dumps(config, default=str)),
        "teacher": dataclasses.asdict(teacher.identity),
        "skipped_scans": [{"token": t, "problems": p} for t, p in skipped.items()],
        "dataset_files": dataset_files(reader.metadata_files()),
        "git_sha": _git_sha(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dask": dask.__version__,
        },
    }


@contextmanager
def _client(cfg: ExtractConfig) -> Iterator[Any]:
    """A Dask client: connected to ``cfg.scheduler`` (the cluster is left running), or to a
    fresh LocalCluster that is closed with it. (A `Client(cluster)` alone leaves the cluster
    running when it closes: 8 idle worker processes, each with its teacher and CUDA context,
    lived on until the process exited, during whatever the caller did next.)"""
    import logging

    import dask
    from dask.distributed import Client, LocalCluster

    if cfg.scheduler:
        with Client(cfg.scheduler) as client:
            yield client
        return
    settings = {
        # Dask's statistical profiler samples every worker thread's stack every 10 ms while
        # holding the GIL: CPU-side time taken from the units (docs/benchmarks.md)
        "distributed.worker.profile.enabled": False,
        # Dask starts worker processes with MALLOC_TRIM_THRESHOLD_=65536, which turns off
        # glibc's adaptive mmap threshold: every image-sized buffer is then mmap'd, page-faulted
        # and unmapped again. Measured: 2.5x the kernel time, -40 % images/s (docs/benchmarks.md)
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    }
    # An earlier Dask cluster of this process may have put it in os.environ (Dask's nannies set
    # their pre-spawn variables in the parent), and children inherit that: keep it out of ours.
    trim = os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    try:
        with dask.config.set(settings):
            cluster = LocalCluster(
                n_workers=cfg.n_workers,
                threads_per_worker=cfg.threads_per_worker,  # units at once; torch threads inside
                processes=cfg.processes,
                dashboard_address=":0",  # a free port: never collides with another cluster's 8787
                silence_logs=logging.ERROR,
            )
    finally:
        if trim is not None:
            os.environ["MALLOC_TRIM_THRESHOLD_"] = trim
    with cluster, Client(cluster) as client:  # the client closes first, then the cluster
        yield client


@contextmanager
def _keeping_torch_threads() -> Iterator[None]:
    """Thread workers set torch's thread count process-wide: give the caller its own back."""
    saved = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class ClusterLayout:
    """How a LocalCluster runs units: ``workers`` x ``threads_per_worker`` units at once."""

    workers: int
    processes: bool
    threads_per_worker: int


def default_layout(device: str, cores: int) -> ClusterLayout:
    """The LocalCluster layout `extract-teacher` uses when none is given (measured,
    docs/extraction.md): on the CPU 2 thread workers (the teacher is the bottleneck and threads
    skip each process's start-up); on a GPU ``cores // 2`` processes x 2 threads, so the CPU
    side (decode, pairing, writing) of enough units keeps the GPU busy (H200, 16 cores: 8 x 2
    225 images/s, 8 x 1 160, 8 threads 66)."""
    if torch.device(device).type == "cpu":
        return ClusterLayout(workers=2, processes=False, threads_per_worker=1)
    return ClusterLayout(workers=max(1, cores // 2), processes=True, threads_per_worker=2)


def _torch_threads(cfg: ExtractConfig) -> int:
    if cfg.torch_threads or cfg.scheduler:
        return cfg.torch_threads
    cores = available_cores()
    # Units at once x torch threads = cores. With thread workers torch's setting is
    # process-wide and each concurrent forward then runs on its own thread: no
    # oversubscription, no spinning pools.
    return max(1, cores // (cfg.n_workers * cfg.threads_per_worker))


def _identity_config(teacher_cfg: TeacherConfig) -> TeacherConfig:
    """The teacher this process loads for the cache key (identity, feature dim; no forward):
    ``teacher_cfg`` itself, or on the CPU in float32 when it asks for CUDA and this process has
    none (a client of an existing cluster whose workers have the GPUs: ``--scheduler``)."""
    if torch.device(teacher_cfg.device).type != "cuda" or torch.cuda.is_available():
        return teacher_cfg
    return dataclasses.replace(teacher_cfg, device="cpu", dtype="float32")


def extract_teacher(cfg: ExtractConfig) -> ExtractSummary:
    """Run stage one (see the module docstring); returns the run's summary."""
    # what `_collect_units` imports, loaded before the clock starts: not part of wall_s
    import dask.distributed  # noqa: F401
    import tqdm  # noqa: F401

    t_start = time.perf_counter()
    reader = NuScenesReader(cfg.data, cfg.version)
    scans = reader.scans(cfg.split)
    if not scans:
        raise ValueError(f"{reader.version_dir}: split {cfg.split!r} has no scans")
    teacher_cfg = cfg.teacher_config()
    # validates model and image size before any Dask work
    teacher = cached_teacher(_identity_config(teacher_cfg))
    # "auto" resolved once, here: the meta records what ran
    cfg = dataclasses.replace(cfg, image_decode=_decode_mode(cfg))
    bad = preflight(reader, scans, cfg.progress)
    scans = _good_scans(scans, bad, cfg.split, cfg.skip_bad)
    units = split_units(scans, cfg.scans_per_unit)
    key = cache_key(cfg, reader, teacher)
    writer = CacheWriter.create(
        cfg.cache_root,
        key,
        [[s.token for s in unit] for unit in units],
        feature_dim=teacher.feature_dim,
        meta=_run_meta(cfg, reader, teacher, bad),
    )
    totals, step_s, progress = _no_units()  # what a run with nothing to compute reports
    with writer.lock():
        pending = writer.pending_units()
        t_compute, compute_at = time.perf_counter(), time.time()
        startup_s = 0.0
        if pending:
            threads = _torch_threads(cfg)
            t_startup = time.perf_counter()
            with _client(cfg) as client, _keeping_torch_threads():
                _start_up(client, cfg, teacher_cfg, threads)
                t_compute = time.perf_counter()  # start-up is not throughput
                compute_at = time.time()
                startup_s = t_compute - t_startup
                futures = _submit_units(
                    client, cfg, writer, reader, teacher_cfg, units, pending, threads
                )
                totals, step_s, progress = _collect_units(
                    client, futures, writer, len(units), cfg.progress, t_compute
                )
                t_done = time.perf_counter()  # the last unit is written; closing is not compute
                done_at = time.time()
        else:
            t_done, done_at = t_compute, time.time()
        compute_s = t_done - t_compute
        summary = ExtractSummary(
            cache_path=str(writer.path),
            scans=len(scans),
            units=len(units),
            units_computed=len(pending),
            units_skipped=len(units) - len(pending),
            images=totals["images"],
            points=totals["points"],
            points_paired=totals["paired"],
            bytes_written=totals["bytes"],
            teacher_forwards=totals["forwards"],
            wall_s=time.perf_counter() - t_start,
            compute_s=compute_s,
            images_per_s=totals["images"] / compute_s if pending and compute_s > 0 else 0.0,
            steady_images_per_s=_steady_rate(progress, totals["images"], compute_s),
            teacher_random=teacher.identity.random,
            teacher_fitted=teacher.identity.fitted,
            scans_skipped=len(bad),
            scans_unlabelled=sum(s.label_path is None for s in scans),
            step_s={k: round(v, 3) for k, v in step_s.items()},
            startup_s=startup_s,
            compute_window=(compute_at, done_at),
        )
        if pending or not writer.is_finalized():  # a re-run keeps its first summary
            writer.finalize(summary.to_dict())
    return summary


def _decode_mode(cfg: ExtractConfig) -> str:
    """``cfg.image_decode`` resolved once, on this client: "cpu" or "device". With
    ``--scheduler`` the workers decode: "device" needs torchvision there, not here (a worker
    without it fails its start-up, naming it), and "auto" decided here is said when it may differ
    from the workers' view (no torchvision here, a CUDA teacher)."""
    if cfg.scheduler and cfg.image_decode == "device":
        return "device"
    mode = resolve_image_decode(cfg.image_decode, cfg.device)
    cuda = torch.device(cfg.device).type == "cuda"
    if cfg.scheduler and cfg.image_decode == "auto" and cuda and mode == "cpu":
        print(
            "warning: --image-decode auto is decided on this client, which has no torchvision: "
            "the workers decode on the CPU (pass --image-decode device for their GPUs)",
            file=sys.stderr,
            flush=True,
        )
    return mode


def _good_scans(
    scans: list[Scan], bad: dict[str, list[str]], split: str, skip_bad: bool
) -> list[Scan]:
    """``scans`` without the ``bad`` ones (`preflight`); DataError when there are bad scans and
    not ``skip_bad``, or when no scan is left."""
    if bad and not skip_bad:
        lines = [p for problems in bad.values() for p in problems]
        raise DataError(
            f"{len(bad)} of {len(scans)} scans of split {split!r} fail the pre-flight check "
            "(fix them, or pass --skip-bad to extract without them):\n  "
            + "\n  ".join(lines[:20])
            + (f"\n  ... {len(lines) - 20} more" if len(lines) > 20 else "")
        )
    scans = [s for s in scans if s.token not in bad]
    if not scans:
        raise DataError(f"split {split!r}: every scan fails the pre-flight check")
    return scans


def _start_up(client: Any, cfg: ExtractConfig, teacher_cfg: TeacherConfig, threads: int) -> None:
    """Make the cluster of ``client`` ready for units, before the clock starts: wait for its
    workers (a LocalCluster's all start now; a running cluster's may join later, and this says
    when it has none yet), check a running cluster runs this code, and prepare every worker."""
    if cfg.scheduler and not client.nthreads():  # say why nothing moves
        print(
            f"waiting for a worker to join the Dask cluster at {cfg.scheduler} (none yet: start "
            f"one with `PYTHONPATH={Path(__file__).resolve().parent.parent} dask worker "
            f"{cfg.scheduler}`, docs/scaling.md)",
            file=sys.stderr,
            flush=True,
        )
    client.wait_for_workers(1 if cfg.scheduler else cfg.n_workers)
    if cfg.scheduler:  # a LocalCluster runs this process's code
        _check_cluster(client, cfg.scheduler)
    _prepare_workers(client, teacher_cfg, cfg.batch_size, threads, cfg.image_decode)


def _submit_units(
    client: Any,
    cfg: ExtractConfig,
    writer: CacheWriter,
    reader: NuScenesReader,
    teacher_cfg: TeacherConfig,
    units: list[list[Scan]],
    pending: list[int],
    threads: int,
) -> dict[Any, int]:
    """One `extract_unit` task per ``pending`` unit; returns its future -> unit id."""
    # shared arguments travel to each worker once, not once per task
    writer_f, reader_f = _shared(client, writer), _shared(client, reader)
    return {
        client.submit(
            extract_unit,
            writer_f,
            u,
            units[u],
            reader_f,
            teacher_cfg,
            cfg.pairing,
            cfg.batch_size,
            threads,
            cfg.image_decode,
            key=f"extract-unit-{writer.key.digest()}-{u}",
            pure=False,
        ): u
        for u in pending
    }


def _no_units() -> tuple[dict[str, int], dict[str, float], list[tuple[float, int]]]:
    """Zero tallies: (totals, step seconds, progress) before any unit (`_collect_units`)."""
    totals = dict.fromkeys(("images", "points", "paired", "bytes", "forwards"), 0)
    step_s = dict.fromkeys(("pair_s", "image_wait_s", "teacher_s", "write_s"), 0.0)
    return totals, step_s, []


def _collect_units(
    client: Any,
    futures: dict[Any, int],
    writer: CacheWriter,
    n_units: int,
    show_progress: bool,
    t_compute: float,
) -> tuple[dict[str, int], dict[str, float], list[tuple[float, int]]]:
    """Wait for the units of ``futures`` (future -> unit id) under a progress bar over all
    ``n_units``; returns their summed statistics (`_no_units`' totals and step seconds) and,
    per unit done, (seconds since ``t_compute``, images so far). On a failure or Ctrl-C the
    units not started are cancelled (finished ones stay done) and the error names the cache.

    Each unit's future is taken out of ``futures`` once it is done: a held future keeps its
    result on a worker and its task on the scheduler, which would otherwise grow with every
    unit of the run."""
    from dask.distributed import as_completed
    from tqdm import tqdm

    totals, step_s, progress = _no_units()

    bar = tqdm(
        total=n_units,
        initial=n_units - len(futures),
        unit="unit",
        desc="extract",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    try:
        for future in as_completed(list(futures)):
            unit = futures.pop(future)  # done: dropped, so Dask can free its result
            try:
                stats = future.result()
            except Exception as e:
                raise UnitFailedError(
                    f"extraction of a unit of cache {writer.path} failed: {e} "
                    "(finished units are kept; re-run to resume)"
                ) from e
            if not writer.is_complete(unit):
                raise CacheError(
                    f"unit {unit} of cache {writer.path} was written by "
                    "a worker but is not complete as seen from here: do the "
                    "workers see this path, on the same file system?"
                )
            for name in totals:
                totals[name] += stats[name]
            for name in step_s:
                step_s[name] += stats[name]
            elapsed = time.perf_counter() - t_compute
            progress.append((elapsed, totals["images"]))
            bar.set_postfix(img_s=f"{totals['images'] / elapsed:.2f}", refresh=False)
            bar.update(1)
    except BaseException as e:
        client.cancel(list(futures))  # stop what has not started; done units stay done
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C: say what is kept
            raise KeyboardInterrupt(
                f"interrupted: {bar.n} of {n_units} units are in cache "
                f"{writer.path} (kept; a unit being written is discarded); the same "
                "command goes on from there"
            ) from None
        _wait_for_running_units()  # what has started finishes under our lock
        raise
    finally:
        bar.close()
    return totals, step_s, progress


def _steady_rate(progress: list[tuple[float, int]], images: int, compute_s: float) -> float:
    """Images/s between the 10 % and 90 % marks of ``progress`` ((seconds, images so far) at
    each unit's completion, in order); the whole run's rate with fewer than 10 units."""
    n = len(progress)
    if n < 10:
        return images / compute_s if n and compute_s > 0 else 0.0
    (t0, i0), (t1, i1) = progress[n // 10 - 1], progress[n - 1 - n // 10]
    return (i1 - i0) / (t1 - t0) if t1 > t0 else images / compute_s
