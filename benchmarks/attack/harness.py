"""What the attack's cases share: tiny configs, a folder per case, the finished runs they start from, and the
checks of a refusal (one line, exit code 2, no traceback, nothing written)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[2]
LRX = [sys.executable, "-m", "lrx"]

# tests/conftest.py's TINY_BASE: a tiny CNN on 16-pixel synthetic images, a few steps per epoch.
TINY_BASE = {
    "model": {"name": "tiny_cnn", "num_classes": 10},
    "data": {"name": "synthetic", "image_size": 16, "batch_size": 32, "test_batch_size": 128,
             "train_subset": 256, "test_subset": 128, "synthetic_size": 16},
    "train": {"epochs": 2, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0},
    "profile": {"input_size": [3, 16, 16], "batch": 4, "warmup": 1, "repeats": 5, "min_time_s": 0.0, "rounds": 1},
    "runtime": {"device": "cpu"},
}
CONFIGS = {
    "base.yaml": TINY_BASE,
    "t01.yaml": {"extends": "base.yaml", "no": 1, "group": 1, "remark": "original model"},
    "t02.yaml": {"extends": "base.yaml", "no": 2, "group": 2, "baseline": "t01",
                 "decompose": {"layers": [2, 3, 4], "scheme": "v1", "bases": [4, 4, 3]}},
    "t03.yaml": {"extends": "base.yaml", "no": 3, "group": 2, "baseline": "t01", "parent": "t02",
                 "finetune": [{"l2": 1.0, "epochs": 2}, {"ce": 1.0, "epochs": 2, "lr": 0.001}],
                 "profile": {"enabled": False}},
    "t04.yaml": {"extends": "base.yaml", "no": 4, "group": 3, "baseline": "t01",
                 "decompose": {"layers": [1, 2, 3, 4], "scheme": "v2", "bases": "auto",
                               "target": {"latency": 1.3}},
                 "profile": {"enabled": False}},
}
RUNS_OF_FIXTURE = ("t01", "t02", "t03")


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def env() -> dict:
    """lrx's environment in a case: one thread, and the machine's latency cache in the case's ``runs/`` (relative to
    the case's folder, where lrx runs), where the cache cases attack it and no case reads another's."""
    out = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), COLUMNS="200",
               LRX_CACHE_DIR="runs")
    out.pop("LRX_DATA", None)
    return out


class Workspace:
    """A case's folder: ``cfg/`` (the tiny configs) and ``runs/``; the fixture's finished runs on request."""

    def __init__(self, path: Path, fixture: Optional[Path]):
        if path.exists():
            shutil.rmtree(path)
        self.path, self.fixture = path, fixture
        self.cfg, self.runs = path / "cfg", path / "runs"
        for name, data in CONFIGS.items():
            write_yaml(self.cfg / name, data)

    def finished(self) -> None:
        """The fixture's finished runs t01, t02, t03 in ``runs/``."""
        assert self.fixture is not None, "a case that needs finished runs says needs_fixture"
        shutil.copytree(self.fixture / "runs", self.runs, symlinks=True)

    def config(self, name: str, data) -> Path:
        """Write ``cfg/<name>`` (YAML of ``data``, or ``data`` itself when it is text)."""
        path = self.cfg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, (str, bytes)):
            path.write_bytes(data.encode() if isinstance(data, str) else data)
        else:
            write_yaml(path, data)
        return path

    def lrx(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*LRX, *args], cwd=self.path, env=env(), capture_output=True, text=True,
                              timeout=timeout, errors="replace")

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([*LRX, *args], cwd=self.path, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)


def snapshot(folder: Path) -> dict:
    """relative path -> (kind, size, mtime) of everything under ``folder`` (symlinks not followed)."""
    out = {}
    if not folder.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            try:
                info = os.lstat(path)
            except OSError:
                continue
            kind = "dir" if os.path.isdir(path) and not os.path.islink(path) else "other"
            out[str(path.relative_to(folder))] = (kind, 0 if kind == "dir" else info.st_size,
                                                  0 if kind == "dir" else info.st_mtime_ns)
    return out


def diff(before: dict, after: dict) -> str | None:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = [f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
             for label, items in (("written", added), ("removed", removed), ("changed", changed)) if items]
    return "; ".join(parts) or None


def refusal_problem(result: subprocess.CompletedProcess, says: Sequence[str] = (), rc: int = 2) -> str | None:
    """Why ``result`` is not a refusal as promised: exit code ``rc``, one line ``lrx: error: ...`` naming
    each of ``says`` on stderr, no traceback."""
    err = result.stderr.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    if "Traceback" in result.stderr or "Traceback" in result.stdout:
        return f"traceback (rc {result.returncode}): {tail(result.stderr)}"
    if result.returncode != rc:
        return f"exit code {result.returncode}, expected {rc}; stderr: {tail(result.stderr)}"
    errors = [line for line in lines if line.startswith("lrx: error:")]
    if len(errors) != 1:
        return f"expected one 'lrx: error:' line, got {len(errors)}: {tail(result.stderr)}"
    missing = [word for word in says if word not in errors[0]]
    if missing:
        return f"the error line does not name {missing}: {errors[0][:300]}"
    return None


def tail(text: str, limit: int = 400) -> str:
    text = " | ".join(line for line in text.strip().splitlines()[-6:])
    return text[-limit:]


@dataclass
class Case:
    """One attack. ``args`` (after ``lrx``; ``{cfg}``, ``{runs}``, ``{ws}`` are filled in) is run in the case's
    folder after ``setup(ws)``; the result must be exit code ``rc``: with 2, a refusal naming each of ``says``
    that leaves ``unchanged`` (``"all"``: the case's folder, ``"runs"``: runs/, ``None``: not checked) as it
    was. ``check(ws, result)`` adds its own check (a problem or None). ``scenario(ws)`` replaces all of it for
    cases with several processes: it returns a problem or None and the commands it ran."""

    category: str
    name: str
    args: Sequence[str] = ()
    setup: Optional[Callable[[Workspace], None]] = None
    rc: Optional[int] = 2  # None: done (0) or refused (2), either
    says: Sequence[str] = ()
    unchanged: Optional[str] = "all"
    check: Optional[Callable[[Workspace, subprocess.CompletedProcess], Optional[str]]] = None
    scenario: Optional[Callable[[Workspace], tuple]] = None
    needs_fixture: bool = False
    timeout: float = 300


def fill(text: str, ws: Workspace) -> str:
    return text.replace("{cfg}", str(ws.cfg)).replace("{runs}", str(ws.runs)).replace("{ws}", str(ws.path))


def run_case(case: Case, ws: Workspace) -> tuple[str | None, str]:
    """(the problem or None, the command line that shows it)."""
    if case.needs_fixture:
        ws.finished()
    try:
        if case.setup is not None:
            case.setup(ws)
        if case.scenario is not None:
            problem, command = case.scenario(ws)
            return problem, command
        args = [fill(a, ws) for a in case.args]
        command = f"cd {ws.path} && lrx {' '.join(args)}"
        watched = {"all": ws.path, "runs": ws.runs}.get(case.unchanged or "")
        before = snapshot(watched) if watched is not None else None
        try:
            result = ws.lrx(*args, timeout=case.timeout)
        except subprocess.TimeoutExpired:
            return f"no answer within {case.timeout:.0f} s (hangs?)", command
        if case.rc is None and result.returncode == 0 and "Traceback" not in result.stderr:
            problem = None  # done, or (below) refused in one line: either is what the case allows
        elif case.rc in (2, None):
            problem = refusal_problem(result, [fill(s, ws) for s in case.says])
        elif result.returncode != case.rc or "Traceback" in result.stderr:
            problem = f"exit code {result.returncode}, expected {case.rc}; stderr: {tail(result.stderr)}"
        else:
            missing = [s for s in case.says if fill(s, ws) not in result.stderr + result.stdout]
            problem = f"output does not say {missing}: {tail(result.stderr + result.stdout)}" if missing else None
        if problem is None and before is not None:
            changed = diff(before, snapshot(watched))
            problem = f"left the folder changed ({changed})" if changed else None
        if problem is None and case.check is not None:
            problem = case.check(ws, result)
        return problem, command
    except Exception as err:  # the harness's own failure is a failed case, with its reason
        return f"harness: {type(err).__name__}: {err}", case.name


# ---------------------------------------------------------------- finished runs and what they hold


def build_fixture(folder: Path) -> Path:
    """Finished runs t01, t02, t03 (an uninterrupted run: the reference of the kill -9 cases)."""
    if (folder / "runs" / "t03" / "metrics.json").is_file():
        return folder
    ws = Workspace(folder, None)
    result = ws.lrx("run", "cfg/t03.yaml", "--runs-dir", "runs", "--quiet", timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"the fixture's runs failed: {tail(result.stderr)}")
    return folder


def metrics(runs: Path, name: str) -> dict:
    return json.loads((runs / name / "metrics.json").read_text())


def model_digest(path: Path) -> str:
    """A digest of the tensors of a model file (its state dict, key by key)."""
    import torch  # local: only the cases that compare models need it

    blob = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for key, value in sorted(blob["model"].items()):
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


FINAL = {"t01": "model.pt", "t02": "expanded.pt", "t03": "stage1.pt"}


def signature(runs: Path, names: Sequence[str] = RUNS_OF_FIXTURE) -> dict:
    """What must be equal between an interrupted-then-rerun run and an uninterrupted one: status, acc@1 and
    the final model's tensors of each run."""
    out = {}
    for name in names:
        try:
            m = metrics(runs, name)
            out[name] = (m.get("status"), m.get("acc1"), model_digest(runs / name / FINAL[name]))
        except Exception as err:
            out[name] = f"unreadable: {type(err).__name__}: {err}"
    return out


def same_as_fixture(ws: Workspace, names: Sequence[str] = RUNS_OF_FIXTURE) -> str | None:
    want, got = signature(ws.fixture / "runs", names), signature(ws.runs, names)
    bad = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    return f"differs from an uninterrupted run: {bad}" if bad else None


def temp_files(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*.tmp")] if folder.exists() else []


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False
