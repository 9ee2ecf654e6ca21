"""SemanticKITTI reader: the standard odometry layout, the standard 19-class learning map.

Layout (``root`` is the folder that holds ``sequences/``)::

    sequences/XX/velodyne/NNNNNN.bin   float32 (N, 4): x, y, z, remission   (lidar frame)
    sequences/XX/labels/NNNNNN.label   uint32 (N,): lower 16 bits semantic id, upper 16 instance id
    sequences/XX/calib.txt             P0..P3 (3x4 projections), Tr (3x4 velodyne → camera 0)
    sequences/XX/poses.txt             one 3x4 row-major pose a scan: camera 0 → camera 0 of scan 0
    sequences/XX/times.txt             optional, seconds since the sequence start, one a scan
    sequences/XX/image_2/NNNNNN.png    optional, the left colour camera

Records follow ``pipeline/datasets/records.py``: the ego frame is the lidar frame
(``sensor_to_ego`` = identity) and the "global" frame is the lidar frame of the sequence's first
scan, so ``ego_to_global = Tr⁻¹ · pose · Tr``. Scan tokens are ``"<sequence>_<frame>"``
(``"08_000123"``). Raw semantic ids are mapped to 0..18 (``class_names``), everything else that the
standard map sends to "unlabeled" (0 unlabeled, 1 outlier, 52 other-structure, 99 other-object)
to 255 = ignore. A raw id the standard map does not know is an error naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.datasets.records import CameraFrame, DataError, Scan

IGNORE_LABEL = 255

CLASS_NAMES: tuple[str, ...] = (
    "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
    "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence",
    "vegetation", "trunk", "terrain", "pole", "traffic-sign",
)  # fmt: skip

# Raw SemanticKITTI id → standard learning-map class (1..19, 0 = unlabeled), as in the official
# semantic-kitti.yaml; moving-* classes fold into their static class.
_RAW_TO_LEARNING: dict[int, int] = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8,
    40: 9, 44: 10, 48: 11, 49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17,
    80: 18, 81: 19, 99: 0, 252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}  # fmt: skip

# Official splits. The test sequences have no labels.
SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10"),
    "val": ("08",),
    "test": tuple(f"{i:02d}" for i in range(11, 22)),
}

_UNKNOWN = 254  # internal marker in the lookup table for raw ids outside the standard map


def learning_map() -> dict[int, int]:
    """Raw semantic id → training class 0..18, or 255 (ignore)."""
    return {raw: (c - 1 if c > 0 else IGNORE_LABEL) for raw, c in _RAW_TO_LEARNING.items()}


def _learning_lut() -> np.ndarray:
    lut = np.full(1 << 16, _UNKNOWN, dtype=np.uint8)  # (65536,)
    for raw, cls in learning_map().items():
        lut[raw] = cls
    return lut


_LUT = _learning_lut()


def map_labels(raw: np.ndarray, source: str = "labels") -> np.ndarray:
    """uint32 raw labels (instance << 16 | semantic) → (N,) uint8 classes 0..18 / 255."""
    semantic = (np.asarray(raw, dtype=np.uint32) & 0xFFFF).astype(np.int64)
    out = _LUT[semantic]
    if np.any(out == _UNKNOWN):
        bad = sorted(set(semantic[out == _UNKNOWN].tolist()))[:10]
        raise DataError(f"{source}: raw semantic ids not in the SemanticKITTI map: {bad}")
    return out


def read_calib(path: Path) -> dict[str, np.ndarray]:
    """calib.txt → {"P0".."P3": (3, 4), "Tr": (4, 4)} float64."""
    entries: dict[str, np.ndarray] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, _, values = line.partition(":")
        try:
            numbers = np.array([float(v) for v in values.split()], dtype=np.float64)
        except ValueError as e:
            raise DataError(f"{path}: line {lineno}: not numbers ({e})") from None
        if numbers.size != 12:
            raise DataError(f"{path}: line {lineno}: {key} has {numbers.size} values, expected 12")
        entries[key.strip()] = numbers.reshape(3, 4)
    if "Tr" not in entries:
        raise DataError(f"{path}: no 'Tr' (velodyne → camera 0) entry")
    calib = dict(entries)
    calib["Tr"] = np.vstack([entries["Tr"], [0.0, 0.0, 0.0, 1.0]])
    return calib


def read_poses(path: Path) -> np.ndarray:
    """poses.txt → (S, 4, 4) float64 camera-0 poses."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        values = line.split()
        if len(values) != 12:
            raise DataError(f"{path}: line {lineno}: {len(values)} values, expected 12")
        rows.append(np.array(values, dtype=np.float64).reshape(3, 4))
    poses = np.tile(np.eye(4), (len(rows), 1, 1))
    if rows:
        poses[:, :3, :] = np.stack(rows)
    return poses


class SemanticKITTIReader:
    """Plain reader of a SemanticKITTI root (the folder that holds ``sequences/``)."""

    class_names: tuple[str, ...] = CLASS_NAMES
    label_bytes_per_point: int = 4  # uint32 .label

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.sequences_dir = self.root / "sequences"
        if not self.sequences_dir.is_dir():
            raise FileNotFoundError(
                f"{self.root}: not a SemanticKITTI root (no 'sequences/' folder inside)"
            )

    def available_sequences(self) -> list[str]:
        """Sequence folders present on disk, sorted."""
        return sorted(p.name for p in self.sequences_dir.iterdir() if (p / "velodyne").is_dir())

    def scans(self, split: str) -> list[Scan]:
        """Scans of the split's sequences that exist on disk, in sequence/frame order.

        ``split`` is "train", "val", "test" or an explicit comma-separated list of sequences
        ("00,08"). Sequences of a named split that are missing are skipped (partial downloads and
        the synthetic set); a split with none present is an error.
        """
        if split in SPLITS:
            wanted = SPLITS[split]
        elif all(s.strip().isdigit() for s in split.split(",")):
            wanted = tuple(f"{int(s):02d}" for s in split.split(","))
        else:
            raise ValueError(
                f"unknown SemanticKITTI split {split!r}: use {sorted(SPLITS)} or '00,08'"
            )
        present = set(self.available_sequences())
        sequences = [s for s in wanted if s in present]
        if not sequences:
            raise FileNotFoundError(
                f"{self.sequences_dir}: none of the sequences of split {split!r} ({', '.join(wanted)}) "
                f"is present (found: {', '.join(sorted(present)) or 'none'})"
            )
        return [scan for seq in sequences for scan in self._sequence_scans(seq)]

    def _sequence_scans(self, seq: str) -> list[Scan]:
        seq_dir = self.sequences_dir / seq
        calib_path = seq_dir / "calib.txt"
        if not calib_path.is_file():
            raise FileNotFoundError(f"{calib_path}: missing calibration file")
        calib = read_calib(calib_path)
        tr = calib["Tr"]  # (4, 4) velodyne → camera 0
        tr_inv = np.linalg.inv(tr)
        frames = sorted(p.stem for p in (seq_dir / "velodyne").glob("*.bin"))
        poses_path = seq_dir / "poses.txt"
        if poses_path.is_file():
            poses = read_poses(poses_path)
            if len(poses) != len(frames):
                raise DataError(
                    f"{poses_path}: {len(poses)} poses for {len(frames)} velodyne scans"
                )
        else:  # test sequences of old releases come without poses
            poses = np.tile(np.eye(4), (len(frames), 1, 1))
        times_path = seq_dir / "times.txt"
        if times_path.is_file():
            times = np.loadtxt(times_path, dtype=np.float64, ndmin=1)
            if len(times) != len(frames):
                raise DataError(f"{times_path}: {len(times)} times for {len(frames)} scans")
        else:
            times = np.arange(len(frames), dtype=np.float64) * 0.1  # 10 Hz
        scans = []
        for i, frame in enumerate(frames):
            ego_to_global = tr_inv @ poses[i] @ tr  # lidar(i) → lidar(0)
            timestamp = int(round(times[i] * 1e6))
            label_path = seq_dir / "labels" / f"{frame}.label"
            scans.append(
                Scan(
                    token=f"{seq}_{frame}",
                    lidar_token=f"{seq}_{frame}",
                    lidar_path=str(seq_dir / "velodyne" / f"{frame}.bin"),
                    sensor_to_ego=np.eye(4),
                    ego_to_global=ego_to_global,
                    timestamp=timestamp,
                    cameras=self._cameras(seq_dir, frame, calib, ego_to_global, timestamp),
                    label_path=str(label_path) if label_path.is_file() else None,
                    scene=seq,
                )
            )
        return scans

    @staticmethod
    def _cameras(
        seq_dir: Path, frame: str, calib: dict, ego_to_global: np.ndarray, timestamp: int
    ) -> tuple[CameraFrame, ...]:
        """The left colour camera (image_2) when its image exists, else no camera."""
        image = seq_dir / "image_2" / f"{frame}.png"
        if not image.is_file() or "P2" not in calib:
            return ()
        from PIL import Image  # header read only

        with Image.open(image) as im:
            width, height = im.size
        p2 = calib["P2"]  # (3, 4) = K · [I | t] in rectified camera-0 coordinates
        intrinsic = p2[:, :3].copy()
        cam0_to_cam2 = np.eye(4)
        cam0_to_cam2[:3, 3] = np.linalg.solve(intrinsic, p2[:, 3])
        lidar_to_cam2 = cam0_to_cam2 @ calib["Tr"]
        return (
            CameraFrame(
                channel="CAM2",
                image_path=str(image),
                width=width,
                height=height,
                intrinsic=intrinsic,
                sensor_to_ego=np.linalg.inv(lidar_to_cam2),
                ego_to_global=ego_to_global,
                timestamp=timestamp,
            ),
        )

    def load_rings(self, scan: Scan) -> None:
        """None: KITTI's velodyne files carry no ring (laser) index (robustness corruptions use
        elevation bins instead)."""
        return None

    def load_points(self, scan: Scan) -> np.ndarray:
        """(N, 4) float32 x, y, z, remission in the lidar frame."""
        path = Path(scan.lidar_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: velodyne scan missing")
        size = path.stat().st_size
        if size % 16:
            raise DataError(
                f"{path}: truncated or not a velodyne scan: {size} bytes is not a multiple of 16 "
                "(4 float32 per point)"
            )
        return np.fromfile(path, dtype=np.float32).reshape(-1, 4)

    def load_labels(self, scan: Scan) -> np.ndarray:
        """(N,) uint8 classes 0..18, 255 = ignore; all 255 when the scan has no label file."""
        n_points = Path(scan.lidar_path).stat().st_size // 16
        if scan.label_path is None:
            return np.full(n_points, IGNORE_LABEL, dtype=np.uint8)
        path = Path(scan.label_path)
        size = path.stat().st_size
        if size != 4 * n_points:
            raise DataError(
                f"{path}: {size} bytes, expected {4 * n_points} (one uint32 for each of the "
                f"{n_points} points of {Path(scan.lidar_path).name}): truncated or mismatched"
            )
        return map_labels(np.fromfile(path, dtype=np.uint32), source=str(path))

    def metadata_files(self) -> list[Path]:
        """Calibration, pose and time files of every present sequence (dataset fingerprint)."""
        files = []
        for seq in self.available_sequences():
            for name in ("calib.txt", "poses.txt", "times.txt"):
                if (self.sequences_dir / seq / name).is_file():
                    files.append(self.sequences_dir / seq / name)
        return files
