"""pipeline/teacher.py: token slicing, eval-only, normalisation, resize, bilinear sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cache.sampling import sample_features
from pipeline.teacher import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Teacher,
    TeacherConfig,
    TeacherError,
    config_sha256,
    parse_image_size,
    save_random_teacher,
    weights_sha256,
)


@pytest.fixture(scope="module")
def registers_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_teacher(tmp_path_factory.mktemp("reg") / "dinov2-reg", registers=4)


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_patch_grid_shape_for_non_multiple_input(tiny_teacher: Path) -> None:
    teacher = Teacher(TeacherConfig(str(tiny_teacher), image_size=(28, 42)))
    images = _images(2, 50, 75)  # neither side a multiple of 14: resized to 28x42
    grid = teacher.patch_grid(images)
    assert grid.shape == (2, 64, 2, 3)
    assert grid.dtype == torch.float32
    # Same values as slicing the HF output by hand: CLS first, then patches row by row.
    with torch.inference_mode():
        tokens = teacher.model(pixel_values=teacher.preprocess(images)).last_hidden_state
    assert tokens.shape == (2, 1 + 6, 64)
    assert torch.equal(grid[:, :, 1, 2], tokens[:, 1 + 1 * 3 + 2])
    assert torch.equal(grid, tokens[:, 1:].reshape(2, 2, 3, 64).permute(0, 3, 1, 2))
    assert teacher.forward_count == 1 and teacher.image_count == 2


def test_register_tokens_are_dropped(registers_teacher: Path) -> None:
    teacher = Teacher(TeacherConfig(str(registers_teacher), image_size=(28, 42)))
    assert teacher.identity.architecture == "Dinov2WithRegistersModel"
    assert teacher.num_register_tokens == 4
    images = _images(3, 40, 60, seed=1)
    grid = teacher.patch_grid(images)
    with torch.inference_mode():
        tokens = teacher.model(pixel_values=teacher.preprocess(images)).last_hidden_state
    assert tokens.shape == (3, 1 + 4 + 6, 64)
    expected = tokens[:, 5:].reshape(3, 2, 3, 64).permute(0, 3, 1, 2)
    assert torch.equal(grid, expected)
    # Forgetting the registers would shift every patch by four tokens: not what we return.
    wrong = tokens[:, 1:7].reshape(3, 2, 3, 64).permute(0, 3, 1, 2)
    assert not torch.allclose(grid, wrong)


@pytest.mark.parametrize("registers", [0, 4])
def test_patch_grid_layout_matches_the_image_not_only_hf_slicing(
    tmp_path: Path, registers: int
) -> None:
    """Independent of HF's token order: with no transformer layer and zero position embeddings a
    patch token is LayerNorm(conv(its own pixels)), so the grid must equal that conv computed on
    the image by hand, patch (i, j) at row i, column j (registers skipped, rows not transposed)."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    from pipeline.teacher import normalise, save_teacher_folder

    torch.manual_seed(0)
    common = dict(
        hidden_size=32, num_hidden_layers=0, num_attention_heads=2, patch_size=14, image_size=518
    )
    if registers:
        model = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        )
    else:
        model = Dinov2Model(Dinov2Config(**common))
    with torch.no_grad():
        model.embeddings.position_embeddings.zero_()
        if registers:
            model.embeddings.register_tokens.normal_()
    folder = save_teacher_folder(model, tmp_path / "flat", {})
    teacher = Teacher(TeacherConfig(str(folder), image_size=(42, 70)))  # grid 3 x 5
    colours = np.random.default_rng(1).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(colours, 14, 0), 14, 1)[None]  # one colour per patch
    grid = teacher.patch_grid(image)[0]  # (D, 3, 5)
    proj = teacher.model.embeddings.patch_embeddings.projection
    pixels = normalise(torch.from_numpy(image).permute(0, 3, 1, 2))
    with torch.inference_mode():
        by_hand = torch.nn.functional.conv2d(pixels, proj.weight, proj.bias, stride=14)[0]
        want = teacher.model.layernorm(by_hand.permute(1, 2, 0)).permute(2, 0, 1)
    assert torch.allclose(grid, want, atol=1e-5)


def test_dinov3_patch_grid_is_its_patch_tokens_after_the_registers(tmp_path: Path) -> None:
    """DINOv3ViTModel (patch 16, 4 registers, RoPE): the grid is last_hidden_state less CLS and
    the 4 registers, row by row, on a non-square image; the identity records the family."""
    folder = save_random_teacher(tmp_path / "d3", family="dinov3")
    teacher = Teacher(TeacherConfig(str(folder), image_size=(32, 80)))  # grid 2 x 5
    assert teacher.identity.architecture == "DINOv3ViTModel"
    assert (teacher.patch_size, teacher.num_register_tokens, teacher.grid_size) == (16, 4, (2, 5))
    images = _images(2, 45, 100, seed=3)
    grid = teacher.patch_grid(images)
    with torch.inference_mode():
        tokens = teacher.model(pixel_values=teacher.preprocess(images)).last_hidden_state
    assert tokens.shape == (2, 1 + 4 + 10, 64) and grid.shape == (2, 64, 2, 5)
    assert torch.equal(grid, tokens[:, 5:].reshape(2, 2, 5, 64).permute(0, 3, 1, 2))
    assert not torch.allclose(grid, tokens[:, 1:11].reshape(2, 2, 5, 64).permute(0, 3, 1, 2))
    with pytest.raises(TeacherError, match="not a multiple of the teacher's patch size 16"):
        Teacher(TeacherConfig(str(folder), image_size=(28, 84)))  # DINOv2's sizes do not fit


def test_dinov3_grid_layout_matches_the_image(tmp_path: Path) -> None:
    """As for DINOv2, independent of HF's token order: with no transformer layer a DINOv3 patch
    token is LayerNorm(conv(its own pixels)) (RoPE acts inside attention only), so the grid is
    that conv computed by hand, patch (i, j) at row i, column j, the 4 registers skipped."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from pipeline.teacher import normalise, save_teacher_folder

    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=32, num_hidden_layers=0, num_attention_heads=2, intermediate_size=64,
        patch_size=16, num_register_tokens=4,
    )  # fmt: skip
    model = DINOv3ViTModel(config)
    with torch.no_grad():
        model.embeddings.register_tokens.normal_()
    folder = save_teacher_folder(model, tmp_path / "flat3", {})
    teacher = Teacher(TeacherConfig(str(folder), image_size=(48, 80)))  # grid 3 x 5
    colours = np.random.default_rng(1).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(colours, 16, 0), 16, 1)[None]  # one colour per patch
    grid = teacher.patch_grid(image)[0]  # (D, 3, 5)
    conv = teacher.model.embeddings.patch_embeddings
    pixels = normalise(torch.from_numpy(image).permute(0, 3, 1, 2))
    with torch.inference_mode():
        by_hand = torch.nn.functional.conv2d(pixels, conv.weight, conv.bias, stride=16)[0]
        want = teacher.model.norm(by_hand.permute(1, 2, 0)).permute(2, 0, 1)
    assert torch.allclose(grid, want, atol=1e-5)


def test_a_teacher_normalised_otherwise_than_imagenet_is_refused(tmp_path: Path) -> None:
    """`normalise` applies ImageNet's mean/std to every teacher: a model whose preprocessor asks
    for others (DINOv3's satellite ViTs) would get wrong inputs, so it is refused by name."""
    import json

    folder = save_random_teacher(tmp_path / "d3", family="dinov3")
    imagenet = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
    (folder / "preprocessor_config.json").write_text(json.dumps(imagenet))
    Teacher(TeacherConfig(str(folder), image_size=(32, 32)))  # accepted
    satellite = {"image_mean": [0.430, 0.411, 0.296], "image_std": [0.213, 0.156, 0.143]}
    (folder / "preprocessor_config.json").write_text(json.dumps(satellite))
    with pytest.raises(TeacherError, match=r"preprocessor_config.json: image_mean \[0.43, "):
        Teacher(TeacherConfig(str(folder), image_size=(32, 32)))
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(TeacherError, match="cannot read the teacher's preprocessor config"):
        Teacher(TeacherConfig(str(folder), image_size=(32, 32)))


def test_features_are_taken_after_the_final_layernorm(tiny_teacher: Path) -> None:
    teacher = Teacher(TeacherConfig(str(tiny_teacher), image_size=(28, 28)))
    pixels = teacher.preprocess(_images(1, 28, 28, seed=2))
    with torch.inference_mode():
        out = teacher.model(pixel_values=pixels, output_hidden_states=True)
        normed = teacher.model.layernorm(out.hidden_states[-1])
    assert torch.allclose(out.last_hidden_state, normed, atol=1e-6)
    assert not torch.allclose(out.last_hidden_state, out.hidden_states[-1], atol=1e-2)
    grid = teacher.patch_grid(_images(1, 28, 28, seed=2))  # (1, D, 2, 2)
    assert torch.allclose(grid[0, :, 0, 0], normed[0, 1], atol=1e-6)


def test_teacher_stays_frozen_in_eval_mode(tiny_teacher: Path) -> None:
    teacher = Teacher(TeacherConfig(str(tiny_teacher), image_size=(28, 28)))
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(RuntimeError, match="eval mode"):
        teacher.train()
    teacher.eval()  # allowed, stays in eval
    grid = teacher.patch_grid(_images(1, 28, 28))
    assert not grid.requires_grad
    teacher.model.train()  # reaching around the wrapper is caught at the next forward
    with pytest.raises(RuntimeError, match="eval mode"):
        teacher.patch_grid(_images(1, 28, 28))


def test_image_size_must_be_a_multiple_of_the_patch(tiny_teacher: Path) -> None:
    with pytest.raises(ValueError, match=r"225x392 is not a multiple .* patch size 14.*224x392"):
        Teacher(TeacherConfig(str(tiny_teacher), image_size=(225, 392)))
    assert parse_image_size("448x896") == (448, 896)
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_image_size("448*896")


def test_missing_or_wrong_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="no such folder"):
        Teacher(TeacherConfig(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="has no config.json"):
        Teacher(TeacherConfig(str(tmp_path / "empty")))
    from transformers import ViTConfig, ViTModel

    vit = tmp_path / "vit"
    ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=28,
            patch_size=14,
        )
    ).save_pretrained(vit)
    with pytest.raises(
        TeacherError,
        match="ViTModel; expected one of Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel",
    ):
        Teacher(TeacherConfig(str(vit)))


def test_weights_that_do_not_fit_the_model_are_refused(tmp_path: Path) -> None:
    """transformers fills parameters missing from a checkpoint (a dropped tensor, another key
    prefix) with fresh random values and only logs it: such a folder would pass for the real
    teacher under its weights hash. It is refused, naming the keys; a shape mismatch too.
    Keys the checkpoint has beyond the model (a classifier head) are fine."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Config, Dinov2ForImageClassification

    base = save_random_teacher(tmp_path / "base")
    weights = load_file(base / "model.safetensors")
    for name, state, named in (
        ("dropped", {k: v for k, v in weights.items() if k != "encoder.layer.1.mlp.fc1.weight"},
         r"1 parameter.*not in its weight files.*encoder\.layer\.1\.mlp\.fc1\.weight"),
        ("prefixed", {f"backbone.{k}": v for k, v in weights.items()},
         rf"{len(weights) - 1} parameters.*not in its weight files"),  # all but the mask token
    ):  # fmt: skip
        folder = tmp_path / name
        shutil.copytree(base, folder)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(TeacherError, match=named):
            Teacher(TeacherConfig(str(folder), image_size=(28, 28)))
    resized = tmp_path / "resized"
    shutil.copytree(base, resized)
    config = json.loads((resized / "config.json").read_text())
    (resized / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(TeacherError, match="cannot load teacher"):
        Teacher(TeacherConfig(str(resized), image_size=(28, 28)))
    # a classification checkpoint: its backbone loads (prefix stripped), the head is left out
    head = Dinov2ForImageClassification(
        Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=3)
    )
    head.save_pretrained(tmp_path / "head")
    teacher = Teacher(TeacherConfig(str(tmp_path / "head"), image_size=(28, 28)))
    assert torch.equal(teacher.model.layernorm.weight, head.dinov2.layernorm.weight)


def test_imagenet_normalisation_is_ours(tiny_teacher: Path) -> None:
    # The reference is transformers' (DINOv2's image processor uses these), not our own copy:
    # a typo in IMAGENET_MEAN / IMAGENET_STD would otherwise pass.
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert (
        list(IMAGENET_MEAN) == IMAGENET_DEFAULT_MEAN and list(IMAGENET_STD) == IMAGENET_DEFAULT_STD
    )
    teacher = Teacher(TeacherConfig(str(tiny_teacher), image_size=(28, 28)))
    image = np.zeros((1, 56, 56, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 128, 250
    x = teacher.preprocess(image)  # (1, 3, 28, 28), a constant image stays constant
    for c, v in enumerate((10, 128, 250)):
        want = (v / 255.0 - IMAGENET_DEFAULT_MEAN[c]) / IMAGENET_DEFAULT_STD[c]
        assert torch.allclose(x[0, c], torch.full((28, 28), want), atol=1e-6)


def test_weights_hash_identifies_the_weights_not_the_folder(tmp_path: Path) -> None:
    a = save_random_teacher(tmp_path / "a", seed=0)
    b = save_random_teacher(tmp_path / "b", seed=0)
    c = save_random_teacher(tmp_path / "c", seed=1)
    assert weights_sha256(a) == weights_sha256(b) != weights_sha256(c)
    assert Teacher(TeacherConfig(str(a))).identity.random is True
    with pytest.raises(FileExistsError, match="not empty"):
        save_random_teacher(a)


def test_config_hash_follows_the_architecture_not_our_markers(tmp_path: Path) -> None:
    """The same weights under another activation are another teacher (other targets); our demo
    markers and what save_pretrained stamps are not part of it."""
    import json
    import shutil

    a = save_random_teacher(tmp_path / "a", seed=0)
    config = json.loads((a / "config.json").read_text())
    edited = {}
    for name, change in (
        ("act", {"hidden_act": "relu"}),
        ("eps", {"layer_norm_eps": 1e-5}),
        ("stamps", {"transformers_version": "0.0.1", "random_init_for_tests": False}),
    ):
        folder = tmp_path / name
        shutil.copytree(a, folder)
        (folder / "config.json").write_text(json.dumps({**config, **change}, indent=4))
        edited[name] = config_sha256(folder)
    assert weights_sha256(tmp_path / "act") == weights_sha256(a)
    assert len({config_sha256(a), edited["act"], edited["eps"]}) == 3
    assert edited["stamps"] == config_sha256(a)
    grids = [
        Teacher(TeacherConfig(str(f), image_size=(28, 28))).patch_grid(
            np.random.default_rng(0).integers(0, 256, (1, 28, 28, 3), dtype=np.uint8)
        )
        for f in (a, tmp_path / "act")
    ]
    assert not torch.allclose(grids[0], grids[1])  # why the key must tell them apart


# ---------------------------------------------------------------- sample_features ----
def _known_grid() -> torch.Tensor:
    # (D=2, h=2, w=3); orig image 20x30 → patch centres at x = 5, 15, 25 and y = 5, 15
    return torch.tensor(
        [
            [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]],
            [[10.0, -2.0, 7.0], [1.0, 0.0, 3.0]],
        ]
    )


def test_sample_features_exact_at_patch_centres() -> None:
    grid = _known_grid()
    ys, xs = np.meshgrid([5.0, 15.0], [5.0, 15.0, 25.0], indexing="ij")
    uv = np.stack([xs.ravel(), ys.ravel()], axis=1)  # (6, 2) row by row
    out = sample_features(grid, uv, (20, 30))
    assert torch.allclose(out, grid.reshape(2, 6).T, atol=1e-5)  # float rounding of 2x/W0 - 1


def test_sample_features_bilinear_between_centres_and_border_outside() -> None:
    grid = _known_grid()
    uv = np.array(
        [
            [10.0, 5.0],  # halfway between (0,0) and (0,1)
            [10.0, 10.0],  # centre of four patches
            [7.5, 5.0],  # a quarter of the way
            [12.5, 7.5],  # x: 0.75 of the way from col 0 to 1; y: 0.25 from row 0 to 1
            [1.0, 1.0],  # before the first centre: edge patch
            [29.9, 19.9],  # last pixel: last patch
        ]
    )
    out = sample_features(grid, uv, (20, 30))
    # hand-computed: channel 1 at row 12.5/7.5: row0 10*.25 - 2*.75 = 1, row1 .25; .75*1 + .25*.25
    want = torch.tensor(
        [[0.5, 4.0], [2.0, 2.25], [0.25, 7.0], [1.5, 0.8125], [0.0, 10.0], [5.0, 3.0]]
    )
    assert torch.allclose(out, want, atol=1e-6)


def test_sample_features_maps_original_pixels_through_the_resize(tiny_teacher: Path) -> None:
    """A point at a patch centre of the *resized* image, mapped back to original pixels with the
    per-axis scale, gets exactly that patch's token (nuScenes-like aspect change)."""
    teacher = Teacher(TeacherConfig(str(tiny_teacher), image_size=(42, 70)))  # grid 3 x 5
    h0, w0 = 45, 80  # aspect 16:9 → 3:5
    grid = teacher.patch_grid(_images(1, h0, w0, seed=3))[0]  # (D, 3, 5)
    i, j = 2, 3
    u = (j + 0.5) * 14 * w0 / 70
    v = (i + 0.5) * 14 * h0 / 42
    out = sample_features(grid, np.array([[u, v]]), (h0, w0))
    assert torch.allclose(out[0], grid[:, i, j], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_autocast_matches_float32(tiny_teacher: Path, dtype: str) -> None:
    images = _images(2, 90, 160, seed=4)
    ref = Teacher(TeacherConfig(str(tiny_teacher), (56, 98), "cpu", "float32")).patch_grid(images)
    cuda32 = Teacher(TeacherConfig(str(tiny_teacher), (56, 98), "cuda", "float32"))
    low = Teacher(TeacherConfig(str(tiny_teacher), (56, 98), "cuda", dtype))
    assert torch.allclose(cuda32.patch_grid(images), ref, atol=1e-3)  # same resize on every device
    grid = low.patch_grid(images)
    assert grid.dtype == torch.float32 and grid.device.type == "cpu"
    cos = torch.nn.functional.cosine_similarity(grid, ref, dim=1)  # (B, h, w)
    assert cos.min() > 0.99
    assert not torch.equal(grid, ref)  # autocast did run in low precision


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_checkpoints_run_in_float32(tmp_path: Path, stored: str) -> None:
    """transformers 5 loads a checkpoint in the dtype it was saved in: weights stored in
    bfloat16/float16 ran in it (float16 even on the CPU, which `TeacherConfig` refuses) while
    the key said float32. They are upcast: the grid equals that of the same values stored in
    float32, and the identity (so the cache key) records the stored dtype."""
    from pipeline.teacher import random_teacher, save_teacher_folder

    dtype = getattr(torch, stored)
    model = random_teacher("tiny", seed=0).to(dtype)
    half = save_teacher_folder(model, tmp_path / "half", {})
    full = save_teacher_folder(model.float(), tmp_path / "full", {})  # the same values
    images = _images(2, 45, 80, seed=5)
    teachers = [Teacher(TeacherConfig(str(f), image_size=(28, 42))) for f in (half, full)]
    assert all(p.dtype == torch.float32 for p in teachers[0].parameters())
    assert torch.equal(teachers[0].patch_grid(images), teachers[1].patch_grid(images))
    assert teachers[0].identity.weights_dtype == stored
    assert teachers[1].identity.weights_dtype == "float32"


def test_float16_on_cpu_is_refused(tiny_teacher: Path) -> None:
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        TeacherConfig(str(tiny_teacher), dtype="float16")


def test_fitted_stand_in_teacher_learns_the_classes(synthetic_nuscenes, tmp_path: Path) -> None:
    """make-teacher --fit-on (the real CLI): the loss falls, held-out point accuracy beats the
    majority class by a wide margin, and the folder loads as a teacher flagged fitted (not random);
    a second run refuses to overwrite it."""
    import json
    import subprocess
    import sys

    out = tmp_path / "fitted"
    cmd = [
        sys.executable, "cli.py", "make-teacher", "--out", str(out), "--size", "tiny",
        "--fit-on", str(synthetic_nuscenes.root), "--image-size", "98x168", "--fit-epochs", "30",
        "--no-progress",
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STAND-IN" in proc.stdout
    stats = json.loads((out / "fit.json").read_text())
    assert stats["images"] == 6 * 4  # scene-0001: 4 keyframes x 6 cameras
    assert stats["last_loss"] < 0.6 * stats["first_loss"]
    assert stats["val_accuracy"] > stats["val_majority_share"] + 0.12  # measured +0.20
    teacher = Teacher(TeacherConfig(str(out), image_size=(98, 168)))
    assert teacher.identity.fitted is True and teacher.identity.random is False
    assert "STAND-IN" in (out / "README.md").read_text()
    again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "exists and is not empty" in again.stderr
