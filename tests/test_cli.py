"""The command line: every command is listed with one line of help, and --help imports nothing
heavy (how long it takes is a benchmark's business, not a test's)."""

import subprocess
import sys
from pathlib import Path

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
    tmp_path: Path, synthetic_nuscenes, tiny_teacher: Path
) -> None:
    """Each command given a bad path or value prints one `error:` line (or typer's usage error)
    and exits 1 (2 for usage), without a traceback, and writes nothing."""
    from typer.testing import CliRunner

    from cli import app

    data, teacher = str(synthetic_nuscenes.root), str(tiny_teacher)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    full = tmp_path / "full"
    (full / "something").mkdir(parents=True)
    kitti = ["make-synthetic", "--out", str(tmp_path / "k"), "--format", "semantickitti"]
    extract = ["extract-teacher", "--data", data, "--teacher", teacher, "--image-size", "28x28"]
    cases = [
        (["make-teacher", "--out", str(full)], 1, "not empty"),
        (["make-teacher", "--out", str(tmp_path / "t"), "--size", "huge"], 1, "huge"),
        (["make-teacher", "--out", str(a_file)], 1, str(a_file)),
        ([*extract, "--cache", str(a_file)], 1, str(a_file)),
        ([*extract, "--cache", "s3://bucket/c"], 2, "URLs are not supported"),
        ([*extract, "--cache", str(tmp_path / "c"), "--split", "mini_val"], 1, "mini_val"),
        (["check-data", "--data", str(tmp_path / "nowhere")], 1, "no such folder"),
        (["check-data", "--data", data, "--split", "mini_val"], 1, "mini_val"),
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
        ([*kitti, "--width", "64"], 2, "--width apply to --format nuscenes only"),
    ]
    runner = CliRunner()
    for args, code, words in cases:
        result = runner.invoke(app, args)
        said = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert isinstance(result.exception, SystemExit), (args, result.exception)
        assert result.exit_code == code, (args, said)
        assert words in said and "Traceback" not in said, (args, said)
    assert not any((tmp_path / name).exists() for name in ("c", "t", "k"))
