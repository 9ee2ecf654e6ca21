"""nuScenes reader (keyframes, LIDAR_TOP + 6 cameras, lidarseg labels), without the devkit.

Reads the standard JSON tables of a version directory (``<root>/<version>/*.json``): real
``v1.0-trainval`` / ``v1.0-test`` / ``v1.0-mini`` or the project's ``v1.0-synthetic``. Only
keyframes are read (one ``Scan`` per ``sample``); non-keyframe sweeps are ignored.

Record chain for a sample::

    sample ──► sample_data (is_key_frame, one per channel) ──► calibrated_sensor ──► sensor.channel
                                                          └──► ego_pose
    sample ──► scene.name                       lidarseg[sample_data token].filename ──► labels

Labels: the lidarseg ``.bin`` holds one uint8 general-class index per point (``category.index``).
It is mapped by category *name* to the 16 classes of the nuScenes-lidarseg challenge
(``CLASS_NAMES``, 0..15); noise and the classes the challenge ignores become 255.

Splits (``scans(split)``):
- every version: ``"all"`` = every scene in the order of ``scene.json``.
- ``v1.0-mini``: ``"mini_train"`` / ``"mini_val"`` (``"train"`` / ``"val"`` are aliases).
- ``v1.0-trainval`` / ``v1.0-test``: the official scene lists from the devkit's
  ``nuscenes.utils.splits.create_splits_scenes`` (``"train"``, ``"val"``, ``"test"``, ...);
  the devkit is imported only for this and only when asked.
- any other version (``v1.0-synthetic``): scenes in ``scene.json`` order; ``"val"`` is the last
  scene and ``"train"`` the others when there are ≥ 2 scenes; with a single scene both are that
  scene (a smoke-test set has nothing to hold out).

Every inconsistency raises ``DataError`` naming the file or record.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.datasets.records import (
    CAMERA_CHANNELS,
    IGNORE_LABEL,
    CameraFrame,
    DataError,
    Scan,
)
from pipeline.geometry import check_intrinsic, pose_matrix

LIDAR_CHANNEL = "LIDAR_TOP"
POINT_DIMS = 5  # .pcd.bin: float32 x, y, z, intensity, ring index

CLASS_NAMES: tuple[str, ...] = (
    "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
    "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain",
    "manmade", "vegetation",
)  # fmt: skip

# General nuScenes-lidarseg category name → challenge class name (the standard mapping of the
# lidarseg benchmark). Names not listed here (and "noise") are ignored.
GENERAL_TO_CHALLENGE: dict[str, str] = {
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "vehicle.car": "car",
    "vehicle.motorcycle": "motorcycle",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.truck": "truck",
    "vehicle.construction": "construction_vehicle",
    "vehicle.trailer": "trailer",
    "movable_object.barrier": "barrier",
    "movable_object.trafficcone": "traffic_cone",
    "flat.driveable_surface": "driveable_surface",
    "flat.sidewalk": "sidewalk",
    "flat.terrain": "terrain",
    "flat.other": "other_flat",
    "static.manmade": "manmade",
    "static.vegetation": "vegetation",
}

MINI_SPLITS: dict[str, tuple[str, ...]] = {
    "mini_train": ("scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0796",
                   "scene-1077", "scene-1094", "scene-1100"),
    "mini_val": ("scene-0103", "scene-0916"),
}  # fmt: skip

_REQUIRED_TABLES = ("scene", "sample", "sample_data", "calibrated_sensor", "ego_pose", "sensor")
_UNKNOWN_INDEX = 254  # internal LUT marker: raw label value that no category.index defines


def find_versions(root: str | Path) -> list[str]:
    """Version directories under ``root`` (those holding a ``sample.json``), sorted."""
    return sorted(p.parent.name for p in Path(root).glob("*/sample.json"))


class NuScenesReader:
    """Plain reader over one nuScenes version directory. Picklable and light to pickle: the JSON
    tables are (re)loaded lazily and are not part of the pickled state."""

    class_names: tuple[str, ...] = CLASS_NAMES
    label_bytes_per_point: int = 1  # uint8 lidarseg .bin

    def __init__(self, root: str | Path, version: str | None = None) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such folder (the nuScenes root holds v1.0-*/)")
        if version is None:
            versions = find_versions(self.root)
            if len(versions) != 1:
                raise DataError(
                    f"{self.root}: cannot pick a nuScenes version, found {versions or 'none'} "
                    "(directories with sample.json); pass the version explicitly"
                )
            version = versions[0]
        self.version = version
        self.version_dir = self.root / version
        if not self.version_dir.is_dir():
            raise DataError(f"{self.version_dir}: nuScenes version directory not found")
        for name in _REQUIRED_TABLES:
            if not (self.version_dir / f"{name}.json").is_file():
                raise DataError(f"{self.version_dir / (name + '.json')}: required table missing")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for derived in ("_tables", "_keyframes_by_sample"):  # reloaded on demand
            state.pop(derived, None)
        return state

    # ------------------------------------------------------------------ tables ----

    def _load_table(self, name: str) -> list[dict]:
        path = self.version_dir / f"{name}.json"
        try:
            with open(path) as f:
                table = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read table ({e})") from e
        if not isinstance(table, list):
            raise DataError(f"{path}: expected a JSON list of records")
        return table

    @cached_property
    def _tables(self) -> dict[str, dict[str, dict]]:
        """Required tables indexed by token, plus optional lidarseg/category."""
        tables: dict[str, dict[str, dict]] = {}
        names = list(_REQUIRED_TABLES)
        for optional in ("lidarseg", "category"):
            if (self.version_dir / f"{optional}.json").is_file():
                names.append(optional)
        for name in names:
            records = self._load_table(name)
            key = "sample_data_token" if name == "lidarseg" else "token"
            try:
                tables[name] = {r[key]: r for r in records}
            except (KeyError, TypeError) as e:
                raise DataError(
                    f"{self.version_dir / (name + '.json')}: record without {key}"
                ) from e
        return tables

    def _get(self, table: str, token: str, referrer: str) -> dict:
        try:
            return self._tables[table][token]
        except KeyError:
            raise DataError(
                f"{self.version_dir / (table + '.json')}: no record with token {token!r} "
                f"(referenced by {referrer})"
            ) from None

    @cached_property
    def _label_lut(self) -> np.ndarray:
        """(256,) uint8: general index → challenge class (255 ignore, 254 undefined index).

        Built from ``category.json`` alone, not from ``_tables``: extraction workers call
        ``load_labels`` on an unpickled reader, and loading every table there would cost each
        worker process gigabytes on v1.0-trainval (``sample_data.json`` alone is ~1.3 GB)."""
        lut = np.full(256, _UNKNOWN_INDEX, dtype=np.uint8)
        has_categories = (self.version_dir / "category.json").is_file()
        categories = self._load_table("category") if has_categories else []
        for category in categories:
            if not isinstance(category, dict):
                raise DataError(f"{self.version_dir / 'category.json'}: record is not an object")
            if "index" not in category:
                raise DataError(
                    f"{self.version_dir / 'category.json'}: category {category.get('name')!r} has "
                    "no 'index' (needed for lidarseg labels)"
                )
            challenge = GENERAL_TO_CHALLENGE.get(category["name"])
            lut[category["index"]] = (
                CLASS_NAMES.index(challenge) if challenge is not None else IGNORE_LABEL
            )
        return lut

    # ------------------------------------------------------------------ records ----

    def scene_names(self, split: str) -> list[str]:
        """Scene names of ``split`` (see the module docstring for the rule per version)."""
        all_scenes = [s["name"] for s in self._tables["scene"].values()]
        if split == "all":
            return all_scenes
        if "mini" in self.version:
            wanted = MINI_SPLITS.get(split if split.startswith("mini_") else f"mini_{split}")
            if wanted is None:
                raise DataError(
                    f"{self.version}: unknown split {split!r} (mini_train, mini_val, all)"
                )
            return [s for s in all_scenes if s in wanted]
        if self.version in ("v1.0-trainval", "v1.0-test"):
            try:
                from nuscenes.utils.splits import create_splits_scenes
            except ImportError as e:
                raise DataError(
                    f"{self.version}: split {split!r} needs the official scene lists from "
                    "nuscenes-devkit (pip install nuscenes-devkit --no-deps), or use split 'all'"
                ) from e
            official = create_splits_scenes(verbose=False)
            if split not in official:
                raise DataError(
                    f"{self.version}: unknown split {split!r} ({sorted(official)}, all)"
                )
            wanted = set(official[split])
            return [s for s in all_scenes if s in wanted]
        if split == "train":
            return all_scenes[:-1] if len(all_scenes) >= 2 else all_scenes
        if split == "val":
            return all_scenes[-1:]
        raise DataError(f"{self.version}: unknown split {split!r} (train, val, all)")

    def scans(self, split: str = "all") -> list[Scan]:
        """Keyframe scans of ``split``, ordered by scene then timestamp."""
        scenes = {s["name"]: s["token"] for s in self._tables["scene"].values()}
        scene_order = {scenes[name]: i for i, name in enumerate(self.scene_names(split))}
        keyframes = self._keyframes_by_sample
        samples = []
        for sample in self._tables["sample"].values():
            scene = self._get("scene", sample.get("scene_token"), f"sample {sample['token']}")
            if scene["token"] in scene_order:
                samples.append(sample)
        samples.sort(key=lambda s: (scene_order[s["scene_token"]], s["timestamp"]))
        scans = []
        for sample in samples:
            try:
                scans.append(self._scan(sample, keyframes.get(sample["token"], {})))
            except KeyError as e:
                raise DataError(
                    f"{self.version_dir / 'sample.json'}: sample {sample['token']}: a record it "
                    f"references has no field {e.args[0]!r}"
                ) from e
        return scans

    @cached_property
    def _keyframes_by_sample(self) -> dict[str, dict[str, dict]]:
        """sample token → channel → keyframe sample_data record."""
        by_sample: dict[str, dict[str, dict]] = {}
        for sd in self._tables["sample_data"].values():
            if not sd.get("is_key_frame"):
                continue
            referrer = f"sample_data {sd['token']}"
            try:
                cs = self._get("calibrated_sensor", sd["calibrated_sensor_token"], referrer)
                sensor = self._get("sensor", cs["sensor_token"], f"calibrated_sensor {cs['token']}")
                by_sample.setdefault(sd["sample_token"], {})[sensor["channel"]] = sd
            except KeyError as e:
                raise DataError(
                    f"{self.version_dir / 'sample_data.json'}: {referrer} (or a record it references): "
                    f"missing field {e.args[0]!r}"
                ) from e
        return by_sample

    def _pose(self, table: str, token: str, referrer: str) -> np.ndarray:
        record = self._get(table, token, referrer)
        try:
            return pose_matrix(record["rotation"], record["translation"])
        except (KeyError, ValueError) as e:
            raise DataError(f"{self.version_dir / (table + '.json')}: record {token}: {e}") from e

    def _scan(self, sample: dict, keyframes: dict[str, dict]) -> Scan:
        where = f"{self.version_dir / 'sample.json'}: sample {sample['token']}"
        scene = self._get("scene", sample["scene_token"], f"sample {sample['token']}")
        missing = [c for c in (LIDAR_CHANNEL, *CAMERA_CHANNELS) if c not in keyframes]
        if missing:
            raise DataError(f"{where}: no keyframe sample_data for {', '.join(missing)}")
        lidar = keyframes[LIDAR_CHANNEL]
        ref = f"sample_data {lidar['token']}"
        lidarseg = self._tables.get("lidarseg", {}).get(lidar["token"])
        return Scan(
            token=sample["token"],
            lidar_token=lidar["token"],
            lidar_path=str(self.root / lidar["filename"]),
            sensor_to_ego=self._pose("calibrated_sensor", lidar["calibrated_sensor_token"], ref),
            ego_to_global=self._pose("ego_pose", lidar["ego_pose_token"], ref),
            timestamp=int(lidar["timestamp"]),
            cameras=tuple(self._camera(keyframes[c], c) for c in CAMERA_CHANNELS),
            label_path=str(self.root / lidarseg["filename"]) if lidarseg else None,
            scene=scene["name"],
        )

    def _camera(self, sd: dict, channel: str) -> CameraFrame:
        ref = f"sample_data {sd['token']}"
        cs = self._get("calibrated_sensor", sd["calibrated_sensor_token"], ref)
        try:
            intrinsic = np.asarray(cs["camera_intrinsic"], dtype=np.float64)
            check_intrinsic(intrinsic)
        except (KeyError, ValueError) as e:
            raise DataError(
                f"{self.version_dir / 'calibrated_sensor.json'}: record {cs['token']} ({channel}): {e}"
            ) from e
        return CameraFrame(
            channel=channel,
            image_path=str(self.root / sd["filename"]),
            width=int(sd["width"]),
            height=int(sd["height"]),
            intrinsic=intrinsic,
            sensor_to_ego=self._pose("calibrated_sensor", sd["calibrated_sensor_token"], ref),
            ego_to_global=self._pose("ego_pose", sd["ego_pose_token"], ref),
            timestamp=int(sd["timestamp"]),
        )

    # ------------------------------------------------------------------ data ----

    def load_points(self, scan: Scan) -> np.ndarray:
        """(N, 4) float32 x, y, z, intensity in the lidar frame."""
        return read_points(scan.lidar_path)

    def load_rings(self, scan: Scan) -> np.ndarray:
        """(N,) int64 ring (laser) index of each point: the .pcd.bin's fifth column."""
        count_points(scan.lidar_path)
        raw = np.fromfile(scan.lidar_path, dtype=np.float32).reshape(-1, POINT_DIMS)
        return raw[:, 4].astype(np.int64)

    def load_labels(self, scan: Scan) -> np.ndarray:
        """(N,) uint8 challenge classes 0..15, 255 = ignore; all 255 when the scan is unlabelled."""
        if scan.label_path is None:
            return np.full(count_points(scan.lidar_path), IGNORE_LABEL, dtype=np.uint8)
        path = Path(scan.label_path)
        try:
            raw = np.fromfile(path, dtype=np.uint8)
        except OSError as e:
            raise DataError(f"{path}: cannot read lidarseg labels ({e})") from e
        n_points = count_points(scan.lidar_path)
        if raw.size != n_points:
            raise DataError(f"{path}: {raw.size} labels for {n_points} points in {scan.lidar_path}")
        labels = self._label_lut[raw]
        if np.any(labels == _UNKNOWN_INDEX):
            bad = sorted(set(raw[labels == _UNKNOWN_INDEX].tolist()))
            raise DataError(f"{path}: label values {bad[:10]} are not a category.index")
        return labels

    def load_image(self, camera: CameraFrame) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        return read_image(camera)

    def metadata_files(self) -> list[Path]:
        """The JSON tables this reader reads (they determine every record; data files are named
        by them): the required ones, plus lidarseg and category where present. Other tables
        (annotations, maps, nuScenes-panoptic's panoptic.json, ...) do not change the targets,
        so adding them keeps the dataset's fingerprint and its caches."""
        names = (*_REQUIRED_TABLES, "lidarseg", "category")
        return sorted(
            self.version_dir / f"{n}.json"
            for n in names
            if (self.version_dir / f"{n}.json").is_file()
        )

    def legacy_metadata_files(self) -> list[Path]:
        """Every JSON table of the version: what the fingerprint covered before 2026-11-26
        (training still accepts caches fingerprinted that way)."""
        return sorted(self.version_dir.glob("*.json"))


def count_points(path: str | Path) -> int:
    """Number of points in a .pcd.bin from its size; DataError if missing, empty or truncated."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: lidar file missing or unreadable ({e.strerror})") from e
    record = POINT_DIMS * 4
    if size == 0:
        raise DataError(f"{path}: lidar file is empty")
    if size % record:
        raise DataError(
            f"{path}: truncated lidar file ({size} bytes is not a multiple of {record} = "
            f"{POINT_DIMS} float32 per point)"
        )
    return size // record


def read_points(path: str | Path) -> np.ndarray:
    """(N, 4) float32 x, y, z, intensity from a nuScenes .pcd.bin; DataError on bad content."""
    count_points(path)
    points = np.fromfile(path, dtype=np.float32).reshape(-1, POINT_DIMS)[:, :4]
    bad = ~np.all(np.isfinite(points[:, :3]), axis=1)
    if bad.any():
        raise DataError(
            f"{path}: {int(bad.sum())} of {len(points)} points have NaN/Inf coordinates"
        )
    return np.ascontiguousarray(points)


def read_image(camera: CameraFrame) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a camera frame; DataError if missing, undecodable or mis-sized."""
    path = camera.image_path
    try:
        with Image.open(path) as image:
            # convert() copies even an RGB image: only non-RGB files (grey, CMYK) need it
            array = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: image file missing ({camera.channel})") from e
    except OSError as e:  # PIL raises OSError subclasses for truncated / unknown formats
        raise DataError(f"{path}: cannot decode image ({e})") from e
    if array.shape[:2] != (camera.height, camera.width):
        raise DataError(
            f"{path}: image is {array.shape[1]}x{array.shape[0]}, the record says "
            f"{camera.width}x{camera.height}"
        )
    return array
