"""Output folders of the data-side commands (make-synthetic, make-teacher)."""

from __future__ import annotations

from pathlib import Path


def check_parents(out: str | Path) -> None:
    """NotADirectoryError naming the file in the way when a parent of ``out`` exists and is not
    a folder (a regular file, a broken symlink), before any work: creating ``out`` would fail
    only then, with mkdir's "File exists" / "Not a directory" about the parent."""
    out = Path(out)
    for parent in out.absolute().parents:  # nearest first
        if parent.is_dir():
            return
        if parent.exists() or parent.is_symlink():
            raise NotADirectoryError(f"{out}: {parent} exists and is not a folder")
