"""`lrx clean`: what it removes, what it keeps (a cleaned run still skips, resumes, and tables the same),
and runs in use left alone."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_BASE, make_tiny_configs, write_yaml
from lrx.base.files import save_atomic
from lrx.cli import app
from lrx.pipeline.rundir import RunDir, format_size, stage_of_file
from lrx.output.table import collect_rows, render

runner = CliRunner()


def lrx(*args):
    return runner.invoke(app, [str(a) for a in args])


def files(runs):
    """{run: sorted file names} of every run folder."""
    return {p.name: sorted(f.name for f in p.iterdir()) for p in sorted(runs.iterdir()) if p.is_dir()}


def plant(path, size=4096):
    """A checkpoint-like file of about ``size`` bytes; its exact size on disk."""
    save_atomic({"model": {"w": torch.zeros(size // 4)}, "epoch": 1}, path)
    return path.stat().st_size


@pytest.fixture(scope="module")
def finished_tree(tmp_path_factory):
    """t01 (baseline), t02 (expansion) and t03 (two fine-tune stages on t02), run once."""
    root = tmp_path_factory.mktemp("clean")
    configs = make_tiny_configs(root / "configs")
    write_yaml(configs / "base.yaml", {**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 1},
                                       "data": {**TINY_BASE["data"], "train_subset": 64, "test_subset": 64},
                                       "profile": {"enabled": False}})  # what clean sees needs no timing
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads spin against each other on a shared 2-core machine
    try:
        result = lrx("run", configs / "t03.yaml", "--runs-dir", root / "runs", "--quiet")
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def tree(finished_tree, tmp_path):
    """A copy of the finished runs this test may change: (configs, runs)."""
    shutil.copytree(finished_tree, tmp_path / "t")
    return tmp_path / "t" / "configs", tmp_path / "t" / "runs"


def test_stage_of_file_reads_the_names_rundir_gives():
    assert stage_of_file("model.pt") == ("train", "model") and stage_of_file("train.ckpt") == ("train", "checkpoint")
    assert stage_of_file("expanded.pt") == ("decompose", "model")
    assert stage_of_file("stage12.pt") == ("finetune.12", "model")
    assert stage_of_file("stage0.ckpt") == ("finetune.0", "checkpoint")
    for other in ("expanded.ckpt", "model.ckpt", "train.pt", "stage01.pt", "stage1.pth", "notes.txt", "stage.pt"):
        assert stage_of_file(other) is None, f"{other} is not a file lrx writes"
    assert (format_size(512), format_size(1536), format_size(3 * 2**30)) == ("512 bytes", "1.5 KiB", "3.0 GiB")


def test_clean_drops_what_nothing_reads_and_a_cleaned_run_still_skips(tree, one_thread):
    configs, runs = tree
    before = files(runs)
    assert "train.ckpt" not in before["t01"], "finished stages drop their checkpoints themselves (runs.py)"
    planted = {  # what older lrx versions, an interruption or a changed setting leave behind
        runs / "t01" / "train.ckpt": plant(runs / "t01" / "train.ckpt", 40_000),
        runs / "t03" / "stage0.ckpt": plant(runs / "t03" / "stage0.ckpt"),
        runs / "t03" / "stage5.pt": plant(runs / "t03" / "stage5.pt"),  # a stage no longer in the config
    }
    temp = runs / "t02" / ".metrics.json.abcd1234.tmp"
    temp.write_bytes(b"half a write")
    old = time.time() - 60
    os.utime(temp, (old, old))
    planted[temp] = temp.stat().st_size
    (runs / "t03" / "notes.txt").write_text("the user's own file")
    table = render(collect_rows(runs), "markdown")
    metrics = {name: (runs / name / "metrics.json").read_bytes() for name in ("t01", "t02", "t03")}

    result = lrx("clean", runs, "--dry-run")
    assert result.exit_code == 0, result.output
    listed = {line.split(" (")[0].removeprefix("would remove ") for line in result.output.splitlines()
              if line.startswith("would remove")}
    assert listed == {str(p) for p in planted}, f"the dry run lists exactly the unneeded files: {result.output}"
    total = sum(planted.values())
    assert f"would free {format_size(total)} in 4 file(s)" in result.output, result.output
    assert all(p.exists() for p in planted), "a dry run removes nothing"
    ckpt = runs / "t01" / "train.ckpt"
    assert f"{ckpt} ({format_size(planted[ckpt])}): per-epoch checkpoint of stage train, which finished" \
        in result.output, \
        "it says why each file can go"

    result = lrx("clean", runs)
    assert result.exit_code == 0, result.output
    assert f"freed {format_size(total)} in 4 file(s)" in result.output, result.output
    assert files(runs) == {**before, "t03": sorted(before["t03"] + ["notes.txt"])}, \
        "exactly the planted files went; every model file, metrics, config, log and the user's file stayed"
    assert render(collect_rows(runs), "markdown") == table, "the table is unchanged"
    assert {n: (runs / n / "metrics.json").read_bytes() for n in metrics} == metrics, "metrics.json untouched"
    assert "lrx clean removed 1 file(s)" in (runs / "t01" / "log.txt").read_text(), "the run's log says it"

    stages = {n: json.loads(metrics[n])["stages"] for n in metrics}
    result = lrx("run", configs / "t03.yaml", "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output, f"the cleaned run is up to date: {result.output}"
    for name in metrics:  # a redone stage would have a new wall_s
        assert json.loads((runs / name / "metrics.json").read_text())["stages"] == stages[name], \
            f"{name}: no stage was redone after clean"
    assert "freed 0 bytes in 0 file(s)" in lrx("clean", runs).output, "a second clean finds nothing"


def test_an_interrupted_stage_keeps_the_checkpoint_it_resumes_from(tree, monkeypatch, one_thread):
    configs, runs = tree
    shutil.rmtree(runs / "t03")
    real = __import__("lrx.pipeline.stages", fromlist=["run_stage"]).run_stage

    def stop_after_stage1(*args, **kwargs):
        result = real(*args, **kwargs)
        if str(args[6]).endswith("stage1.ckpt"):  # its last epoch's checkpoint is written, its model not yet
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr("lrx.pipeline.stages.run_stage", stop_after_stage1)
    assert lrx("run", configs / "t03.yaml", "--runs-dir", runs, "--quiet").exit_code == 130
    monkeypatch.setattr("lrx.pipeline.stages.run_stage", real)
    metrics = json.loads((runs / "t03" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and list(metrics["running"]) == ["finetune.1"], metrics.get("running")
    stale = plant(runs / "t03" / "stage0.ckpt")

    result = lrx("clean", runs)
    assert result.exit_code == 0 and f"freed {format_size(stale)} in 1 file(s)" in result.output, result.output
    assert (runs / "t03" / "stage1.ckpt").exists(), "the checkpoint a rerun resumes from is kept"
    assert not (runs / "t03" / "stage0.ckpt").exists(), "the finished stage's checkpoint went"

    epochs = []
    real_epoch = __import__("lrx.train.loop", fromlist=["train_one_epoch"]).train_one_epoch
    monkeypatch.setattr("lrx.train.loop.train_one_epoch", lambda *a, **k: epochs.append(1) or real_epoch(*a, **k))
    result = lrx("run", configs / "t03.yaml", "--runs-dir", runs, "--quiet")
    assert result.exit_code == 0, result.output
    assert epochs == [], f"the rerun resumed stage finetune.1 past its only epoch instead of training {len(epochs)}"
    assert json.loads((runs / "t03" / "metrics.json").read_text())["status"] == "done"


def test_a_run_in_use_is_not_touched(tree, monkeypatch):
    _, runs = tree
    monkeypatch.setattr("lrx.pipeline.rundir.LOCK_PATIENCE_S", 0.0)
    size = plant(runs / "t01" / "train.ckpt")
    plant(runs / "t02" / "stage3.ckpt")
    holder = RunDir(runs, "t01")
    holder.lock()  # another open file description: clean's flock on it is refused, as another process's
    try:
        for args, verb in ((("--dry-run",), "would free"), ((), "freed")):
            result = lrx("clean", runs, *args)
            assert result.exit_code == 0, result.output
            assert "t01: not touched" in result.output and "in use" in result.output, result.output
            assert f"{verb} {format_size(size)} in 1 file(s)" in result.output, f"t02 alone is cleaned: {result.output}"
            assert (runs / "t01" / "train.ckpt").exists(), "the run in use keeps its files"
    finally:
        holder.unlock()
    assert not (runs / "t02" / "stage3.ckpt").exists()
    result = lrx("clean", runs / "t01")
    assert result.exit_code == 0 and "freed" in result.output and not (runs / "t01" / "train.ckpt").exists(), \
        "once free, the run (named on its own) is cleaned"


def test_a_folder_that_is_not_a_run_is_left_alone(tmp_path):
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    plant(tmp_path / "runs" / "mine" / "model.pt")
    damaged = tmp_path / "runs" / "broken"
    damaged.mkdir()
    (damaged / "metrics.json").write_text("{not json")
    plant(damaged / "train.ckpt")
    result = lrx("clean", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "broken: not touched" in result.output and "not valid JSON" in result.output, result.output
    assert (tmp_path / "runs" / "mine" / "model.pt").exists() and (damaged / "train.ckpt").exists()
    result = lrx("clean", tmp_path / "nope")
    assert result.exit_code == 2 and "not a folder" in result.output, result.output


def test_keep_final_drops_the_earlier_models_of_finished_runs_and_they_still_skip(tree, one_thread):
    configs, runs = tree
    stage0 = runs / "t03" / "stage0.pt"
    size = stage0.stat().st_size
    table = render(collect_rows(runs), "markdown")
    recorded = {n: json.loads((runs / n / "metrics.json").read_text())["stages"] for n in ("t01", "t02", "t03")}

    result = lrx("clean", runs, "--keep-final")
    assert result.exit_code == 0, result.output
    assert f"removed {stage0} ({format_size(size)}): model of stage finetune.0, before the final model stage1.pt" \
        in result.output, result.output
    assert f"freed {format_size(size)} in 1 file(s)" in result.output, \
        "t01's model.pt and t02's expanded.pt are their runs' final models (and what t03 builds on): kept"
    needed = sum((runs / n / f).stat().st_size for n, final in (("t01", "model.pt"), ("t02", "expanded.pt"),
                                                               ("t03", "stage1.pt"))
                 for f in (final, "metrics.json", "config.yaml", "log.txt"))
    assert f"3 finished run(s) keep {format_size(needed)}" in result.output, result.output
    assert render(collect_rows(runs), "markdown") == table, "the table is unchanged"

    again = lrx("run", configs / "t03.yaml", "--runs-dir", runs)
    assert again.exit_code == 0 and "nothing to do" in again.output, f"a finished run still skips: {again.output}"
    for name, stages in recorded.items():
        assert json.loads((runs / name / "metrics.json").read_text())["stages"] == stages, f"{name}: nothing redone"

    changed = lrx("run", configs / "t03.yaml", "--runs-dir", runs, "--set", "finetune.1.epochs=2")
    assert changed.exit_code == 0, changed.output
    assert "stage finetune.1 starts from stage0.pt, which lrx clean --keep-final removed: making stage finetune.0 " \
           "again first" in changed.output, changed.output
    assert stage0.exists() and json.loads((runs / "t03" / "metrics.json").read_text())["finetune"][-1]["epochs"] == 2
