"""The command line: every command is listed with one line of help, and --help is fast."""

import subprocess
import sys
import time
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
    start = time.perf_counter()
    out = run_cli("--help")
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name in EXPECTED:
        rows = [
            line for line in lines if line.strip().startswith(name + " ") or f"│ {name} " in line
        ]
        assert rows, f"{name} missing from --help:\n{out.stdout}"
        assert len(rows[0].split(name, 1)[1].strip(" │")) > 10, f"{name} has no help line"
    # Lazy imports: listing commands must not import torch/transformers/MinkowskiEngine.
    assert elapsed < 10, f"--help took {elapsed:.1f} s"


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys, runpy; sys.argv=['cli.py','--help']\n"
        "try:\n    runpy.run_path('cli.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'MinkowskiEngine', 'zarr') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
