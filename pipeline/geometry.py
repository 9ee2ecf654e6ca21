"""Small pure geometry functions: rigid transforms, calibration checks, point transforms.

Conventions: a pose ``T_a_to_b`` is a (4, 4) float64 homogeneous matrix that maps points expressed
in frame ``a`` to frame ``b`` (``x_b = R x_a + t``). Quaternions are nuScenes-style ``(w, x, y, z)``.
The checks raise ``ValueError`` with the problem; callers add the file / record name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pyquaternion import Quaternion

# |‖q‖ − 1| above this is a broken record, not rounding (nuScenes stores ~1e-15 accurate values).
UNIT_QUATERNION_TOLERANCE = 1e-3
# |det K| below this (in px²) is a degenerate camera matrix.
MIN_INTRINSIC_DET = 1e-6


def check_unit_quaternion(rotation: Sequence[float]) -> None:
    """Raise ValueError unless ``rotation`` is 4 finite numbers of unit norm (w, x, y, z)."""
    q = np.asarray(rotation, dtype=np.float64)
    if q.shape != (4,) or not np.all(np.isfinite(q)):
        raise ValueError(f"rotation must be 4 finite numbers (w, x, y, z), got {list(rotation)}")
    norm = float(np.linalg.norm(q))
    if abs(norm - 1.0) > UNIT_QUATERNION_TOLERANCE:
        raise ValueError(f"rotation quaternion {q.tolist()} is not unit (norm {norm:.6g})")


def check_intrinsic(intrinsic: np.ndarray) -> None:
    """Raise ValueError unless ``intrinsic`` is a finite, invertible (3, 3) pinhole matrix
    with last row (0, 0, 1) and positive focal lengths."""
    k = np.asarray(intrinsic, dtype=np.float64)
    if k.shape != (3, 3) or not np.all(np.isfinite(k)):
        raise ValueError(f"camera_intrinsic must be a finite 3x3 matrix, got {k.tolist()}")
    if not np.allclose(k[2], (0.0, 0.0, 1.0)):
        raise ValueError(f"camera_intrinsic last row must be (0, 0, 1), got {k[2].tolist()}")
    det = float(np.linalg.det(k))
    if abs(det) < MIN_INTRINSIC_DET or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise ValueError(
            f"camera_intrinsic is singular or has non-positive focal length: {k.tolist()}"
        )


def pose_matrix(rotation: Sequence[float], translation: Sequence[float]) -> np.ndarray:
    """(w, x, y, z) unit quaternion + (3,) translation → (4, 4) float64 rigid transform."""
    check_unit_quaternion(rotation)
    t = np.asarray(translation, dtype=np.float64)
    if t.shape != (3,) or not np.all(np.isfinite(t)):
        raise ValueError(f"translation must be 3 finite numbers, got {list(translation)}")
    matrix = np.eye(4)
    matrix[:3, :3] = Quaternion(np.asarray(rotation, dtype=np.float64)).rotation_matrix
    matrix[:3, 3] = t
    return matrix


def invert_rigid(transform: np.ndarray) -> np.ndarray:
    """Exact inverse of a (4, 4) rigid transform: (R, t) → (Rᵀ, −Rᵀt)."""
    rotation_t = transform[:3, :3].T
    inverse = np.eye(4)
    inverse[:3, :3] = rotation_t
    inverse[:3, 3] = -rotation_t @ transform[:3, 3]
    return inverse


def transform_points(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (4, 4) transform to (N, 3) points → (N, 3) float64."""
    points = np.asarray(points, dtype=np.float64)
    return points @ transform[:3, :3].T + transform[:3, 3]


def project_pinhole(intrinsic: np.ndarray, points_cam: np.ndarray) -> np.ndarray:
    """(N, 3) camera-frame points (z forward) → (N, 2) pixel coordinates ``(u, v)``.

    Same as the devkit's ``view_points(..., normalize=True)``: ``(K p)[:2] / z``. Points with
    z <= 0 get meaningless values; callers mask them by depth first.
    """
    homogeneous = points_cam @ np.asarray(intrinsic, dtype=np.float64).T  # (N, 3)
    with np.errstate(divide="ignore", invalid="ignore"):
        return homogeneous[:, :2] / homogeneous[:, 2:3]
