"""The command line: every command is listed with one line of help, and --help imports nothing
heavy (how long it takes is a benchmark's business, not a test's)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = [
    "make-synthetic",
    "make-teacher",
    "check-data",
    "extract-teacher",
    "cache",
    "train",
    "evaluate",
    "visualize",
    "ablate",
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_command_with_help_text():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name in EXPECTED:
        rows = [
            line for line in lines if line.strip().startswith(name + " ") or f"│ {name} " in line
        ]
        assert rows, f"{name} missing from --help:\n{out.stdout}"
        assert len(rows[0].split(name, 1)[1].strip(" │")) > 10, f"{name} has no help line"


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys, runpy; sys.argv=['cli.py','--help']\n"
        "try:\n    runpy.run_path('cli.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'MinkowskiEngine', 'zarr') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_bad_input_is_one_line_naming_it_not_a_traceback(
    tmp_path: Path, synthetic_nuscenes, tiny_teacher: Path, train_cache
) -> None:
    """Each command given a bad path or value prints one `error:` line (or typer's usage error)
    and exits 1 (2 for usage), without a traceback, and writes nothing. Each case names the
    file or option and the problem; the commented ones ended in a traceback, or a message
    without the file, before cli.py's shared `_errors()`."""
    import shutil

    from typer.testing import CliRunner

    from cli import app

    data, teacher = str(synthetic_nuscenes.root), str(tiny_teacher)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    full = tmp_path / "full"
    (full / "something").mkdir(parents=True)
    list_manifest = tmp_path / "list-manifest"  # valid JSON, not an object
    list_manifest.mkdir()
    (list_manifest / "manifest.json").write_text("[]")
    no_dim = tmp_path / "no-dim" / train_cache.cache.name  # a manifest without feature_dim
    shutil.copytree(train_cache.cache, no_dim)
    manifest = (no_dim / "manifest.json").read_text()
    (no_dim / "manifest.json").write_text(manifest.replace('"feature_dim"', '"feature_dim_"'))
    garbled_unit = tmp_path / "garbled-unit" / train_cache.cache.name  # a unit's zarr.json
    shutil.copytree(train_cache.cache, garbled_unit)
    (garbled_unit / "units" / "u00000" / "zarr.json").write_text("{garbled")
    runs = {  # run folders: config.yaml, checkpoint.pt
        "run-bad-yaml": ("config: [1\n", None),
        "run-list-yaml": ("- 1\n", None),
        "run-bad-ckpt": ("config: {backbone: tiny, voxel_size: 0.1}\n", "garbage\n"),
    }
    for name, (config, checkpoint) in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(config)
        if checkpoint is not None:
            (tmp_path / name / "checkpoint.pt").write_text(checkpoint)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: [1\n")
    kitti = ["make-synthetic", "--out", str(tmp_path / "k"), "--format", "semantickitti"]
    extract = ["extract-teacher", "--data", data, "--teacher", teacher, "--image-size", "28x28"]
    train = ["train", "--cache", str(train_cache.cache), "--data", str(train_cache.data),
             "--version", "v1.0-test", "--backbone", "tiny", "--workers", "0", "--no-progress"]  # fmt: skip
    probe = ["evaluate", "linear-probe", "--data", data, "--out", str(tmp_path / "e")]
    none = ["--checkpoint", "none", "--like", "tiny", "--out", str(tmp_path / "e")]
    cases = [
        (["make-teacher", "--out", str(full)], 1, "not empty"),
        (["make-teacher", "--out", str(tmp_path / "t"), "--size", "huge"], 1, "huge"),
        (["make-teacher", "--out", str(a_file)], 1, str(a_file)),
        # before: "[Errno 17] File exists: '.../a-file'"
        (["make-teacher", "--out", str(a_file / "t")], 1, f"{a_file} exists and is not a folder"),
        ([*extract, "--cache", str(a_file)], 1, str(a_file)),
        ([*extract, "--cache", "s3://bucket/c"], 1, "URLs are not supported"),  # before: exit 2
        ([*extract, "--cache", str(tmp_path / "c"), "--split", "mini_val"], 1, "mini_val"),
        (["check-data", "--data", str(tmp_path / "nowhere")], 1, "no such folder"),
        (["check-data", "--data", data, "--split", "mini_val"], 1, "mini_val"),
        # before: a traceback (AttributeError, KeyError) / "cache root ... does not exist"
        (["cache", "info", str(list_manifest)], 1, f"{list_manifest / 'manifest.json'}: expected a JSON object"),
        (["cache", "info", str(no_dim)], 1, f"{no_dim / 'manifest.json'}: feature_dim must be"),
        (["cache", "verify", str(a_file)], 1, f"{a_file} is not a folder"),
        # before: a multi-line YAML message / a traceback (NotADirectoryError)
        ([*train, "--config", str(bad_yaml), "--out", str(tmp_path / "r")], 1, f"{bad_yaml}: not valid YAML"),
        ([*train, "--out", str(a_file / "r")], 1, str(a_file / "r")),
        # before: a traceback (yaml's ParserError, TypeError) / no file named
        ([*probe, "--checkpoint", str(tmp_path / "run-bad-yaml")], 1, str(tmp_path / "run-bad-yaml" / "config.yaml")),
        ([*probe, "--checkpoint", str(tmp_path / "run-list-yaml")], 1, str(tmp_path / "run-list-yaml" / "config.yaml")),
        ([*probe, "--checkpoint", str(tmp_path / "run-bad-ckpt")], 1, str(tmp_path / "run-bad-ckpt" / "checkpoint.pt")),
        (["evaluate", "rankme", *none, "--cache", str(garbled_unit)], 1, str(garbled_unit / "units" / "u00000")),
        (["evaluate", "robustness", "--checkpoint", "none", "--data", data, "--severity", "x"], 2, "--severity"),
        (
            ["evaluate", "rankme", "--checkpoint", "none", "--cache", str(tmp_path / "nowhere")],
            1,
            "nowhere",
        ),
        (
            ["visualize", "--checkpoint", "none", "--cache", str(a_file), "--out", str(tmp_path)],
            1,
            "a-file",
        ),
        (["bench", "size", "--image-size", "foo"], 2, "foo"),
        (["bench", "loader", "--data", str(tmp_path / "nowhere"), "--teacher", teacher], 1, "nowhere"),
        ([*kitti, "--width", "64"], 2, "--width: apply to --format nuscenes only"),
        (["make-synthetic", "--out", str(tmp_path / "k"), "--format", "foo"], 2, "'foo'"),
        (["make-teacher", "--out", str(tmp_path / "t"), "--fit-on", data, "--image-size", "3x"],
         2, "--image-size"),  # fmt: skip
        # before: a traceback (NotADirectoryError) / "[Errno 17] File exists: '.../a-file'"
        (["make-synthetic", "--out", str(a_file / "k"), "--format", "semantickitti"], 1, f"{a_file} exists and is not a folder"),
        (["make-synthetic", "--out", str(a_file / "s")], 1, f"{a_file} exists and is not a folder"),
        (["make-teacher", "--out", str(tmp_path / "t"), "--family", "dinov4"], 2, "'dinov4' is not one of dinov2, dinov3"),
        (["make-teacher", "--out", str(tmp_path / "t"), "--family", "dinov3", "--fit-on", data], 2, "--fit-on fits a DINOv2"),
        (["make-teacher", "--out", str(tmp_path / "t"), "--family", "dinov3", "--size", "vits14"], 1, "unknown random dinov3 teacher size 'vits14'"),
        (["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b.pt")], 1, f"{tmp_path / 'nowhere' / 'config.yaml'}: not a training run folder"),
        (["export", "--checkpoint", str(tmp_path / "run-bad-ckpt"), "--out", str(tmp_path / "b.pt")], 1, str(tmp_path / "run-bad-ckpt" / "checkpoint.pt")),
        (["export", "--checkpoint", str(tmp_path / "run-bad-ckpt"), "--out", str(a_file)], 1, f"{a_file}: already exists"),
        (["export", "--checkpoint", str(tmp_path / "run-bad-ckpt"), "--out", str(a_file / "b.pt")], 1, f"{a_file} exists and is not a folder"),
        ([*probe, "--checkpoint", str(a_file)], 1, f"{a_file}: not an exported backbone"),
    ]  # fmt: skip
    runner = CliRunner()
    for args, code, words in cases:
        result = runner.invoke(app, args)
        said = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert isinstance(result.exception, SystemExit), (args, result.exception)
        assert result.exit_code == code, (args, said)
        assert words in said and "Traceback" not in said, (args, said)
        if "error: " in result.stderr:  # (check-data reports problems, one a line)
            error = result.stderr[result.stderr.index("error: ") :]  # the last thing said
            assert error.count("\n") == 1 and error.endswith("\n"), (args, error)
    assert not any((tmp_path / name).exists() for name in ("c", "t", "k", "r", "e"))
    # DISTILL_TRACEBACK=1: the same error line, after the traceback that led to it
    shown = runner.invoke(app, ["check-data", "--data", str(tmp_path / "nowhere")],
                          env={"DISTILL_TRACEBACK": "1"})  # fmt: skip
    assert shown.exit_code == 1 and "Traceback (most recent call last)" in shown.stderr
    assert shown.stderr.rstrip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("fmt", ["point-f16", "grid-i8"])
def test_gpu_extraction_points_at_grid_i8(fmt, synthetic_nuscenes, tiny_teacher, tmp_path) -> None:
    """On a GPU, point-f16 is bound by the cache's disk (docs/benchmarks.md §GPU): a point-f16
    extraction with --device cuda says grid-i8 ran faster; a grid-i8 one does not. (A cluster
    that is not there: the run stops after the note, on a machine with no GPU too.)"""
    out = subprocess.run(
        [sys.executable, "cli.py", "extract-teacher", "--data", str(synthetic_nuscenes.root),
         "--cache", str(tmp_path / "cache"), "--teacher", str(tiny_teacher),
         "--scheduler", "tcp://127.0.0.1:9", "--device", "cuda", "--target-format", fmt,
         "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"},
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "Timed out trying to connect to tcp://127.0.0.1:9" in out.stderr
    assert ("--target-format grid-i8 writes ~0.9 MB" in out.stderr) == (fmt == "point-f16")
