"""The run pipeline end to end on synthetic data: stages, skipping, redoing, dependencies, locks."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lrx.cli import app

runner = CliRunner()


def lrx(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def metrics(runs, name):
    return json.loads((runs / name / "metrics.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """t03 run once from nothing: it makes t01 (baseline) and t02 (expansion) first."""
    from conftest import make_tiny_configs

    root = tmp_path_factory.mktemp("pipeline")
    folder = make_tiny_configs(root / "configs")
    runs = root / "runs"
    result = lrx("run", folder / "t03.yaml", "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    return folder, runs, result.output


def test_run_makes_its_dependencies_first_and_says_so(finished):
    folder, runs, output = finished
    assert "needs run t01" in output and "needs run t02" in output
    for name in ("t01", "t02", "t03"):
        m = metrics(runs, name)
        assert m["status"] == "done", f"{name} finished"
        assert (runs / name / "config.yaml").read_text().startswith("# resolved config")
        assert "torch" in m["versions"] and m["seed"] == 0
        assert (runs / name / "log.txt").stat().st_size > 0
    assert (runs / "t01" / "model.pt").exists() and (runs / "t02" / "expanded.pt").exists()
    assert (runs / "t03" / "stage0.pt").exists() and (runs / "t03" / "stage1.pt").exists()


def test_metrics_hold_what_the_table_needs(finished):
    _, runs, _ = finished
    base, expanded, tuned = (metrics(runs, n) for n in ("t01", "t02", "t03"))
    assert 0 <= base["acc1"] <= 100 and base["macs"] > expanded["macs"] > 0
    assert base["cuda_time_ms"] is None and base["cpu_time_ms"] > 0
    assert expanded["decompose"]["bases"] == [4, 4, 3] and expanded["acc1_before"] == base["acc1"]
    assert expanded["latency"]["speedup"] > 0 and expanded["latency"]["mac_ratio"] > 1
    prof = expanded["stages"]["profile"]
    assert prof["optimised"] and len(prof["paths"]) == 3, "timed with lrx.nn.inference's paths, one per replaced layer"
    assert [(s["l2"], s["ce"], s["epochs"]) for s in tuned["finetune"]] == [(1.0, 0.0, 1), (0.0, 1.0, 1)]
    assert tuned["decompose"]["layers"] == [2, 3, 4], "a run built on a parent shows the parent's decomposition"
    assert tuned["l2_before"] == pytest.approx(expanded["l2_after"]), "fine-tuning starts from the expansion"
    assert tuned["l2_after"] is not None and tuned["acc1"] is not None
    for stage in ("finetune.0", "finetune.1"):
        assert tuned["stages"][stage]["wall_s"] > 0


def test_rerun_does_nothing_and_says_so(finished):
    folder, runs, _ = finished
    before = (runs / "t03" / "metrics.json").read_text()
    result = lrx("run", folder / "t03.yaml", "--runs-dir", runs)
    assert result.exit_code == 0 and "nothing to do" in result.output
    assert json.loads((runs / "t03" / "metrics.json").read_text())["stages"] == json.loads(before)["stages"]


def test_changed_setting_redoes_only_affected_stages_and_keeps_a_record(finished, tmp_path):
    folder, runs, _ = finished
    import shutil

    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    old = metrics(copy, "t03")
    result = lrx("run", folder / "t03.yaml", "--runs-dir", copy, "--set", "finetune.1.epochs=2")
    assert result.exit_code == 0, result.output
    new = metrics(copy, "t03")
    assert new["stages"]["finetune.0"] == old["stages"]["finetune.0"], "the unchanged L2 stage is kept"
    assert new["stages"]["finetune.1"]["hash"] != old["stages"]["finetune.1"]["hash"]
    assert new["finetune"][-1]["epochs"] == 2
    assert new["replaced"][-1]["metrics"]["stages"]["finetune.1"] == old["stages"]["finetune.1"], "old results kept"
    assert metrics(copy, "t01")["stages"] == metrics(runs, "t01")["stages"], "the baseline was not redone"


def test_same_config_twice_gives_the_same_metrics(finished, tmp_path):
    folder, runs, _ = finished
    result = lrx("run", folder / "t02.yaml", "--runs-dir", tmp_path / "again", "--quiet")
    assert result.exit_code == 0, result.output
    for name in ("t01", "t02"):
        a, b = metrics(runs, name), metrics(tmp_path / "again", name)
        assert a["acc1"] == b["acc1"], f"{name}: acc1 is reproducible"
        assert a.get("l2_after") == b.get("l2_after")


def test_no_deps_names_the_command_to_run(finished, tmp_path):
    folder, _, _ = finished
    result = lrx("run", folder / "t03.yaml", "--runs-dir", tmp_path / "empty", "--no-deps")
    assert result.exit_code == 2 and "lrx run" in result.output and "t01.yaml" in result.output
    assert not (tmp_path / "empty" / "t03").exists()


def test_table_of_the_runs(finished):
    _, runs, _ = finished
    result = lrx("table", runs)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "|No.|layers|#bases|decomped|L2 finetune|CE finetune|acc@1(%)|macs(M)|params(M)|CPU time(ms)|CUDA time(ms)|Remark|"
    assert lines[2].startswith("|1|-|-|-|-|-|") and "original model" in lines[2]
    assert lines[3] == "|" and lines[4].startswith("|2|2,3,4|4,4,3|-|-|-|")
    assert lines[5].startswith("|3|2,3,4|4,4,3|-|1.0x1|1.0x1|")


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(finished, tmp_path):
    folder, runs, _ = finished
    lock = runs / "t03" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, json, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'pid': os.getpid()}).encode()); "
                               "print('locked', flush=True); time.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = lrx("run", folder / "t03.yaml", "--runs-dir", runs)
        assert result.exit_code == 2 and f"in use by process {holder.pid}" in result.output, result.output
    finally:
        holder.kill()
        holder.wait()
    lock.write_text("9" * 20)  # left behind by a process that is gone, held by nobody: taken over
    result = lrx("run", folder / "t03.yaml", "--runs-dir", runs)
    assert result.exit_code == 0 and "nothing to do" in result.output, "a dead process's lock is taken over"
    assert not lock.exists(), "the lock is released"


def test_force_redoes_every_stage_and_keeps_the_old_results(finished, tmp_path):
    folder, runs, _ = finished
    import shutil

    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    old = metrics(copy, "t02")
    log = copy / "t02" / "log.txt"
    started = {s: log.read_text().count(f"stage {s} ...") for s in old["stages"]}
    result = lrx("run", folder / "t02.yaml", "--runs-dir", copy, "--force", "--quiet")
    assert result.exit_code == 0, result.output
    new = metrics(copy, "t02")
    assert new["replaced"][-1]["why"] == "--force" and new["replaced"][-1]["metrics"]["stages"] == old["stages"]
    for stage, count in started.items():
        assert log.read_text().count(f"stage {stage} ...") == count + 1, f"stage {stage} redone"
    assert new["acc1"] == old["acc1"], "redone with the same settings, the same result"
    assert metrics(copy, "t01")["stages"] == old_t01(runs), "--force redoes this run, not the runs it builds on"


def old_t01(runs):
    return metrics(runs, "t01")["stages"]
