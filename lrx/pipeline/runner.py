"""The run pipeline: one experiment row's stages, what may be skipped, and the runs it builds on.

Stages, in order (:func:`lrx.pipeline.stages.stage_names`): ``train`` (baseline runs only), ``decompose``,
``finetune.K`` for each fine-tune stage, ``profile``. Each stage records a hash of everything it depends
on (its settings, the previous stage's hash, the runs it builds on); a stage whose hash and output are
unchanged is skipped, a changed one is redone together with every stage after it, and what it replaced
is kept under ``replaced`` in metrics.json.

A stage command (``lrx profile``, ``decompose``, ``finetune-l2``, ``finetune-ce``) redoes an earlier stage
whose settings changed only when told (``--force``); a redo that fails leaves the finished result as it was;
and results are recorded only while the runs this one builds on are as they were when it read them.

The module is long because a run's rules are read together: the checks before anything runs, the stage
hashes, and the runner's skip, redo, refusal and put-back.

From Python (what ``lrx run`` does)::

    from lrx.config.settings import load_config
    from lrx.pipeline.runner import run_with_dependencies
    metrics = run_with_dependencies(load_config("configs/exp04.yaml"), runs_dir="runs")
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from lrx import __version__

from lrx.base import distributed
from lrx.config.settings import (IMAGE_CHANNELS, Config, find_config, load_config, one_run, profile_input_size,
                                 seed_suffix, stage_settings, with_seed)
from lrx.data.datasets import check_data
from lrx.base.errors import UserError
from lrx.nn.surgery import check_layer, check_layer_rank, conv_sizes, layer_label, select_layers
from lrx.nn.models import build_model, check_start, min_image_size
from lrx.plan.macs import check_reachable, device_align
from lrx.pipeline.changes import config_changes, fingerprint
from lrx.pipeline.rundir import RunDir, model_file
from lrx.pipeline.stages import Context, run_selection, stage, stage_names, summarise

__all__ = ["device_of", "dependencies", "check_against_model", "configs_to_run", "config_key", "SHARED",
           "check_shared_settings", "stage_hashes", "planned_at", "final_hash", "Runner", "run_with_dependencies"]

Echo = Callable[[str], None]


def _hash(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def device_of(cfg: Config) -> torch.device:
    """The device the config's stages run on (``runtime.device``)."""
    try:
        return distributed.resolve_device(cfg.runtime.device)
    except UserError as err:
        raise UserError(err.message, file=cfg.path, key="runtime.device") from None


# ---------------------------------------------------------------- configs involved


def dependencies(cfg: Config) -> list[Config]:
    """The configs this one builds on (baseline, parent, recursively), dependencies first, validated.

    Command-line overrides apply to the named config only, never to the runs it builds on. A run of a seed
    list (``cfg.seed_of``) builds on the runs of its baseline and parent with its seed (their configs given
    that seed, :func:`lrx.config.settings.with_seed`); a run of one seed builds on runs of one seed. Refused
    before anything runs: a config whose ``name:`` is not the name it is referred by (its run folder would
    not be the one the referring run reads), configs that build on each other in a loop, and a run of one
    seed built on a config that lists several.
    """
    out: list[Config] = []
    seen = {cfg.name}

    def visit(c: Config, chain: tuple[Config, ...]) -> None:
        for key in ("baseline", "parent"):
            name = getattr(c, key)
            if name is None:
                continue
            looped = next((i for i, earlier in enumerate(chain) if earlier.name == name), None)
            if looped is not None:
                cycle = " -> ".join(f"{link.path} ({link.name})" for link in chain[looped:])
                raise UserError(f"the runs build on each other in a loop: {cycle} -> {chain[looped].path}; "
                                f"one of them must start from a run outside the loop", file=c.path, key=key)
            if name in seen:
                continue
            seen.add(name)
            referred = name.removesuffix(seed_suffix(c.seed)) if c.seed_of is not None else name
            dep = load_config(find_config(referred, c.path, key))
            if dep.name != referred:
                raise UserError(f"names run {referred!r}, found in {dep.path}, but that config says name: {dep.name!r} "
                                f"(its run is runs/{dep.name}); refer to it as {dep.name!r} or give it name: {referred}",
                                file=c.path, key=key)
            if c.seed_of is not None:
                dep = with_seed(dep, c.seed)
            elif isinstance(dep.seed, list):
                raise UserError(f"builds on run {referred!r}, whose config {dep.path} lists seeds {dep.seed}; this run "
                                f"has one seed ({c.seed}): give it the same seeds (seed: {dep.seed}, or lrx run "
                                f"--seeds) so that each seed's run builds on that seed's", file=c.path, key=key)
            visit(dep, chain + (dep,))
            out.append(dep)

    visit(cfg, (cfg,))
    return out


def check_against_model(cfg: Config) -> None:
    """Checks that need the model: image size, layers, ranks; and the devices the run and its profile ask
    for (a profile on a GPU this machine lacks is refused before a baseline trains). Nothing is loaded,
    trained or written."""
    devices = [("runtime.device", cfg.runtime.device)]
    if cfg.profile.enabled:
        devices.append(("profile.device", cfg.profile.device))
    for key, want in devices:
        try:
            distributed.resolve_device(want)
        except UserError as err:
            raise UserError(err.message, file=cfg.path, key=key) from None
    try:
        model = build_model(cfg.model.name, cfg.model.num_classes)
        check_start(cfg.model, model)  # weights' name, the checkpoint's keys and shapes
    except UserError as err:
        raise UserError(err.message, file=cfg.path, key=err.key or "model.name") from None
    smallest = min_image_size(cfg.model.name)
    if cfg.data.image_size < smallest:
        raise UserError(f"{cfg.model.name} needs images of at least {smallest}x{smallest}, got {cfg.data.image_size}",
                        file=cfg.path, key="data.image_size")
    input_size = profile_input_size(cfg)
    if input_size[1] < smallest or input_size[2] < smallest:
        raise UserError(f"{cfg.model.name} needs an input of at least {smallest}x{smallest}, got "
                        f"{list(input_size)}", file=cfg.path, key="profile.input_size")
    try:  # one forward at the profile's input: a wrong channel count or size shows here, not after training
        conv_sizes(model, [], input_size)
    except UserError as err:
        raise UserError(err.message, file=cfg.path, key="profile.input_size") from None
    images = (IMAGE_CHANNELS, cfg.data.image_size, cfg.data.image_size)
    if images != input_size:  # and one at the training images' size: a user's model has no known minimum
        try:
            conv_sizes(model, [], images)
        except UserError as err:
            raise UserError(err.message, file=cfg.path, key="data.image_size") from None
    settings = cfg.decompose
    if settings is None:
        return
    for i, layer in enumerate(settings.layers):  # one at a time, so that the message names the key
        try:
            for index, name, conv in select_layers(model, [layer], settings.scheme, settings.decomposed):
                check_layer(conv, settings.scheme, settings.decomposed, layer_label(index, name))
        except UserError as err:
            raise UserError(err.message, file=cfg.path, key=f"decompose.layers.{i}") from None
    try:  # and together: a layer given by index and by name, or by a pattern too
        chosen = select_layers(model, settings.layers, settings.scheme, settings.decomposed)
    except UserError as err:
        raise UserError(err.message, file=cfg.path, key="decompose.layers") from None
    if settings.bases != "auto" and len(settings.bases) != len(chosen):
        noun = "convs" if settings.scheme in ("v1", "v2") else "layers"
        raise UserError(f"has {len(settings.bases)} entries but decompose.layers selects {len(chosen)} {noun} "
                        f"({', '.join(name for _, name, _ in chosen)}): give one rank per {noun[:-1]}",
                        file=cfg.path, key="decompose.bases")
    if settings.bases == "auto" and "latency" in settings.target:
        return  # measured on the device by the planner itself (lrx.plan.latency); nothing to count here
    if settings.bases == "auto":  # reachability depends on MACs alone, so fresh weights tell it; no plan here
        try:
            check_reachable(model, settings.layers, settings.scheme, settings.target, input_size=input_size,
                       basis=settings.basis, decomposed=settings.decomposed,
                       align=device_align(settings.align, cfg.runtime.device))
        except UserError as err:
            raise UserError(err.message, file=cfg.path, key=err.key or "decompose.target") from None
        return
    for i, ((index, name, conv), rank) in enumerate(zip(chosen, settings.bases)):
        try:
            check_layer_rank(rank, conv, settings.scheme, basis=settings.basis, order=settings.order,
                             name=layer_label(index, name))
        except UserError as err:
            raise UserError(err.message, file=cfg.path, key=f"decompose.bases.{i}") from None


def configs_to_run(cfg: Config, with_deps: bool = True, checked: set[str] | None = None) -> list[Config]:
    """Every config that running ``cfg`` involves, dependencies first; all checked before anything runs.

    ``checked``: keys (:func:`config_key`) of configs already checked against their model, skipped here
    and added to as they pass; share one set across the configs of one command (a check builds the model
    and, for ``bases: auto``, plans its ranks: 1-2 s for AlexNet).
    """
    one_run(cfg)  # a seed list is several runs: lrx.config.settings.seed_runs splits it first
    configs = (dependencies(cfg) if with_deps else []) + [cfg]
    checked = set() if checked is None else checked
    by_name = {c.name: c for c in configs}
    for c in configs:
        if config_key(c) not in checked:
            check_against_model(c)
            checked.add(config_key(c))
        for key in ("baseline", "parent"):
            if getattr(c, key) in by_name:
                check_shared_settings(c, key, by_name[getattr(c, key)])
    return configs


def config_key(cfg: Config) -> str:
    """What identifies a config's content (its file and every resolved setting, overrides included)."""
    return json.dumps([cfg.path, cfg.to_dict()], sort_keys=True, default=str)


# A run and the run it builds on must agree on these: its model file is loaded as this model, and its
# accuracy is this run's "before", so both read the same images (the dataset, its folder, the size they are
# read at, the test subset both are measured on). The training subset may differ (a baseline may train on
# more images than a fine-tune).
SHARED = ("model.name", "model.num_classes", "data.name", "data.root", "data.image_size", "data.test_subset",
          "data.synthetic_size")


def check_shared_settings(cfg: Config, key: str, other: Config) -> None:
    """Refuse ``cfg`` when it differs from the run it builds on (``key``: baseline or parent) in :data:`SHARED`."""
    for dotted in SHARED:
        section, name = dotted.split(".")
        mine, theirs = getattr(getattr(cfg, section), name), getattr(getattr(other, section), name)
        if mine != theirs:
            hint = ", or give --data-root, which every run of the command reads" if dotted == "data.root" else ""
            raise UserError(f"is {mine!r} but the {key} run {other.name!r} ({other.path}) has {dotted}: {theirs!r}; "
                            f"a run and the run it builds on share {', '.join(SHARED)} (--set changes only the "
                            f"config named on the command line: set it in both files{hint})", file=cfg.path, key=dotted)


# ---------------------------------------------------------------- stage hashes


def stage_hashes(cfg: Config, dep_hashes: dict[str, str]) -> dict[str, str]:
    """Each stage's hash: its own settings chained with the previous stage's and the runs it builds on."""
    # Keys added later count only when set, so runs made before them keep their hash; data.stream and
    # data.workers say how batches are read, not which (both paths give the same batches). Before select_on
    # existed every choice was made on the test images: select_on: test keeps those hashes, validation (and
    # the validation split's size, which changes the images trained on) is part of every stage's hash.
    model = {k: v for k, v in asdict(cfg.model).items() if not (k in ("weights", "checkpoint") and v is None)}
    data = {k: v for k, v in asdict(cfg.data).items() if k not in ("stream", "workers", "val_subset", "val_fraction")}
    common = (model, data, cfg.seed, asdict(cfg.runtime))
    if cfg.select_on != "test":
        common += ({"select_on": cfg.select_on, "val_subset": cfg.data.val_subset,
                    "val_fraction": cfg.data.val_fraction},)
    previous = _hash(common, dep_hashes.get(cfg.baseline), dep_hashes.get(cfg.parent))
    out = {}
    for name in stage_names(cfg):
        if name == "train":
            own = asdict(cfg.train)
        elif name == "decompose":
            own = asdict(cfg.decompose)
            if own["fit"] == "weights":  # calibration is unused; runs made before fit: existed keep their hash
                del own["fit"], own["calibration"]
            if "latency" in (cfg.decompose.target or {}):  # the plan is measured: at this size, batch and dtype
                own["timed_at"] = planned_at(cfg)
        elif name.startswith("finetune."):
            own = stage_settings(cfg.finetune[int(name.split(".")[1])])
        else:  # the size as resolved: a row whose data.image_size is the size it set before hashes alike
            own = {**asdict(cfg.profile), "input_size": list(profile_input_size(cfg))}
        previous = out[name] = _hash(name, own, previous)
    return out


def planned_at(cfg: Config) -> dict:
    """What a latency target's plan is measured at (:meth:`lrx.plan.latency.DeviceTiming.from_config`): the
    profile's input size as resolved, batch, threads, dtype and compile; part of the decompose stage's hash,
    so that a plan made at another size is made again rather than profiled at this one."""
    p = cfg.profile
    return {"input_size": list(profile_input_size(cfg)), "batch": p.batch, "threads": p.threads, "dtype": p.dtype,
            "compile": p.compile}


def final_hash(metrics: dict) -> str | None:
    """The hash of a finished run's last model-changing stage (from its metrics.json content), for runs that
    build on it; None while the run is not finished."""
    stages = metrics.get("stages", {})
    for key in reversed(list(stages)):
        if key != "profile" and metrics.get("status") == "done":
            return stages[key]["hash"]
    return None


# ---------------------------------------------------------------- runner


class Runner:
    """Runs one config's stages in its run directory (the runs it builds on must be finished)."""

    def __init__(self, cfg: Config, runs_dir: str | Path = "runs", data_root: str | None = None,
                 quiet: bool = False, force: bool = False, echo: Echo | None = None, redo: str | None = None,
                 checked: bool = False, sources: dict[str, dict] | None = None):
        """``sources``: metrics.json content of runs by name, as the caller read it (those this run builds on
        and the caller did not read are read once when the run starts)."""
        self.cfg, self.runs_dir = cfg, Path(runs_dir)
        self.quiet = quiet
        # Redo from this stage on even where up to date: every stage with force, else the stage named by redo.
        every = stage_names(cfg)
        self.redo = every[0] if force and every else redo
        self.checked = checked  # True when the caller ran check_against_model on cfg (configs_to_run)
        self.dir = RunDir(self.runs_dir, cfg.name)
        self.echo = echo or (lambda message: None)
        self.device = device_of(cfg)
        distributed.setup(self.device)
        # The runs this one builds on, as read once (by the caller, or at the start of run()): every stage and
        # the final record use this state of them.
        self.sources = sources
        self._used: dict[str, tuple[Path, tuple | None]] = {}  # their final model files and fingerprints, as read
        self.context = Context(cfg, self.dir, self.device, say=self.say, quiet=quiet, data_root=data_root)

    def say(self, message: str) -> None:
        self.dir.log(message)
        if not self.quiet and distributed.is_main():
            self.echo(f"[{self.cfg.name}] {message}")

    def run(self, until: str | None = None) -> dict:
        """Run the stages up to ``until`` (inclusive; all when None). Returns metrics.json's content.

        metrics.json is read once (under the lock) and written when the run starts work and after each stage.
        With ``until`` (a stage command), a stage before it whose settings changed since it was recorded is
        redone only with ``redo`` (``--force``); else the command is refused, naming the changed settings. A
        redo that fails puts the finished result back (metrics.json, config.yaml and the model files) and
        records the failure under ``redo_failed``; one that is interrupted is resumed by the same command.
        """
        cfg = self.cfg
        if not self.checked:
            check_against_model(cfg)
        every = stage_names(cfg)
        names = every if until is None else (every[: every.index(until) + 1] if until in every else [])
        builds_on = [name for name in (cfg.baseline, cfg.parent) if name]
        self.sources = {name: (self.sources or {}).get(name) for name in builds_on}
        self.sources = {name: RunDir(self.runs_dir, name).read_metrics() if record is None else record
                        for name, record in self.sources.items()}
        self.context.sources = self.sources
        deps = {name: final_hash(self.sources[name]) for name in builds_on}
        for name, value in deps.items():
            if value is None:
                raise UserError(f"run {name!r} (which {cfg.name} builds on) is not finished in {self.runs_dir}; "
                                f"run `lrx run {find_config(name, cfg.path)}` first", file=cfg.path)
        hashes = stage_hashes(cfg, deps)
        inherited = self._inherited()
        self.dir.lock()
        kept: list = []
        try:
            self._used = {name: self._source_file(name) for name in builds_on}
            metrics = self.dir.read_metrics()  # under the lock: a run that just finished is seen finished
            distributed.barrier()  # every process has read the same state before rank 0 writes
            before = copy.deepcopy(metrics)
            metrics.setdefault("stages", {})
            forced = every.index(self.redo) if self.redo in every else len(every)
            todo = [n for n in names if every.index(n) >= forced or metrics["stages"].get(n, {}).get("hash") != hashes[n]
                    or not self._done(n, metrics)]
            why = None
            if todo:
                first = every.index(todo[0])
                why = "--force" if first >= forced else self._why(todo[0], metrics, hashes, deps)
                if until in every and first < every.index(until) and self.redo is None \
                        and metrics["stages"].get(todo[0], {}).get("hash") not in (None, hashes[todo[0]]):
                    raise UserError(f"this command makes stage {until}, but the earlier stage {todo[0]} was made "
                                    f"with other settings ({why.split(': ', 1)[-1]}); redo it with `lrx run "
                                    f"{cfg.path}` (every changed stage) or add --force to this command, or give the "
                                    f"settings it was made with (--set)", file=cfg.path)
                first = self._rebuild_from(first, every, metrics)
                if first < every.index(todo[0]):
                    why = f"rebuilding {model_file(every[first])}, removed by lrx clean --keep-final"
                stale = [n for n in every[first:] if n in metrics["stages"]]
                if stale and before.get("status") in ("done", "partial"):
                    kept = self.dir.keep_for_redo(stale)  # put back if the redo fails
                todo = [n for n in names if every.index(n) >= first]
            metrics = self._header(metrics, deps)
            self.dir.write_config(cfg)
            if todo:
                if stale:
                    metrics = self._header(self._retire(metrics, why, keep=every[:first]), deps)
            else:
                self.say("nothing to do: every stage is up to date (use --force to redo)")
            self.context.metrics = metrics
            current = None
            try:
                if todo:
                    self._mark_running(metrics, todo[0], hashes[todo[0]])
                    self.dir.write_metrics(metrics)
                for i, name in enumerate(todo):
                    current = f"stage {name}"
                    self._run_stage(name, hashes[name], metrics, inherited)
                    if i + 1 < len(todo):  # the next stage is marked running in the same write
                        self._mark_running(metrics, todo[i + 1], hashes[todo[i + 1]])
                    else:
                        self._finish(metrics, every, hashes, inherited)
                    self.dir.write_metrics(metrics)
                    self._after_stage(name)
                    current = f"after stage {name}"
                current = "the end of the run"
                if not todo:
                    self._check_sources()
                    self._finish(metrics, every, hashes, inherited)
                    self.dir.write_metrics(metrics)
            except BaseException as err:  # a stage's failure, Ctrl-C or SIGTERM, also between stages
                if metrics.get("status") != "done":
                    if kept and not isinstance(err, KeyboardInterrupt):
                        self._put_back(before, kept, current or "the start of the run", err)
                        kept = []
                    elif current is not None:
                        self._stopped(metrics, current, err)
                raise
            distributed.barrier()  # no process reads this run's results before rank 0 has written them
            return metrics
        finally:
            self.dir.drop_kept(kept)
            self.dir.unlock()

    def _done(self, name: str, metrics: dict) -> bool:
        """Whether stage ``name``'s result is there: its model file, or, where ``lrx clean --keep-final``
        removed that, a later model file of this run that metrics.json records (made from it)."""
        if stage(name).done(self.context, name):
            return True
        if name == "profile" or os.path.lexists(self.dir.model_path(name)):
            return False  # a damaged file: has_model said so; the stage is made again
        later = [n for n in stage_names(self.cfg) if n != "profile"]
        later = later[later.index(name) + 1:]
        return any(n in metrics["stages"] and self.dir.model_path(n).is_file() for n in later)

    def _rebuild_from(self, first: int, every: list[str], metrics: dict) -> int:
        """The stage to start from so that stage ``every[first]`` finds the model file it starts from: an
        earlier stage of this run whose file ``lrx clean --keep-final`` removed is made again first (said)."""
        while True:
            before = [n for n in every[:first] if n != "profile"]
            if not before or self.dir.model_path(before[-1]).is_file():
                return first
            self.say(f"stage {every[first]} starts from {model_file(before[-1])}, which lrx clean --keep-final "
                     f"removed: making stage {before[-1]} again first")
            first = every.index(before[-1])

    def _why(self, name: str, metrics: dict, hashes: dict, deps: dict) -> str:
        """Why stage ``name`` is redone: the settings that changed (old -> new), the runs it builds on that
        changed, or its missing result."""
        recorded = metrics["stages"].get(name, {}).get("hash")
        if recorded is None or recorded == hashes[name]:
            return f"stage {name}'s result is missing"
        try:
            changes = config_changes(self.dir.read_config(), self.cfg.to_dict())
        except UserError:
            changes = []
        built_on = metrics.get("built_on") if isinstance(metrics.get("built_on"), dict) else {}
        redone = [n for n, h in deps.items() if n in built_on and built_on[n] != h]
        if redone:
            changes.append(f"run{'s' if len(redone) > 1 else ''} {', '.join(map(repr, redone))} it builds on "
                           "changed since")
        return f"settings changed from stage {name}: {'; '.join(changes) or 'its settings or the runs it builds on'}"

    def _source_file(self, name: str) -> tuple[Path, tuple | None]:
        """The final model file of run ``name`` (one this run builds on), and its fingerprint now."""
        path = RunDir(self.runs_dir, name).final_model_path(self.sources[name])
        return path, fingerprint(path)

    def _check_sources(self) -> None:
        """Refuse to record results when a run this one builds on changed its final model file since it was read."""
        for name, (path, seen) in self._used.items():
            if fingerprint(path) != seen:
                raise UserError(f"run {name!r}, which {self.cfg.name} builds on, changed while this run used it "
                                f"({path} was written again); this run's results since are not recorded: run "
                                f"`lrx run {self.cfg.path}` again to build on its new state", file=self.cfg.path)

    def _put_back(self, before: dict, kept: list, where: str, err: BaseException) -> None:
        """A redo failed: the finished result from before stays (its files and metrics), with the failure noted."""
        reason = str(err) or type(err).__name__
        self.dir.put_back(kept)
        before["redo_failed"] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "error": f"{where}: {reason}"}
        self.dir.write_metrics(before)
        self.say(f"stopped at {where}: {reason}; the results from before the redo stay (metrics.json, config.yaml "
                 f"and model files as they were)")

    @staticmethod
    def _finish(metrics: dict, every: list[str], hashes: dict, inherited: dict) -> None:
        complete = all(metrics["stages"].get(n, {}).get("hash") == hashes[n] for n in every)
        metrics["status"] = "done" if complete else "partial"
        metrics.update(summarise(metrics, inherited))
        metrics.pop("running", None)
        metrics.pop("error", None)

    def _mark_running(self, metrics: dict, name: str, hash_: str) -> None:
        """Record that stage ``name`` runs now; a checkpoint left by other settings of it must not be resumed."""
        if metrics.get("running", {}).get(name) != hash_:
            ckpt = self.dir.checkpoint_path(name)
            if ckpt is not None:
                ckpt.unlink(missing_ok=True)
        metrics["status"] = "running"
        metrics["running"] = {name: hash_}

    def _stopped(self, metrics: dict, where: str, err: BaseException) -> None:
        """Record in metrics.json that the run stopped at ``where``: interrupted (resumable) or failed."""
        interrupted = isinstance(err, KeyboardInterrupt)
        reason = "interrupted (Ctrl-C or SIGTERM)" if interrupted else (str(err) or type(err).__name__)
        metrics["status"] = "interrupted" if interrupted else "failed"
        metrics["error"] = f"{where}: {reason}"
        self.dir.write_metrics(metrics)
        self.say(f"stopped at {where}: {reason}")

    def _run_stage(self, name: str, hash_: str, metrics: dict, inherited: dict) -> None:
        """Run one stage (marked running in ``metrics`` by the caller) and record its result in ``metrics``."""
        self.say(f"stage {name} ...")
        start = time.perf_counter()
        result = stage(name).run(self.context, name)  # if it stops, run() records why
        self._check_sources()  # a result built on a run that changed meanwhile is not recorded
        metrics["stages"][name] = {"hash": hash_, "wall_s": round(time.perf_counter() - start, 3), **(result or {})}
        metrics.update(summarise(metrics, inherited))

    def _after_stage(self, name: str) -> None:
        """Once the stage's record is written: its checkpoint is no longer needed."""
        distributed.barrier()  # the next stage checks its model file against this record, on every process
        ckpt = self.dir.checkpoint_path(name)
        if ckpt is not None and distributed.is_main():  # resuming is over: the model file holds the result
            ckpt.unlink(missing_ok=True)
        self.say(f"stage {name} done in {self.context.metrics['stages'][name]['wall_s']:.1f} s")

    def _header(self, metrics: dict, deps: dict) -> dict:
        cfg = self.cfg
        metrics.pop("redo_failed", None)
        metrics.update({
            "name": cfg.name, "no": cfg.no, "group": cfg.group, "remark": cfg.remark, "seed": cfg.seed,
            "seed_of": cfg.seed_of,
            "config": cfg.path, "baseline": cfg.baseline, "parent": cfg.parent, "built_on": deps,
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
        """What a run started from another's model shows of it: accuracy, decomposition, earlier fine-tune stages,
        and what the choices behind that model were made on."""
        source = self.cfg.parent or self.cfg.baseline
        if source is None:
            return {}
        other = self.sources[source]
        return {"acc1": other.get("acc1"), "decompose": other.get("decompose"), "finetune": other.get("finetune") or [],
                "selected_on": run_selection(other)}


def run_with_dependencies(cfg: Config, runs_dir: str | Path = "runs", until: str | None = None, *,
                          data_root: str | None = None, quiet: bool = False, force: bool = False,
                          redo: str | None = None, no_deps: bool = False, echo: Echo | None = None,
                          checked: set[str] | None = None, involved: list[Config] | None = None) -> dict:
    """Run ``cfg`` up to stage ``until``, first running the runs it builds on that are not finished.

    ``force`` redoes every stage of ``cfg`` (never of the runs it builds on), ``redo`` the named stage and
    those after it up to ``until``; ``no_deps`` refuses instead of running an unfinished dependency;
    ``checked`` as for :func:`configs_to_run`; ``involved``: what :func:`configs_to_run` returned for ``cfg``
    when the caller has it already (loaded and checked). Each dependency's metrics.json is read once here,
    and ``cfg``'s run builds on that state of it. Returns ``cfg``'s metrics.json content.
    """
    say = echo or (lambda message: None)
    configs = involved if involved is not None else configs_to_run(cfg, checked=checked)
    records = {dep.name: RunDir(runs_dir, dep.name).read_metrics() for dep in configs[:-1]}
    pending = [dep for dep in configs[:-1] if records[dep.name].get("status") != "done"]
    notes = [note for c in pending + [cfg] for note in check_data(c, data_root)]  # before any run folder is made
    for note in dict.fromkeys(notes) if not quiet else ():
        say(f"[{cfg.name}] {note}")
    for dep in pending:
        if no_deps:
            raise UserError(f"run {dep.name!r} is not finished; run `lrx run {dep.path}` first (or drop --no-deps)",
                            file=cfg.path)
        if not quiet:
            say(f"[{cfg.name}] needs run {dep.name}: running {dep.path} first")
        records[dep.name] = Runner(dep, runs_dir, data_root, quiet, echo=echo, checked=True, sources=records).run()
    return Runner(cfg, runs_dir, data_root, quiet, force, echo=echo, redo=redo, checked=True,
                  sources=records).run(until)
