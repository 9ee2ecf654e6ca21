"""One extraction run per cache: a lock file holding pid, host, boot and pid namespace, start time.

Parallel Dask tasks of one run do not take the lock (they write disjoint units); the driver of
the run holds it for the whole run. The file is written under a temporary name and hard-linked
into place, so it never exists empty or half-written (``os.link`` fails when the name exists, as
``O_EXCL`` does, also on NFS). A lock whose process is gone (same host, boot and pid namespace;
pid not alive, or now another process: its start ticks differ) or that was written before the
machine last booted is stale and taken over with a warning; a live one, or one whose process we
cannot see (another host, another container's pid namespace), is a clear error. An unreadable
lock file (damaged: this code never writes one) counts as held until it is
``UNREADABLE_STALE_S`` old.
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

UNREADABLE_STALE_S = 60.0
"""An unreadable lock file younger than this (by mtime) is taken as held."""


class LockHeldError(CacheError):
    """Another live process holds the lock."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """A local process's start, in clock ticks since boot (/proc/PID/stat field 22): with the
    pid, it names one process of one boot; None where unavailable."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _process_start_time(pid: int) -> float | None:
    """Start time (epoch seconds) of a local process, from /proc; None where unavailable."""
    ticks = _start_ticks(pid)
    try:
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return None if ticks is None else btime + ticks / os.sysconf("SC_CLK_TCK")


def _is_stale(holder: dict) -> bool:
    """True when the holder's process is provably gone: it ran on this host before the last
    boot, or in this boot and pid namespace and its pid is dead or now another process's. A
    lock of another pid namespace (a container sharing the host name) is never judged by its
    pid. Locks written by older code lack boot, namespace and start ticks: the host and the
    wall-clock start time decide then."""
    if holder.get("host") != socket.gethostname():
        return False
    if "boot_id" in holder and holder["boot_id"] != _boot_id():
        return True  # written before this machine last booted
    if "pid_ns" in holder and holder["pid_ns"] != _pid_namespace():
        return False  # another container's pids are not ours to test
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    if holder.get("start_ticks") is not None:  # exact, and immune to wall-clock steps
        ticks = _start_ticks(pid)
        return ticks is not None and ticks != holder["start_ticks"]
    started = _process_start_time(pid)
    # A process younger than the lock is not the one that wrote it: the pid was reused.
    return started is not None and started > float(holder.get("started", 0)) + 2.0


def _read_holder(path: Path) -> dict | None:
    """Lock file contents; None when it vanished; {} when unreadable (damaged)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {started}"


def _unreadable_age(path: Path) -> float | None:
    """Seconds since an unreadable lock file was last modified; None when it vanished."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _link_into_place(source: Path, path: Path) -> bool:
    """Hard-link ``source`` to ``path``; False when ``path`` exists (someone holds the lock)."""
    try:
        os.link(source, path)
    except FileExistsError:
        return False
    return True


def this_process() -> dict:
    """What a lock taken now by this process records: who holds it (pid, host, boot, pid
    namespace, start ticks), since when, and a unique id."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid_ns": _pid_namespace(),
        "start_ticks": _start_ticks(os.getpid()),
        "started": time.time(),
        "id": uuid.uuid4().hex,
    }


def acquire_lock(directory: Path) -> dict:
    """Create ``directory/writer.lock`` exclusively and return what was written into it.

    Raises LockHeldError when a live process holds it; takes a stale one over with a warning.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    mine = this_process()
    # The complete file under a name of our own, then linked into place: never seen empty.
    draft = path.with_name(f"{LOCK_FILE}.new-{mine['id']}")
    with open(draft, "w") as fh:
        json.dump(mine, fh)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        for _ in range(50):
            if _link_into_place(draft, path):
                return mine
            holder = _read_holder(path)
            if holder is None:
                continue  # released between our attempts: try again
            if not holder:
                age = _unreadable_age(path)
                if age is None:
                    continue
                if age < UNREADABLE_STALE_S:
                    raise LockHeldError(
                        f"cache {directory}: the lock file {path} is unreadable and "
                        f"{age:.0f} s old; if no run is writing this cache, delete it"
                    )
            elif not _is_stale(holder):
                raise LockHeldError(
                    f"cache {directory} is being written by another run ({_describe(holder)}); "
                    f"wait for it to finish. If that run is dead, delete {path}."
                )
            # Stale: move it aside under a unique name, and make sure what we moved is the
            # stale lock we judged (not a fresh one another process created meanwhile).
            aside = path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            moved = _read_holder(aside)
            if moved is None:
                continue
            if moved != holder:
                # Not the one we judged: put it back without replacing a newer one, re-check.
                _link_into_place(aside, path)
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            warnings.warn(
                f"taking over the stale lock of cache {directory} "
                f"({_describe(holder) if holder else 'unreadable lock file'}: process is gone)",
                stacklevel=2,
            )
        raise LockHeldError(f"could not take the lock {path}: it keeps changing hands")
    finally:
        draft.unlink(missing_ok=True)


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
