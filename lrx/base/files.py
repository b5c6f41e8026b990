"""Atomic writes and safe loading of checkpoints and JSON files.

A file is written to a temporary name in the same folder, flushed to disk (``fsync``) and renamed
over the target with ``os.replace``, which is atomic on POSIX: a crash or a full disk leaves either the
old file or the new one, never half of one. Checkpoints are read with ``torch.load(weights_only=True)``
so a checkpoint cannot run code; they may hold tensors, numbers, strings, lists, tuples and dicts only.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from lrx.base.errors import UserError

__all__ = ["is_temp_file", "NEW_FILE_MODE", "current_umask", "unlink_quietly", "os_reason", "not_a_file",
           "write_atomic", "write_named_atomic", "save_atomic", "write_text_atomic", "write_json_atomic", "READ_LIMIT",
           "read_text_limited", "load_json", "load_checkpoint"]


# A write goes to ``.<target>.<8 random characters>.tmp`` next to the target (tempfile.mkstemp's
# naming); :func:`is_temp_file` recognises the name, so a run directory can remove what a kill left.
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp")


def is_temp_file(name: str) -> bool:
    """Whether ``name`` is a temporary file an atomic write makes (and a killed one leaves behind)."""
    return _TEMP_NAME.fullmatch(name) is not None


class _ErrorRecorder:
    """A file wrapper that remembers the first OSError its ``write`` raised.

    ``torch.save`` on a file object reports a failed write as ``RuntimeError: ... unexpected pos``;
    the OS's own reason (e.g. "No space left on device") is kept here to be reported instead.
    """

    def __init__(self, file: io.BufferedWriter):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.file.flush()


def _write_atomic(path: str | os.PathLike, write: Callable[[Any], None], by_name: bool = False) -> None:
    path = Path(path)
    tmp = None
    recorder = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, NEW_FILE_MODE & ~current_umask())  # mkstemp makes 0600; a file lrx writes follows the umask
            if not by_name:
                recorder = _ErrorRecorder(f)
                write(recorder)
                f.flush()
                os.fsync(f.fileno())
        if by_name:  # the writer opens the file itself (and may replace it): flush what it wrote by name
            write(Path(tmp))
            flushed = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(flushed)
            finally:
                os.close(flushed)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as err:
        raise UserError(f"cannot write ({os_reason(err)}); the previous file, if any, is kept", file=str(path)) from err
    except RuntimeError as err:  # torch.save's report of a failed write; find the OS's reason
        interrupted = _in_chain(err, KeyboardInterrupt)
        if interrupted is not None:  # Ctrl-C or SIGTERM mid-write, masked by torch's "unexpected pos" on closing
            raise interrupted from None
        cause = _os_cause(err, recorder, path.parent)
        if cause is None:
            raise
        raise UserError(f"cannot write ({os_reason(cause)}); the previous file, if any, is kept",
                        file=str(path)) from cause
    finally:
        if tmp is not None:
            unlink_quietly(tmp)


NEW_FILE_MODE = 0o666  # what open() asks for a new file; the umask then takes away bits, as for any program's


def current_umask() -> int:
    """The process's umask (e.g. 0o022), read from /proc where it is there: setting it to read it back
    (``os.umask``) would leave another thread creating a file in between with the wrong mode."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def unlink_quietly(path) -> None:
    """Remove ``path`` if it is there; a failure to remove is not worth a second error."""
    try:
        os.unlink(path)
    except OSError:
        pass


def os_reason(err: OSError) -> str:
    """The OS's words for ``err`` (e.g. "No space left on device"), for one-line messages."""
    return err.strerror or str(err) or type(err).__name__


def _in_chain(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` that ``err`` was raised from or while handling, if any."""
    seen: BaseException | None = err
    for _ in range(10):  # a chain is short; the bound guards against a cycle
        seen = (seen.__cause__ or seen.__context__) if seen is not None else None
        if isinstance(seen, kind):
            return seen
    return None


def _os_cause(err: BaseException, recorder: _ErrorRecorder | None, folder: Path) -> OSError | None:
    """The OSError behind ``err``: the one a write raised, one in its exception chain, or a full disk.

    None when the failure was not the file system's (a programming error, to be raised as it is).
    """
    if recorder is not None and recorder.error is not None:
        return recorder.error
    cause = _in_chain(err, OSError)
    if cause is not None:
        return cause
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs on this platform
        return None
    if stats.f_bavail == 0:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; not every platform lets a folder be opened, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write ``path`` atomically with ``write(f)``, ``f`` a binary file object (``write``, ``flush``) on a
    temporary file beside ``path`` that is renamed over it once ``write`` returned and the data is on disk.

    Raises
    ------
    UserError
        naming ``path`` and the OS's reason when the write fails (an OSError, or a RuntimeError of
        ``torch.save``-like writers caused by one); the temporary file is removed and an existing ``path``
        is left as it was. Any other exception of ``write`` is raised as it is, the temporary file removed.
    """
    _write_atomic(path, write)


def write_named_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """As :func:`write_atomic`, for writers that take a file name (ONNX's ``save``): ``write(tmp)`` writes
    the temporary file ``tmp`` beside ``path`` by name, which is then renamed over ``path``."""
    _write_atomic(path, write, by_name=True)


def not_a_file(path: str | os.PathLike) -> str | None:
    """What is at ``path`` when it is not a regular file (following symlinks): ``"no such file"``, ``"a
    directory"``, ``"not a regular file (a character device)"``, ``"unreadable (<the OS's reason>)"``;
    None for a regular file. For messages that say what a path is instead of calling a folder or a device
    missing."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as err:
        return f"unreadable ({os_reason(err)})"
    except ValueError:  # a NUL byte in the name
        return "unreadable (its name holds a NUL byte)"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"))
    return "not a regular file (" + next((name for test, name in kinds if test(mode)), "a special file") + ")"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically.

    Raises
    ------
    UserError
        naming ``path`` and the OS error (e.g. "No space left on device") when the write fails;
        the temporary file is removed and an existing ``path`` is left as it was.
    """
    _write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`save_atomic` does."""
    data = text.encode("utf-8")
    _write_atomic(path, lambda f: f.write(data))


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON (UTF-8, trailing newline) to ``path`` atomically.

    Non-finite floats are written as ``NaN``/``Infinity`` as Python's json does; objects JSON cannot
    encode raise ``TypeError`` before anything is written.
    """
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


# The most a JSON or YAML file of lrx's may hold; a larger one is refused without being read.
READ_LIMIT = 16 * 2**20  # bytes


def read_text_limited(path: str | os.PathLike, limit: int = READ_LIMIT) -> str:
    """The UTF-8 text of the regular file ``path``, refused when it is larger than ``limit`` bytes.

    Raises
    ------
    FileNotFoundError
        when ``path`` does not exist (callers decide what a missing file means).
    UserError
        naming ``path`` when it cannot be read, is not a regular file (a folder, a FIFO), is too
        large or is not UTF-8.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # non-blocking: a FIFO must not hang
    except FileNotFoundError:
        raise
    except OSError as err:
        raise UserError(f"cannot read it ({os_reason(err)})", file=str(path)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError("cannot read it: not a regular file", file=str(path))
        if info.st_size > limit:
            raise UserError(f"cannot read it: {info.st_size} bytes, more than the {limit} an lrx file may hold",
                            file=str(path))
        chunks, size = [], 0
        while size <= limit:  # the size on disk may change while it is read
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as err:
        raise UserError(f"cannot read it ({os_reason(err)})", file=str(path)) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UserError(f"cannot read it: more than the {limit} bytes an lrx file may hold", file=str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"cannot read it: not UTF-8 text (byte {err.start})", file=str(path)) from None


def load_json(path: str | os.PathLike, limit: int = READ_LIMIT) -> Any:
    """The JSON value in ``path`` (any type: callers check the shape they need).

    Raises ``FileNotFoundError`` when ``path`` is missing, else :class:`UserError` naming ``path`` for
    anything :func:`read_text_limited` refuses, invalid JSON, and nesting too deep to parse.
    """
    text = read_text_limited(path, limit)
    try:
        return json.loads(text)
    except ValueError as err:  # JSONDecodeError, or an integer too long to convert
        raise UserError(f"not valid JSON ({_first_sentence(err)})", file=str(path)) from None
    except RecursionError:
        raise UserError("not valid JSON: nested too deeply to read", file=str(path)) from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`save_atomic` onto the CPU.

    Raises
    ------
    UserError
        naming ``path`` when it is missing, truncated, corrupted, holds objects other than tensors and
        plain containers, or is not a mapping.
    """
    path = Path(path)
    problem = not_a_file(path)
    if problem is not None:
        said = "no such checkpoint file" if problem == "no such file" else f"cannot load checkpoint: it is {problem}"
        raise UserError(said, file=str(path))
    try:
        with warnings.catch_warnings():  # torch warns about a raw pickle's protocol before refusing it: one line is ours
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError("cannot load checkpoint: it is corrupted or holds objects other than tensors and plain "
                        f"containers ({_first_sentence(err)}); delete it to start over", file=str(path)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError) as err:
        raise UserError(f"cannot load checkpoint: the file is truncated or corrupted ({_first_sentence(err)}); "
                        "delete it to start over", file=str(path)) from None
    if not isinstance(obj, dict):
        raise UserError(f"not an lrx checkpoint: expected a mapping, found {type(obj).__name__}", file=str(path))
    return obj


def _first_sentence(err: BaseException, limit: int = 100) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
