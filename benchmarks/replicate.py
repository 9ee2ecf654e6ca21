"""A K-times larger nuScenes-format set that reuses one set's files: long benchmark runs.

    python benchmarks/replicate.py --data SRC --out DST --copies K

Throughput is a steady-state quantity: a run of a few hundred images on a GPU lasts about a
second, and its ramp-up (the first unit's points and images) and tail (the last units finishing
while other workers idle) decide the ratio. Rendering thousands of synthetic scans at nuScenes
resolution costs minutes per hundred; this instead writes the version directory's JSON tables
K times over, each copy's scenes, samples, sample_data, ego poses, lidarseg, instances and
annotations under new tokens (``md5(token + copy)``, deterministic) and scene names
(``scene-0001-r1``), all pointing at the SAME point clouds, images and label files (the data
folders are symlinked; lidarseg gets one link per record, named by its token, as the devkit
expects). Every image is still decoded, resized, paired and sampled per scan:
only the page cache makes the file reads cheaper than on a cold disk. Copy 0 is the original.
For benchmarks only: a replicated set is not a dataset (its copies are identical scenes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

# Tables whose records belong to one scene (copied under new tokens); every other table
# (sensor, calibrated_sensor, log, map, category, attribute, visibility) is shared by the copies.
PER_SCENE = (
    "scene",
    "sample",
    "sample_data",
    "ego_pose",
    "lidarseg",
    "instance",
    "sample_annotation",
)


def _new_token(token: str, copy: int) -> str:
    return token if copy == 0 else hashlib.md5(f"{token}-r{copy}".encode()).hexdigest()


def _remap(value: Any, tokens: dict[str, str]) -> Any:
    """``value`` with every string that is a per-scene token replaced (recursively)."""
    if isinstance(value, str):
        return tokens.get(value, value)
    if isinstance(value, list):
        return [_remap(v, tokens) for v in value]
    if isinstance(value, dict):
        return {k: _remap(v, tokens) for k, v in value.items()}
    return value


def _scene_records(tables: dict[str, list[dict]], names: set[str]) -> dict[str, list[dict]]:
    """The per-scene tables reduced to the records of the scenes named ``names``."""
    keep = {name: [] for name in PER_SCENE if name in tables}
    keep["scene"] = [r for r in tables["scene"] if r["name"] in names]
    scenes = {r["token"] for r in keep["scene"]}
    keep["sample"] = [r for r in tables["sample"] if r["scene_token"] in scenes]
    samples = {r["token"] for r in keep["sample"]}
    keep["sample_data"] = [r for r in tables["sample_data"] if r["sample_token"] in samples]
    sample_data = {r["token"] for r in keep["sample_data"]}
    poses = {r["ego_pose_token"] for r in keep["sample_data"]}
    keep["ego_pose"] = [r for r in tables["ego_pose"] if r["token"] in poses]
    if "lidarseg" in keep:
        keep["lidarseg"] = [r for r in tables["lidarseg"] if r["sample_data_token"] in sample_data]
    if "sample_annotation" in keep:
        ann = [r for r in tables["sample_annotation"] if r["sample_token"] in samples]
        keep["sample_annotation"] = ann
        if "instance" in keep:
            instances = {r["instance_token"] for r in ann}
            keep["instance"] = [r for r in tables["instance"] if r["token"] in instances]
    return keep


def _link_labels(data: Path, out: Path, record: dict, new: dict) -> str:
    """A link named after the copy's token to the original record's label file; its path."""
    filename = record["filename"].replace(record["token"], new["token"])
    if filename == record["filename"] and new["token"] != record["token"]:
        filename = f"{filename}.{new['token']}"
    link = out / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(data / record["filename"])
    return filename


def replicate(
    data: Path,
    out: Path,
    copies: int,
    version: str | None = None,
    scenes: list[str] | None = None,
) -> Path:
    """Write ``out`` (a nuScenes root) holding ``copies`` copies of ``data``'s scenes (only
    those named in ``scenes`` when given, in their order of scene.json); returns the new
    version directory. ``out`` must not exist yet."""
    from pipeline.datasets.nuscenes import NuScenesReader

    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    source = NuScenesReader(data, version)  # picks the version, or names what is wrong
    data, version, src, out = source.root, source.version, source.version_dir, Path(out)
    out.mkdir(parents=True, exist_ok=False)
    for child in data.iterdir():  # samples/, sweeps/, maps/, ... : shared files
        if child.name not in (version, "lidarseg") and child.is_dir():
            (out / child.name).symlink_to(child, target_is_directory=True)
    dst = out / version
    dst.mkdir()
    tables = {p.stem: json.loads(p.read_text()) for p in sorted(src.glob("*.json"))}
    if scenes is not None:
        missing = set(scenes) - {r["name"] for r in tables["scene"]}
        if missing:
            raise ValueError(f"{src / 'scene.json'}: no scenes named {sorted(missing)}")
        tables.update(_scene_records(tables, set(scenes)))
    own = {r["token"] for name in PER_SCENE for r in tables.get(name, [])}
    for name, records in tables.items():
        if name not in PER_SCENE:
            result = records
        else:
            result = []
            for copy in range(copies):
                tokens = {t: _new_token(t, copy) for t in own}
                for record in records:
                    new = _remap(record, tokens)
                    if name == "scene" and copy:
                        new["name"] = f"{record['name']}-r{copy}"
                    if name == "lidarseg":  # one label file per record (the devkit counts them)
                        new["filename"] = _link_labels(data, out, record, new)
                    result.append(new)
        (dst / f"{name}.json").write_text(json.dumps(result))
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, type=Path, help="nuScenes (or synthetic) root")
    p.add_argument("--out", required=True, type=Path, help="new root (must not exist)")
    p.add_argument("--copies", required=True, type=int, help="copies of every scene (>= 1)")
    p.add_argument("--version", default=None)
    p.add_argument("--scenes", nargs="*", default=None, help="scene names to copy (default all)")
    args = p.parse_args()
    dst = replicate(args.data, args.out, args.copies, args.version, args.scenes)
    print(f"wrote {dst} ({args.copies} copies of {args.data})")


if __name__ == "__main__":
    main()
