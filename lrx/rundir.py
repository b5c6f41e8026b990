"""``runs/<name>/``: the one module that knows a run directory's layout, its files and its lock.

Layout::

    config.yaml     the resolved config, with a header of lrx/torch versions
    metrics.json    results (see docs/design.md), written atomically
    log.txt         what the run said, one stamped line each
    .lock           the PID of the process working on the run
    model.pt        the trained baseline (stage ``train``)
    expanded.pt     the expansion right after stage ``decompose``
    stageK.pt       the model after stage ``finetune.K``
    train.ckpt, stageK.ckpt   per-epoch checkpoints that an interrupted stage resumes from

Every model file is ``{"model": state_dict, "arch", "num_classes", "spec", "layers"}``: ``spec`` is what
:func:`lrx.lowrank.build_expanded` needs to rebuild an expansion's structure (None for a plain model),
``layers`` the names of the replaced convs.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from . import __version__, distributed
from .checkpoint import load_checkpoint, save_atomic, write_json_atomic, write_text_atomic
from .config import Config
from .errors import UserError
from .lowrank import build_expanded
from .models import build_model

CONFIG, METRICS, LOG, LOCK = "config.yaml", "metrics.json", "log.txt", ".lock"
MODEL_FILES = {"train": "model.pt", "decompose": "expanded.pt"}


def model_file(stage: str) -> str:
    """The file a model-changing stage (``train``, ``decompose``, ``finetune.K``) writes."""
    if stage.startswith("finetune."):
        return f"stage{stage.split('.')[1]}.pt"
    return MODEL_FILES[stage]


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

    def file(self, name: str) -> Path:
        return self.path / name

    def model_path(self, stage: str) -> Path:
        return self.file(model_file(stage))

    def checkpoint_path(self, stage: str) -> Path | None:
        name = checkpoint_file(stage)
        return self.file(name) if name else None

    def final_model_path(self) -> Path:
        """The last model file this run wrote (its last model-changing stage in metrics.json)."""
        stages = [s for s in self.read_metrics().get("stages", {}) if s != "profile"]
        if not stages:
            raise UserError(f"run {self.name!r} in {self.runs_dir} has no finished model")
        return self.model_path(stages[-1])

    # ------------------------------------------------------------ metrics, log, config

    def read_metrics(self) -> dict:
        if not self.metrics_path.exists():
            return {}
        try:
            return json.loads(self.metrics_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read {self.metrics_path}: {err}; move it away or use --force") from None

    def write_metrics(self, metrics: dict) -> None:
        if distributed.is_main():
            write_json_atomic(metrics, self.metrics_path)

    def log(self, message: str) -> None:
        if not distributed.is_main():
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.file(LOG), "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {message}\n")

    def write_config(self, cfg: Config) -> None:
        if not distributed.is_main():
            return
        header = (f"# resolved config of run {cfg.name} from {cfg.path}\n"
                  f"# lrx {__version__}, torch {torch.__version__}\n")
        write_text_atomic(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False), self.file(CONFIG))

    # ------------------------------------------------------------ model files

    def save_model(self, stage: str, model: nn.Module, arch: str, num_classes: int, spec=None, layers=None) -> Path:
        """Write the model file of ``stage``; rank 0 writes, every process waits until it is there."""
        path = self.model_path(stage)
        save_model(path, model, arch, num_classes, spec, layers)
        return path

    # ------------------------------------------------------------ lock

    # A lock file holds the PID of the process working on this run; a dead PID's lock is taken over.
    def lock(self) -> None:
        if not distributed.is_main():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.file(LOCK)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = _read_pid(path)
                if pid is not None and _alive(pid) and pid != os.getpid():
                    raise UserError(f"run {self.path} is in use by process {pid} (lock file {path}); "
                                    "wait for it to finish or stop it") from None
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return
        raise UserError(f"could not take the lock {path}")

    def unlock(self) -> None:
        if not distributed.is_main():
            return
        path = self.file(LOCK)
        if _read_pid(path) == os.getpid():
            path.unlink(missing_ok=True)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- model files anywhere


def save_model(path: Path, model: nn.Module, arch: str, num_classes: int, spec=None, layers=None) -> None:
    """Write a model file (see the module doc); rank 0 writes, every process waits until it is there."""
    if distributed.is_main():
        save_atomic({"model": model.state_dict(), "arch": arch, "num_classes": num_classes,
                     "spec": spec, "layers": layers or []}, path)
    distributed.barrier()


def load_model(path: Path, arch: str, num_classes: int) -> tuple[nn.Module, list[str], dict | None]:
    """Rebuild a saved model (expanded or not) and load its weights.

    Returns (model, replaced layer names, spec), the spec being what :func:`lrx.lowrank.build_expanded` took.
    """
    blob = load_checkpoint(path)
    if blob.get("arch") != arch or blob.get("num_classes") != num_classes:
        raise UserError(f"{path} holds a {blob.get('arch')} with {blob.get('num_classes')} classes, "
                        f"but the config asks for {arch} with {num_classes}; use --force to rebuild it")
    model = build_model(arch, num_classes)
    if blob.get("spec"):
        model = build_expanded(model, blob["spec"])
    own = model.state_dict()
    for key, value in blob["model"].items():
        if key in own and own[key].shape != value.shape:
            raise UserError(f"{path}: {key} has shape {tuple(value.shape)} but the model expects {tuple(own[key].shape)}")
    try:
        model.load_state_dict(blob["model"])
    except RuntimeError as err:
        raise UserError(f"{path} does not fit the model: {str(err).splitlines()[0]}") from None
    return model, blob.get("layers") or [], blob.get("spec")
