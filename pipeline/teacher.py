"""The frozen DINOv2 teacher: camera images → patch-token grids → features at pixel positions.

Conventions (docs/extraction.md explains them with a picture in words):
- Models: Hugging Face ``Dinov2Model`` or ``Dinov2WithRegistersModel`` (patch 14), or the DINOv3
  ViTs' ``DINOv3ViTModel`` (patch 16, 4 registers, e.g. facebook/dinov3-vits16-pretrain-lvd1689m),
  loaded by hub id or local folder with ``AutoModel.from_pretrained``; weight files lacking a
  parameter the forward reads are refused (transformers would silently random-initialise it).
  A ``preprocessor_config.json`` asking for another normalisation than ImageNet's (DINOv3's
  satellite models) is refused. Frozen: no parameter requires grad, the module
  refuses to leave eval mode, forwards run under ``torch.inference_mode``.
- Weights run in float32 (``dtype`` autocasts): a checkpoint saved in float16/bfloat16, which
  transformers loads as such, is upcast (`TeacherIdentity.weights_dtype` records it).
- Input: uint8 RGB images (H0, W0, 3). We resize them to the configured (H, W) (bilinear,
  antialiased, half-pixel centres, in uint8 as PIL does), convert to [0, 1] and normalise with the ImageNet mean/std ourselves
  (no image-processor defaults: the processor would centre-crop). H and W must be multiples of
  the patch size (14; 16 for DINOv3). Aspect ratio is not preserved: each axis is scaled on its own
  (nuScenes 1600x900 → 896x448 scales x by 0.56 and y by 0.4978), which `sample_features`
  accounts for because it works in normalised image coordinates.
- Output: the last layer's patch tokens *after* the final LayerNorm (``last_hidden_state`` of the
  HF models, the features DINOv2 and DINOv3 are evaluated with), the CLS token and the
  ``config.num_register_tokens`` register tokens dropped, as a grid (B, D, H/P, W/P), P the
  patch size.
- Sampling: patch j covers resized pixels [P j, P (j + 1)), its feature sits at its centre;
  features between centres are bilinear, beyond the outermost centres constant (border).
  `sample_features` lives in `cache/sampling.py`: the reader of a
  ``grid-f16`` cache samples the stored grids with the same function.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.outputs import check_parents

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of ImageNet (in [0, 1]): DINOv2's training normalisation."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel RGB standard deviation of ImageNet (in [0, 1])."""
FEATURE_LAYER = "last"
"""The one layer we extract: the last block's tokens after the final LayerNorm."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""Files whose bytes define the teacher's weights (hashed into its identity)."""
RANDOM_MARKER = "random_init_for_tests"
"""config.json flag written by `save_random_teacher`: the weights are random, not DINOv2's."""
FITTED_MARKER = "fitted_on_dataset_labels"
"""config.json entry of a stand-in teacher fitted to dataset labels
(`pipeline/synthetic/teacher_fit.py`): what it was fitted on."""
UNUSED_PARAMETERS = frozenset({"embeddings.mask_token"})
"""Parameters a forward without masked positions never reads: a checkpoint may lack them."""
MISSING_SHOWN = 5
"""How many missing parameter names the error of a checkpoint that lacks some shows."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TeacherError(ValueError):
    """The teacher cannot be found, loaded or used as asked; the message names the model (or
    its folder) and the problem."""


@dataclass(frozen=True)
class TeacherConfig:
    """Which teacher to run and how."""

    model: str
    """Hugging Face hub id (e.g. "facebook/dinov2-small") or a local save_pretrained folder."""
    image_size: tuple[int, int] = (448, 896)
    """(H, W) the images are resized to before the forward; multiples of the patch size."""
    device: str = "cpu"
    """torch device of the forward ("cpu", "cuda", "cuda:1")."""
    dtype: str = "float32"
    """Autocast dtype of the forward: "float32" (none), "float16" (CUDA only) or "bfloat16"."""

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.image_size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"TeacherConfig.image_size must be (H, W) > 0, got {self.image_size}")
        object.__setattr__(self, "image_size", size)
        if self.dtype not in DTYPES:
            raise ValueError(
                f"TeacherConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )
        if self.dtype == "float16" and not self.device.startswith("cuda"):
            raise ValueError(
                "TeacherConfig.dtype float16 needs a CUDA device; use float32 or bfloat16"
            )


@dataclass(frozen=True)
class TeacherIdentity:
    """What makes two teachers the same: name as given and the hash of the weight bytes."""

    name: str  # hub id or local path, as given by the user
    weights_sha256: str  # `weights_sha256(folder)`
    config_sha256: str  # `config_sha256(folder)`
    architecture: str  # "Dinov2Model", "Dinov2WithRegistersModel" or "DINOv3ViTModel"
    feature_dim: int  # D, hidden size
    patch_size: int  # 14 for every released DINOv2, 16 for the DINOv3 ViTs
    num_register_tokens: int  # 0 without registers
    random: bool  # True for `save_random_teacher` folders: demo/test only
    fitted: bool = False  # True for stand-ins fitted to dataset labels (`make-teacher --fit-on`)
    weights_dtype: str = "float32"  # dtype the weights are stored in; upcast to float32 to run


def parse_image_size(text: str) -> tuple[int, int]:
    """ "448x896" → (448, 896): height x width."""
    try:
        h, w = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"image size must look like HEIGHTxWIDTH (e.g. 448x896), got {text!r}"
        ) from None
    return h, w


def check_image_size(image_size: tuple[int, int], patch_size: int) -> None:
    """Raise TeacherError unless both sides are positive multiples of ``patch_size``."""
    h, w = image_size
    if h <= 0 or w <= 0 or h % patch_size or w % patch_size:
        near = tuple(max(patch_size, round(s / patch_size) * patch_size) for s in (h, w))
        raise TeacherError(
            f"image size {h}x{w} is not a multiple of the teacher's patch size {patch_size} on both "
            f"sides; the nearest valid size is {near[0]}x{near[1]}"
        )


def resolve_model_dir(model: str) -> Path:
    """Local folder holding ``config.json`` and the weights of ``model`` (a folder, or a hub id
    fetched into the Hugging Face cache; no network needed when it is already there)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TeacherError(
                f"teacher folder {path} has no config.json (not a save_pretrained folder)"
            )
        return path.resolve()
    if path.exists() or model.startswith((".", "/", "~")):
        raise TeacherError(f"teacher {model!r}: no such folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id=model, allow_patterns=["*.json", "*.safetensors", "*.bin"])
        )
    except Exception as e:  # offline, unknown id, ...: name what we tried
        raise TeacherError(
            f"teacher {model!r} is neither a local folder nor a reachable Hugging Face model "
            f"({type(e).__name__}: {e})"
        ) from e


def weights_sha256(folder: str | Path) -> str:
    """sha256 over the weight files of a model folder: for each file (sorted by name), its name
    and the sha256 of its bytes. Renaming the folder keeps it; any changed weight changes it."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise TeacherError(
            f"teacher folder {folder} holds no weight file ({', '.join(WEIGHT_SUFFIXES)})"
        )
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as fh:
            h.update(f"{p.name}\0{hashlib.file_digest(fh, 'sha256').hexdigest()}\n".encode())
    return h.hexdigest()


CONFIG_FIELDS_IGNORED = (RANDOM_MARKER, FITTED_MARKER, "_name_or_path", "transformers_version")
"""config.json entries that do not change the model's outputs: our demo markers and what
save_pretrained stamps on a copy."""


def config_sha256(folder: str | Path) -> str:
    """sha256 of a model folder's config.json as canonical JSON (sorted keys), less
    `CONFIG_FIELDS_IGNORED`: an edited architecture setting (activation, layer-norm eps, ...)
    changes it; re-saving the same model does not."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TeacherError(f"{path}: cannot read the teacher's config ({e})") from e
    if not isinstance(config, dict):
        raise TeacherError(f"{path}: not a JSON object")
    kept = {k: v for k, v in config.items() if k not in CONFIG_FIELDS_IGNORED}
    return hashlib.sha256(
        json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def resize_uint8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H0, W0) uint8 → (B, 3, H, W) uint8 of ``size`` = (H, W): bilinear, antialiased,
    half-pixel centres, rounded to whole grey levels (like PIL/torchvision), on ``x``'s device.
    On the CPU in uint8 (~30x faster than resizing float 1600x900 images, a smaller copy to the
    GPU); elsewhere (CUDA has no uint8 antialiased kernel) through float32 then rounded
    (`resize_uint8_float`: within one grey level of the CPU result). Already-sized input is
    returned."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.device.type != "cpu":
        return resize_uint8_float(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_uint8_float(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`resize_uint8` computed in float32 on any device: the path of images decoded on a GPU."""
    y = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 → float32 on the same device: to [0, 1], then ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def patch_tokens(
    last_hidden_state: torch.Tensor, num_register_tokens: int, grid: tuple[int, int]
) -> torch.Tensor:
    """Token sequence (B, 1 + R + h*w, D) → patch grid (B, D, h, w).

    HF DINOv2 and DINOv3 order tokens as [CLS, R registers, patches row by row]; we drop the
    first 1 + R.
    """
    h, w = grid
    b, n, d = last_hidden_state.shape
    if n != 1 + num_register_tokens + h * w:
        raise ValueError(
            f"teacher returned {n} tokens; expected 1 CLS + {num_register_tokens} registers + "
            f"{h}x{w} patches"
        )
    patches = last_hidden_state[:, 1 + num_register_tokens :]  # (B, h*w, D)
    return patches.reshape(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w)


TEACHER_CLASSES = ("Dinov2Model", "Dinov2WithRegistersModel", "DINOv3ViTModel")
"""The transformers model classes a teacher may be (their last_hidden_state: CLS, registers,
patches after the final LayerNorm)."""


def check_normalisation(folder: Path) -> None:
    """TeacherError when the folder's ``preprocessor_config.json`` (if any) normalises with
    another mean/std than ImageNet's, which `normalise` applies to every teacher."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return
    try:
        processor = json.loads(path.read_text())
        mean, std = processor.get("image_mean"), processor.get("image_std")
    except (OSError, ValueError, AttributeError) as e:
        raise TeacherError(f"{path}: cannot read the teacher's preprocessor config ({e})") from e
    for name, value, ours in (
        ("image_mean", mean, IMAGENET_MEAN),
        ("image_std", std, IMAGENET_STD),
    ):
        if value is None:
            continue
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not np.allclose(value, ours, atol=1e-3)
        ):
            raise TeacherError(
                f"{path}: {name} {value} is not ImageNet's {list(ours)}, the normalisation this "
                "tool applies to every teacher"
            )


class Teacher(nn.Module):
    """A frozen DINOv2 (or DINOv3 ViT) that turns uint8 images into last-layer patch-token grids."""

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        from transformers import AutoModel

        self.cfg = cfg
        folder = resolve_model_dir(cfg.model)
        try:
            model, loading = AutoModel.from_pretrained(folder, output_loading_info=True)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: shape mismatch
            raise TeacherError(f"cannot load teacher {cfg.model!r} from {folder}: {e}") from e
        if type(model).__name__ not in TEACHER_CLASSES:
            raise TeacherError(
                f"teacher {cfg.model!r} is a {type(model).__name__}; expected one of "
                f"{', '.join(TEACHER_CLASSES)}"
            )
        check_normalisation(folder)
        # transformers fills parameters the weight files lack with random values and only logs
        # it; the mask token is unused (no masked positions in a forward)
        missing = sorted(set(loading["missing_keys"]) - UNUSED_PARAMETERS)
        if missing:
            shown = ", ".join(missing[:MISSING_SHOWN]) + (
                ", ..." if len(missing) > MISSING_SHOWN else ""
            )
            raise TeacherError(
                f"teacher {cfg.model!r}: {len(missing)} parameter{'s' * (len(missing) > 1)} of its "
                f"{type(model).__name__} not in its weight files (they would be random): {shown}"
            )
        # transformers loads weights in the dtype they were saved in; a half-precision checkpoint
        # would run in it whatever cfg.dtype says (cfg.dtype autocasts a float32 model)
        weights_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        model.float()
        model.requires_grad_(False)
        nn.Module.train(model, False)  # the wrapped model's own train() would flip it back
        self.model = model.to(cfg.device)
        config = model.config
        patch = config.patch_size
        self.patch_size: int = int(patch if isinstance(patch, int) else patch[0])
        check_image_size(cfg.image_size, self.patch_size)
        self.num_register_tokens: int = int(getattr(config, "num_register_tokens", 0) or 0)
        self.identity = TeacherIdentity(
            name=cfg.model,
            weights_sha256=weights_sha256(folder),
            config_sha256=config_sha256(folder),
            architecture=type(model).__name__,
            feature_dim=int(config.hidden_size),
            patch_size=self.patch_size,
            num_register_tokens=self.num_register_tokens,
            random=bool(getattr(config, RANDOM_MARKER, False)),
            fitted=bool(getattr(config, FITTED_MARKER, None)),
            weights_dtype=weights_dtype,
        )
        self.forward_count = 0  # teacher forwards (batches) run by this instance
        self.image_count = 0  # images passed through the teacher by this instance
        nn.Module.train(self, False)

    @property
    def feature_dim(self) -> int:
        return self.identity.feature_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the patch grid: image size / patch size."""
        h, w = self.cfg.image_size
        return h // self.patch_size, w // self.patch_size

    def train(self, mode: bool = True) -> Teacher:
        """The teacher is frozen: ``train(False)``/``eval()`` are fine, ``train(True)`` raises."""
        if mode:
            raise RuntimeError("the teacher is frozen and stays in eval mode; train() is refused")
        return nn.Module.train(self, False)

    def resize(self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 RGB (B, H0, W0, 3) (or a list of (H0_i, W0_i, 3)) → (B, H, W, 3) uint8 at the
        configured size, on the device the images are on (`resize_uint8`); CPU results are
        pinned when the teacher runs on CUDA, so the copy to the GPU can be asynchronous. Uses
        no teacher state: extraction runs it in a prefetch thread for the next batch while the
        current one is in the teacher. Already-sized images are not resampled."""
        if isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4:
            batch = [images]
        else:
            batch = [im[None] for im in images]
        out = []
        for group in batch:
            # np.array copies: decoded images are often read-only views torch will not wrap
            t = group if isinstance(group, torch.Tensor) else torch.from_numpy(np.array(group))
            if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
                raise ValueError(
                    f"teacher input must be uint8 RGB images (B, H, W, 3), got {t.dtype} {tuple(t.shape)}"
                )
            out.append(resize_uint8(t.permute(0, 3, 1, 2), self.cfg.image_size))
        # one group (a batch the prefetch already resized): no copy; pinned memory is not re-pinned
        x = (out[0] if len(out) == 1 else torch.cat(out)).permute(0, 2, 3, 1)  # (B, H, W, 3)
        cuda = torch.device(self.cfg.device).type == "cuda"
        return x.pin_memory() if cuda and x.device.type == "cpu" and not x.is_pinned() else x

    def preprocess(self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 RGB (B, H0, W0, 3) (or a list of (H0_i, W0_i, 3)) → normalised (B, 3, H, W)
        float32 on the teacher's device: `resize`, to [0, 1], ImageNet mean/std."""
        x = self.resize(images).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        return normalise(x.to(self.cfg.device, non_blocking=True))

    @torch.inference_mode()
    def patch_grid(
        self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray], on_device: bool = False
    ) -> torch.Tensor:
        """uint8 RGB images (B, H0, W0, 3) → last-layer patch tokens (B, D, H/P, W/P) float32,
        on the CPU, or left on the teacher's device with ``on_device`` (extraction samples the
        paired points there and copies only their features back)."""
        if self.training or self.model.training:
            raise RuntimeError("the teacher must be in eval mode (something called train() on it)")
        pixels = self.preprocess(images)  # (B, 3, H, W)
        device_type = torch.device(self.cfg.device).type
        dtype = DTYPES[self.cfg.dtype]
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            tokens = self.model(pixel_values=pixels).last_hidden_state  # (B, 1 + R + h*w, D)
        self.forward_count += 1
        self.image_count += len(pixels)
        grid = patch_tokens(tokens.float(), self.num_register_tokens, self.grid_size)
        return grid if on_device else grid.cpu()


# Workers keep one teacher per process (a Dask worker runs many units); threads share it.
_TEACHERS: dict[TeacherConfig, Teacher] = {}
_TEACHERS_LOCK = threading.Lock()


def cached_teacher(cfg: TeacherConfig) -> Teacher:
    """The process-wide `Teacher` for ``cfg``, loaded on first use."""
    with _TEACHERS_LOCK:
        if cfg not in _TEACHERS:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker is noise
            _TEACHERS[cfg] = Teacher(cfg)
        return _TEACHERS[cfg]


# ---------------------------------------------------------------- random teachers for tests ----
RANDOM_SIZES = {
    # name: (hidden size D, layers, heads); MLP ratio 4, patch 14 as DINOv2
    "tiny": (64, 2, 2),  # tests and the demo
    "small": (96, 4, 3),
    "vits14": (384, 12, 6),  # the shape of DINOv2 ViT-S/14 (random weights): for timing only
    "vitb14": (768, 12, 12),  # the shape of DINOv2 ViT-B/14 (random weights): for timing only
    "vitl14": (1024, 24, 16),  # the shape of DINOv2 ViT-L/14 (random weights): for timing only
}
FAMILIES = {
    # family: (patch size, register tokens by default, sizes it comes in)
    "dinov2": (14, 0, ("tiny", "small", "vits14", "vitb14", "vitl14")),
    "dinov3": (16, 4, ("tiny", "small")),  # DINOv3ViTModel; its released ViTs all have 4 registers
}

RANDOM_README = """# RANDOM {family} — for demos and tests only

This folder holds a **randomly initialised** {arch} ({size}: hidden size {dim}, {layers} layers,
{heads} heads, patch {patch}, {registers} register tokens), written by `python cli.py make-teacher`
with seed {seed}. It is NOT a trained {family}: its features carry no semantics. It exists because
no real weights can be downloaded here; it exercises the exact code path a real teacher takes.
Its config.json carries `"{marker}": true`, and extraction prints a warning when it sees it.
"""


def random_teacher(
    size: str = "tiny", registers: int | None = None, seed: int = 0, family: str = "dinov2"
) -> nn.Module:
    """A random-initialised small HF teacher of one of the ``RANDOM_SIZES``, flagged with
    ``RANDOM_MARKER`` in its config: for ``family`` "dinov2" a ``Dinov2Model``
    (``Dinov2WithRegistersModel`` when ``registers`` > 0), for "dinov3" a ``DINOv3ViTModel``
    (patch 16, RoPE). ``registers`` None: the family's default (``FAMILIES``)."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    if family not in FAMILIES:
        raise ValueError(f"unknown teacher family {family!r}; choose one of {sorted(FAMILIES)}")
    patch, default_registers, sizes = FAMILIES[family]
    if size not in sizes:
        raise ValueError(
            f"unknown random {family} teacher size {size!r}; choose one of {', '.join(sizes)}"
        )
    registers = default_registers if registers is None else registers
    if registers < 0:
        raise ValueError(f"registers must be >= 0, got {registers}")
    dim, layers, heads = RANDOM_SIZES[size]
    if family == "dinov3":
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        config = DINOv3ViTConfig(
            hidden_size=dim,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * dim,
            patch_size=patch,
            num_register_tokens=registers,
            **{RANDOM_MARKER: True},
        )
        torch.manual_seed(seed)
        model = DINOv3ViTModel(config)
        with torch.no_grad():  # HF may initialise the tokens to zero: make them differ
            model.embeddings.register_tokens.normal_(0.0, 0.02)
        return model
    common = dict(
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_ratio=4,
        patch_size=patch,
        image_size=518,  # position embeddings for 37x37 patches, interpolated as in DINOv2
    )
    common[RANDOM_MARKER] = True
    torch.manual_seed(seed)
    if registers:
        model = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        )
        # HF initialises registers to zero; give them values so they differ from each other
        with torch.no_grad():
            model.embeddings.register_tokens.normal_(0.0, 0.02)
    else:
        model = Dinov2Model(Dinov2Config(**common))
    return model


def save_teacher_folder(model: nn.Module, out: str | Path, files: dict[str, str]) -> Path:
    """``model.save_pretrained`` plus text ``files`` (name → content, e.g. README.md) into ``out``
    (must not exist or be empty), written to a temp folder beside it and renamed: a folder
    either is complete or absent."""
    import shutil
    import uuid

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-file "Writing model shards" bar is noise
    out = Path(out)
    check_parents(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
    try:
        model.save_pretrained(tmp)
        for name, text in files.items():
            (tmp / name).write_text(text)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_random_teacher(
    out: str | Path,
    size: str = "tiny",
    registers: int | None = None,
    seed: int = 0,
    family: str = "dinov2",
) -> Path:
    """Save a random-initialised small teacher of ``family`` (`random_teacher`) with
    ``save_pretrained`` into ``out`` (written to a temp folder, then renamed). Returns ``out``."""
    model = random_teacher(size, registers, seed, family)
    dim, layers, heads = RANDOM_SIZES[size]
    readme = RANDOM_README.format(
        family=family.replace("dino", "DINO"),
        arch=type(model).__name__,
        size=size,
        dim=dim,
        layers=layers,
        heads=heads,
        patch=FAMILIES[family][0],
        registers=getattr(model.config, "num_register_tokens", 0),
        seed=seed,
        marker=RANDOM_MARKER,
    )
    return save_teacher_folder(model, out, {"README.md": readme})
