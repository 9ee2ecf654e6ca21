"""A stand-in for ONE GPU running the teacher: the `feed` benchmark only (never tests or runs).

While installed, `Teacher.patch_grid` sleeps batch / rate seconds (GIL released, no CPU work)
holding a file lock, so the forwards of every worker thread and worker process queue for one
"GPU", and returns a preallocated grid of the real shape. What is left is the CPU side of
extraction (decode, resize, pairing, sampling, writing, Dask): `feed` measures whether it keeps
a GPU of that rate busy on this machine. Caches written under it hold meaningless targets.

Settings travel in environment variables, so spawned Dask worker processes see them; those
load this file as a Dask preload (``dask_setup``).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

RATE_ENV = "CLEVERDISTILL_STANDIN_GPU_RATE"  # images/s; "0": a free teacher (no sleep)
LOCK_ENV = "CLEVERDISTILL_STANDIN_GPU_LOCK"  # lock file: one forward at a time, all processes

_REAL = "_standin_gpu_real_patch_grid"  # Teacher attribute holding the real method while installed
_grids: dict[tuple[int, ...], torch.Tensor] = {}


def _patch_grid(self, images, on_device: bool = False) -> torch.Tensor:
    pixels = self.resize(images)  # extraction's batches come resized: no work
    shape = (len(pixels), self.feature_dim, *self.grid_size)
    rate = float(os.environ[RATE_ENV])
    with open(os.environ[LOCK_ENV], "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if rate > 0:
            time.sleep(len(pixels) / rate)
        self.forward_count += 1
        self.image_count += len(pixels)
        if shape not in _grids:
            _grids[shape] = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return _grids[shape]


def install() -> None:
    """Replace `Teacher.patch_grid` in this process when the environment asks for it (once:
    the real method is kept on the class, so a second copy of this module cannot stack)."""
    from pipeline.teacher import Teacher

    if os.environ.get(RATE_ENV) and not hasattr(Teacher, _REAL):
        setattr(Teacher, _REAL, Teacher.patch_grid)
        Teacher.patch_grid = _patch_grid


def uninstall() -> None:
    from pipeline.teacher import Teacher

    if hasattr(Teacher, _REAL):
        Teacher.patch_grid = getattr(Teacher, _REAL)
        delattr(Teacher, _REAL)


def dask_setup(worker: Any = None) -> None:
    """Dask preload hook: worker processes install the stand-in at start."""
    install()


@contextmanager
def standin_gpu(rate: float | None, lock: Path, processes: bool) -> Iterator[None]:
    """The stand-in at ``rate`` images/s (None: free) for this process and, with
    ``processes``, for the Dask worker processes started inside the block (their preload is
    this file; thread workers share this process and its patched class)."""
    import dask
    import dask.distributed  # noqa: F401  (its config defaults must exist before config.set:
    # leaving the block would otherwise delete every "distributed" setting with ours)

    os.environ[RATE_ENV] = str(rate or 0)
    os.environ[LOCK_ENV] = str(lock)
    install()
    preload = [str(Path(__file__).resolve())] if processes else []
    try:
        with dask.config.set({"distributed.worker.preload": preload}):
            yield
    finally:
        uninstall()
        os.environ.pop(RATE_ENV, None)
        os.environ.pop(LOCK_ENV, None)
