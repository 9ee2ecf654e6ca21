"""The student: a MinkUNet34-style sparse-conv U-Net on MinkowskiEngine, features per input point.

Layout (strides in voxels): stem (5^3 conv, stride 1) → 4 encoder stages, each a 2^3 stride-2
conv and residual blocks (strides 2, 4, 8, 16) → 4 decoder stages, each a 2^3 stride-2 transposed
conv, the encoder's skip at that stride concatenated, residual blocks (strides 8, 4, 2, 1).
Voxel features are sliced back to every input point (``ME.TensorField.slice``), so points that
share a voxel share a feature. Public API (also used by ``trainer/evaluate``):

- ``StudentConfig`` / ``build_student(cfg)`` → ``MinkUNet``; ``model(field)`` → (N, C) features.
- ``points_field(points_list, cfg, device)`` → ``ME.TensorField`` of a batch of raw scans;
  ``make_field(coords, feats, device, threads)`` the same from batched coordinates and features.
- ``point_features(model, points_list, device)`` → list of (N_i, C) per-scan features.
- ``load_backbone(run_dir)`` → (model in eval mode, StudentConfig) from a training run folder;
  ``load_checkpoint(path)`` → the checkpoint dict (ValueError naming a file that is not one).

Mixed precision: MinkowskiEngine's convolutions need features and kernels of the same dtype, and
autocast would turn some of them (the 1x1 convolutions are ``F.mm(kernel)``, the voxel averaging
a sparse matmul) into bfloat16. Every ME part therefore runs with autocast off on float32 features
(``float32_sparse``, ``no_autocast``); only what the caller does with the point features (the
projection head) runs in the caller's autocast.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.config import CHECKPOINT, CONFIG, read_run_record
from trainer.minkowski import ME

# name -> (stem width, 8 stage widths, 8 stage depths): encoder strides 2..16, decoder 8..1.
ARCHITECTURES: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "minkunet34": (32, (32, 64, 128, 256, 256, 128, 96, 96), (2, 3, 4, 6, 2, 2, 2, 2)),
    "tiny": (8, (8, 16, 16, 32, 16, 16, 16, 16), (1, 1, 1, 1, 1, 1, 1, 1)),
}
IN_CHANNELS = 2  # per point: 1 (occupancy of the voxel) and intensity * intensity_scale


@dataclass(frozen=True)
class StudentConfig:
    """What defines the student's architecture and input."""

    backbone: str = "minkunet34"
    """Key of ARCHITECTURES."""
    voxel_size: float = 0.1
    """Voxel edge, metres."""
    intensity_scale: float = 1.0 / 255.0
    """Input feature = intensity * this (nuScenes intensities are 0..255)."""

    def __post_init__(self) -> None:
        if self.backbone not in ARCHITECTURES:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {list(ARCHITECTURES)}")
        if self.voxel_size <= 0:
            raise ValueError(f"voxel_size must be > 0, got {self.voxel_size}")


def no_autocast(device: torch.device | str):
    """Context with autocast off for ``device``'s type (the sparse convolutions run in float32)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def float32_sparse(x: ME.SparseTensor) -> ME.SparseTensor:
    """``x`` itself if its features are float32, else the same coordinates with float32 features."""
    if x.F.dtype == torch.float32:
        return x
    return ME.SparseTensor(
        x.F.float(),
        coordinate_map_key=x.coordinate_map_key,
        coordinate_manager=x.coordinate_manager,
    )


def _conv(c_in: int, c_out: int, k: int, stride: int = 1) -> ME.MinkowskiConvolution:
    return ME.MinkowskiConvolution(c_in, c_out, kernel_size=k, stride=stride, dimension=3)


class BasicBlock(nn.Module):
    """Residual block: conv3-BN-ReLU-conv3-BN + (1x1 projected) identity, ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(c_in, c_out, 3), ME.MinkowskiBatchNorm(c_out)
        self.conv2, self.bn2 = _conv(c_out, c_out, 3), ME.MinkowskiBatchNorm(c_out)
        self.project = (
            None
            if c_in == c_out
            else nn.Sequential(_conv(c_in, c_out, 1), ME.MinkowskiBatchNorm(c_out))
        )
        self.relu = ME.MinkowskiReLU()

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        identity = x if self.project is None else self.project(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _blocks(c_in: int, c_out: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[BasicBlock(c_in if i == 0 else c_out, c_out) for i in range(n)])


class MinkUNet(nn.Module):
    """Sparse-conv U-Net; ``forward(field)`` → (N, out_channels) features of the field's points."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        stem, planes, depths = ARCHITECTURES[cfg.backbone]
        self.stem = nn.Sequential(
            _conv(IN_CHANNELS, stem, 5), ME.MinkowskiBatchNorm(stem), ME.MinkowskiReLU()
        )
        self.down, self.enc = nn.ModuleList(), nn.ModuleList()
        enc_channels = [stem]  # channels at strides 1, 2, 4, 8, 16
        c = stem
        for i in range(4):
            self.down.append(
                nn.Sequential(
                    _conv(c, c, 2, stride=2), ME.MinkowskiBatchNorm(c), ME.MinkowskiReLU()
                )
            )
            self.enc.append(_blocks(c, planes[i], depths[i]))
            c = planes[i]
            enc_channels.append(c)
        self.up, self.dec = nn.ModuleList(), nn.ModuleList()
        for i in range(4):
            p = planes[4 + i]
            self.up.append(
                nn.Sequential(
                    ME.MinkowskiConvolutionTranspose(c, p, kernel_size=2, stride=2, dimension=3),
                    ME.MinkowskiBatchNorm(p),
                    ME.MinkowskiReLU(),
                )
            )
            skip = enc_channels[3 - i]  # strides 8, 4, 2, 1
            self.dec.append(_blocks(p + skip, p, depths[4 + i]))
            c = p
        self.out_channels = c
        # channels of the decoder output at each stride (for auxiliary decoders)
        self.decoder_channels = {16 // 2 ** (i + 1): planes[4 + i] for i in range(4)}

    def forward_sparse(self, x: ME.SparseTensor) -> dict[int, ME.SparseTensor]:
        """Decoder outputs by tensor stride: {8: ..., 4: ..., 2: ..., 1: ...}."""
        skips = [self.stem(x)]
        for down, enc in zip(self.down, self.enc, strict=True):
            skips.append(enc(down(skips[-1])))
        out = skips.pop()  # stride 16
        by_stride = {}
        for up, dec in zip(self.up, self.dec, strict=True):
            out = dec(ME.cat(up(out), skips.pop()))
            by_stride[out.tensor_stride[0]] = out
        return by_stride

    def forward_with_strides(
        self, field: ME.TensorField
    ) -> tuple[torch.Tensor, dict[int, ME.SparseTensor]]:
        """((N, C) per-point features, decoder outputs by stride); float32 under any autocast."""
        with no_autocast(field.F.device):
            by_stride = self.forward_sparse(float32_sparse(field.sparse()))
            return by_stride[1].slice(field).F, by_stride

    def forward(self, field: ME.TensorField) -> torch.Tensor:
        """(N, C) features of every point of ``field``."""
        return self.forward_with_strides(field)[0]


def build_student(cfg: StudentConfig) -> MinkUNet:
    """The student backbone for ``cfg``."""
    return MinkUNet(cfg)


def input_features(points: torch.Tensor, cfg: StudentConfig) -> torch.Tensor:
    """(N, IN_CHANNELS) float32 input features of (N, 4) points x, y, z, intensity."""
    ones = torch.ones_like(points[:, 3:4])
    return torch.cat([ones, points[:, 3:4] * cfg.intensity_scale], dim=1)


def voxel_coordinates(xyz: np.ndarray | torch.Tensor, voxel_size: float) -> torch.Tensor:
    """(N, 3) int32 voxel indices floor(xyz / voxel_size) (the convention of every grid here)."""
    xyz = torch.as_tensor(xyz)
    return torch.floor(xyz.double() / voxel_size).to(torch.int32)


def make_field(
    coords: torch.Tensor, feats: torch.Tensor, device: str | torch.device, threads: int = 1
) -> ME.TensorField:
    """A batch of scans as one TensorField: coords (N, 4) batch index + voxel indices (as
    ``ME.utils.batched_coordinates`` makes them), feats (N, IN_CHANNELS). Points keep their order.

    ``threads``: CPU threads ME builds the kernel maps with (0 = ME's default: all cores, or
    OMP_NUM_THREADS). The kernel maps' order decides the float summation order, so results are
    bit-reproducible only for a fixed count; 1 was also the fastest on a loaded 2-core VM."""
    device = torch.device(device)
    manager = ME.CoordinateManager(
        D=3,
        num_threads=threads if threads > 0 else -1,
        coordinate_map_type=(
            ME.CoordinateMapType.CUDA if device.type == "cuda" else ME.CoordinateMapType.CPU
        ),
        minkowski_algorithm=ME.MinkowskiAlgorithm.SPEED_OPTIMIZED,
    )
    return ME.TensorField(
        feats.to(device=device, dtype=torch.float32),
        coordinates=coords.to(device=device, dtype=torch.float32),
        quantization_mode=ME.SparseTensorQuantizationMode.UNWEIGHTED_AVERAGE,
        coordinate_manager=manager,
    )


def points_field(
    points_list: list[np.ndarray], cfg: StudentConfig, device: str | torch.device
) -> ME.TensorField:
    """TensorField of raw (N_i, 4) float32 scans x, y, z, intensity (no augmentation)."""
    pts = [torch.as_tensor(np.asarray(p, np.float32)) for p in points_list]
    coords = ME.utils.batched_coordinates(
        [voxel_coordinates(p[:, :3], cfg.voxel_size) for p in pts], dtype=torch.float32
    )  # (N, 4)
    return make_field(coords, torch.cat([input_features(p, cfg) for p in pts]), device)


def point_features(
    model: MinkUNet, points_list: list[np.ndarray], device: str | torch.device
) -> list[torch.Tensor]:
    """Per-scan (N_i, C) features of raw scans (grad follows the caller's mode/no_grad)."""
    field = points_field(points_list, model.cfg, device)
    feats = model(field)  # (sum N_i, C)
    return list(torch.split(feats, [len(p) for p in points_list]))


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint a training run wrote at ``path`` (on the CPU; ``mmap``: tensors are read
    when used). FileNotFoundError when absent; ValueError naming the file when it is not one
    (truncated, garbled, another file)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint in this run folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:  # torch's, pickle's
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{path}: not a checkpoint of `cli.py train` (no model weights)")
    if not isinstance(state.get("step"), int):
        raise ValueError(f"{path}: not a checkpoint of `cli.py train` (no step)")
    return state


def load_backbone(run_dir: str | Path, device: str = "cpu") -> tuple[MinkUNet, StudentConfig]:
    """(backbone in eval mode with the weights of RUN_DIR/checkpoint.pt, its StudentConfig)."""
    run_dir = Path(run_dir)
    cfg = student_config_of_run(run_dir)
    state = load_checkpoint(run_dir / CHECKPOINT)
    model = build_student(cfg)
    model.load_state_dict(state["model"]["backbone"])
    return model.to(device).eval(), cfg


def student_config_of_run(run_dir: str | Path) -> StudentConfig:
    """StudentConfig recorded in RUN_DIR/config.yaml."""
    cfg = read_run_record(run_dir)["config"]
    voxel_size = cfg.get("voxel_size")
    try:
        if not isinstance(voxel_size, int | float) or isinstance(voxel_size, bool):
            raise ValueError(f"voxel_size must be a number, got {voxel_size!r}")
        return StudentConfig(backbone=cfg.get("backbone"), voxel_size=voxel_size)
    except ValueError as e:
        raise ValueError(f"{Path(run_dir) / CONFIG}: {e}") from None
