"""What the machine did while a benchmark ran: busy CPU cores, cores waiting on I/O, the disks'
write rate and busy share, the GPU's utilisation. These say which resource bounds a run (the
CPU, the disk or the GPU) where a ratio alone cannot (issue 9: extraction on a GPU node).

    with LoadSampler() as load:
        summary = extract_teacher(...)
    rows = load.rows(*summary.compute_window)  # averages over [t0, t1] (Unix times)

System-wide counters (psutil), sampled every ``interval`` seconds in a thread; a window is the
difference of the samples nearest its ends. Disks: the whole block devices (partitions, loop
and RAM devices left out), so a cache on tmpfs or on a network file system writes "0 MB/s".
GPU: ``nvidia-smi``'s utilisation (the share of time a kernel ran, per its own sampling
period), when the command exists; otherwise no GPU row.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

Row = tuple[str, float, str]


@dataclass(frozen=True)
class Counters:
    """Cumulative system counters at one moment (``t``: time.time())."""

    t: float
    cpu_busy_s: float  # CPU-seconds not idle and not waiting on I/O, all cores together
    cpu_iowait_s: float  # CPU-seconds idle with I/O outstanding
    disk_write_bytes: int  # whole disks
    disk_busy_ms: int  # whole disks, summed: a disk busy all the time adds 1000 ms per s


def read_counters() -> Counters:
    cpu = psutil.cpu_times()
    # user includes guest time on Linux; steal (the hypervisor's) is not ours
    busy = (
        cpu.user + cpu.nice + cpu.system + getattr(cpu, "irq", 0.0) + getattr(cpu, "softirq", 0.0)
    )
    whole = [d for name, d in _disks().items() if _whole_disk(name)]
    return Counters(
        t=time.time(),
        cpu_busy_s=busy,
        cpu_iowait_s=getattr(cpu, "iowait", 0.0),
        disk_write_bytes=sum(d.write_bytes for d in whole),
        disk_busy_ms=sum(getattr(d, "busy_time", 0) for d in whole),
    )


def _disks() -> dict:
    """psutil's per-disk counters; {} where there are none or they cannot be read (some
    containers): a benchmark never fails for want of them."""
    try:
        return psutil.disk_io_counters(perdisk=True) or {}
    except (OSError, RuntimeError):
        return {}


def _whole_disk(name: str) -> bool:
    """A whole block device (vda, nvme0n1, sda), not a partition, loop, RAM or device-mapper
    device (whose writes a whole disk counts again)."""
    if re.match(r"(loop|ram|zram|dm-|md|sr)", name):
        return False
    sys_block = Path("/sys/block")
    return (sys_block / name).exists() if sys_block.exists() else True


def window_rows(a: Counters, b: Counters, disks: int) -> list[Row]:
    """Averages over the time between two counter readings ``a`` and ``b`` (b later)."""
    dt = max(b.t - a.t, 1e-9)
    return [
        ("busy CPU cores (user + system)", (b.cpu_busy_s - a.cpu_busy_s) / dt, "cores"),
        ("cores idle waiting on I/O", (b.cpu_iowait_s - a.cpu_iowait_s) / dt, "cores"),
        ("disk writes (whole disks)", (b.disk_write_bytes - a.disk_write_bytes) / dt / 1e6, "MB/s"),
        (
            "disk busy (mean over whole disks)",
            (b.disk_busy_ms - a.disk_busy_ms) / 1e3 / dt / max(disks, 1),
            "fraction",
        ),
    ]


class LoadSampler:
    """Samples `read_counters` (and nvidia-smi's GPU utilisation) in the background."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[Counters] = []
        self.gpu: list[tuple[float, float]] = []  # (time.time(), utilisation %)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._smi: subprocess.Popen | None = None
        self.disks = sum(_whole_disk(n) for n in _disks())

    def __enter__(self) -> LoadSampler:
        self.samples.append(read_counters())
        self._threads.append(threading.Thread(target=self._sample, daemon=True))
        smi = shutil.which("nvidia-smi")
        if smi:
            ms = max(100, int(self.interval * 1000))
            try:
                self._smi = subprocess.Popen(
                    [
                        smi,
                        "--query-gpu=utilization.gpu",
                        "--format=csv,noheader,nounits",
                        f"--loop-ms={ms}",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            except OSError:
                self._smi = None  # no GPU row
            else:
                self._threads.append(threading.Thread(target=self._read_gpu, daemon=True))
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
        self.samples.append(read_counters())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(read_counters())

    def _read_gpu(self) -> None:
        assert self._smi is not None and self._smi.stdout is not None
        for line in self._smi.stdout:
            try:  # one line per GPU and sample; the first GPU's (CUDA_VISIBLE_DEVICES aside)
                self.gpu.append((time.time(), float(line.split(",")[0])))
            except ValueError:
                continue

    def _bracket(self, t0: float, t1: float) -> tuple[Counters, Counters] | None:
        """The last sample at or before ``t0`` and the first at or after ``t1`` (the window
        grows by up to one interval at each end); None when they do not span time."""
        a = max((s for s in self.samples if s.t <= t0), key=lambda s: s.t, default=self.samples[0])
        b = min((s for s in self.samples if s.t >= t1), key=lambda s: s.t, default=self.samples[-1])
        return (a, b) if b.t > a.t else None

    def busy_cores(self, t0: float, t1: float) -> float:
        """Mean busy CPU cores over [t0, t1] (time.time()); 0 without samples spanning it."""
        ab = self._bracket(t0, t1)
        return (ab[1].cpu_busy_s - ab[0].cpu_busy_s) / (ab[1].t - ab[0].t) if ab else 0.0

    def rows(self, t0: float, t1: float) -> list[Row]:
        """Averages over [t0, t1] (time.time()), from the samples bracketing it."""
        ab = self._bracket(t0, t1)
        if ab is None:
            return []
        rows = window_rows(*ab, self.disks)
        rows.insert(0, ("logical CPU cores of the machine", float(os.cpu_count() or 0), "cores"))
        gpu = [u for t, u in self.gpu if t0 <= t <= t1]
        if gpu:
            rows.append(("GPU utilisation (nvidia-smi, mean)", sum(gpu) / len(gpu), "%"))
        return rows
