"""PCA pictures of teacher targets and student features (matplotlib, Agg; PNG files).

Colours: the first three principal components of a feature set, each stretched to [0, 1] between
its 1st and 99th percentile, give RGB. Rows are L2-normalised first: the distillation loss is a
cosine, so only directions matter.

- **Teacher** basis: fitted on the paired points' teacher targets of the scan (from the cache).
- **Student head** (the projection into teacher space) is coloured with the *teacher's* basis: the
  two pictures share one colour code, so equal colours mean the student reproduces the teacher, and
  unpaired points (outside every camera) show what the student extrapolates.
- **Student backbone** features live in another space (another dimension); they get their own
  basis (fitted separately), so compare their structure (which parts are distinguished), not hues.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

UNPAIRED_GREY = (0.35, 0.35, 0.35)


@dataclass(frozen=True)
class PCABasis:
    """A 3-component PCA colour map."""

    mean: np.ndarray
    """(D,) mean of the normalised features."""
    components: np.ndarray
    """(3, D) principal directions."""
    low: np.ndarray
    """(3,) 1st percentile of each component (maps to 0)."""
    high: np.ndarray
    """(3,) 99th percentile of each component (maps to 1)."""


def _normalise(x: np.ndarray | torch.Tensor) -> np.ndarray:
    x = np.asarray(x.float().cpu() if torch.is_tensor(x) else x, dtype=np.float64)  # (N, D)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_pca(
    features: np.ndarray | torch.Tensor, max_points: int = 50_000, seed: int = 0
) -> PCABasis:
    """Fit the 3-component colour map on (a seeded subsample of) ``features`` (N, D)."""
    x = _normalise(features)
    if len(x) < 2:
        raise ValueError(f"PCA needs at least 2 feature rows, got {len(x)}")
    if len(x) > max_points:
        x = x[np.random.default_rng(seed).choice(len(x), max_points, replace=False)]
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)  # rows of vt: directions
    components = np.zeros((3, x.shape[1]))
    components[: min(3, len(vt))] = vt[:3]
    proj = (x - mean) @ components.T  # (n, 3)
    return PCABasis(mean, components, np.percentile(proj, 1, 0), np.percentile(proj, 99, 0))


def pca_rgb(features: np.ndarray | torch.Tensor, basis: PCABasis) -> np.ndarray:
    """(N, 3) float RGB in [0, 1] of ``features`` under ``basis``."""
    proj = (_normalise(features) - basis.mean) @ basis.components.T  # (N, 3)
    return np.clip((proj - basis.low) / np.maximum(basis.high - basis.low, 1e-12), 0.0, 1.0)


def _bev_axis(ax, xy: np.ndarray, rgb: np.ndarray, title: str, extent: float) -> None:
    order = np.argsort(np.linalg.norm(xy, axis=1))[::-1]  # near points drawn last (on top)
    ax.scatter(xy[order, 0], xy[order, 1], c=rgb[order], s=1.5, marker=".", linewidths=0)
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_facecolor("black")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def save_bev_panels(
    path: Path, xy: np.ndarray, panels: list[tuple[str, np.ndarray]], extent: float = 40.0
) -> Path:
    """One PNG of bird's-eye views: the same points ``xy`` (N, 2) coloured by each (title, rgb)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.2), squeeze=False)
    for ax, (title, rgb) in zip(axes[0], panels, strict=True):
        _bev_axis(ax, xy, rgb, title, extent)
    fig.tight_layout()
    return _save(fig, path)


def save_camera_overlay(
    path: Path, image_path: str, uv: np.ndarray, rgb: np.ndarray, title: str
) -> Path:
    """The camera JPEG with each paired point's colour drawn at its pixel ``uv`` (M, 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    with Image.open(image_path) as im:
        image = np.asarray(im.convert("RGB"))
    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(10, 10 * h / w + 0.4))
    ax.imshow(image)
    ax.scatter(uv[:, 0] - 0.5, uv[:, 1] - 0.5, c=rgb, s=3, marker="s", linewidths=0)  # centre +0.5
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class VisualizeConfig:
    """Which pictures to draw."""

    checkpoint: str
    """Run folder of the trained student, or "none" (random init, architecture ``like``)."""
    cache: Path
    """Cache directory holding the scan (points, teacher targets, pairing)."""
    out: Path
    """Folder for the PNG files."""
    data: Path | None = None
    """Dataset root, for the camera images; without it only the bird's-eye views are drawn."""
    dataset: str = "nuscenes"
    """"nuscenes" or "semantickitti"."""
    version: str | None = None
    """nuScenes version folder."""
    scan: str | None = None
    """Scan token; None = the cache's first scan."""
    extent: float = 40.0
    """Half-width of the bird's-eye view, m."""
    device: str = "cpu"
    """torch device."""
    like: Path | None = None
    """With checkpoint "none": architecture from this run folder or name."""


def _find_scan_record(cfg: VisualizeConfig, token: str):
    from trainer.evaluate.backbone import EvalData, open_reader

    reader = open_reader(EvalData(root=cfg.data, dataset=cfg.dataset, version=cfg.version))
    split = token.split("_")[0] if cfg.dataset == "semantickitti" else "all"
    for scan in reader.scans(split):
        if scan.token == token:
            return scan
    raise ValueError(f"scan {token!r} of the cache is not in the dataset at {cfg.data}")


def run_visualize(cfg: VisualizeConfig) -> list[Path]:
    """Draw the pictures of one scan; returns the PNG paths."""
    from cache.reader import open_cache
    from trainer.evaluate.backbone import load_model, load_projection_head, scan_features
    from trainer.evaluate.rankme import paired_targets

    cache = open_cache(cfg.cache)
    if cfg.scan is None:
        index = 0
    elif cfg.scan in cache.tokens:
        index = cache.tokens.index(cfg.scan)
    else:
        raise ValueError(f"scan {cfg.scan!r} is not in cache {cfg.cache} ({len(cache)} scans)")
    scan = cache.read_scan(index)
    points = np.asarray(scan.points)  # (N, 4)
    camera = np.asarray(scan.camera)  # (N,)
    uv = np.asarray(scan.uv)  # (N, 2)
    paired = scan.paired
    if paired.sum() < 3:
        raise ValueError(
            f"scan {scan.token}: only {int(paired.sum())} paired points, nothing to draw"
        )
    target = paired_targets(scan).astype(np.float32)  # (P, D_t)

    model = load_model(cfg.checkpoint, cfg.like, cfg.device, dataset=cfg.dataset)
    feats = scan_features(model, points, cfg.device)  # (N, D_s)
    teacher_basis = fit_pca(target)
    teacher_rgb = np.tile(np.array(UNPAIRED_GREY), (len(points), 1))
    teacher_rgb[paired] = pca_rgb(target, teacher_basis)
    panels = [("teacher targets (paired points; grey = unpaired)", teacher_rgb)]
    head = None if cfg.checkpoint == "none" else load_projection_head(cfg.checkpoint, cfg.device)
    if head is not None:
        with torch.no_grad():
            projected = head(feats.to(cfg.device)).float().cpu()  # (N, D_t)
        panels.append(
            ("student head, teacher's PCA basis (all points)", pca_rgb(projected, teacher_basis))
        )
    panels.append(("student backbone, own PCA basis", pca_rgb(feats, fit_pca(feats))))
    out = Path(cfg.out)
    written = [save_bev_panels(out / f"{scan.token}_bev.png", points[:, :2], panels, cfg.extent)]

    if cfg.data is not None:
        record = _find_scan_record(cfg, scan.token)
        for c, frame in enumerate(record.cameras):
            on = camera == c
            if on.any():
                written.append(
                    save_camera_overlay(
                        out / f"{scan.token}_{frame.channel}.png", frame.image_path, uv[on],
                        teacher_rgb[on], f"{frame.channel}: teacher targets, PCA → RGB",
                    )
                )  # fmt: skip
    for path in written:
        print(path)
    return written
