"""Signals during runs and exports, and several processes on one runs folder. After any of them, rerunning the
same command must give what an uninterrupted run gives (the fixture's runs t01, t02, t03)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

from harness import (Case, Workspace, kill_group, refusal_problem, same_as_fixture, tail, temp_files,
                     wait_for)

RUN03 = ("run", "cfg/t03.yaml", "--runs-dir", "runs", "--quiet")


def rerun_equals(ws: Workspace, what: str) -> str | None:
    """Run t03 again: it must finish (exit 0), equal the uninterrupted run and leave no temporary file."""
    again = ws.lrx(*RUN03, timeout=900)
    if again.returncode != 0:
        return f"{what}; the rerun failed (exit {again.returncode}): {tail(again.stderr)}"
    problem = same_as_fixture(ws)
    if problem:
        return f"{what}; the rerun {problem}"
    left = [p for p in temp_files(ws.runs) if "/" in p]  # in a run folder: its lock removes them
    return f"{what}; the rerun left temporary files {left}" if left else None


def status(ws: Workspace, name: str) -> str | None:
    try:
        return json.loads((ws.runs / name / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def kill9(delay: float) -> Case:
    def scenario(ws: Workspace):
        proc = ws.popen(*RUN03)
        time.sleep(delay)
        alive = proc.poll() is None
        kill_group(proc)
        proc.wait()
        what = f"killed -9 after {delay} s" if alive else f"finished before {delay} s (nothing killed)"
        return rerun_equals(ws, what), f"cd {ws.path} && lrx {' '.join(RUN03)} & sleep {delay}; kill -9; rerun"
    return Case("signals", f"kill9-run-at-{delay}s", scenario=scenario, needs_fixture=False)


def kill9_redo(delay: float) -> Case:
    """kill -9 during `lrx run --force` of a finished run, then the same command without --force."""
    forced = (*RUN03, "--force")

    def scenario(ws: Workspace):
        proc = ws.popen(*forced)
        time.sleep(delay)
        alive = proc.poll() is None
        kill_group(proc)
        proc.wait()
        what = f"--force killed -9 after {delay} s" if alive else f"--force finished before {delay} s"
        return rerun_equals(ws, what), f"cd {ws.path} && lrx {' '.join(forced)} & sleep {delay}; kill -9; rerun"
    return Case("signals", f"kill9-force-redo-at-{delay}s", scenario=scenario, needs_fixture=True)


def terminate(sig: int, delay: float) -> Case:
    name = signal.Signals(sig).name

    def scenario(ws: Workspace):
        proc = ws.popen(*RUN03)
        time.sleep(delay)
        if proc.poll() is not None:
            return f"the run ended before the {name} (exit {proc.returncode})", "lrx run"
        os.kill(proc.pid, sig)  # the main process only, as `timeout` and schedulers do
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0 and "Traceback" not in err:  # the signal came as the run ended: it must be whole
            return same_as_fixture(ws), f"cd {ws.path} && lrx {' '.join(RUN03)} & kill -{name} (as it ended)"
        if proc.returncode != 130 or "Traceback" in err:
            return f"{name}: exit {proc.returncode}, expected 130: {tail(err)}", "lrx run"
        running = [n for n in ("t01", "t02", "t03") if status(ws, n) not in (None, "done", "interrupted")]
        if running:
            return f"{name}: runs {running} not marked interrupted", "lrx run"
        return rerun_equals(ws, f"{name} after {delay} s"), f"cd {ws.path} && lrx {' '.join(RUN03)} & kill -{name}"
    return Case("signals", f"{name.lower()}-run-at-{delay}s", scenario=scenario)


def export_signal(sig: int, delay: float, fmt: str = "onnx") -> Case:
    name = signal.Signals(sig).name
    args = ("export", "runs/t03", "--format", fmt, "-o", "out.bin")

    def scenario(ws: Workspace):
        out = ws.path / "out.bin"
        out.write_bytes(b"previous")
        proc = ws.popen(*args)
        time.sleep(delay)
        alive = proc.poll() is None
        if sig == signal.SIGKILL:
            kill_group(proc)
        else:
            os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
        command = f"cd {ws.path} && lrx {' '.join(args)} & sleep {delay}; kill -{name}"
        data = out.read_bytes()
        if data != b"previous" and len(data) < 1000:
            return f"the output is torn ({len(data)} bytes)", command
        if alive and sig != signal.SIGKILL:
            if proc.returncode == 0 and "Traceback" not in err:  # the signal came as the export ended: it is whole
                if data == b"previous":
                    return "exit 0 but the previous file is still there", command
                if temp_files(ws.path):
                    return f"temporary files left: {temp_files(ws.path)}", command
                return None, command
            if proc.returncode != 130 or "Traceback" in err:
                return f"exit {proc.returncode}, expected 130: {tail(err)}", command
            if data != b"previous":
                return "an interrupted export replaced the previous file", command
            if temp_files(ws.path):
                return f"temporary files left: {temp_files(ws.path)}", command
        return None, command
    return Case("signals", f"export-{fmt}-{name.lower()}-at-{delay}s", scenario=scenario, needs_fixture=True)


def concurrent_same(config: str, names) -> Case:
    args = ("run", f"cfg/{config}.yaml", "--runs-dir", "runs", "--quiet")

    def scenario(ws: Workspace):
        first = ws.popen(*args)
        time.sleep(0.3)
        second = ws.popen(*args)
        results = [(p, *p.communicate(timeout=900)) for p in (first, second)]
        command = f"cd {ws.path} && lrx {' '.join(args)} & lrx {' '.join(args)}"
        codes = [p.returncode for p, _, _ in results]
        for proc, _, err in results:
            if proc.returncode not in (0, 2) or "Traceback" in err:
                return f"exit {proc.returncode}: {tail(err)}", command
            if proc.returncode == 2 and "in use" not in err:
                return f"refused without naming the run in use: {tail(err)}", command
        if 0 not in codes:
            again = ws.lrx(*args, timeout=900)
            if again.returncode != 0:
                return f"both refused (exits {codes}) and a rerun failed: {tail(again.stderr)}", command
        return same_as_fixture(ws, names), command
    return Case("concurrency", f"two-runs-of-{config}", scenario=scenario)


def wait_running(ws: Workspace, name: str, timeout: float = 120) -> bool:
    return wait_for(lambda: status(ws, name) == "running", timeout)


def parent_forced_while_child_runs(ws: Workspace):
    shutil.rmtree(ws.runs / "t03")
    child = ws.popen(*RUN03)
    command = f"cd {ws.path} && lrx {' '.join(RUN03)} & lrx run cfg/t02.yaml --force"
    if not wait_running(ws, "t03"):
        child.kill()
        return "the child run never started", command
    parent = ws.lrx("run", "cfg/t02.yaml", "--runs-dir", "runs", "--force", "--quiet", timeout=900)
    _, err = child.communicate(timeout=900)
    if parent.returncode not in (0, 2) or "Traceback" in parent.stderr:
        return f"the parent's --force: exit {parent.returncode}: {tail(parent.stderr)}", command
    if child.returncode not in (0, 2) or "Traceback" in err:
        return f"the child: exit {child.returncode}: {tail(err)}", command
    if child.returncode == 2 and "t02" not in err:
        return f"the child stopped without naming its parent t02: {tail(err)}", command
    return rerun_equals(ws, f"parent exit {parent.returncode}, child exit {child.returncode}"), command


def child_started_during_parent_force(ws: Workspace):
    parent = ws.popen("run", "cfg/t02.yaml", "--runs-dir", "runs", "--force", "--quiet")
    command = f"cd {ws.path} && lrx run cfg/t02.yaml --force & lrx run cfg/t03.yaml --force"
    time.sleep(1.0)
    child = ws.lrx("run", "cfg/t03.yaml", "--runs-dir", "runs", "--force", "--quiet", timeout=900)
    _, err = parent.communicate(timeout=900)
    for label, code, text in (("parent", parent.returncode, err), ("child", child.returncode, child.stderr)):
        if code not in (0, 2) or "Traceback" in text:
            return f"the {label}: exit {code}: {tail(text)}", command
    return rerun_equals(ws, f"parent exit {parent.returncode}, child exit {child.returncode}"), command


def clean_while_running(ws: Workspace):
    shutil.rmtree(ws.runs / "t03")
    child = ws.popen(*RUN03)
    command = f"cd {ws.path} && lrx {' '.join(RUN03)} & lrx clean runs --keep-final; lrx table runs"
    if not wait_running(ws, "t03"):
        child.kill()
        return "the run never started", command
    cleaned = ws.lrx("clean", "runs", "--keep-final")
    table = ws.lrx("table", "runs")
    _, err = child.communicate(timeout=900)
    for label, result in (("clean", cleaned), ("table", table)):
        if result.returncode != 0 or "Traceback" in result.stderr:
            return f"{label}: exit {result.returncode}: {tail(result.stderr)}", command
    if child.returncode != 0:
        return f"the run failed under lrx clean: exit {child.returncode}: {tail(err)}", command
    return rerun_equals(ws, "clean during the run"), command


def export_during_force(ws: Workspace):
    redo = ws.popen("run", "cfg/t03.yaml", "--runs-dir", "runs", "--force", "--quiet")
    command = f"cd {ws.path} && lrx run cfg/t03.yaml --force & lrx export runs/t03 ... (repeated)"
    problems = []
    while redo.poll() is None:
        result = ws.lrx("export", "runs/t03", "--format", "state-dict", "-o", "out.pt", "--no-check")
        if result.returncode not in (0, 2) or "Traceback" in result.stderr:
            problems.append(f"export exit {result.returncode}: {tail(result.stderr)}")
            break
        if result.returncode == 2 and refusal_problem(result):
            problems.append(refusal_problem(result))
            break
    _, err = redo.communicate(timeout=900)
    if redo.returncode != 0:
        problems.append(f"the redo failed: {tail(err)}")
    return (problems[0] if problems else same_as_fixture(ws)), command


def cases() -> list[Case]:
    out = [kill9(d) for d in (0.8, 1.5, 2.5, 3.5, 5.0, 7.0, 9.5, 13.0)]
    out += [kill9_redo(d) for d in (1.0, 2.5, 4.0)]
    out += [terminate(signal.SIGTERM, 1.5), terminate(signal.SIGINT, 3.0), terminate(signal.SIGTERM, 4.5)]
    out += [export_signal(signal.SIGKILL, 4.0), export_signal(signal.SIGTERM, 4.0),
            export_signal(signal.SIGKILL, 3.0, "pt2"), export_signal(signal.SIGTERM, 3.0, "torchscript")]
    out += [concurrent_same("t01", ["t01"]), concurrent_same("t03", ["t01", "t02", "t03"]),
            Case("concurrency", "parent-force-while-child-runs", scenario=parent_forced_while_child_runs,
                 needs_fixture=True),
            Case("concurrency", "child-force-while-parent-force", scenario=child_started_during_parent_force,
                 needs_fixture=True),
            Case("concurrency", "clean-and-table-while-running", scenario=clean_while_running, needs_fixture=True),
            Case("concurrency", "export-while-redone", scenario=export_during_force, needs_fixture=True)]
    return out
