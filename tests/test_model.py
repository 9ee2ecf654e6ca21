"""MinkowskiEngine smoke tests and the student U-Net (tiny width, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.minkowski import ME
from trainer.model import (
    ARCHITECTURES,
    StudentConfig,
    build_student,
    point_features,
    points_field,
    voxel_coordinates,
)


def _sparse(n: int = 200, c: int = 3, seed: int = 0, dtype=torch.float32) -> ME.SparseTensor:
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.randint(0, 12, (n, 3), generator=g), dim=0).int()
    batched = ME.utils.batched_coordinates([coords])
    feats = torch.randn(len(coords), c, generator=g, dtype=dtype)
    return ME.SparseTensor(feats, coordinates=batched)


def test_sparse_conv_forward_backward() -> None:
    x = _sparse()
    conv = ME.MinkowskiConvolution(3, 5, kernel_size=3, stride=2, dimension=3)
    y = conv(x)
    assert y.tensor_stride == [2, 2, 2]
    assert y.F.shape == (len(y.C), 5) and len(y.C) < len(x.C)
    y.F.square().sum().backward()
    assert conv.kernel.grad is not None and conv.kernel.grad.shape == (27, 3, 5)
    assert conv.kernel.grad.abs().sum() > 0


def test_1x1_conv_is_a_matmul_with_the_matmul_gradient() -> None:
    x = _sparse()
    conv = ME.MinkowskiConvolution(3, 4, kernel_size=1, dimension=3)
    y = conv(x)
    torch.testing.assert_close(y.F, x.F @ conv.kernel, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y.F)
    (y.F * g).sum().backward()
    torch.testing.assert_close(conv.kernel.grad, x.F.T @ g, rtol=1e-4, atol=1e-5)


def test_sparse_conv_gradcheck_float64() -> None:
    x = _sparse(n=40, c=2, dtype=torch.float64)
    conv = ME.MinkowskiConvolution(2, 2, kernel_size=3, dimension=3).double()
    feats = x.F.clone().requires_grad_(True)

    def f(feats: torch.Tensor) -> torch.Tensor:
        return conv(ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key,
                                    coordinate_manager=x.coordinate_manager)).F  # fmt: skip

    assert torch.autograd.gradcheck(f, (feats,), eps=1e-6, atol=1e-5)


def test_voxel_coordinates_floor_negative_coordinates() -> None:
    """floor, not truncation toward zero: the occupancy rays (np.floor) share this grid."""
    xyz = np.array([[0.05, -0.05, -0.15], [1.23, -1.23, -0.01]], np.float32)
    assert voxel_coordinates(xyz, 0.1).tolist() == [[0, -1, -2], [12, -13, -1]]


def test_student_gives_one_feature_per_point_shared_within_a_voxel() -> None:
    torch.manual_seed(0)
    model = build_student(StudentConfig(backbone="tiny")).eval()
    rng = np.random.default_rng(0)
    a = rng.uniform(-10, 10, (500, 4)).astype(np.float32)
    b = rng.uniform(-10, 10, (300, 4)).astype(np.float32)
    a[0, :3] = np.floor(a[0, :3] / 0.1) * 0.1 + 0.03
    a[1, :3] = a[0, :3] + 0.04  # same 0.1 m voxel as point 0 (checked below)
    assert (voxel_coordinates(a[:2, :3], 0.1)[0] == voxel_coordinates(a[:2, :3], 0.1)[1]).all()
    with torch.no_grad():
        fa, fb = point_features(model, [a, b], "cpu")
        (fa_alone,) = point_features(model, [a], "cpu")
    assert fa.shape == (500, model.out_channels) and fb.shape == (300, model.out_channels)
    torch.testing.assert_close(fa[0], fa[1])
    assert not torch.allclose(fa[0], fa[2])
    # scans in a batch do not see each other (eval mode: batch norm uses running stats)
    torch.testing.assert_close(fa, fa_alone, rtol=1e-4, atol=1e-5)


def test_student_backward_reaches_the_stem_and_widths_differ() -> None:
    model = build_student(StudentConfig(backbone="tiny"))
    pts = np.random.default_rng(1).uniform(-5, 5, (400, 4)).astype(np.float32)
    feats = model(points_field([pts], model.cfg, "cpu"))
    feats.square().mean().backward()
    assert model.stem[0].kernel.grad.abs().sum() > 0
    full = build_student(StudentConfig(backbone="minkunet34"))
    assert full.out_channels == ARCHITECTURES["minkunet34"][1][-1] == 96
    n_full = sum(p.numel() for p in full.parameters())
    n_tiny = sum(p.numel() for p in model.parameters())
    assert n_full > 20e6 and n_tiny < 1e6


def test_unknown_backbone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'big'"):
        StudentConfig(backbone="big")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_linear_head_is_affine_mlp_head_is_not(kind: str) -> None:
    """The "linear" ablation head is one affine map C -> D (f(a x + (1 - a) y) equals
    a f(x) + (1 - a) f(y), C * D + D parameters); the method's MLP head is not affine."""
    from trainer.heads import build_head

    torch.manual_seed(0)
    head = build_head(kind, 8, 5, hidden=16)
    x, y = torch.randn(64, 8), torch.randn(64, 8)
    with torch.no_grad():
        fx, fy, fm = head(x), head(y), head(0.3 * x + 0.7 * y)
    assert fx.shape == (64, 5)
    affine = torch.allclose(fm, 0.3 * fx + 0.7 * fy, atol=1e-5)
    n_params = sum(p.numel() for p in head.parameters())
    assert affine == (kind == "linear") and (n_params == 8 * 5 + 5) == (kind == "linear")
