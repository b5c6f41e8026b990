"""The run directory under attack: a lock two processes cannot both hold, file-system trouble and damaged
files as one-line UserErrors, and the temporary files of a killed write removed at the next run."""
from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import signal
import socket
import time

import pytest
import torch

from lrx.base import files as checkpoint

from lrx.pipeline import rundir
from lrx.base.files import save_atomic
from lrx.base.errors import UserError
from lrx.nn.models import build_model
from lrx.pipeline.rundir import RunDir, load_model, save_model

FORK = multiprocessing.get_context("fork")


def one_line(err) -> str:
    text = str(err.value if hasattr(err, "value") else err)
    assert "\n" not in text, f"the error is one line: {text!r}"
    return text


# ---------------------------------------------------------------- the lock, with real processes


def _contender(runs, barrier, got, worker, trials):
    """Each trial: wait for all, try the lock at once, record success, hold it until all have tried."""
    run = RunDir(runs, "r")
    for trial in range(trials):
        barrier.wait()
        try:
            run.lock()
            got[worker * trials + trial] = 1
        except UserError:
            pass
        barrier.wait()  # everyone has tried while the winner still holds it
        run.unlock()
        barrier.wait()  # released before the next trial
    os._exit(0)


@pytest.mark.parametrize("workers", [2, 4])
def test_processes_starting_together_never_both_hold_the_lock(tmp_path, workers, monkeypatch):
    # No patience: a loser refuses at once (lock() waits LOCK_PATIENCE_S for a probe's instant otherwise,
    # which would make each of the 200 trials last that long; the holder keeps the lock until all tried).
    monkeypatch.setattr("lrx.pipeline.rundir.LOCK_PATIENCE_S", 0.0)
    trials = 200
    barrier = FORK.Barrier(workers, timeout=60)
    got = FORK.Array("i", workers * trials, lock=False)
    procs = [FORK.Process(target=_contender, args=(tmp_path, barrier, got, w, trials)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs), f"every contender finished: {[p.exitcode for p in procs]}"
    holders = [sum(got[w * trials + t] for w in range(workers)) for t in range(trials)]
    both = [t for t, n in enumerate(holders) if n > 1]
    none = [t for t, n in enumerate(holders) if n == 0]
    assert not both, f"{len(both)} of {trials} trials had several holders of one lock (first: {both[:5]})"
    assert not none, f"{len(none)} of {trials} trials had no holder although nobody else held it"
    assert not (tmp_path / "r" / ".lock").exists(), "the last holder removed the lock file"


def _holder(runs, ready):
    run = RunDir(runs, "r")
    run.lock()
    ready.set()
    time.sleep(60)  # until killed; no unlock(): the kernel lets go of the lock when the process ends
    os._exit(0)


def _stop(proc):
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)


def _refusal_while_held(runs, holder, *args) -> tuple[str, int]:
    """(the one-line refusal of RunDir(runs, "r").lock(), the holder's pid) while ``holder(*args, ready)``,
    in another process, holds the lock; the holder is killed after."""
    ready = FORK.Event()
    proc = FORK.Process(target=holder, args=(*args, ready))
    proc.start()
    try:
        assert ready.wait(30), "the holder took the lock"
        with pytest.raises(UserError) as err:
            RunDir(runs, "r").lock()
        return one_line(err), proc.pid
    finally:
        _stop(proc)


def test_a_live_holder_is_named_and_a_killed_one_lets_go(tmp_path):
    text, pid = _refusal_while_held(tmp_path, _holder, tmp_path)
    assert f"in use by process {pid} on host {socket.gethostname()} since" in text, \
        f"the refusal names the holding process, its host and since when: {text}"
    run = RunDir(tmp_path, "r")
    run.lock()  # a killed holder's lock is free at once: no stale-pid guessing
    info = json.loads((tmp_path / "r" / ".lock").read_text())
    assert info["pid"] == os.getpid(), f"the lock file names its new holder: {info}"
    run.unlock()


@pytest.mark.parametrize("content", [b"0", b"-1", b"1", b"9" * 20, b"garbage\x00\xff\n", b"", b"[" * 100_000,
                                     json.dumps({"pid": os.getpid() + 10**6, "host": "x"}).encode()])
def test_a_lock_file_nobody_holds_is_taken_whatever_it_says(tmp_path, content):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / ".lock").write_bytes(content)
    run = RunDir(tmp_path, "r")
    run.lock()  # pid 1 (alive), 20 digits, garbage: the content says nothing about who holds the flock
    info = json.loads((tmp_path / "r" / ".lock").read_text())
    assert info["pid"] == os.getpid(), f"content {content[:20]!r}: the lock file now names this process: {info}"
    run.unlock()
    assert not (tmp_path / "r" / ".lock").exists(), "unlock removes the lock file"


def _raw_holder(path, content, ready):
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, content)
    ready.set()
    time.sleep(60)  # until killed
    os._exit(0)


@pytest.mark.parametrize("content", [b"", b"-1", b"9" * 20, b"{\"pid\": true}", b"\xff\xfe", b"[" * 10_000])
def test_a_held_lock_with_unreadable_content_refuses_in_one_line(tmp_path, content):
    (tmp_path / "r").mkdir()
    text, _ = _refusal_while_held(tmp_path, _raw_holder, tmp_path / "r" / ".lock", content)
    assert "in use by another process" in text and str(tmp_path / "r" / ".lock") in text, \
        f"content {content[:20]!r}: refused, naming the lock file without trusting its content: {text}"


# ---------------------------------------------------------------- file-system trouble


def test_runs_dir_or_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    for run in (RunDir(tmp_path / "afile", "r"), RunDir(tmp_path, "afile")):
        with pytest.raises(UserError) as err:
            run.lock()
        text = one_line(err)
        assert "afile is a file, not a folder" in text, f"lock() says which path is in the way: {text}"
        with pytest.raises(UserError) as err:
            run.read_metrics()
        assert "afile is a file, not a folder" in one_line(err), f"read_metrics() too: {err.value}"


def test_run_dir_that_is_a_dangling_symlink(tmp_path):
    (tmp_path / "r").symlink_to(tmp_path / "gone")
    run = RunDir(tmp_path, "r")
    assert run.read_metrics() == {}, "a run folder that does not exist has no metrics"
    with pytest.raises(UserError) as err:
        run.lock()
    text = one_line(err)
    assert f"is a symlink to {tmp_path / 'gone'}, which does not exist" in text, f"lock() names the symlink: {text}"


def test_a_name_too_long_for_the_file_system(tmp_path):
    run = RunDir(tmp_path, "x" * 300)
    for call in (run.lock, run.read_metrics):
        with pytest.raises(UserError) as err:
            call()
        assert os.strerror(errno.ENAMETOOLONG) in one_line(err), f"{call.__name__}: the OS's reason: {err.value}"


def _fail_on(monkeypatch, name, err_no, when=lambda *a: True):
    real = getattr(os, name)

    def fake(*args, **kwargs):
        if when(*args):
            raise OSError(err_no, os.strerror(err_no))
        return real(*args, **kwargs)

    monkeypatch.setattr(rundir.os, name, fake)


def test_no_permission_to_create_the_lock(tmp_path, monkeypatch):
    (tmp_path / "r").mkdir()
    _fail_on(monkeypatch, "open", errno.EACCES, lambda path, *a: str(path).endswith(".lock"))
    with pytest.raises(UserError) as err:
        RunDir(tmp_path, "r").lock()
    text = one_line(err)
    assert os.strerror(errno.EACCES) in text and str(tmp_path / "r" / ".lock") in text, \
        f"the OS's reason and the lock file's path: {text}"


def test_no_permission_to_create_the_run_folder(tmp_path, monkeypatch):
    real = type(tmp_path).mkdir

    def refuse(self, *args, **kwargs):
        if self.name == "r":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "mkdir", refuse)
    with pytest.raises(UserError) as err:
        RunDir(tmp_path, "r").lock()
    text = one_line(err)
    assert os.strerror(errno.EACCES) in text and str(tmp_path / "r") in text, f"reason and folder: {text}"


def test_disk_full_while_taking_the_lock_leaves_nothing_behind(tmp_path, monkeypatch):
    (tmp_path / "r").mkdir()
    for name in ("write", "pwrite"):
        _fail_on(monkeypatch, name, errno.ENOSPC)
    with pytest.raises(UserError) as err:
        RunDir(tmp_path, "r").lock()
    assert os.strerror(errno.ENOSPC) in one_line(err), f"the OS's reason: {err.value}"
    monkeypatch.undo()
    assert not (tmp_path / "r" / ".lock").exists(), "no empty lock file is left behind"
    run = RunDir(tmp_path, "r")
    run.lock()  # and nothing blocks the next run
    run.unlock()


def test_log_on_a_full_disk_is_a_user_error(tmp_path, monkeypatch):
    run = RunDir(tmp_path, "r")
    run.file("log.txt").parent.mkdir()
    run.file("log.txt").mkdir()  # a folder where the log should be
    with pytest.raises(UserError) as err:
        run.log("hello")
    assert str(run.file("log.txt")) in one_line(err), f"the log's path: {err.value}"


class _FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes, as a full disk's do."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_during_a_checkpoint_save_reports_the_os_reason(tmp_path, monkeypatch):
    path = tmp_path / "a.ckpt"
    save_atomic({"epoch": 1}, path)
    real = os.fdopen
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, *a, **k: _FullDisk(real(fd, *a, **k), 3000))
    with pytest.raises(UserError) as err:
        save_atomic({"w": torch.randn(100_000)}, path)  # torch.save says only "unexpected pos" here
    text = one_line(err)
    assert os.strerror(errno.ENOSPC) in text and str(path) in text, f"the OS's reason and the file: {text}"
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1, "the previous checkpoint is kept"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "the temporary file is removed"


class _InterruptedFile(_FullDisk):
    """A file whose third write is interrupted, as by Ctrl-C or SIGTERM's handler in the middle of torch.save."""

    def write(self, data):
        self.writes = getattr(self, "writes", 0) + 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return self.f.write(data)


def test_an_interrupt_during_a_checkpoint_save_stays_an_interrupt(tmp_path, monkeypatch):
    """torch's zip writer masked the interrupt with "unexpected pos" on closing: a SIGTERM mid-save exited 1."""
    path = tmp_path / "a.ckpt"
    save_atomic({"epoch": 1}, path)
    real = os.fdopen
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, *a, **k: _InterruptedFile(real(fd, *a, **k), 0))
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"w": torch.randn(100_000), "epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1, "the previous checkpoint is kept"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "the temporary file is removed"


def test_a_real_full_disk_during_a_checkpoint_save(tmp_path):
    """On a 256 KiB tmpfs (needs root; skipped elsewhere): the real ENOSPC, not torch's "unexpected pos"."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=256k tmpfs {mount} 2>/dev/null") != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with pytest.raises(UserError) as err:
            save_atomic({"w": torch.randn(1_000_000)}, mount / "model.pt")
        text = one_line(err)
        assert os.strerror(errno.ENOSPC) in text, f"the OS's reason: {text}"
        assert os.listdir(mount) == [], f"the temporary file is removed: {os.listdir(mount)}"
    finally:
        os.system(f"umount {mount}")


# ---------------------------------------------------------------- temporary files a kill left


def test_taking_the_lock_removes_the_temp_files_of_killed_writes(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    old = time.time() - 3600
    orphans = [folder / ".model.pt.ab12_xyz.tmp", folder / ".metrics.json.k3j4h5g6.tmp"]
    for p in orphans:
        p.write_bytes(b"half a file")
        os.utime(p, (old, old))
    newer = folder / ".stage0.ckpt.zzzzzzzz.tmp"  # changed after the lock was taken: not an orphan
    newer.write_bytes(b"")
    os.utime(newer, (time.time() + 3600,) * 2)
    others = [folder / "notes.tmp", folder / ".hidden.tmp", folder / "model.pt"]
    for p in others:
        p.write_bytes(b"keep")
        os.utime(p, (old, old))
    run = RunDir(tmp_path, "r")
    run.lock()
    run.unlock()
    assert not any(p.exists() for p in orphans), f"temp files of killed writes removed: {sorted(os.listdir(folder))}"
    assert newer.exists() and all(p.exists() for p in others), \
        f"newer temp files and other files are kept: {sorted(os.listdir(folder))}"
    assert "removed 2 temporary file(s)" in (folder / "log.txt").read_text(), "the removal is logged"


def test_temp_file_names_are_the_ones_atomic_writes_make(tmp_path, monkeypatch):
    seen = []
    real = checkpoint.tempfile.mkstemp
    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    save_atomic({"epoch": 1}, tmp_path / "stage0.ckpt")
    names = [os.path.basename(p) for _, p in seen]
    assert names and all(checkpoint.is_temp_file(n) for n in names), f"is_temp_file knows mkstemp's names: {names}"


# ---------------------------------------------------------------- damaged state


@pytest.mark.parametrize("content", ["[]", "null", "3", '"done"', '{"stages": []}', '{"stages": {"train": []}}',
                                     '{"stages": {"train": {"acc1": 1}}}', '{"running": []}', '{"replaced": {}}',
                                     '{"status": 1}', '{"finetune": {}}', "[" * 100_000, "\udcff",
                                     '{"stages": {"bogus": {"hash": "x"}}}', '{"stages": {"finetune./x": {"hash": "x"}}}'])
def test_damaged_metrics_is_a_user_error_saying_what_to_do(tmp_path, content):
    run = RunDir(tmp_path, "r")
    run.path.mkdir()
    run.metrics_path.write_bytes(content.encode("utf-8", "surrogateescape"))
    for call in (run.read_metrics, run.final_model_path):
        with pytest.raises(UserError) as err:
            call()
        text = one_line(err)
        assert str(run.metrics_path) in text and "move it away" in text, \
            f"{content[:20]!r}: {call.__name__} names the file and what to do: {text}"


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_log_that_is_not_a_file_of_the_run_is_refused_not_written_through(tmp_path, kind):
    run = RunDir(tmp_path / "runs", "r")
    run.path.mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    outside.write_text("kept\n")
    if kind == "symlink":
        run.log_path().symlink_to(outside)
    else:
        os.mkfifo(run.log_path())  # no reader: a blocking open would hang the run
    with pytest.raises(UserError) as err:
        run.log("a line")
    assert str(run.log_path()) in one_line(err), f"{kind}: names log.txt: {err.value}"
    assert outside.read_text() == "kept\n", f"{kind}: the file a symlinked log points to is not written"


@pytest.mark.parametrize("kind", ["fifo", "huge", "deep", "alias-bomb", "not-utf8", "long-integer"])
def test_a_damaged_config_yaml_is_refused_naming_it(tmp_path, kind):
    run = RunDir(tmp_path, "r")
    run.path.mkdir()
    path = run.config_path()
    if kind == "fifo":
        os.mkfifo(path)  # no writer: a blocking read would hang
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(64 * 2**20)
    else:
        path.write_bytes({"deep": b"[" * 100_000, "not-utf8": b"model: \xff\n", "long-integer": b"a: " + b"9" * 5000,
                          "alias-bomb": b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                                        b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c]\n"}[kind])
    with pytest.raises(UserError) as err:
        run.read_config()
    assert str(path) in one_line(err) and "move it away" in str(err.value), f"{kind}: names the file: {err.value}"


def test_huge_metrics_is_refused_unread(tmp_path):
    run = RunDir(tmp_path, "r")
    run.path.mkdir()
    with open(run.metrics_path, "wb") as f:
        f.truncate(64 * 2**20)  # sparse: 64 MiB of zeros without writing them
    with pytest.raises(UserError) as err:
        run.read_metrics()
    assert "more than the" in one_line(err) and str(run.metrics_path) in str(err.value), f"too large: {err.value}"


@pytest.mark.parametrize("damage", ["no model", "model is a list", "spec is a list", "spec nonsense",
                                    "layers is a number"])
def test_damaged_model_file_is_a_user_error(tmp_path, damage):
    path = tmp_path / "model.pt"
    model = build_model("tiny_cnn", 10)
    save_model(path, model, "tiny_cnn", 10)
    blob = torch.load(path)
    if damage == "no model":
        del blob["model"]
    elif damage == "model is a list":
        blob["model"] = [1, 2, 3]
    elif damage == "spec is a list":
        blob["spec"] = [1]
    elif damage == "spec nonsense":
        blob["spec"] = {"nonsense": 1}
    else:
        blob["layers"] = 5
    torch.save(blob, path)
    with pytest.raises(UserError) as err:
        load_model(path, "tiny_cnn", 10)
    assert str(path) in one_line(err), f"{damage}: the error names the file: {err.value}"


# ---------------------------------------------------------------- file modes follow the umask


@pytest.fixture
def umask():
    """Set the process's umask for one test: ``umask(0o077)``; the previous one is restored after."""
    before = os.umask(0o022)
    yield os.umask
    os.umask(before)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_a_run_writes_follow_the_umask(tmp_path, umask, mask, mode, tiny_configs):
    from lrx.config.settings import load_config

    umask(mask)
    run = RunDir(tmp_path / "runs", "r")
    run.lock()
    run.write_metrics({"name": "r", "stages": {}})
    run.write_config(load_config(tiny_configs / "t01.yaml"))
    run.log("hello")
    run.save_model("train", build_model("tiny_cnn", 10), "tiny_cnn", 10)
    save_atomic({"epoch": 1}, run.checkpoint_path("train"))
    checkpoint.write_text_atomic("x", run.file("notes.txt"))
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in run.path.iterdir() if p.name != ".lock"}
    run.unlock()
    assert modes == {name: oct(mode) for name in
                     ("metrics.json", "config.yaml", "log.txt", "model.pt", "train.ckpt", "notes.txt")}, \
        f"umask {oct(mask)}: every file is {oct(mode)} as a plain open() makes it: {modes}"
    assert run.path.stat().st_mode & 0o777 == 0o777 & ~mask, "the run folder follows the umask too"
