"""How busy the machine was while lrx timed something: other processes' share of the CPUs, the hypervisor's
steal time, and the load average, read from Linux's /proc (elsewhere only the load average, or nothing).

A time taken while other processes used the cores is not the model's time: on a 2-core machine a test suite
running beside a profile put figures 2-4x off. :class:`MachineWatch` records the readings around a timing
so that metrics.json keeps them and the profile is flagged ``busy`` when they say the cores were shared::

    with MachineWatch() as watch:
        ...  # the timing
    watch.record   # {"busy": bool, "reasons": [...], "other_share", "steal_share", "load_1m", "cpus"}
"""
from __future__ import annotations

import os
import platform
import resource
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["cpu_name", "device_name", "CpuTimes", "read_cpu_times", "read_load", "own_cpu_seconds", "MachineWatch", "OTHER_SHARE_LIMIT",
           "STEAL_SHARE_LIMIT", "LOAD_PER_CPU_LIMIT"]

# A timing is flagged busy when, while it ran, other processes used more than this share of all the CPUs ...
OTHER_SHARE_LIMIT = 0.25
# ... or the hypervisor took more than this share of them (steal time) ...
STEAL_SHARE_LIMIT = 0.05
# ... or the 1-minute load average, less this process's own threads, exceeded this many runnable tasks per CPU.
LOAD_PER_CPU_LIMIT = 0.75


@dataclass(frozen=True)
class CpuTimes:
    """Seconds the CPUs spent since boot, summed over all CPUs (/proc/stat's first line)."""

    total: float
    idle: float  # idle and waiting for I/O
    steal: float


def read_cpu_times(path: str = "/proc/stat") -> CpuTimes | None:
    """The CPUs' time since boot; None where /proc/stat cannot be read (not Linux)."""
    try:
        with open(path, encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]] + [0] * 8
    hertz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return CpuTimes(total / hertz, (idle + iowait) / hertz, steal / hertz)


def read_load() -> float | None:
    """The 1-minute load average, None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def own_cpu_seconds() -> float:
    """CPU seconds used by this process (all its threads) and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class MachineWatch:
    """Readings of the machine's load around a block of timing; ``record`` after the block.

    The readers are arguments so that tests can inject readings: ``cpu_times()`` -> :class:`CpuTimes` or
    None, ``load()`` -> float or None, ``own()`` -> this process's CPU seconds, ``cpus`` the CPU count,
    ``threads`` how many runnable threads this process itself keeps (its own share of the load average).
    """

    def __init__(self, cpu_times: Callable[[], CpuTimes | None] = read_cpu_times,
                 load: Callable[[], float | None] = read_load, own: Callable[[], float] = own_cpu_seconds,
                 cpus: int | None = None, threads: int = 1):
        self._cpu_times, self._load, self._own = cpu_times, load, own
        self.cpus = cpus or os.cpu_count() or 1
        self.threads = threads
        self.record: dict | None = None

    def __enter__(self) -> "MachineWatch":
        self._start = (self._cpu_times(), self._own())
        return self

    def __exit__(self, *exc) -> None:
        (before, own_before), after, own_after = self._start, self._cpu_times(), self._own()
        load = self._load()
        other = steal = None
        if before is not None and after is not None and after.total > before.total:
            total = after.total - before.total
            busy = total - (after.idle - before.idle) - (after.steal - before.steal)
            other = max(0.0, busy - (own_after - own_before)) / total
            steal = (after.steal - before.steal) / total
        reasons = []
        if other is not None and other > OTHER_SHARE_LIMIT:
            reasons.append(f"other processes used {other:.0%} of the {self.cpus} CPUs")
        if steal is not None and steal > STEAL_SHARE_LIMIT:
            reasons.append(f"the hypervisor stole {steal:.0%} of the CPU time")
        if load is not None and (load - self.threads) / self.cpus > LOAD_PER_CPU_LIMIT:
            reasons.append(f"load average {load:.2f} on {self.cpus} CPUs")
        self.record = {"busy": bool(reasons), "reasons": reasons, "other_share": other, "steal_share": steal,
                       "load_1m": load, "cpus": self.cpus}


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else the platform's machine type."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device, threads: int | None = None) -> str:
    """What a time was taken on, as a table names it: a GPU's name, or the CPU's with its CPU count and the
    threads used (``"AMD EPYC, 2 CPUs, 2 threads"``). ``device``: a ``torch.device`` or its string."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        return torch.cuda.get_device_name(device)
    used = f", {threads} threads" if threads is not None else ""
    return f"{cpu_name()}, {os.cpu_count()} CPUs{used}"
