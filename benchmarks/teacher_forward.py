"""Bare teacher throughput: images/s of `Teacher.patch_grid` on decoded uint8 images.

    python benchmarks/teacher_forward.py --teacher DIR --image-size 448x896 --batch 6 \
        [--device cuda --dtype bfloat16] [--compare-dtypes]

With --compare-dtypes (CUDA) it also reports the cosine similarity of float16/bfloat16 grids to
float32 ones. Used for the numbers in docs/extraction.md.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pipeline.teacher import Teacher, TeacherConfig, parse_image_size


def images_per_second(
    teacher: Teacher, images: np.ndarray, repeats: int, forward_only: bool = False
) -> tuple[float, float]:
    """(images per wall second, CPU seconds of this process per image) of `Teacher.patch_grid`.

    Default: resize from the decoded size + forward + the grid copied back to the CPU.
    ``forward_only``: the images are resized once beforehand and the grid stays on the
    teacher's device (synchronised at the end): the teacher's own rate, the strictest
    denominator of the extraction ratio."""
    cuda = teacher.cfg.device.startswith("cuda")
    if forward_only:
        images = teacher.resize(images)  # (B, H, W, 3) uint8, pinned on CUDA
    teacher.patch_grid(images, on_device=forward_only)  # warm-up (allocations, kernels)
    if cuda:
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        teacher.patch_grid(images, on_device=forward_only)
    if cuda:
        torch.cuda.synchronize()
    n = repeats * len(images)
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--image-size", default="448x896")
    p.add_argument("--source-size", default="900x1600", help="HxW of the decoded input images")
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compare-dtypes", action="store_true")
    p.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = p.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    h0, w0 = parse_image_size(args.source_size)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, h0, w0, 3), dtype=np.uint8)
    size = parse_image_size(args.image_size)
    result = {
        "teacher": args.teacher,
        "image_size": size,
        "batch": args.batch,
        "device": args.device,
        "threads": torch.get_num_threads(),
    }
    dtypes = ["float32", "float16", "bfloat16"] if args.compare_dtypes else [args.dtype]
    grids = {}
    for dtype in dtypes:
        teacher = Teacher(TeacherConfig(args.teacher, size, args.device, dtype))
        rate, cpu = images_per_second(teacher, images, args.repeats)
        result[f"images_per_s_{dtype}"] = round(rate, 2)
        result[f"cpu_s_per_image_{dtype}"] = round(cpu, 3)
        grids[dtype] = teacher.patch_grid(images)
    for dtype in dtypes[1:]:
        cos = torch.nn.functional.cosine_similarity(grids[dtype], grids["float32"], dim=1)
        result[f"cosine_{dtype}_vs_float32_min"] = round(cos.min().item(), 5)
        result[f"cosine_{dtype}_vs_float32_mean"] = round(cos.mean().item(), 5)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
