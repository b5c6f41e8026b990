"""`lrx run` under torchrun with 2 gloo processes: one set of files, written by rank 0, and a finished run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY_BASE, write_yaml

INFRA_ERRORS = ("Address already in use", "EADDRINUSE", "RendezvousConnectionError", "The server socket has failed")


def test_lrx_run_under_torchrun_writes_one_set_of_files(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    write_yaml(folder / "base.yaml", TINY_BASE)
    write_yaml(folder / "t01.yaml", {"extends": "base.yaml", "no": 1, "profile": {"enabled": False}})
    write_yaml(folder / "t02.yaml", {"extends": "base.yaml", "no": 2, "baseline": "t01",
                                     "decompose": {"layers": [2, 3], "scheme": "v2", "bases": [8, 8]},
                                     "finetune": [{"l2": 1.0, "epochs": 1}, {"ce": 1.0, "epochs": 1}]})
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lrx.cli",
           "run", str(folder / "t02.yaml"), "--runs-dir", str(runs), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and any(s in proc.stdout + proc.stderr for s in INFRA_ERRORS):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    for name in ("t01", "t02"):
        metrics = json.loads((runs / name / "metrics.json").read_text())
        assert metrics["status"] == "done", f"{name}: {metrics.get('status')}"
        assert not (runs / name / ".lock").exists(), "the lock is released"
        log = (runs / name / "log.txt").read_text().splitlines()
        assert sum("stage" in line and "done in" in line for line in log) == len(metrics["stages"]), \
            "each stage is logged once (rank 0 alone writes)"
    files = sorted(p.name for p in (runs / "t02").iterdir())
    assert files == ["config.yaml", "expanded.pt", "log.txt", "metrics.json",
                                     "stage0.pt", "stage1.pt"], files
    assert json.loads((runs / "t02" / "metrics.json").read_text())["latency"]["speedup"] > 0, "rank 0 profiled"
