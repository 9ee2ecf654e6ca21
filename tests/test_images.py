"""pipeline/images.py and the on-device image path of extraction.

The decoder itself (torchvision's nvJPEG) needs a CUDA device and torchvision: those tests are
skipped elsewhere and run on a lent GPU (benchmarks/gpu_check.sh runs this file there)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import open_cache
from pipeline.datasets import DataError, NuScenesReader
from pipeline.extract import ExtractConfig, extract_teacher
from pipeline.images import read_encoded, resolve_image_decode, torchvision_available
from pipeline.teacher import resize_uint8, resize_uint8_float

cuda_decode = pytest.mark.skipif(
    not (torch.cuda.is_available() and torchvision_available()),
    reason="needs a CUDA device and torchvision",
)


def test_float_resize_of_gpus_is_within_one_grey_level_of_the_cpu_uint8_resize() -> None:
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 900, 1600), np.uint8))
    for size in ((448, 896), (56, 98), (900, 1610)):  # down both ways, and up along x
        a = resize_uint8(x, size)  # the CPU's uint8 kernel
        b = resize_uint8_float(x, size)
        assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape == (2, 3, *size)
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 1, size
        assert (diff > 0).float().mean() < 0.2, size  # mostly identical


def test_image_decode_modes() -> None:
    assert resolve_image_decode("auto", "cpu") == "cpu"
    assert resolve_image_decode("cpu", "cuda") == "cpu"
    with pytest.raises(ValueError, match="image_decode must be one of"):
        resolve_image_decode("gpu", "cuda")
    if torchvision_available():
        assert resolve_image_decode("device", "cpu") == "device"
    else:
        with pytest.raises(ValueError, match="needs torchvision"):
            resolve_image_decode("device", "cuda")
    with pytest.raises(ValueError, match="image_decode must be one of"):
        ExtractConfig(data=".", cache_root=".", teacher="t", image_decode="nvjpeg")


def test_read_encoded_is_the_file_and_names_a_missing_one(synthetic_nuscenes, tmp_path) -> None:
    reader = NuScenesReader(synthetic_nuscenes.root, synthetic_nuscenes.version)
    camera = reader.scans("val")[0].cameras[0]
    data = read_encoded(camera)
    assert data.dtype == torch.uint8 and bytes(data.numpy()) == Path(camera.image_path).read_bytes()
    gone = replace(camera, image_path=str(tmp_path / "gone.jpg"))
    with pytest.raises(DataError, match="gone.jpg: image file missing"):
        read_encoded(gone)


# ---------------------------------------------------------------- CUDA + torchvision only ----
@pytest.fixture(scope="module")
def two_decodes(synthetic_nuscenes, tiny_teacher: Path, tmp_path_factory):
    """The val split extracted on CUDA twice: images decoded by PIL, and on the device."""
    base = ExtractConfig(
        data=synthetic_nuscenes.root,
        version=synthetic_nuscenes.version,
        cache_root=tmp_path_factory.mktemp("cache-decode"),
        teacher=str(tiny_teacher),
        split="val",
        image_size=(56, 98),
        n_workers=2,
        threads_per_worker=2,
        batch_size=4,
        scans_per_unit=1,
        device="cuda",
        progress=False,
    )
    out = {}
    for mode in ("cpu", "device"):
        root = tmp_path_factory.mktemp(f"cache-{mode}")
        summary = extract_teacher(replace(base, cache_root=root, image_decode=mode))
        out[mode] = summary.cache_path
    return out


@cuda_decode
def test_device_decode_gives_the_cpu_targets(two_decodes) -> None:
    # the decoder is part of the cache key (the pixels differ by a few grey levels): two caches
    assert Path(two_decodes["cpu"]).name != Path(two_decodes["device"]).name
    cpu, dev = open_cache(two_decodes["cpu"]), open_cache(two_decodes["device"])
    for i in range(len(cpu)):
        a, b = cpu.read_scan(i), dev.read_scan(i)
        assert np.array_equal(a.camera, b.camera) and np.array_equal(a.uv, b.uv)
        paired = a.camera >= 0
        ta = torch.from_numpy(a.target[paired].astype(np.float32))
        tb = torch.from_numpy(b.target[paired].astype(np.float32))
        cos = torch.nn.functional.cosine_similarity(ta, tb, dim=1)
        assert cos.min() > 0.99 and cos.mean() > 0.999, (cos.min(), cos.mean())


@cuda_decode
def test_device_decode_names_a_broken_jpeg(synthetic_nuscenes, tmp_path: Path) -> None:
    from pipeline.images import decode_on_device

    reader = NuScenesReader(synthetic_nuscenes.root, synthetic_nuscenes.version)
    cameras = list(reader.scans("val")[0].cameras[:3])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(cameras[1].image_path).read_bytes()[:2000])  # truncated
    cameras[1] = replace(cameras[1], image_path=str(broken))
    good = decode_on_device([cameras[0]], [read_encoded(cameras[0])], "cuda")[0]
    ref = torch.from_numpy(reader.load_image(cameras[0]))
    assert good.shape == ref.shape and (good.cpu().int() - ref.int()).abs().float().mean() < 2
    with pytest.raises(DataError, match="broken.jpg: cannot decode image"):
        decode_on_device(cameras, [read_encoded(c) for c in cameras], "cuda")


def test_resize_of_an_image_sized_the_other_way_round() -> None:
    """An image of (W, H) pixels, the target size transposed, is resized to (H, W) all the
    same; an image already of the target size is returned as it is."""
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 3, 98, 56), np.uint8))
    assert resize_uint8(x, (56, 98)).shape == (1, 3, 56, 98)
    assert resize_uint8(x, (98, 56)) is x
