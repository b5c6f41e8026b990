"""Hostile files around a run: a lock file that is another file (a hard link to metrics.json, a FIFO), a lock
kept alive by a forked child, finished stages whose model files no longer load, --set values and merge keys
the YAML reader must refuse, terminal escapes in the table, a killed write's temporary file in the runs
folder, and checkpoints that are folders or devices."""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lrx.base.errors import UserError
from lrx.base.files import load_checkpoint
from lrx.cli import app
from lrx.config.settings import load_config
from lrx.nn.models import build_model
from lrx.output.table import collect_rows, render
from lrx.pipeline.rundir import STALE_TEMP_S, RunDir, clean_runs, save_model

FORK = multiprocessing.get_context("fork")
HISTORY = json.dumps({"name": "t01", "status": "done", "stages": {"train": {"hash": "h"}}, "replaced": []}) + "\n"


@contextlib.contextmanager
def no_hang(what: str, seconds: int = 60):
    """Fail instead of blocking for ever (opening a FIFO nobody writes blocks) if the code under test regresses."""
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail(f"{what} blocked"))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, f"one line, got: {result.output!r}"
    return lines[0]


# ---------------------------------------------------------------- the lock file


def test_a_lock_file_hard_linked_to_metrics_is_refused_and_never_written(tmp_path):
    run = RunDir(tmp_path, "t03")
    run.path.mkdir()
    run.metrics_path.write_text(HISTORY)
    os.link(run.metrics_path, run.file(".lock"))
    with pytest.raises(UserError) as err:
        run.lock()
    text = str(err.value)
    assert str(run.file(".lock")) in text and "2 hard links" in text, f"names the lock file and why: {text}"
    assert run.metrics_path.read_text() == HISTORY, "metrics.json is not truncated through the lock"


def test_lrx_run_force_with_a_hard_linked_lock_keeps_the_history(tiny_configs, tmp_path):
    runs = tmp_path / "runs"
    run = RunDir(runs, "t01")
    run.path.mkdir(parents=True)
    run.metrics_path.write_text(HISTORY)
    os.link(run.metrics_path, run.file(".lock"))
    result = CliRunner().invoke(app, ["run", str(tiny_configs / "t01.yaml"), "--runs-dir", str(runs), "--force", "-q"])
    assert result.exit_code == 2, result.output
    assert str(run.file(".lock")) in one_line(result), result.output
    assert run.metrics_path.read_text() == HISTORY, "the run's history is intact"


def test_a_lock_file_that_is_a_fifo_is_refused_and_probed_without_hanging(tmp_path):
    run = RunDir(tmp_path, "r")
    run.path.mkdir()
    os.mkfifo(run.file(".lock"))
    with no_hang("probing a FIFO lock"):
        assert run.in_use() is False, "nobody holds a flock on it"
        with pytest.raises(UserError) as err:
            run.lock()
    assert str(run.file(".lock")) in str(err.value) and "FIFO" in str(err.value), str(err.value)


def _holder_with_a_worker(runs, worker_pid, ready):
    """Take the lock, fork a worker (as a DataLoader does) that lives on, and wait to be killed."""
    run = RunDir(runs, "r")
    run.lock()
    pid = os.fork()
    if pid == 0:  # the worker: outlives its parent
        time.sleep(120)
        os._exit(0)
    worker_pid.value = pid
    ready.set()
    time.sleep(120)
    os._exit(0)


def test_a_forked_worker_does_not_keep_the_lock_of_a_killed_parent(tmp_path):
    worker_pid, ready = FORK.Value("i", 0), FORK.Event()
    proc = FORK.Process(target=_holder_with_a_worker, args=(tmp_path, worker_pid, ready))
    proc.start()
    try:
        assert ready.wait(60), "the holder took the lock and forked its worker"
        os.kill(proc.pid, signal.SIGKILL)  # no unlock(): the lock file stays, the worker lives on
        proc.join()  # waitpid; a timeout would wait on a pipe the worker inherited and keeps open
        os.kill(worker_pid.value, 0)  # the premise: the worker is alive (raises if not)
        run = RunDir(tmp_path, "r")
        run.lock()  # refused "in use by process <dead pid>" if the worker had kept the descriptor
        run.unlock()
    finally:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        if worker_pid.value:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker_pid.value, signal.SIGKILL)


def test_the_parent_keeps_the_lock_while_a_forked_child_runs(tmp_path):
    run = RunDir(tmp_path, "r")
    run.lock()
    try:
        pid = os.fork()
        if pid == 0:  # the child holds no lock: its unlock() must not remove the parent's lock file
            run.unlock()
            os._exit(0 if run._lock_fd is None and run.file(".lock").exists() else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child's RunDir holds no lock and removes nothing"
        with pytest.raises(UserError, match="in use by process"):
            RunDir(tmp_path, "r").lock()
    finally:
        run.unlock()


# ---------------------------------------------------------------- finished stages whose model does not load


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random bytes":
        path.write_bytes(torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    else:  # a pickle that would call a function when loaded without weights_only

        class Call:
            def __reduce__(self):
                return (print, ("this must never run",))

        torch.save({"model": Call()}, path)


@pytest.mark.parametrize("how", ["truncated", "random bytes", "code in the pickle"])
def test_a_model_file_that_does_not_load_is_not_a_finished_stage(tmp_path, how):
    run = RunDir(tmp_path, "t01")
    run.path.mkdir()
    path = run.model_path("train")
    save_model(path, build_model("tiny_cnn", 10), "tiny_cnn", 10)
    said = []
    assert run.has_model("train", said.append) and not said, "a good model file: the stage is done"
    damage(path, how)
    assert not run.has_model("train", said.append), f"{how}: the stage is not done"
    assert len(said) == 1 and str(path) in said[0] and "redoing stage train" in said[0], said
    assert not run.has_model("decompose", said.append) and len(said) == 1, "a missing file: not done, nothing to say"


def test_lrx_run_redoes_a_stage_whose_model_file_was_damaged(tiny_configs, tmp_path):
    runs = tmp_path / "runs"
    args = ["run", str(tiny_configs / "t01.yaml"), "--runs-dir", str(runs), "--set", "train.epochs=1",
            "--set", "profile.enabled=false"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    model = runs / "t01" / "model.pt"
    damage(model, "truncated")
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert f"{model} does not load" in again.output and "nothing to do" not in again.output, again.output
    assert set(load_checkpoint(model)) >= {"model", "arch"}, "the stage was redone: the model file loads again"
    assert json.loads((runs / "t01" / "metrics.json").read_text())["status"] == "done"


# ---------------------------------------------------------------- YAML


@pytest.mark.parametrize("value", ["[1, 2", "{latency: 2", '"half quoted', "a: b: c", "!!python/name:os.system"])
def test_a_set_value_that_is_broken_yaml_is_refused_naming_the_key(tiny_configs, value):
    with pytest.raises(UserError) as err:
        load_config(tiny_configs / "t01.yaml", [f"remark={value}"])
    assert err.value.key == "remark" and "not valid YAML" in str(err.value), str(err.value)
    result = CliRunner().invoke(app, ["train", str(tiny_configs / "t01.yaml"), "--set", f"remark={value}"])
    assert result.exit_code == 2 and "remark" in one_line(result), result.output


@pytest.mark.parametrize("value", ["@home", "`date`", "C:\\data", "it's fine", "plain words"])
def test_a_set_value_that_is_a_plain_word_is_taken_as_the_string(tiny_configs, value):
    assert load_config(tiny_configs / "t01.yaml", [f"remark={value}"]).remark == value


@pytest.mark.parametrize("model", ["{<<: {name: tiny_cnn, num_classes: 10}, num_classes: 5}",
                                   "{<<: [{name: tiny_cnn}, {name: alexnet_cifar10}], num_classes: 10}"])
def test_a_duplicate_key_through_a_merge_key_is_refused(tiny_configs, model):
    path = tiny_configs / "merged.yaml"
    path.write_text(f"extends: base.yaml\nmodel: {model}\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    assert "appears twice" in str(err.value) and "merge key" in str(err.value) and str(path) in str(err.value), \
        str(err.value)
    path.write_text("extends: base.yaml\nmodel: {<<: {name: tiny_cnn}, num_classes: 10}\n")
    assert load_config(path).model.name == "tiny_cnn", "a merge without a duplicate still loads"


# ---------------------------------------------------------------- the table, lrx clean, checkpoints


def test_terminal_escape_sequences_are_left_out_of_the_table(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    remark = ("\x1b[31mred\x1b[0m, \x1b]8;;https://example.invalid\x07a link\x1b]8;;\x1b\\, "
              "\x1b]0;a window title\x07\x9b2Jend")
    (run / "metrics.json").write_text(json.dumps({"name": "r1\x1b]0;x\x07", "status": "done", "stages": {},
                                                  "remark": remark}))
    rows = collect_rows(tmp_path / "runs")
    for fmt in ("markdown", "csv", "json"):
        text = render(rows, fmt)
        shown = json.dumps(json.loads(text), ensure_ascii=False) if fmt == "json" else text
        assert not any(c in shown for c in "\x1b\x07\x9b"), f"{fmt}: no control characters: {shown!r}"
        assert "red, a link, end" in shown, f"{fmt}: the text between the sequences stays: {shown!r}"


def test_clean_removes_a_stale_temporary_file_of_an_atomic_write(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    stale, fresh = runs / ".table.json.abcd1234.tmp", runs / ".table.json.efgh5678.tmp"
    stale.write_text("{half")
    fresh.write_text("{half")
    old = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    assert [p for p, _, _ in clean_runs(runs, dry_run=True)[0]] == [stale] and stale.exists(), "a dry run lists it"
    result = CliRunner().invoke(app, ["clean", str(runs)])
    assert result.exit_code == 0 and str(stale) in result.output, result.output
    assert not stale.exists() and fresh.exists(), "the stale one is removed; a recent one may be a write under way"


@pytest.mark.parametrize("kind", ["a directory", "a FIFO", "a character device"])
def test_a_checkpoint_that_is_not_a_file_says_what_it_is(tmp_path, kind):
    path = {"a directory": tmp_path, "a FIFO": tmp_path / "fifo", "a character device": "/dev/zero"}[kind]
    if kind == "a FIFO":
        os.mkfifo(path)
    if kind == "a character device" and not os.path.exists(path):
        pytest.skip("no /dev/zero here")
    with no_hang(f"loading {kind}"), pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert kind in str(err.value) and "no such" not in str(err.value), str(err.value)


@pytest.mark.parametrize("kind", ["device", "directory", "fifo"])
def test_a_model_checkpoint_that_is_not_a_file_says_what_it_is(tmp_path, kind):
    """model.checkpoint: /dev/zero, a folder or a FIFO is named for what it is, not as a missing file."""
    from lrx.nn.models import build_model, load_user_weights

    path = {"device": Path("/dev/zero"), "directory": tmp_path}.get(kind, tmp_path / "weights.pt")
    if kind == "fifo":
        os.mkfifo(path)
    words = {"device": "character device", "directory": "a directory", "fifo": "FIFO"}[kind]
    with pytest.raises(UserError) as err:
        load_user_weights(build_model("tiny_cnn", 10), path)
    assert words in str(err.value) and "no such file" not in str(err.value), str(err.value)
