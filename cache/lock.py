"""One extraction run per cache: an O_EXCL lock file holding pid, host and start time.

Parallel Dask tasks of one run do not take the lock (they write disjoint units); the driver of
the run holds it for the whole run. A lock whose process is gone (same host, pid not alive or
reused by a younger process) is stale and taken over with a warning; a live one, or one held on
another host (whose processes we cannot see), is a clear error.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cache.schema import LOCK_FILE, CacheError


class LockHeldError(CacheError):
    """Another live process holds the lock."""


def _process_start_time(pid: int) -> float | None:
    """Start time (epoch seconds) of a local process, from /proc; None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime in clock ticks
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _is_stale(holder: dict) -> bool:
    """True when the holder ran on this host and its process is gone (or the pid was reused)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    started = _process_start_time(pid)
    # A process younger than the lock is not the one that wrote it: the pid was reused.
    return started is not None and started > float(holder.get("started", 0)) + 2.0


def _read_holder(path: Path) -> dict | None:
    """Lock file contents; None when it vanished; {} when unreadable (being written)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {started}"


def acquire_lock(directory: Path) -> dict:
    """Create ``directory/writer.lock`` exclusively and return what was written into it.

    Raises LockHeldError when a live process holds it; takes a stale one over with a warning.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    mine = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.time(),
        "id": uuid.uuid4().hex,
    }
    for _ in range(50):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if holder is None:
                continue  # released between our attempts: try again
            if not holder:
                time.sleep(0.05)  # being written right now
                holder = _read_holder(path)
                if holder is None:
                    continue
            if holder and not _is_stale(holder):
                raise LockHeldError(
                    f"cache {directory} is being written by another run ({_describe(holder)}); "
                    f"wait for it to finish. If that run is dead, delete {path}."
                ) from None
            # Stale: move it aside under a unique name, and make sure what we moved is the
            # stale lock we judged (not a fresh one another process created meanwhile).
            aside = path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            moved = _read_holder(aside)
            if holder and moved != holder:
                os.rename(aside, path)  # not the one we judged stale: put it back, re-check
                continue
            aside.unlink(missing_ok=True)
            warnings.warn(
                f"taking over the stale lock of cache {directory} "
                f"({_describe(holder) if holder else 'unreadable lock file'}: process is gone)",
                stacklevel=2,
            )
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(mine, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return mine
    raise LockHeldError(f"could not take the lock {path}: it keeps changing hands")


def release_lock(directory: Path, mine: dict) -> None:
    """Remove the lock file if it is still ours."""
    path = directory / LOCK_FILE
    if _read_holder(path) == mine:
        path.unlink(missing_ok=True)


@contextmanager
def cache_lock(directory: str | Path) -> Iterator[None]:
    """Hold ``directory/writer.lock`` for the duration of the block (one writing run per cache)."""
    directory = Path(directory)
    mine = acquire_lock(directory)
    try:
        yield
    finally:
        release_lock(directory, mine)
