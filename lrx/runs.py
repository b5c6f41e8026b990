"""The run pipeline: one experiment row's stages, its run directory, and what may be skipped.

Stages, in order: ``train`` (baseline runs only), ``decompose``, ``finetune.K`` for each fine-tune
stage, ``profile``. Each stage records a hash of everything it depends on (its settings, the
previous stage's hash, the runs it builds on); a stage whose hash and output are unchanged is
skipped, a changed one is redone together with every stage after it, and what it replaced is kept
under ``replaced`` in metrics.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import yaml

from . import __version__, distributed
from .config import Config, find_config, load_config
from .errors import UserError

LOCK = ".lock"


def stage_names(cfg: Config) -> list[str]:
    """The stages of a config, in order."""
    names = ["train"] if cfg.baseline is None else []
    if cfg.decompose is not None:
        names.append("decompose")
    names += [f"finetune.{i}" for i in range(len(cfg.finetune))]
    if cfg.profile.enabled:
        names.append("profile")
    return names


def _hash(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def device_of(cfg: Config) -> torch.device:
    want = cfg.runtime.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("runtime.device is cuda but no GPU is available; allowed here: auto, cpu",
                        file=cfg.path, key="runtime.device")
    return torch.device(want)


# ---------------------------------------------------------------- run directory


class RunDir:
    """``runs/<name>/``: resolved config, metrics.json, log.txt, checkpoints and a lock."""

    def __init__(self, runs_dir: str | Path, name: str):
        self.path = Path(runs_dir) / name
        self.metrics_path = self.path / "metrics.json"

    def file(self, name: str) -> Path:
        return self.path / name

    def read_metrics(self) -> dict:
        if not self.metrics_path.exists():
            return {}
        try:
            return json.loads(self.metrics_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read {self.metrics_path}: {err}; move it away or use --force") from None

    # Under torchrun every process runs the stages; rank 0 alone writes the run directory.
    def write_metrics(self, metrics: dict) -> None:
        from .checkpoint import write_json_atomic

        if distributed.is_main():
            write_json_atomic(metrics, self.metrics_path)

    def log(self, message: str) -> None:
        if not distributed.is_main():
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.file("log.txt"), "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {message}\n")

    def write_config(self, cfg: Config) -> None:
        if not distributed.is_main():
            return
        from .checkpoint import write_text_atomic

        header = f"# resolved config of run {cfg.name} from {cfg.path}\n# lrx {__version__}, torch {torch.__version__}\n"
        write_text_atomic(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False), self.file("config.yaml"))

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


# ---------------------------------------------------------------- configs involved


def dependencies(cfg: Config) -> list[Config]:
    """The configs this one builds on (baseline, parent, recursively), dependencies first, validated.

    Command-line overrides apply to the named config only, never to the runs it builds on.
    """
    out: list[Config] = []
    seen = {cfg.name}

    def visit(c: Config) -> None:
        for key in ("baseline", "parent"):
            name = getattr(c, key)
            if name is None or name in seen:
                continue
            seen.add(name)
            dep = load_config(find_config(name, c.path, key))
            visit(dep)
            out.append(dep)

    visit(cfg)
    return out


def check_against_model(cfg: Config) -> None:
    """Checks that need the model: image size, layer indices and names, ranks. Nothing is loaded or trained."""
    from .decomposition import max_rank
    from .models import build_model, conv_layers, min_image_size

    try:
        model = build_model(cfg.model.name, cfg.model.num_classes)
    except UserError as err:
        raise UserError(err.message, file=cfg.path, key=err.key) from None
    smallest = min_image_size(cfg.model.name)
    if cfg.data.image_size < smallest:
        raise UserError(f"{cfg.model.name} needs images of at least {smallest}x{smallest}, got {cfg.data.image_size}",
                        file=cfg.path, key="data.image_size")
    if cfg.profile.input_size[1] < smallest or cfg.profile.input_size[2] < smallest:
        raise UserError(f"{cfg.model.name} needs an input of at least {smallest}x{smallest}, got {cfg.profile.input_size}",
                        file=cfg.path, key="profile.input_size")
    dec = cfg.decompose
    if dec is None:
        return
    convs = conv_layers(model)
    names = {name: conv for name, conv in convs}
    chosen = []
    for i, layer in enumerate(dec.layers):
        key = f"decompose.layers.{i}"
        if isinstance(layer, int):
            if layer > len(convs):
                raise UserError(f"layer {layer} does not exist: {cfg.model.name} has {len(convs)} conv layers (1..{len(convs)})",
                                file=cfg.path, key=key)
            chosen.append(convs[layer - 1])
        elif layer in names:
            chosen.append((layer, names[layer]))
        else:
            raise UserError(f"no conv layer named {layer!r}; conv layers: {', '.join(list(names)[:8])}...",
                            file=cfg.path, key=key)
    if dec.bases == "auto":
        return
    for i, ((name, conv), rank) in enumerate(zip(chosen, dec.bases)):
        try:
            top = max_rank(conv, dec.scheme, dec.basis)
        except UserError as err:
            raise UserError(f"layer {name}: {err.message}", file=cfg.path, key=f"decompose.layers.{i}") from None
        if rank > top:
            raise UserError(f"rank {rank} is above layer {name}'s maximum {top} for scheme {dec.scheme}",
                            file=cfg.path, key=f"decompose.bases.{i}")


def plan(cfg: Config, with_deps: bool = True) -> list[Config]:
    """Every config that running ``cfg`` involves, dependencies first; all validated before anything runs."""
    configs = (dependencies(cfg) if with_deps else []) + [cfg]
    for c in configs:
        check_against_model(c)
    return configs


# ---------------------------------------------------------------- stage hashes


def stage_hashes(cfg: Config, dep_hashes: dict[str, str]) -> dict[str, str]:
    """Each stage's hash: its own settings chained with the previous stage's and the runs it builds on."""
    common = (asdict(cfg.model), asdict(cfg.data), cfg.seed, asdict(cfg.runtime))
    previous = _hash(common, dep_hashes.get(cfg.baseline), dep_hashes.get(cfg.parent))
    out = {}
    for name in stage_names(cfg):
        if name == "train":
            own = asdict(cfg.train)
        elif name == "decompose":
            own = asdict(cfg.decompose)
        elif name.startswith("finetune."):
            own = asdict(cfg.finetune[int(name.split(".")[1])])
        else:
            own = asdict(cfg.profile)
        previous = out[name] = _hash(name, own, previous)
    return out


def final_hash(runs_dir: Path, name: str) -> str | None:
    """The hash of a finished run's last model-changing stage, for runs that build on it."""
    metrics = RunDir(runs_dir, name).read_metrics()
    stages = metrics.get("stages", {})
    for stage in reversed(list(stages)):
        if stage != "profile" and metrics.get("status") == "done":
            return stages[stage]["hash"]
    return None


# ---------------------------------------------------------------- runner


class Runner:
    """Runs one config's stages in its run directory. The CLI and notebooks both use this."""

    def __init__(self, cfg: Config, runs_dir: str | Path = "runs", data_root: str | None = None,
                 quiet: bool = False, force: bool = False, echo: Callable[[str], None] | None = None):
        self.cfg, self.runs_dir = cfg, Path(runs_dir)
        self.data_root, self.quiet, self.force = data_root, quiet, force
        self.dir = RunDir(self.runs_dir, cfg.name)
        self.echo = echo or (lambda message: None)
        self.device = device_of(cfg)
        distributed.setup(self.device)
        self._data = None
        self._original = None

    def say(self, message: str) -> None:
        self.dir.log(message)
        if not self.quiet and distributed.is_main():
            self.echo(f"[{self.cfg.name}] {message}")

    def run(self, until: str | None = None) -> dict:
        """Run the stages up to ``until`` (inclusive; all when None). Returns metrics.json's content."""
        from .stages import STAGES, checkpoint_file, summarise

        cfg = self.cfg
        names = stage_names(cfg)
        if until is not None:
            names = names[: names.index(until) + 1] if until in names else []
        deps = {name: final_hash(self.runs_dir, name) for name in (cfg.baseline, cfg.parent) if name}
        for name, value in deps.items():
            if value is None:
                raise UserError(f"run {name!r} (which {cfg.name} builds on) is not finished in {self.runs_dir}; "
                                f"run `lrx run {find_config(name, cfg.path)}` first", file=cfg.path)
        hashes = stage_hashes(cfg, deps)
        metrics = self.dir.read_metrics()
        distributed.barrier()  # every process has read the same state before rank 0 writes
        self.dir.lock()
        try:
            if self.force and metrics:
                metrics = self._retire(metrics, "--force")
            metrics = self._header(metrics)
            self.dir.write_config(cfg)
            todo = [n for n in names if self.force or metrics["stages"].get(n, {}).get("hash") != hashes[n]
                    or not STAGES[n.split(".")[0]].done(self, n)]
            if todo:
                first = stage_names(cfg).index(todo[0])
                stale = [n for n in stage_names(cfg)[first:] if n in metrics["stages"]]
                if stale and not self.force:
                    metrics = self._retire(metrics, f"settings changed from stage {todo[0]}", keep=stage_names(cfg)[:first])
                    metrics = self._header(metrics)
                todo = [n for n in names if stage_names(cfg).index(n) >= first]
            else:
                self.say("nothing to do: every stage is up to date (use --force to redo)")
            inherited = self._inherited()
            for name in todo:
                if metrics.get("running", {}).get(name) != hashes[name]:
                    # A checkpoint left by other settings must not be resumed.
                    ckpt = checkpoint_file(name)
                    if ckpt:
                        self.dir.file(ckpt).unlink(missing_ok=True)
                metrics["status"] = "running"
                metrics["running"] = {name: hashes[name]}
                self.dir.write_metrics(metrics)
                self.say(f"stage {name} ...")
                start = time.perf_counter()
                try:
                    result = STAGES[name.split(".")[0]].run(self, name, metrics)
                except BaseException as err:
                    metrics["status"] = "failed" if not isinstance(err, KeyboardInterrupt) else "interrupted"
                    metrics["error"] = f"stage {name}: {err}"
                    self.dir.write_metrics(metrics)
                    self.say(f"stage {name} stopped: {err}")
                    raise
                metrics["stages"][name] = {"hash": hashes[name], "wall_s": round(time.perf_counter() - start, 3), **(result or {})}
                metrics.update(summarise(metrics, inherited))
                self.dir.write_metrics(metrics)
                self.say(f"stage {name} done in {metrics['stages'][name]['wall_s']:.1f} s")
            complete = all(metrics["stages"].get(n, {}).get("hash") == hashes[n] for n in stage_names(cfg))
            metrics["status"] = "done" if complete else "partial"
            metrics.update(summarise(metrics, self._inherited()))
            metrics.pop("running", None)
            metrics.pop("error", None)
            self.dir.write_metrics(metrics)
            distributed.barrier()  # no process reads this run's results before rank 0 has written them
            return metrics
        finally:
            self.dir.unlock()

    def _header(self, metrics: dict) -> dict:
        cfg = self.cfg
        metrics.update({
            "name": cfg.name, "no": cfg.no, "group": cfg.group, "remark": cfg.remark, "seed": cfg.seed,
            "config": cfg.path, "baseline": cfg.baseline, "parent": cfg.parent,
            "versions": {"lrx": __version__, "torch": torch.__version__},
            "device": str(self.device),
        })
        metrics.setdefault("stages", {})
        return metrics

    def _retire(self, metrics: dict, why: str, keep: list[str] = ()) -> dict:
        """Move the results of the stages after ``keep`` to ``replaced``, so old and new never mix."""
        old = {k: v for k, v in metrics.items() if k != "replaced"}
        replaced = metrics.get("replaced", [])
        replaced.append({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "why": why, "metrics": old})
        self.say(f"replacing earlier results ({why}); the old ones stay under 'replaced' in metrics.json")
        return {"replaced": replaced, "stages": {k: v for k, v in metrics.get("stages", {}).items() if k in keep}}

    def _inherited(self) -> dict:
        """What a run started from another's model shows of it: accuracy, decomposition, earlier fine-tune stages."""
        source = self.cfg.parent or self.cfg.baseline
        if source is None:
            return {}
        other = RunDir(self.runs_dir, source).read_metrics()
        return {"acc1": other.get("acc1"), "decompose": other.get("decompose"), "finetune": other.get("finetune") or []}
