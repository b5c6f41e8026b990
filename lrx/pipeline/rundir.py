"""``runs/<name>/``: the one module that knows a run directory's layout, its files and its lock.

Layout::

    config.yaml     the resolved config, with a header of lrx/torch versions
    metrics.json    results (see docs/design.md), written atomically
    log.txt         what the run said, one stamped line each
    .lock           held (flock) by the process working on the run; names it: pid, host, since when
    model.pt        the trained baseline (stage ``train``)
    expanded.pt     the expansion right after stage ``decompose``
    stageK.pt       the model after stage ``finetune.K``
    train.ckpt, stageK.ckpt   per-epoch checkpoints that an interrupted stage resumes from

and one file shared by the runs of a runs folder: ``latency-tables.json``, the per-layer times the latency
planner measured (:mod:`lrx.plan.latency`), keyed by machine, device and layer shape.

What a run needs to resume, to be skipped on a rerun and to be shown in the table, and what
``lrx clean`` removes as unneeded, is decided in one place: :meth:`RunDir.unneeded_files`.
It is long because the directory's whole contract lives here: layout, metrics, lock, model files, cleaning.

Every model file is ``{"model": state_dict, "arch", "num_classes", "spec", "layers"}``: ``spec`` is what
:func:`lrx.nn.surgery.build_expanded` needs to rebuild an expansion's structure (None for a plain model),
``layers`` the names of the replaced convs.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import time
import weakref
from pathlib import Path

import torch
import yaml
from torch import nn

from lrx import __version__

from lrx.base import distributed
from lrx.base.files import (NEW_FILE_MODE, TEMP_PREFIX, TEMP_SUFFIX, is_temp_file, load_checkpoint, load_json,
                            os_reason, read_text_limited, save_atomic, unlink_quietly, write_json_atomic,
                            write_text_atomic)
from lrx.config.settings import Config, size_text
from lrx.base.errors import UserError
from lrx.base.yamlread import show
from lrx.nn.surgery import build_expanded
from lrx.nn.models import build_model

__all__ = ["LOCK_PATIENCE_S", "MODEL_FILES", "LATENCY_TABLES", "LOCK_INFO_LIMIT", "STALE_TEMP_S", "MOVE_AWAY",
           "model_file", "sized_profile_file", "is_run_folder", "latency_cache_path", "checkpoint_file", "RunDir", "stage_of_file",
           "clean_runs", "finished_needs", "format_size", "metrics_problem", "save_model", "load_model", "REDO_MARK"]

# The advice for a model file that is not what it should be: it belongs to run {run}, which --force on
# another run (one that builds on it) never redoes.
_REBUILD = "lrx run <the config of run {run!r}> --force"
LOCK_PATIENCE_S = 0.5  # how long lock() waits for a lock held only for an instant (a probe) before refusing
CONFIG, METRICS, LOG, LOCK = "config.yaml", "metrics.json", "log.txt", ".lock"
MODEL_FILES = {"train": "model.pt", "decompose": "expanded.pt"}
LATENCY_TABLES = "latency-tables.json"
LOCK_INFO_LIMIT = 4096  # bytes of a lock file read for the "in use by" message
# A temporary file in a folder of runs (a write of metrics.json takes milliseconds) older than this is what a
# killed write left; `lrx clean` removes it.
STALE_TEMP_S = 3600

# The second name a file gets while a redo may replace it (``.expanded.pt.redo_old.tmp``): a temporary file's
# name, so that one a killed process left is removed the next time the run is locked.
REDO_MARK = "redo_old"

# What a damaged run file is told to do. metrics.json is moved away rather than retired by --force:
# the runner (and --force) read metrics.json before anything else, and a file lrx cannot parse holds
# no results to keep under "replaced"; moved away, the run starts afresh and the old file stays for a person.
MOVE_AWAY = "move it away (e.g. add .bad to its name) and run again"


def model_file(stage: str) -> str:
    """The file a model-changing stage (``train``, ``decompose``, ``finetune.K``) writes."""
    if stage.startswith("finetune."):
        return f"stage{stage.split('.')[1]}.pt"
    return MODEL_FILES[stage]


def sized_profile_file(input_size) -> str:
    """The name of a finished run's profile at another input size (:meth:`RunDir.sized_profile_path`)."""
    return f"profile-{size_text(input_size)}.json"


def is_run_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a run directory: a folder holding a run's metrics.json (whose other files, the
    model files among them, belong to the run: nothing else may write there)."""
    try:
        return (Path(folder) / METRICS).is_file()
    except OSError:
        return False


def latency_cache_path() -> Path:
    """The machine's cache of the latency planner's measured times (:mod:`lrx.plan.latency`), shared by every
    run of every runs folder: ``$LRX_CACHE_DIR/latency-tables.json``, by default in ``$XDG_CACHE_HOME/lrx``
    (``~/.cache/lrx``). It is not in a runs folder, so that a config planned again from an empty runs folder
    reuses the times it was planned on, and chooses the same plan."""
    folder = os.environ.get("LRX_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lrx"
    return Path(folder) / LATENCY_TABLES


def checkpoint_file(stage: str) -> str | None:
    """The per-epoch checkpoint a training stage resumes from (None for stages without epochs)."""
    if stage.startswith("finetune."):
        return f"stage{stage.split('.')[1]}.ckpt"
    return "train.ckpt" if stage == "train" else None


class RunDir:
    """One run directory: paths of its files, metrics, log, resolved config, model files and lock.

    Under torchrun every process runs the stages; rank 0 alone writes.
    """

    def __init__(self, runs_dir: str | Path, name: str):
        self.runs_dir = Path(runs_dir)
        self.name = name
        self.path = self.runs_dir / name
        self.metrics_path = self.path / METRICS
        self._lock_fd: int | None = None  # the open .lock file while this process holds its flock

    def file(self, name: str) -> Path:
        return self.path / name

    def log_path(self) -> Path:
        """The run's log.txt (what :meth:`log` appends to)."""
        return self.file(LOG)

    def config_path(self) -> Path:
        """The run's config.yaml (what :meth:`write_config` writes and :meth:`read_config` reads)."""
        return self.file(CONFIG)

    def model_path(self, stage: str) -> Path:
        return self.file(model_file(stage))

    def sized_profile_path(self, input_size) -> Path:
        """Where ``lrx profile CONFIG --input-size C,H,W`` writes its profile of the finished run at that size
        (``profile-3x224x224.json``), beside the run's own and never in place of it."""
        return self.file(sized_profile_file(input_size))

    def checkpoint_path(self, stage: str) -> Path | None:
        name = checkpoint_file(stage)
        return self.file(name) if name else None

    def final_model_path(self, metrics: dict | None = None) -> Path:
        """The run's final model: the model file of its last finished model-changing stage in metrics.json
        (``stageK.pt`` of the last fine-tune, else ``expanded.pt``, else ``model.pt``). What later runs build
        on, ``lrx.load_run`` returns and ``lrx export`` writes; no separate copy is kept. ``metrics``: the
        run's metrics.json content when the caller has read it already."""
        metrics = self.read_metrics() if metrics is None else metrics
        stages = [s for s in metrics.get("stages", {}) if s != "profile"]
        if not stages:
            raise UserError(f"run {self.name!r} in {self.runs_dir} has no finished model")
        return self.model_path(stages[-1])

    def read_config(self) -> dict:
        """The resolved config the run wrote (config.yaml) as plain data; ``{}`` when there is none.

        Read as metrics.json is (:func:`lrx.base.files.read_text_limited`: a regular file of at most 16 MiB,
        so a FIFO cannot hang it), with the safe loader it was written for, without anchors and aliases (lrx
        writes none; an alias bomb would make every walk over it take forever). :class:`UserError` naming
        the file otherwise."""
        path = self.config_path()
        try:
            data = yaml.load(read_text_limited(path), Loader=_ConfigLoader)
        except FileNotFoundError:
            return {}
        except UserError as err:
            raise UserError(f"{err.message}; {MOVE_AWAY}", file=err.file) from None
        except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: an integer too long to convert
            raise UserError(f"cannot read it ({type(err).__name__}); {MOVE_AWAY}", file=str(path)) from None
        return data if isinstance(data, dict) else {}

    # ------------------------------------------------------------ metrics, log, config

    def read_metrics(self) -> dict:
        """metrics.json's content, ``{}`` when there is none.

        Raises :class:`UserError` naming the file, on one line, when it cannot be read or is not what
        lrx writes (an object whose ``stages`` maps stage names to records with a ``hash``, ...);
        the advice is to move it away (see ``MOVE_AWAY``), which the runner then treats as a new run.
        """
        path = self.metrics_path
        for folder in (self.runs_dir, self.path):
            if _is_file(folder):
                raise UserError(f"{folder} is a file, not a folder; {MOVE_AWAY}")
        try:
            metrics = load_json(path)
        except FileNotFoundError:
            return {}
        except UserError as err:
            raise UserError(f"{err.message}; {MOVE_AWAY}", file=err.file) from None
        problem = metrics_problem(metrics)
        if problem:
            raise UserError(f"damaged: {problem}; {MOVE_AWAY}", file=str(path))
        return metrics

    def write_metrics(self, metrics: dict) -> None:
        if distributed.is_main():
            write_json_atomic(metrics, self.metrics_path)

    def log(self, message: str) -> None:
        if not distributed.is_main():
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        path = self.file(LOG)
        # Appended in place, so never through a symlink (it would write into the file it points to, outside the
        # run) nor into a FIFO or device (O_NONBLOCK: a FIFO without a reader must not hang the run).
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, NEW_FILE_MODE)
        except OSError as err:
            why = "it is a symlink, and the run's log is a file of its own" if os.path.islink(path) else os_reason(err)
            raise UserError(f"cannot write ({why}); remove it and run again", file=str(path)) from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise UserError(f"cannot write: {_file_kind(mode)}; remove it and run again", file=str(path))
            os.write(fd, f"{stamp} {message}\n".encode("utf-8", "replace"))
        except OSError as err:
            raise UserError(f"cannot write ({os_reason(err)})", file=str(path)) from None
        finally:
            os.close(fd)

    def write_config(self, cfg: Config) -> None:
        if not distributed.is_main():
            return
        header = (f"# resolved config of run {cfg.name} from {cfg.path}\n"
                  f"# lrx {__version__}, torch {torch.__version__}\n")
        write_text_atomic(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False), self.file(CONFIG))

    # ------------------------------------------------------------ model files

    def has_model(self, stage: str, log=None) -> bool:
        """Whether ``stage``'s model file is there and loads: what makes a finished stage done (with its hash).

        The file is read as :func:`load_model` reads it (``weights_only``, a ``model`` entry that is a state
        dict of tensors); a truncated, corrupted or foreign file is not a finished stage's result: it is
        logged (``log``, default the run's log) naming the file and why, and the stage counts as not done,
        so that it is redone and the file replaced.
        """
        path = self.model_path(stage)
        if not os.path.lexists(path):
            return False
        try:
            blob = load_checkpoint(path)
            state = blob.get("model")
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise UserError("not an lrx model file: its 'model' entry is missing or not a state dict of tensors",
                                file=str(path))
        except UserError as err:
            why = err.message.removesuffix("; delete it to start over")
            (log or self.log)(f"{path} does not load ({why}); redoing stage {stage}")
            return False
        return True

    def save_model(self, stage: str, model: nn.Module, arch: str, num_classes: int, spec=None, layers=None) -> Path:
        """Write the model file of ``stage``; rank 0 writes, every process waits until it is there."""
        path = self.model_path(stage)
        save_model(path, model, arch, num_classes, spec, layers)
        return path

    # ------------------------------------------------------------ a redo that may fail

    def keep_for_redo(self, stages) -> list[tuple[Path, Path]]:
        """Give config.yaml and the model files of ``stages`` a second name (a hard link, else a copy) before a
        redo replaces them, so that a redo that fails can put the finished result back (:meth:`put_back`).
        Returns ``(file, its second name)`` for each file there; rank 0 alone keeps them."""
        if not distributed.is_main():
            return []
        kept = []
        for path in [self.file(CONFIG)] + [self.model_path(s) for s in stages if s != "profile"]:
            second = path.with_name(f"{TEMP_PREFIX}{path.name}.{REDO_MARK}{TEMP_SUFFIX}")
            unlink_quietly(second)
            try:
                try:
                    os.link(path, second)
                except FileNotFoundError:
                    continue
                except OSError:  # a file system without hard links
                    shutil.copy2(path, second)
            except OSError as err:
                self.drop_kept(kept)
                raise UserError(f"cannot keep it while the run is redone ({os_reason(err)})", file=str(path)) from None
            kept.append((path, second))
        return kept

    def put_back(self, kept: list[tuple[Path, Path]]) -> None:
        """Put the files :meth:`keep_for_redo` kept back under their names (a rename each)."""
        for path, second in kept:
            os.replace(second, path)

    @staticmethod
    def drop_kept(kept: list[tuple[Path, Path]]) -> None:
        """Remove the second names :meth:`keep_for_redo` made (the redo finished, or stopped to be resumed)."""
        for _, second in kept:
            unlink_quietly(second)

    # ------------------------------------------------------------ lock

    # The lock is the kernel's: an exclusive flock on the open .lock file, held until unlock() or until
    # the process ends in any way (the kernel drops it with the last file descriptor), so a dead
    # process's lock needs no guessing and two processes can never both hold it. What the file says
    # (pid, host, start) only feeds the "in use by" message; a file with garbage in it is simply taken.
    #
    # unlock() removes the file while still holding the flock. That alone could let two hold it: B opens
    # the file, A unlinks it and lets go, B gets the flock on the removed inode while C creates a new
    # file and locks that. So lock() checks, with the flock held, that the path still names the inode it
    # locked, and starts over if not. The holder of the inode at the path is then unique: the file at the
    # path is only ever removed by a process holding its flock, so while one holds it no other file can
    # appear there. Removing the file also means that a forked child still holding the inherited
    # descriptor (a DataLoader worker) cannot block the next run. A forked child does not keep it at all:
    # os.register_at_fork closes every held lock descriptor in the child (:func:`_drop_locks_in_child`),
    # so a worker that outlives its parent (SIGKILLed: nothing unlinked the file) cannot hold the flock of
    # a dead process. (Over NFS, Linux maps flock onto NFS byte-range locks, which cover every client.)
    # Taking the lock twice through one RunDir is a no-op.
    #
    # The lock file is opened without truncating it (O_RDWR | O_CREAT, never following a symlink) and is
    # written only once its flock is held and it is known to be a regular file with exactly one link: a
    # .lock that is a hard link to metrics.json, or a FIFO or device, is refused naming it, never written.

    def lock(self) -> None:
        """Take this run's lock, or raise :class:`UserError` naming the process that holds it.

        Rank 0 alone locks under torchrun. Taking the lock also removes the temporary files that a
        write killed half-way left in the run folder (:meth:`remove_orphan_temp_files`).
        """
        if not distributed.is_main() or self._lock_fd is not None:
            return
        taken_at = time.time()
        self._make_folder()
        path = self.file(LOCK)
        busy_since = None
        for _ in range(100):  # each retry means a holder let go between our open and our flock
            fd = self._open_lock(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy_since = busy_since or time.monotonic()
                if time.monotonic() - busy_since < LOCK_PATIENCE_S:  # e.g. `lrx table` probing it: wait a moment
                    os.close(fd)
                    time.sleep(0.02)
                    continue
                owner = _lock_owner(fd)
                os.close(fd)
                raise UserError(f"run {self.path} is in use by {owner} (lock file {path}); "
                                "wait for it to finish or stop it") from None
            except OSError as err:  # e.g. ENOLCK: a file system without locks
                os.close(fd)
                raise UserError(f"cannot lock it ({os_reason(err)})", file=str(path)) from None
            if _names(path, fd):
                problem = _lock_file_problem(fd)
                if problem is not None:
                    os.close(fd)
                    raise UserError(f"cannot use it as the run's lock file: {problem}; remove it and run again",
                                    file=str(path))
                break
            os.close(fd)
        else:
            raise UserError("cannot lock it: it keeps being replaced by other processes", file=str(path))
        try:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "lrx": __version__}
            os.ftruncate(fd, 0)
            data = json.dumps(info).encode()
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as err:  # a full disk: leave no lock file behind (we hold its flock, so removing is safe)
            unlink_quietly(path)
            os.close(fd)
            raise UserError(f"cannot take the lock ({os_reason(err)})", file=str(path)) from None
        self._lock_fd = fd
        _HOLDERS.add(self)
        self.remove_orphan_temp_files(older_than=taken_at)

    def in_use(self) -> bool:
        """Whether a process holds this run's lock now (a run marked "running" whose holder is gone was
        interrupted). Probes with a shared flock for an instant; :meth:`lock` waits that long."""
        try:  # O_NONBLOCK: a FIFO planted as .lock must not hang the probe
            fd = os.open(self.file(LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)  # closing drops the probe's flock
        return False

    def unlock(self) -> None:
        """Let go of the lock this RunDir holds (nothing to do if it holds none)."""
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        _HOLDERS.discard(self)
        path = self.file(LOCK)
        try:
            if _names(path, fd):
                unlink_quietly(path)  # while holding the flock: see the comment above lock()
        finally:
            os.close(fd)

    def remove_orphan_temp_files(self, older_than: float | None = None) -> list[Path]:
        """Remove the temporary files of atomic writes (``.<file>.XXXXXXXX.tmp``) last changed before
        ``older_than`` (seconds since the epoch; now when None): a write killed half-way leaves one.

        Call it only while holding the lock, so that no write of this run can be under way.
        Returns the files removed.
        """
        cutoff = time.time() if older_than is None else older_than
        removed = [path for path, _ in _temp_files(self.path, cutoff, remove=True)]
        if removed:
            self.log(f"removed {len(removed)} temporary file(s) an interrupted write left: "
                     + ", ".join(p.name for p in removed))
        return removed

    # ------------------------------------------------------------ what is kept, what `lrx clean` removes

    def unneeded_files(self, metrics: dict, keep_final: bool = False) -> list[tuple[Path, str]]:
        """The files of this run that nothing reads again, each with why, given its ``metrics``.

        With ``keep_final``, a finished run (status ``done``, its final model file there) also drops the
        model files of its earlier stages (``expanded.pt`` and ``stageK.pt`` before the final model): the
        table, ``lrx export``, the runs built on it and a rerun's skip read only the final model, and a rerun
        that has to start from an earlier stage's model makes that stage again (the runner says so).

        Needed, so kept: metrics.json, config.yaml (the table reads both), log.txt, the lock, the model
        file of every stage metrics.json records (a rerun skips a stage only while its file is there; the
        next stage, a redone later stage and the runs that build on this one read them), the checkpoint
        of the stage an unfinished run was in (``running``: the one checkpoint a rerun resumes from), and
        every file lrx does not write. Not needed: the other per-epoch checkpoints (the runner resumes
        only the running stage's and deletes any other before a stage starts), model files of stages
        metrics.json does not record (left by an interruption or a changed setting: the stage is redone
        before anything reads its file) and the temporary files of killed writes.
        """
        stages = metrics.get("stages")
        if not isinstance(stages, dict):
            return []  # not a run lrx wrote: nothing is known to be unneeded
        running = metrics.get("running") if metrics.get("status") != "done" else None
        resumable = set(running) if isinstance(running, dict) else set()
        final = self.final_model_file(metrics) if keep_final else None
        out = []
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except OSError:
            return out
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            if is_temp_file(entry.name):
                out.append((Path(entry.path), "temporary file of a write that was killed"))
                continue
            known = stage_of_file(entry.name)
            if known is None:
                continue
            stage, kind = known
            if kind == "checkpoint" and stage not in resumable:
                why = "which finished" if stage in stages else "which no rerun resumes from"
                out.append((Path(entry.path), f"per-epoch checkpoint of stage {stage}, {why}"))
            elif kind == "model" and stage not in stages:
                out.append((Path(entry.path), f"model of stage {stage}, which metrics.json does not record "
                                              "(a rerun redoes the stage before reading it)"))
            elif kind == "model" and final is not None and entry.name != final:
                out.append((Path(entry.path), f"model of stage {stage}, before the final model {final} "
                                              "(--keep-final; a rerun that needs it makes the stage again)"))
        return out

    def final_model_file(self, metrics: dict) -> str | None:
        """The name of a finished run's final model file when it is there, else None (a run not finished, or
        one whose final model is missing, keeps its earlier model files)."""
        if metrics.get("status") != "done":
            return None
        try:
            path = self.final_model_path(metrics)
        except UserError:
            return None
        return path.name if path.is_file() else None

    def kept_when_finished(self, metrics: dict) -> int | None:
        """Bytes a finished run needs to stay as it is in the table and skipped by a rerun: its final model,
        metrics.json, config.yaml and log.txt (None when the run is not finished)."""
        final = self.final_model_file(metrics)
        if final is None:
            return None
        return sum(size for _, size, _ in _sized((self.file(name), "") for name in (final, METRICS, CONFIG, LOG)))

    def clean(self, dry_run: bool = False, keep_final: bool = False) -> list[tuple[Path, int, str]]:
        """Remove :meth:`unneeded_files` under the run's lock; ``(path, bytes, why)`` of each file removed
        (with ``dry_run``: that would be; nothing is written, not even the lock). ``keep_final``: see
        :meth:`unneeded_files`.

        Raises :class:`UserError` when the run is in use (another process holds its lock) or its
        metrics.json is missing or damaged; the run is then left as it is.
        """
        if not self.metrics_path.is_file():
            raise UserError("not a run: no metrics.json, so nothing is known to be unneeded", file=str(self.path))
        if dry_run:
            if self.in_use():
                raise UserError(f"run {self.path} is in use by another process (lock file {self.file(LOCK)})")
            return _sized(self.unneeded_files(self.read_metrics(), keep_final))
        temp = _sized((p, "temporary file of a write that was killed") for p in self.path.iterdir()
                      if is_temp_file(p.name))
        self.lock()  # removes the temporary files of killed writes itself
        try:
            found = [t for t in temp if not t[0].exists()]
            found += _sized(self.unneeded_files(self.read_metrics(), keep_final))
            for path, _, _ in found:
                try:
                    path.unlink(missing_ok=True)
                except OSError as err:
                    raise UserError(f"cannot remove it ({os_reason(err)})", file=str(path)) from None
            if found:
                self.log(f"lrx clean removed {len(found)} file(s), {format_size(sum(s for _, s, _ in found))}: "
                         + ", ".join(p.name for p, _, _ in found))
            return found
        finally:
            self.unlock()

    def _make_folder(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the run folder ({_folder_trouble(err, self.runs_dir, self.path)})",
                            file=str(self.path)) from None

    def _open_lock(self, path: Path) -> int:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            info = None
        except OSError as err:
            raise UserError(f"cannot open the lock file ({os_reason(err)})", file=str(path)) from None
        if info is not None and not stat.S_ISREG(info.st_mode) and not stat.S_ISLNK(info.st_mode):
            raise UserError(f"cannot use it as the run's lock file: {_file_kind(info.st_mode)}; remove it and run "
                            "again", file=str(path))  # not even opened: opening a device can do things
        try:  # O_NOFOLLOW: a symlink planted as .lock is refused, not followed; no O_TRUNC: see lock()
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            raise UserError(f"cannot open the lock file ({os_reason(err)})", file=str(path)) from None


class _ConfigLoader(yaml.SafeLoader):
    """The safe loader config.yaml is written for (``yaml.safe_dump``), refusing anchors and aliases."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("an alias (*name), which lrx never writes")
        return super().compose_node(parent, index)


# The RunDirs of this process that hold their lock; a forked child closes their descriptors.
_HOLDERS: "weakref.WeakSet[RunDir]" = weakref.WeakSet()


def _drop_locks_in_child() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors, so that the flock
    stays with the parent alone and ends with it. Closing the child's copy does not drop the parent's
    flock (that lives until the last descriptor of the open file is closed); the child's RunDirs then
    hold no lock, and their unlock() does nothing."""
    for run in list(_HOLDERS):
        fd, run._lock_fd = run._lock_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _HOLDERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return "it is " + next((name for test, name in kinds if test(mode)), "not a regular file") + ", not a regular file"


def _lock_file_problem(fd: int) -> str | None:
    """Why the open file ``fd`` cannot be the lock file (writing the holder into it would clobber another
    file), or None: it must be a regular file with exactly one link."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return _file_kind(info.st_mode)
    if info.st_nlink != 1:
        return (f"it has {info.st_nlink} hard links, so it is another file too (metrics.json?), which writing "
                "the lock's holder into it would overwrite")
    return None


# A fine-tune stage's index as stage names and file names hold it: finetune.K, stageK.pt, stageK.ckpt.
_INDEX = r"(0|[1-9][0-9]{0,5})"
# The stage names lrx writes into metrics.json (lrx.pipeline.stages.stage_names).
_STAGE_NAME = re.compile(rf"train|decompose|profile|finetune\.{_INDEX}")


def stage_of_file(name: str) -> tuple[str, str] | None:
    """``(stage, "model" | "checkpoint")`` of a file name :func:`model_file` or :func:`checkpoint_file`
    gives (``stage1.ckpt`` -> ``("finetune.1", "checkpoint")``), None for any other name."""
    match = re.fullmatch(rf"stage{_INDEX}\.(pt|ckpt)", name)
    stage = f"finetune.{match[1]}" if match else {"model.pt": "train", "expanded.pt": "decompose",
                                                  "train.ckpt": "train"}.get(name)
    if stage is None:
        return None
    return (stage, "model") if name == model_file(stage) else (stage, "checkpoint")


def clean_runs(runs_dir: str | Path, dry_run: bool = False,
               keep_final: bool = False) -> tuple[list[tuple[Path, int, str]], list[str]]:
    """:meth:`RunDir.clean` on every run under ``runs_dir`` (or on ``runs_dir`` itself when it is a run);
    ``keep_final``: see :meth:`RunDir.unneeded_files`.

    Returns ``(removed, not_touched)``: ``(path, bytes, why)`` of each file removed (with ``dry_run``:
    that would be) and one line per run left as it is, with the reason (in use, damaged metrics.json).
    A folder without metrics.json is not a run and is passed over. In a folder of runs, the temporary
    files of killed writes in the folder itself (of ``latency-tables.json``, which no run's lock covers)
    are removed too once they are older than :data:`STALE_TEMP_S`. Raises :class:`UserError` when
    ``runs_dir`` is not a folder.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise UserError(f"{str(root)!r} is not a folder of runs (e.g. runs/)")
    try:
        folders = [root] if (root / METRICS).is_file() else sorted(
            p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / METRICS).is_file())
    except OSError as err:
        raise UserError(f"cannot list {root} ({os_reason(err)})") from None
    removed, not_touched = [], []
    for folder in folders:
        try:
            removed += RunDir(folder.parent, folder.name).clean(dry_run, keep_final)
        except UserError as err:
            not_touched.append(f"{folder.name}: not touched: {err}")
    if folders != [root]:
        removed += _stale_temp_files(root, dry_run)
    return removed, not_touched


def finished_needs(runs_dir: str | Path) -> tuple[int, int]:
    """(finished runs under ``runs_dir``, the bytes they need to stay as they are: :meth:`RunDir.kept_when_finished`)."""
    root = Path(runs_dir)
    try:
        folders = [root] if (root / METRICS).is_file() else sorted(
            p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / METRICS).is_file())
    except OSError:
        return 0, 0
    count = total = 0
    for folder in folders:
        run = RunDir(folder.parent, folder.name)
        try:
            size = run.kept_when_finished(run.read_metrics())
        except UserError:
            continue
        if size is not None:
            count, total = count + 1, total + size
    return count, total


def _stale_temp_files(folder: Path, dry_run: bool) -> list[tuple[Path, int, str]]:
    """Remove (unless ``dry_run``) the temporary files of atomic writes in ``folder`` last changed more
    than :data:`STALE_TEMP_S` ago; ``(path, bytes, why)`` of each."""
    return [(path, size, "temporary file of a write that was killed")
            for path, size in _temp_files(folder, time.time() - STALE_TEMP_S, remove=not dry_run)]


def _temp_files(folder: str | Path, cutoff: float, remove: bool) -> list[tuple[Path, int]]:
    """``(path, bytes)`` of the temporary files of atomic writes (``.<file>.XXXXXXXX.tmp``) in ``folder`` last
    changed before ``cutoff`` (seconds since the epoch), each removed first when ``remove``."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return found
    for entry in entries:
        if not is_temp_file(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or info.st_mtime >= cutoff:
                continue  # not ours, or maybe a write under way
            if remove:
                os.unlink(entry.path)
        except OSError:
            continue  # gone already, or not ours to remove: harmless
        found.append((Path(entry.path), info.st_size))
    return found


def format_size(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``: sizes in binary units, as ``du -h`` shows them."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _sized(found) -> list[tuple[Path, int, str]]:
    """``(path, bytes, why)`` for each ``(path, why)`` still there."""
    out = []
    for path, why in found:
        try:
            out.append((path, path.stat(follow_symlinks=False).st_size, why))
        except OSError:
            continue  # gone meanwhile: nothing to remove
    return out


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is (still) the file open as ``fd``."""
    try:
        on_disk, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _lock_owner(fd: int) -> str:
    """ "process 1234 on host X since ..." from a lock file; any content that is not lrx's reads as unknown."""
    try:
        info = json.loads(os.pread(fd, LOCK_INFO_LIMIT, 0).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: not UTF-8 or not JSON
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) or isinstance(info.get("pid"), bool):
        return "another process (its lock file does not say which)"
    text = f"process {info['pid']}"
    for key, word in (("host", "on host"), ("since", "since")):
        value = info.get(key)
        if isinstance(value, str) and value.isprintable() and len(value) <= 100:
            text += f" {word} {value}"
    return text


def _is_file(path: Path) -> bool:
    """Whether ``path`` exists and is something other than a folder (False when it cannot be told)."""
    try:
        return path.exists() and not path.is_dir()
    except OSError:
        return False


def _folder_trouble(err: OSError, *folders: Path) -> str:
    """The OS's reason, and which of ``folders`` is in the way when one is a file or a dangling symlink."""
    reason = os_reason(err)
    for folder in folders:
        try:
            if folder.is_symlink() and not folder.exists():
                return f"{reason}: {folder} is a symlink to {os.readlink(folder)}, which does not exist"
            if folder.exists() and not folder.is_dir():
                return f"{reason}: {folder} is a file, not a folder"
        except OSError:
            break  # e.g. a name too long to look at: the OS's reason says it
    return reason


def metrics_problem(metrics) -> str | None:
    """What makes ``metrics`` (parsed metrics.json) unlike what lrx writes, or None.

    Checked are the keys the runner reads: ``stages`` (a stage name lrx writes -> record with a string
    ``hash``), ``running``, ``replaced``, ``status``, ``decompose`` and ``finetune``. A stage's name gives its
    model file's name (:func:`model_file`), so one lrx never writes is refused here, not met later.
    """
    if not isinstance(metrics, dict):
        return f"it holds {_json_type(metrics)}, not an object"
    stages = metrics.get("stages", {})
    if not isinstance(stages, dict):
        return f"'stages' is {_json_type(stages)}, not an object"
    for name, record in stages.items():
        if not _STAGE_NAME.fullmatch(name):
            return f"stage {show(name)} is not one lrx writes (train, decompose, finetune.K, profile)"
        if not isinstance(record, dict) or not isinstance(record.get("hash"), str):
            return f"stage {name!r} is not a record with a hash"
    for key, kind, types in (("running", "an object", dict), ("replaced", "a list", list),
                             ("status", "a string", str), ("decompose", "an object or null", (dict, type(None))),
                             ("finetune", "a list", list)):
        if key in metrics and not isinstance(metrics[key], types):
            return f"'{key}' is {_json_type(metrics[key])}, not {kind}"
    return None


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- model files anywhere


def save_model(path: Path, model: nn.Module, arch: str, num_classes: int, spec=None, layers=None) -> None:
    """Write a model file (see the module doc); rank 0 writes, every process waits until it is there."""
    if distributed.is_main():
        save_atomic({"model": model.state_dict(), "arch": arch, "num_classes": num_classes,
                     "spec": spec, "layers": layers or []}, path)
    distributed.barrier()


def load_model(path: Path, arch: str, num_classes: int) -> tuple[nn.Module, list[str], dict | None]:
    """Rebuild a saved model (expanded or not) and load its weights.

    Returns (model, replaced layer names, spec), the spec being what :func:`lrx.nn.surgery.build_expanded` took.
    """
    blob = load_checkpoint(path)
    state, spec, layers = blob.get("model"), blob.get("spec"), blob.get("layers")
    rebuild = f"rebuild it: {_REBUILD.format(run=Path(path).parent.name)}"
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError("not an lrx model file: its 'model' entry is missing or not a state dict of tensors; "
                        + rebuild, file=str(path))
    if not (spec is None or isinstance(spec, dict)) or not (layers is None or isinstance(layers, list)):
        raise UserError("not an lrx model file: its 'spec' or 'layers' entry has the wrong type; "
                        + rebuild, file=str(path))
    if blob.get("arch") != arch or blob.get("num_classes") != num_classes:
        raise UserError(f"{path} holds a {blob.get('arch')} with {blob.get('num_classes')} classes, "
                        f"but the config asks for {arch} with {num_classes}; {rebuild}")
    model = build_model(arch, num_classes)
    if spec:
        try:
            model = build_expanded(model, spec)
        except UserError as err:
            raise UserError(f"its expansion cannot be rebuilt: {err}; {rebuild}",
                            file=str(path)) from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise UserError(f"its expansion cannot be rebuilt ({type(err).__name__}: {err}); {rebuild}",
                            file=str(path)) from None
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise UserError(f"{path}: {key} has shape {tuple(value.shape)} but the model expects {tuple(own[key].shape)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path} does not fit the model: {str(err).splitlines()[0]}") from None
    return model, layers or [], spec
