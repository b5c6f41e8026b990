"""A finished run profiled again at another input size, beside its results and never in place of them.

``lrx profile CONFIG --input-size 3,224,224`` times a run's final model and its original at that size (a
row trained at 64 px shown at a deployment size too) and writes the profile to a file of its own in the run
folder (``profile-3x224x224.json``, :meth:`lrx.pipeline.rundir.RunDir.sized_profile_path`). metrics.json,
config.yaml, the model files and the stages' state are read, never written: the table row stays the run's
own profile. The run must be finished with the settings the config gives now (a stage made with others is
refused, naming it): this profile runs no stage and redoes nothing.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from lrx import __version__
from lrx.base.errors import UserError
from lrx.base.files import write_json_atomic
from lrx.config.settings import Config, ProfileConfig, size_text
from lrx.measure.profiling import profile_pair
from lrx.nn.models import build_model, min_image_size
from lrx.nn.surgery import conv_sizes
from lrx.pipeline.rundir import RunDir
from lrx.pipeline.runner import final_hash, stage_hashes
from lrx.pipeline.stages import Context, stage_names

__all__ = ["check_size", "finished_record", "profile_at_size"]


def check_size(cfg: Config, input_size, option: str = "--input-size") -> None:
    """Refuse an input size the config's model cannot run at (its smallest input, or a forward that fails),
    naming ``option``; nothing is loaded from the run."""
    smallest = min_image_size(cfg.model.name)
    if input_size[1] < smallest or input_size[2] < smallest:
        raise UserError(f"{option} {size_text(input_size)}: {cfg.model.name} needs an input of at least "
                        f"{smallest}x{smallest}")
    try:
        conv_sizes(build_model(cfg.model.name, cfg.model.num_classes), [], tuple(input_size))
    except UserError as err:
        raise UserError(f"{option} {size_text(input_size)}: {err.message}") from None


def finished_record(cfg: Config, run: RunDir) -> tuple[dict, dict]:
    """(the run's metrics.json content, the metrics.json content of the runs it builds on) when the run is
    finished with the settings ``cfg`` gives now; :class:`UserError` saying what to run first otherwise."""
    metrics = run.read_metrics()
    if metrics.get("status") != "done":
        state = metrics.get("status") or "not run"
        raise UserError(f"run {cfg.name!r} in {run.runs_dir} is {state}: profiling at another size needs the "
                        f"finished run; run `lrx run {cfg.path}` first", file=cfg.path)
    sources = {name: RunDir(run.runs_dir, name).read_metrics() for name in (cfg.baseline, cfg.parent) if name}
    deps = {name: final_hash(record) for name, record in sources.items()}
    unfinished = [name for name, value in deps.items() if value is None]
    if unfinished:
        raise UserError(f"run {unfinished[0]!r}, which {cfg.name} builds on, is not finished in {run.runs_dir}",
                        file=cfg.path)
    hashes = stage_hashes(cfg, deps)
    changed = [name for name in stage_names(cfg) if name != "profile"
               and metrics.get("stages", {}).get(name, {}).get("hash") != hashes[name]]
    if changed:
        raise UserError(f"run {cfg.name!r}'s stage {changed[0]} was made with other settings than the config gives "
                        f"now (or from another state of the runs it builds on); run `lrx run {cfg.path}` first, "
                        f"or give the settings it was made with (--set)", file=cfg.path)
    return metrics, sources


def profile_at_size(cfg: Config, timing: ProfileConfig, runs_dir: str | Path = "runs",
                    say=lambda message: None) -> tuple[dict, Path]:
    """Profile the finished run of ``cfg`` (its final model against its original) with ``timing`` (a
    :class:`lrx.config.settings.ProfileConfig` whose ``input_size`` is set) and write the profile to
    :meth:`RunDir.sized_profile_path`; returns (the record written, its path).

    The record is :func:`lrx.measure.profiling.profile_pair`'s result plus ``name``, ``config``, ``when``,
    ``versions``, ``final_model`` (the file timed) and ``final_hash`` (the stage hash it was made with).
    Nothing else of the run is written; the run's lock is held while its models are read and timed.
    """
    size = tuple(int(v) for v in timing.input_size)
    check_size(cfg, size)
    run = RunDir(runs_dir, cfg.name)
    metrics, sources = finished_record(cfg, run)
    run.lock()
    try:
        metrics, sources = finished_record(cfg, run)  # again under the lock: a run redone meanwhile is seen
        ctx = Context(cfg, run, torch.device("cpu"), say=say, sources=sources, metrics=metrics)
        original = ctx.original().cpu()
        expanded, names, final = None, [], run.final_model_path(metrics)
        if cfg.baseline is not None:
            expanded, names, _ = ctx.previous_model("profile")
        say(f"profiling {final.name} of run {cfg.name} at {size_text(size)}, batch {timing.batch}")
        result = profile_pair(original, expanded, names, timing)
        record = {"name": cfg.name, "config": cfg.path, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "versions": {"lrx": __version__, "torch": torch.__version__}, "final_model": final.name,
                  "final_hash": final_hash(metrics), **result}
        path = run.sized_profile_path(size)
        write_json_atomic(record, path)
    finally:
        run.unlock()
    return record, path
