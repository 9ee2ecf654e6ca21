"""Camera images decoded on the teacher's device: JPEG bytes → uint8 RGB tensors, nvJPEG on CUDA.

Extraction decodes images on the CPU with PIL (`pipeline.datasets.nuscenes.read_image`) unless
asked to decode them where the teacher runs (``ExtractConfig.image_decode``): on a GPU node the
CPU side must feed the teacher, and JPEG decode + resize were ~14 ms of CPU per 1600x900 image
there (docs/benchmarks.md). This module does that with torchvision's ``decode_jpeg`` (batched
nvJPEG on CUDA). torchvision is an optional dependency (it must match the installed torch), only
needed for this mode.

- `read_encoded` reads a file's bytes (I/O only: the prefetch thread runs it).
- `decode_on_device` decodes a batch; files that are not whole JPEGs (no end-of-image marker:
  truncated), or that the device decoder refuses, go through PIL (`read_image`), so a bad file
  raises the same `DataError` naming it. Every image is checked against its record's size, as
  `read_image` does.

Pixels differ from PIL's by a few grey levels at most (another IDCT); the cache records which
decoder a run used (meta ``extract_config.image_decode``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.datasets import DataError
from pipeline.datasets.nuscenes import read_image
from pipeline.datasets.records import CameraFrame

IMAGE_DECODES = ("auto", "cpu", "device")
"""``ExtractConfig.image_decode`` values: auto = device when the teacher is on CUDA and
torchvision is installed, else cpu."""
JPEG_START = b"\xff\xd8\xff"  # SOI, then the first marker
JPEG_END = b"\xff\xd9"  # EOI: a truncated file lacks it (and goes through PIL, which says so)


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def resolve_image_decode(mode: str, device: str) -> str:
    """``mode`` ("auto", "cpu", "device") for a teacher on ``device`` → "cpu" or "device";
    ValueError for an unknown mode or "device" without torchvision."""
    if mode not in IMAGE_DECODES:
        raise ValueError(f"image_decode must be one of {IMAGE_DECODES}, got {mode!r}")
    if mode == "auto":
        cuda = torch.device(device).type == "cuda"
        return "device" if cuda and torchvision_available() else "cpu"
    if mode == "device" and not torchvision_available():
        raise ValueError(
            "image_decode 'device' needs torchvision (the build matching torch "
            f"{torch.__version__}: pip install torchvision); or use image_decode 'cpu'"
        )
    return mode


def read_encoded(camera: CameraFrame) -> torch.Tensor:
    """The bytes of ``camera``'s image file as a (n,) uint8 CPU tensor; DataError if missing."""
    path = camera.image_path
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError as e:
        raise DataError(f"{path}: image file missing ({camera.channel})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read image file ({e})") from e
    return torch.from_numpy(data)


def _whole_jpeg(data: torch.Tensor) -> bool:
    """Starts like a JPEG and ends with its end-of-image marker."""
    head, tail = bytes(data[:3].tolist()), bytes(data[-2:].tolist())
    return len(data) > 4 and head == JPEG_START and tail == JPEG_END


def decode_on_device(
    cameras: Sequence[CameraFrame], encoded: Sequence[torch.Tensor], device: str
) -> list[torch.Tensor]:
    """Decode the images of ``cameras`` (their `read_encoded` bytes) on ``device``: one
    (H0, W0, 3) uint8 RGB tensor each, on ``device``. JPEGs are decoded in one batched
    torchvision call; other files, and a batch the decoder refuses, image by image with PIL
    (a broken file then raises `DataError` naming it)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(cameras)
    jpeg = [i for i, e in enumerate(encoded) if _whole_jpeg(e)]
    if jpeg:
        try:
            decoded = decode_jpeg(
                [encoded[i] for i in jpeg], mode=ImageReadMode.RGB, device=device
            )  # each (3, H0, W0)
        except RuntimeError:
            decoded = None  # PIL below decodes each one, or names the broken file
        if decoded is not None:
            for i, image in zip(jpeg, decoded, strict=True):
                out[i] = image.permute(1, 2, 0)  # (H0, W0, 3), a view
    for i, camera in enumerate(cameras):
        if out[i] is None:
            out[i] = torch.from_numpy(np.array(read_image(camera))).to(device)
        h, w = out[i].shape[:2]
        if (h, w) != (camera.height, camera.width):
            raise DataError(
                f"{camera.image_path}: image is {w}x{h}, the record says "
                f"{camera.width}x{camera.height}"
            )
    return out
