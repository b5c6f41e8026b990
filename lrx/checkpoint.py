"""Atomic writes and safe loading of checkpoints and JSON files.

A file is written to a temporary name in the same folder, flushed to disk (``fsync``) and renamed
over the target with ``os.replace``, which is atomic on POSIX: a crash or a full disk leaves either the
old file or the new one, never half of one. Checkpoints are read with ``torch.load(weights_only=True)``
so a checkpoint cannot run code; they may hold tensors, numbers, strings, lists, tuples and dicts only.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError


def _write_atomic(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as err:
        reason = err.strerror or str(err)
        raise UserError(f"cannot write ({reason}); the previous file, if any, is kept", file=str(path)) from err
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


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


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`save_atomic` onto the CPU.

    Raises
    ------
    UserError
        naming ``path`` when it is missing, truncated, corrupted, holds objects other than tensors and
        plain containers, or is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("no such checkpoint file", file=str(path))
    try:
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
