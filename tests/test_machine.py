"""How busy the machine was during a timing: readings injected, the busy flag, and where it is reported."""
from __future__ import annotations

import itertools

import pytest

from lrx.measure.machine import CpuTimes, MachineWatch, read_cpu_times
from lrx.output.profiles import busy_warning


def watch_with(before: CpuTimes, after: CpuTimes, own: tuple[float, float], load: float, cpus: int = 2, threads: int = 2):
    times, owns = iter([before, after]), iter(own)
    return MachineWatch(cpu_times=lambda: next(times), load=lambda: load, own=lambda: next(owns), cpus=cpus,
                        threads=threads)


def test_a_quiet_machine_is_not_busy():
    # 10 s of 2 CPUs: this process used 9.5 s, the rest idle; load = our own 2 threads
    with watch_with(CpuTimes(100, 50, 0), CpuTimes(120, 60.4, 0), (1.0, 10.5), load=2.0) as watch:
        pass
    record = watch.record
    assert not record["busy"] and record["reasons"] == [], record
    assert record["other_share"] == pytest.approx(0.1 / 20, abs=1e-9), "busy time not ours, over all CPU time"


def test_other_processes_on_the_cores_make_it_busy():
    # 10 s of 2 CPUs: all busy, this process 10 s of it, another process the other 10 s
    with watch_with(CpuTimes(100, 50, 0), CpuTimes(120, 50, 0), (0.0, 10.0), load=4.0) as watch:
        pass
    record = watch.record
    assert record["busy"] and record["other_share"] == pytest.approx(0.5), record
    assert any("other processes used 50%" in r for r in record["reasons"]), record["reasons"]
    assert any("load average 4.00" in r for r in record["reasons"]), "load beyond our own threads is a reason too"


def test_steal_time_makes_it_busy():
    with watch_with(CpuTimes(100, 50, 0), CpuTimes(120, 60, 2.0), (0.0, 8.0), load=1.0) as watch:
        pass
    assert watch.record["busy"] and watch.record["steal_share"] == pytest.approx(0.1), watch.record
    assert any("stole 10%" in r for r in watch.record["reasons"]), watch.record["reasons"]


def test_without_proc_stat_only_the_load_average_counts():
    with watch_with(None, None, (0.0, 1.0), load=0.5) as watch:
        pass
    assert watch.record["other_share"] is None and not watch.record["busy"], watch.record


def test_proc_stat_is_read_on_linux(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 50 0 0 10 0 0\ncpu0 1 2 3\n")
    times = read_cpu_times(str(stat))
    hz = __import__("os").sysconf("SC_CLK_TCK")
    assert times == CpuTimes(1010 / hz, 850 / hz, 10 / hz), times
    assert read_cpu_times(str(tmp_path / "missing")) is None


def test_a_busy_profile_is_flagged_in_what_lrx_profile_prints():
    busy = {"latency": {"machine": {"busy": True, "reasons": ["other processes used 50% of the 2 CPUs"]}}}
    assert "busy machine (other processes used 50% of the 2 CPUs)" in busy_warning(busy)
    assert busy_warning({"latency": {"machine": {"busy": False, "reasons": []}}}) is None
    assert busy_warning({"latency": None}) is None, "a run without a profile has nothing to flag"
