"""A stand-in for ONE GPU running the teacher: the `feed` benchmark only (never tests or runs).

While installed, `Teacher.patch_grid` sleeps batch / rate seconds (GIL released, no CPU work)
holding a file lock, so the forwards of every worker thread and worker process queue for one
"GPU", and returns a preallocated grid of the real shape. What is left is the CPU side of
extraction (decode, resize, pairing, sampling, writing, Dask): `feed` measures whether it keeps
a GPU of that rate busy on this machine. Caches written under it hold meaningless targets.

With ``decode=True`` it also stands in for on-device JPEG decoding (``--image-decode device``,
nvJPEG on a real GPU): the files are still read on the CPU, as there, but not decoded; a batch
"decodes" to a preallocated resized batch, and the images' original sizes come from their
records. `feed --image-decode device` then measures the CPU side of the GPU-decode path, which
needs torchvision and a GPU to run for real.

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
DECODE_ENV = "CLEVERDISTILL_STANDIN_GPU_DECODE"  # "1": stand in for on-device decoding too

_REAL = "_standin_gpu_real_patch_grid"  # Teacher attribute holding the real method while installed
_REAL_DECODE = "_standin_gpu_real"  # pipeline.extract attribute: its real decode functions
_grids: dict[tuple[int, ...], torch.Tensor] = {}
_pixels: dict[tuple[int, ...], torch.Tensor] = {}


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


def _decode_batch(scans, teacher, batch, encoded) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """`pipeline.extract._decode_batch` on a stand-in GPU: the files were read (``encoded``),
    decoding and resizing cost the CPU nothing, as with nvJPEG."""
    cameras = [scans[j].cameras[c] for j, c in batch]
    shape = (len(batch), *teacher.cfg.image_size, 3)
    if shape not in _pixels:
        _pixels[shape] = torch.zeros(shape, dtype=torch.uint8)
    return _pixels[shape], [(cam.height, cam.width) for cam in cameras]


def install() -> None:
    """Replace `Teacher.patch_grid` (and, with on-device decoding, extraction's decode step) in
    this process when the environment asks for it (once: the real functions are kept aside, so
    a second copy of this module cannot stack)."""
    import pipeline.extract as extract
    from pipeline.teacher import Teacher

    if os.environ.get(RATE_ENV) and not hasattr(Teacher, _REAL):
        setattr(Teacher, _REAL, Teacher.patch_grid)
        Teacher.patch_grid = _patch_grid
    if os.environ.get(DECODE_ENV) == "1" and not hasattr(extract, _REAL_DECODE):
        setattr(
            extract,
            _REAL_DECODE,
            (extract._decode_batch, extract._warm_up_decoder, extract.resolve_image_decode),
        )
        extract._decode_batch = _decode_batch
        extract._warm_up_decoder = lambda device: None
        extract.resolve_image_decode = lambda mode, device: "device"


def uninstall() -> None:
    import pipeline.extract as extract
    from pipeline.teacher import Teacher

    if hasattr(Teacher, _REAL):
        Teacher.patch_grid = getattr(Teacher, _REAL)
        delattr(Teacher, _REAL)
    if hasattr(extract, _REAL_DECODE):
        real = getattr(extract, _REAL_DECODE)
        extract._decode_batch, extract._warm_up_decoder, extract.resolve_image_decode = real
        delattr(extract, _REAL_DECODE)


def dask_setup(worker: Any = None) -> None:
    """Dask preload hook: worker processes install the stand-in at start."""
    install()


@contextmanager
def standin_gpu(
    rate: float | None, lock: Path, processes: bool, decode: bool = False
) -> Iterator[None]:
    """The stand-in at ``rate`` images/s (None: free) for this process and, with
    ``processes``, for the Dask worker processes started inside the block (their preload is
    this file; thread workers share this process and its patched class). ``decode``: it
    decodes the JPEGs too (extraction must run with image_decode "device")."""
    import dask
    import dask.distributed  # noqa: F401  (its config defaults must exist before config.set:
    # leaving the block would otherwise delete every "distributed" setting with ours)

    os.environ[RATE_ENV] = str(rate or 0)
    os.environ[LOCK_ENV] = str(lock)
    os.environ[DECODE_ENV] = "1" if decode else "0"
    install()
    preload = [str(Path(__file__).resolve())] if processes else []
    try:
        with dask.config.set({"distributed.worker.preload": preload}):
            yield
    finally:
        uninstall()
        os.environ.pop(RATE_ENV, None)
        os.environ.pop(LOCK_ENV, None)
        os.environ.pop(DECODE_ENV, None)
