"""Failure behaviour: kill -9 at any moment, a full disk, foreign checkpoints. Nothing lost, nothing mixed."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lrx.base.files import is_temp_file
from lrx.cli import app
from conftest import TINY_BASE, write_yaml

runner = CliRunner()
COMPARED = ("acc1", "acc1_before", "l2_before", "l2_after", "macs", "params")


def make_configs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 3}}
    write_yaml(folder / "base.yaml", base)
    write_yaml(folder / "t01.yaml", {"extends": "base.yaml", "no": 1, "profile": {"enabled": False}})
    write_yaml(folder / "t02.yaml", {"extends": "base.yaml", "no": 2, "baseline": "t01",
                                     "decompose": {"layers": [2, 3, 4], "scheme": "v2", "bases": [6, 8, 8]},
                                     "finetune": [{"l2": 1.0, "epochs": 2}, {"ce": 1.0, "epochs": 2}]})
    return folder


def final_metrics(runs: Path) -> dict:
    return {name: {k: json.loads((runs / name / "metrics.json").read_text()).get(k) for k in COMPARED}
            for name in ("t01", "t02")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    configs = make_configs(root / "configs")
    lrx_run(configs / "t02.yaml", root / "runs")
    return configs, final_metrics(root / "runs")


# Subprocesses with one thread each, so every run does its float sums in the same order.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def lrx_run(config: Path, runs: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "lrx.cli", "run", str(config), "--runs-dir", str(runs), "--quiet"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def run_and_kill(config: Path, runs: Path, marker: str, timeout: float = 120) -> bool:
    """Start `lrx run` in a subprocess and SIGKILL it once its log shows ``marker``. True if it was killed."""
    proc = subprocess.Popen([sys.executable, "-m", "lrx.cli", "run", str(config), "--runs-dir", str(runs), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            logs = [p.read_text(errors="replace") for p in runs.glob("*/log.txt")]
            if any(marker in text for text in logs):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return False


@pytest.mark.parametrize("marker", ["epoch 2/3", "stage decompose ...", "epoch 1/2:", "stage profile ..."])
def test_sigkill_then_rerun_equals_uninterrupted(reference, tmp_path, marker):
    configs, expected = reference
    runs = tmp_path / "runs"
    killed = run_and_kill(configs / "t02.yaml", runs, marker)
    for path in runs.rglob("*"):
        if path.name.endswith(".tmp"):  # SIGKILL during a write leaves its temp file: hidden, never a result
            assert is_temp_file(path.name), f"a killed write's temp file is hidden and named as one: {path}"
        elif path.suffix == ".json":
            json.loads(path.read_text())  # never torn
    (runs / "t02").mkdir(parents=True, exist_ok=True)
    (runs / "t02" / ".expanded.pt.Ab3_x9Zq.tmp").write_bytes(b"torn")  # as a kill during a write leaves it
    lrx_run(configs / "t02.yaml", runs)
    assert final_metrics(runs) == expected, f"killed at {marker!r} (killed={killed}): re-run must equal an uninterrupted run"
    assert not list(runs.rglob("*.tmp")), "the rerun removes the temp files a killed write left"


def test_full_disk_stops_cleanly_and_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    configs, _ = reference
    runs = tmp_path / "runs"
    assert runner.invoke(app, ["run", str(configs / "t01.yaml"), "--runs-dir", str(runs), "--quiet"]).exit_code == 0
    model_before = (runs / "t01" / "model.pt").read_bytes()
    import tempfile

    real_save, real_mkstemp = torch.save, tempfile.mkstemp
    opened = []

    def mkstemp(*args, **kwargs):
        opened.append(kwargs.get("prefix", ""))
        return real_mkstemp(*args, **kwargs)

    def full_disk(obj, f, *args, **kwargs):
        if "stage1" in opened[-1]:  # every write of the second fine-tune stage fails half-way
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(torch, "save", full_disk)
    result = runner.invoke(app, ["run", str(configs / "t02.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "No space left" in result.output and "stage1" in result.output and "Traceback" not in result.output
    assert (runs / "t02" / "stage0.pt").exists(), "the finished stage's model is intact"
    assert (runs / "t01" / "model.pt").read_bytes() == model_before
    assert json.loads((runs / "t02" / "metrics.json").read_text())["status"] == "failed"
    assert not list((runs / "t02").glob("*.tmp")), "the half-written temp file is removed"
    monkeypatch.setattr(torch, "save", real_save)
    result = runner.invoke(app, ["run", str(configs / "t02.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 0, "with space again, the run finishes"


def test_checkpoint_of_other_ranks_is_refused_naming_both_shapes(reference, tmp_path):
    configs, _ = reference
    runs = tmp_path / "runs"
    assert runner.invoke(app, ["run", str(configs / "t02.yaml"), "--runs-dir", str(runs), "--quiet"]).exit_code == 0
    from lrx.pipeline.rundir import load_model, save_model
    from lrx.expansion.model import expand
    from lrx.nn.models import build_model

    other, report = expand(build_model("tiny_cnn"), layers=[2, 3, 4], scheme="v2", ranks=[4, 8, 8], input_size=(3, 16, 16))
    save_model(runs / "t02" / "expanded.pt", other, "tiny_cnn", 10, report.spec, ["3", "6", "8"])
    blob = torch.load(runs / "t02" / "expanded.pt", weights_only=True)
    blob["spec"] = torch.load(runs / "t02" / "stage0.pt", weights_only=True)["spec"]  # claims the old ranks
    torch.save(blob, runs / "t02" / "expanded.pt")
    from lrx.base.errors import UserError

    with pytest.raises(UserError, match=r"has shape \(4, .*expects \(6, "):
        load_model(runs / "t02" / "expanded.pt", "tiny_cnn", 10)
    with pytest.raises(UserError, match="holds a tiny_cnn with 10 classes, but the config asks for vgg11"):
        load_model(runs / "t02" / "stage0.pt", "vgg11", 10)
