"""cache/lock.py: the writer lock is never seen half-written, and is taken over only when its
process is provably gone. (Exclusion between live runs: tests/test_cache.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache import LockHeldError, cache_lock
from cache.lock import UNREADABLE_STALE_S, _boot_id, _pid_namespace, _start_ticks, this_process
from cache.schema import LOCK_FILE


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_an_unreadable_lock_is_held_until_it_is_old(tmp_path: Path) -> None:
    """A lock file whose JSON is not (yet) readable, e.g. an older writer's or a slow NFS
    client's, is a held lock, not a stale one, until UNREADABLE_STALE_S have passed."""
    path = tmp_path / LOCK_FILE
    path.write_text("")
    with pytest.raises(LockHeldError, match="unreadable"):
        with cache_lock(tmp_path):
            pass
    assert path.read_text() == ""  # left as it was
    old = time.time() - UNREADABLE_STALE_S - 5
    os.utime(path, (old, old))
    with pytest.warns(UserWarning, match="unreadable lock file"), cache_lock(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no drafts or set-aside files


def test_a_lock_of_another_pid_namespace_is_never_stale(tmp_path: Path) -> None:
    """Same host name, another container (pid namespace): its pid means nothing here."""
    holder = {
        "pid": _dead_pid(),
        "host": socket.gethostname(),
        "pid_ns": "pid:[1]",
        "started": time.time() - 60,
        "id": "other",
    }
    assert _pid_namespace() not in (None, "pid:[1]")
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
    with pytest.raises(LockHeldError, match=f"pid {holder['pid']}"):
        with cache_lock(tmp_path):
            pass
    holder["pid_ns"] = _pid_namespace()  # ours, and the process is gone: stale
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
    with pytest.warns(UserWarning, match="stale lock"), cache_lock(tmp_path):
        pass


def test_the_lock_file_appears_complete(tmp_path: Path) -> None:
    """Whoever sees writer.lock can read the whole holder record: a reader polling the name
    while 20 processes take and release the lock never reads an empty or partial file."""
    code = (
        "import sys; from cache import cache_lock, LockHeldError\n"
        "for _ in range(20):\n"
        f"    try:\n        with cache_lock({str(tmp_path)!r}): pass\n"
        "    except LockHeldError: pass\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
        for _ in range(4)
    ]
    seen = bad = 0
    path = tmp_path / LOCK_FILE
    while any(p.poll() is None for p in procs):
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        seen += 1
        try:
            assert {"pid", "host", "id"} <= json.loads(text).keys()
        except (ValueError, AssertionError):
            bad += 1
    assert all(p.wait() == 0 for p in procs)
    assert seen > 0 and bad == 0
    assert not any(tmp_path.iterdir())


def test_a_lock_from_before_the_last_boot_or_of_a_reused_pid_is_stale(tmp_path: Path) -> None:
    """Judged by boot id and the process's start ticks, not the wall clock (which may step)."""
    assert _boot_id() is not None and _start_ticks(os.getpid()) is not None
    # a wall clock an hour off changes nothing
    mine = {**this_process(), "started": time.time() + 3600, "id": "live"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(mine))
    with pytest.raises(LockHeldError, match=f"pid {os.getpid()}"):
        with cache_lock(tmp_path):
            pass
    for change in ({"start_ticks": mine["start_ticks"] - 1}, {"boot_id": "an-earlier-boot"}):
        (tmp_path / LOCK_FILE).write_text(json.dumps({**mine, **change}))
        with pytest.warns(UserWarning, match="stale lock"), cache_lock(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["id"] != "live"
