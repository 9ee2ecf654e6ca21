"""Writes a synthetic world as a nuScenes release (``v1.0-synthetic``) with lidarseg labels.

Layout under the output root (as nuScenes, plus one extra folder):
    v1.0-synthetic/*.json                     13 devkit tables + lidarseg.json
    samples/LIDAR_TOP/<log>__LIDAR_TOP__<ts>.pcd.bin    float32 (N, 5) x, y, z, intensity, ring
    samples/CAM_*/<log>__CAM_*__<ts>.jpg
    lidarseg/v1.0-synthetic/<lidar sample_data token>_lidarseg.bin   uint8 (N,)
    maps/<token>.png                          semantic prior (road + sidewalk), 0.1 m / px
    synthetic_semantic/CAM_*/<same basename>.png   per-pixel lidarseg index, 255 = sky (not nuScenes)
    synthetic_meta.json                       generator settings and a suggested train/val split

Everything is a function of the config (output is byte-identical for the same arguments, whatever
the number of worker processes). The release is built in a sibling temp folder and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from pyquaternion import Quaternion
from tqdm import tqdm

from pipeline.outputs import check_parents
from pipeline.synthetic.camera import (
    CAMERA_RIG,
    camera_rotation,
    firing_offset_us,
    intrinsic,
    render,
)
from pipeline.synthetic.categories import LIDARSEG_CATEGORIES
from pipeline.synthetic.lidar import LIDAR_TRANSLATION, LIDAR_YAW, LidarConfig, scan
from pipeline.synthetic.world import EgoPath, World, build_world

VERSION = "v1.0-synthetic"
LOCATION = "synthetic-town"
KEYFRAME_US = 500_000  # 2 Hz keyframes, as nuScenes
BASE_TIMESTAMP_US = 1_600_000_000_000_000
MAP_EXTENT_M = 200.0  # the map mask covers [0, 200] m x [0, 200] m of the global frame
MAP_RESOLUTION = 0.1  # m / px, fixed by the devkit's MapMask
WORLD_ORIGIN = (100.0, 100.0)  # global position of the road at s = 0 in every scene

ATTRIBUTES = (
    ("vehicle.moving", "Vehicle is moving."),
    ("vehicle.stopped", "Vehicle, with a driver, is stopped (e.g. in traffic)."),
    ("vehicle.parked", "Vehicle is parked without a driver."),
    ("cycle.with_rider", "There is someone on the bicycle or motorcycle."),
    ("cycle.without_rider", "There is nobody on the bicycle or motorcycle."),
    ("pedestrian.sitting_lying_down", "The pedestrian is sitting or lying down."),
    ("pedestrian.standing", "The pedestrian is standing."),
    ("pedestrian.moving", "The pedestrian is moving."),
)
VISIBILITY = (
    ("1", "v0-40", "visibility of whole object is between 0 and 40%"),
    ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
    ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
    ("4", "v80-100", "visibility of whole object is between 80 and 100%"),
)


@dataclass(frozen=True)
class SyntheticConfig:
    """What ``make-synthetic`` generates."""

    out: Path  # output root (the nuScenes ``dataroot``)
    scenes: int = 2  # number of scenes (one log each)
    samples_per_scene: int = 4  # keyframes per scene (2 Hz)
    seed: int = 0  # everything random derives from it
    width: int = 640  # rendered image width (nuScenes 1600, intrinsics scaled)
    height: int = 360  # rendered image height (nuScenes 900)
    workers: int = 2  # processes rendering samples (does not change the output)
    overwrite: bool = False  # replace an existing non-empty ``out``
    lidar: LidarConfig = field(default_factory=LidarConfig)  # spinning LiDAR model

    def __post_init__(self) -> None:
        if self.scenes < 1 or self.samples_per_scene < 1:
            raise ValueError("scenes and samples_per_scene must be >= 1")
        if self.width < 16 or self.height < 16:
            raise ValueError(f"image size {self.width}x{self.height} is too small")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")


def make_token(*parts: object) -> str:
    """Deterministic 32-hex-char token (nuScenes tokens look the same)."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def transform(rotation_wxyz: list[float], translation: list[float]) -> np.ndarray:
    """(4, 4) from a nuScenes rotation (w, x, y, z) + translation, exactly as readers compute it."""
    m = np.eye(4)
    m[:3, :3] = Quaternion(rotation_wxyz).rotation_matrix
    m[:3, 3] = translation
    return m


def _quat(r: np.ndarray) -> list[float]:
    return [float(v) for v in Quaternion(matrix=r).elements]


def _yaw_quat(yaw: float) -> list[float]:
    return [float(v) for v in Quaternion(axis=[0.0, 0.0, 1.0], angle=yaw).elements]


@dataclass(frozen=True)
class ScenePlan:
    """Everything about one scene that the sample renderer needs (picklable)."""

    index: int  # scene index (0-based)
    seed: int
    world: World
    logfile: str
    calib: dict  # channel -> {"rotation": [w,x,y,z], "translation": [x,y,z], "camera_intrinsic": [...]}
    timestamps: list[dict]  # per sample: channel -> timestamp (µs)
    ego_poses: list[dict]  # per sample: channel -> {"rotation", "translation"} at that timestamp
    width: int
    height: int
    lidar: LidarConfig


def plan_scene(cfg: SyntheticConfig, k: int) -> ScenePlan:
    """Draw the world, calibration, trajectory and timestamps of scene ``k``."""
    rng = np.random.default_rng([cfg.seed, k])
    speed = float(rng.uniform(5.0, 9.0))
    travel = speed * (cfg.samples_per_scene - 1) * KEYFRAME_US * 1e-6 + 1.0
    world = build_world(rng, travel, WORLD_ORIGIN)
    t_start = (
        BASE_TIMESTAMP_US
        + cfg.seed * 86_400_000_000
        + k * 3_600_000_000
        + int(rng.integers(0, 1_000_000))
    )
    path = EgoPath(road=world.road, speed=speed, t0_us=t_start)

    # calibration: nominal nuScenes-like mounting + small per-log deviations
    calib: dict[str, dict] = {}
    tilt = rng.normal(0.0, np.deg2rad(0.3), 3)
    c, s = np.cos(LIDAR_YAW + tilt[2]), np.sin(LIDAR_YAW + tilt[2])
    r_lidar = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ _small_tilt(tilt[0], tilt[1])
    calib["LIDAR_TOP"] = {
        "translation": [float(v) for v in np.asarray(LIDAR_TRANSLATION) + rng.normal(0.0, 0.01, 3)],
        "rotation": _quat(r_lidar),
        "camera_intrinsic": [],
    }
    for spec in CAMERA_RIG:
        r = camera_rotation(spec.yaw_deg, rng.normal(0.0, np.deg2rad(0.4), 3))
        calib[spec.channel] = {
            "translation": [
                float(v) for v in np.asarray(spec.translation) + rng.normal(0.0, 0.01, 3)
            ],
            "rotation": _quat(r),
            "camera_intrinsic": intrinsic(spec, cfg.width, cfg.height).tolist(),
        }

    timestamps, ego_poses = [], []
    for i in range(cfg.samples_per_scene):
        t_lidar = t_start + i * KEYFRAME_US + int(rng.integers(-2000, 2001))
        ts = {"LIDAR_TOP": t_lidar}
        for spec in CAMERA_RIG:
            ts[spec.channel] = (
                t_lidar + firing_offset_us(spec.yaw_deg) + int(rng.integers(-300, 301))
            )
        poses = {}
        for ch, t in ts.items():
            m = path.pose(t)
            poses[ch] = {
                "rotation": _yaw_quat(float(np.arctan2(m[1, 0], m[0, 0]))),
                "translation": [float(m[0, 3]), float(m[1, 3]), 0.0],
            }
        timestamps.append(ts)
        ego_poses.append(poses)
    return ScenePlan(
        index=k,
        seed=cfg.seed,
        world=world,
        logfile=f"syn{cfg.seed}-{k:04d}",
        calib=calib,
        timestamps=timestamps,
        ego_poses=ego_poses,
        width=cfg.width,
        height=cfg.height,
        lidar=cfg.lidar,
    )


def _small_tilt(rx: float, ry: float) -> np.ndarray:
    cx, sx, cy, sy = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry)
    return np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array(
        [[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]
    )


def sample_filename(plan: ScenePlan, i: int, channel: str) -> str:
    """Path relative to the root of the file of ``channel`` in sample ``i``."""
    ext = "pcd.bin" if channel == "LIDAR_TOP" else "jpg"
    return f"samples/{channel}/{plan.logfile}__{channel}__{plan.timestamps[i][channel]}.{ext}"


def render_sample(plan: ScenePlan, i: int, root: Path, lidar_token: str) -> dict:
    """Cast the LiDAR and render the 6 cameras of sample ``i``; write their files under ``root``.

    Returns the number of points and the LiDAR point count per annotated object."""
    cal, pose = plan.calib, plan.ego_poses[i]
    lidar_to_global = transform(**_rt(pose["LIDAR_TOP"])) @ transform(**_rt(cal["LIDAR_TOP"]))
    sweep = scan(
        plan.world,
        lidar_to_global,
        plan.lidar,
        np.random.default_rng([plan.seed, plan.index, i, 0]),
    )
    lidar_file = root / sample_filename(plan, i, "LIDAR_TOP")
    lidar_file.write_bytes(sweep.points.tobytes())
    (root / "lidarseg" / VERSION / f"{lidar_token}_lidarseg.bin").write_bytes(
        sweep.labels.tobytes()
    )

    for c, spec in enumerate(CAMERA_RIG):
        ch = spec.channel
        cam_to_global = transform(**_rt(pose[ch])) @ transform(**_rt(cal[ch]))
        k = np.asarray(cal[ch]["camera_intrinsic"])
        rng = np.random.default_rng([plan.seed, plan.index, i, 1 + c])
        frame = render(plan.world, k, cam_to_global, plan.width, plan.height, rng)
        rel = sample_filename(plan, i, ch)
        Image.fromarray(frame.rgb).save(root / rel, format="JPEG", quality=90)
        sem = root / "synthetic_semantic" / ch / (Path(rel).name[: -len(".jpg")] + ".png")
        Image.fromarray(frame.classes).save(sem, format="PNG")

    inst = sweep.instance[sweep.instance >= 0]
    counts = np.bincount(inst, minlength=len(plan.world.objects))
    return {"points": int(len(sweep.points)), "object_points": counts.tolist()}


def _rt(rec: dict) -> dict:
    return {"rotation_wxyz": rec["rotation"], "translation": rec["translation"]}


def _render_task(args: tuple) -> dict:
    return render_sample(*args)


def _map_mask(plans: list[ScenePlan]) -> np.ndarray:
    """Road + sidewalk of all scenes on a 0.1 m grid (uint8 0/255), row 0 = largest y (devkit)."""
    coarse = 0.5  # rasterised at 0.5 m, then repeated to the devkit's fixed 0.1 m
    n = int(MAP_EXTENT_M / coarse)
    centres = (np.arange(n) + 0.5) * coarse
    x, y = np.meshgrid(centres, centres[::-1])
    xy = np.column_stack([x.ravel(), y.ravel()])
    mask = np.zeros(n * n, dtype=bool)
    for plan in plans:
        s, d = plan.world.road.to_road(xy)
        s0, s1 = plan.world.s_range
        mask |= (np.abs(d) < 9.0) & (s >= s0) & (s <= s1)
    rep = int(round(coarse / MAP_RESOLUTION))
    return np.repeat(np.repeat(mask.reshape(n, n), rep, axis=0), rep, axis=1).astype(np.uint8) * 255


def _link(records: list[dict]) -> None:
    """Set prev/next of an ordered chain of records."""
    for a, b in zip(records[:-1], records[1:], strict=True):
        a["next"], b["prev"] = b["token"], a["token"]


def make_synthetic(cfg: SyntheticConfig) -> Path:
    """Generate the release into ``cfg.out``; returns the root."""
    out = Path(cfg.out)
    check_parents(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_release(cfg, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written release behind
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _write_release(cfg: SyntheticConfig, tmp: Path) -> None:
    """Everything of the release, written under ``tmp``."""
    channels = ["LIDAR_TOP"] + [s.channel for s in CAMERA_RIG]
    for ch in channels:
        (tmp / "samples" / ch).mkdir(parents=True)
    for spec in CAMERA_RIG:
        (tmp / "synthetic_semantic" / spec.channel).mkdir(parents=True)
    (tmp / "lidarseg" / VERSION).mkdir(parents=True)
    (tmp / VERSION).mkdir()
    (tmp / "maps").mkdir()

    plans = [plan_scene(cfg, k) for k in range(cfg.scenes)]
    seed = cfg.seed
    sd_token = {
        (k, i, ch): make_token(seed, "sample_data", k, i, ch)
        for k in range(cfg.scenes)
        for i in range(cfg.samples_per_scene)
        for ch in channels
    }
    tasks = [
        (p, i, tmp, sd_token[(p.index, i, "LIDAR_TOP")])
        for p in plans
        for i in range(cfg.samples_per_scene)
    ]
    desc = f"make-synthetic ({cfg.scenes} scenes x {cfg.samples_per_scene} samples)"
    if cfg.workers == 1:
        results = [render_sample(*t) for t in tqdm(tasks, desc=desc, unit="sample")]
    else:
        with ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn")) as pool:
            results = list(
                tqdm(pool.map(_render_task, tasks), total=len(tasks), desc=desc, unit="sample")
            )

    tables = _tables(cfg, plans, sd_token, results)
    for name, records in tables.items():
        (tmp / VERSION / f"{name}.json").write_text(json.dumps(records, indent=1))
    map_rec = tables["map"][0]
    Image.fromarray(_map_mask(plans)).save(tmp / map_rec["filename"], format="PNG")
    meta = {
        "version": VERSION,
        "generator": "pipeline.synthetic",
        "config": {
            k: v for k, v in asdict(cfg).items() if k not in ("out", "workers", "overwrite")
        },
        "scenes": [rec["name"] for rec in tables["scene"]],
        "split": {
            "train": [rec["name"] for rec in tables["scene"][:-1]] or [tables["scene"][0]["name"]],
            "val": [tables["scene"][-1]["name"]],
        },
        "points_per_sweep": [r["points"] for r in results],
        "semantic_images": "synthetic_semantic/<CAM>/<jpg basename>.png, uint8 lidarseg index, 255 = sky",
    }
    (tmp / "synthetic_meta.json").write_text(json.dumps(meta, indent=1))


def _tables(
    cfg: SyntheticConfig, plans: list[ScenePlan], sd_token: dict, results: list[dict]
) -> dict[str, list]:
    """All nuScenes tables (name -> records)."""
    seed = cfg.seed
    channels = ["LIDAR_TOP"] + [s.channel for s in CAMERA_RIG]
    category = [
        {"token": make_token("category", name), "name": name, "description": desc, "index": i}
        for i, (name, desc) in enumerate(LIDARSEG_CATEGORIES)
    ]
    cat_token = {c["name"]: c["token"] for c in category}
    attribute = [
        {"token": make_token("attribute", n), "name": n, "description": d} for n, d in ATTRIBUTES
    ]
    attr_token = {a["name"]: a["token"] for a in attribute}
    visibility = [{"token": t, "level": lvl, "description": d} for t, lvl, d in VISIBILITY]
    sensor = [
        {
            "token": make_token("sensor", ch),
            "channel": ch,
            "modality": "lidar" if ch == "LIDAR_TOP" else "camera",
        }
        for ch in channels
    ]
    sensor_token = {s["channel"]: s["token"] for s in sensor}

    tables: dict[str, list] = {
        name: []
        for name in (
            "calibrated_sensor ego_pose log scene sample sample_data instance sample_annotation lidarseg".split()
        )
    }
    result_iter = iter(results)
    for plan in plans:
        k = plan.index
        log_token = make_token(seed, "log", k)
        tables["log"].append(
            {
                "token": log_token,
                "logfile": plan.logfile,
                "vehicle": "synthetic-ego",
                "date_captured": "2026-01-01",
                "location": LOCATION,
            }
        )
        cs_token = {}
        for ch in channels:
            cs_token[ch] = make_token(seed, "calibrated_sensor", k, ch)
            tables["calibrated_sensor"].append(
                {"token": cs_token[ch], "sensor_token": sensor_token[ch], **plan.calib[ch]}
            )
        samples, by_channel = [], {ch: [] for ch in channels}
        ann_by_object: dict[int, list[dict]] = {}
        for i in range(cfg.samples_per_scene):
            res = next(result_iter)
            s_token = make_token(seed, "sample", k, i)
            samples.append(
                {
                    "token": s_token,
                    "timestamp": plan.timestamps[i]["LIDAR_TOP"],
                    "prev": "",
                    "next": "",
                    "scene_token": make_token(seed, "scene", k),
                }
            )
            for ch in channels:
                tok = sd_token[(k, i, ch)]
                tables["ego_pose"].append(
                    {"token": tok, "timestamp": plan.timestamps[i][ch], **plan.ego_poses[i][ch]}
                )
                cam = ch != "LIDAR_TOP"
                by_channel[ch].append(
                    {
                        "token": tok,
                        "sample_token": s_token,
                        "ego_pose_token": tok,
                        "calibrated_sensor_token": cs_token[ch],
                        "timestamp": plan.timestamps[i][ch],
                        "fileformat": "jpg" if cam else "pcd",
                        "is_key_frame": True,
                        "height": plan.height if cam else 0,
                        "width": plan.width if cam else 0,
                        "filename": sample_filename(plan, i, ch),
                        "prev": "",
                        "next": "",
                    }
                )
            lidar_tok = sd_token[(k, i, "LIDAR_TOP")]
            tables["lidarseg"].append(
                {
                    "token": lidar_tok,
                    "sample_data_token": lidar_tok,
                    "filename": f"lidarseg/{VERSION}/{lidar_tok}_lidarseg.bin",
                }
            )
            ego_xy = np.asarray(plan.ego_poses[i]["LIDAR_TOP"]["translation"][:2])
            for j, n_pts in enumerate(res["object_points"]):
                obj = plan.world.objects[j]
                if n_pts == 0 or np.hypot(*(np.asarray(obj.center[:2]) - ego_xy)) > 60.0:
                    continue
                ann_by_object.setdefault(j, []).append(
                    {
                        "token": make_token(seed, "sample_annotation", k, i, j),
                        "sample_token": s_token,
                        "instance_token": make_token(seed, "instance", k, j),
                        "visibility_token": "4" if n_pts >= 20 else "3" if n_pts >= 5 else "2",
                        "attribute_tokens": [attr_token[obj.attribute]] if obj.attribute else [],
                        "translation": list(obj.center),
                        "size": list(obj.size),
                        "rotation": _yaw_quat(obj.yaw),
                        "prev": "",
                        "next": "",
                        "num_lidar_pts": int(n_pts),
                        "num_radar_pts": 0,
                    }
                )
        _link(samples)
        tables["sample"] += samples
        for ch in channels:
            _link(by_channel[ch])
            tables["sample_data"] += by_channel[ch]
        for j in sorted(ann_by_object):
            anns = ann_by_object[j]
            _link(anns)
            tables["sample_annotation"] += anns
            tables["instance"].append(
                {
                    "token": make_token(seed, "instance", k, j),
                    "category_token": cat_token[plan.world.objects[j].category],
                    "nbr_annotations": len(anns),
                    "first_annotation_token": anns[0]["token"],
                    "last_annotation_token": anns[-1]["token"],
                }
            )
        tables["scene"].append(
            {
                "token": make_token(seed, "scene", k),
                "log_token": log_token,
                "nbr_samples": len(samples),
                "first_sample_token": samples[0]["token"],
                "last_sample_token": samples[-1]["token"],
                "name": f"scene-{k + 1:04d}",
                "description": f"synthetic street, seed {seed}, curvature {plan.world.road.kappa:+.4f} 1/m",
            }
        )
    map_token = make_token("map", LOCATION, seed)
    tables["map"] = [
        {
            "token": map_token,
            "filename": f"maps/{map_token}.png",
            "category": "semantic_prior",
            "log_tokens": [log["token"] for log in tables["log"]],
        }
    ]
    return {
        "attribute": attribute,
        "calibrated_sensor": tables["calibrated_sensor"],
        "category": category,
        "ego_pose": tables["ego_pose"],
        "instance": tables["instance"],
        "log": tables["log"],
        "map": tables["map"],
        "sample": tables["sample"],
        "sample_annotation": tables["sample_annotation"],
        "sample_data": tables["sample_data"],
        "scene": tables["scene"],
        "sensor": sensor,
        "visibility": visibility,
        "lidarseg": tables["lidarseg"],
    }
