"""What each stage of a run does: ``train``, ``decompose``, ``finetune.K``, ``profile``.

Every stage reads the model it starts from out of a file and writes the model it ends with to a
file of its own (the names are :mod:`lrx.pipeline.rundir`'s), so any stage can be redone alone. A stage gets
what it needs in a :class:`Context` that the runner (:mod:`lrx.pipeline.runner`) builds: the config, the run
directory, the device, and the data and original model, each loaded once on first use.
The table's keys (acc1, l2_before, ...) are derived from the stages' results by :func:`summarise`, with how sure
each is: the final model's per-image correctness on the test images, its Wilson interval, and its paired
difference from the original on the same images (:mod:`lrx.measure.accuracy`).

It is long because each stage's record and the test figures the next stage takes from it (not measuring the
same model on the same images twice) are read together; the table's derivation could move out if it grows.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lrx.base import distributed
from lrx.config.settings import Config, ProfileConfig, profile_input_size
from lrx.data.datasets import load_splits
from lrx.base.errors import UserError
from lrx.train.finetune import measure, run_stage
from lrx.expansion.model import ExpansionNote, ExpansionReport, expand
from lrx.nn.models import initial_model
from lrx.nn.surgery import shown_name, summarise_notes
from lrx.plan.latency import DeviceTiming
from lrx.measure.accuracy import pack, paired_difference, percent, unpack, wilson
from lrx.measure.profiling import profile_pair
from lrx.plan.macs import device_align
from lrx.pipeline.rundir import RunDir, latency_cache_path, load_model
from lrx.train.baseline import train_baseline
from lrx.train.loop import correct_per_image

__all__ = ["stage_names", "last_finetune_stage", "Context", "check_expansion", "ModelStage", "Train", "Decompose",
           "expand_model", "report_text", "Finetune", "Profile", "STAGES", "stage", "stage_selection", "run_selection",
           "summarise", "latency_target", "profile_settings"]


def stage_names(cfg: Config) -> list[str]:
    """The stages of a config, in order."""
    names = ["train"] if cfg.baseline is None else []
    if cfg.decompose is not None:
        names.append("decompose")
    names += [f"finetune.{i}" for i in range(len(cfg.finetune))]
    if cfg.profile.enabled:
        names.append("profile")
    return names


def last_finetune_stage(cfg: Config, loss: str) -> str:
    """The last ``finetune.K`` stage whose ``loss`` ("l2" or "ce") weight is above 0 (what ``lrx finetune-l2``
    and ``finetune-ce`` run up to)."""
    indices = [i for i, settings in enumerate(cfg.finetune) if getattr(settings, loss) > 0]
    if not indices:
        raise UserError(f"no fine-tune stage has {loss} > 0", file=cfg.path, key="finetune")
    return f"finetune.{indices[-1]}"


@dataclass
class Context:
    """What a stage works with. ``say`` logs a line (and echoes it unless quiet).

    ``sources``: the metrics.json content of the runs this one builds on (baseline, parent), read once when
    the run starts, so that every stage builds on the same state of them; ``metrics``: this run's own record,
    as the runner keeps it in memory.
    """

    cfg: Config
    run: RunDir
    device: torch.device
    say: Callable[[str], None] = lambda message: None
    quiet: bool = False
    data_root: str | None = None
    sources: dict[str, dict] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    _data: tuple | None = field(default=None, repr=False)
    _original: nn.Module | None = field(default=None, repr=False)
    _original_file: tuple | None = field(default=None, repr=False)  # (path, names, spec) it was loaded from

    def data(self):
        """(train, test) :class:`lrx.data.datasets.Batches` of the config, loaded on first use."""
        if self._data is None:
            self._data = load_splits(self.cfg, self.device, self.data_root)
        return self._data.train, self._data.test

    def validation(self):
        """The validation batches that choose kept epochs (``select_on: validation``), or None (``test``)."""
        self.data()
        return self._data.val

    def source_model_path(self, name: str) -> Path:
        """The final model file of run ``name`` (the baseline or the parent), from the record read at the start."""
        return RunDir(self.run.runs_dir, name).final_model_path(self.sources.get(name))

    def original(self) -> nn.Module:
        """The baseline model this run compresses (the teacher of L2 fine-tuning), on the run's device, eval mode."""
        if self._original is None:
            cfg = self.cfg
            path = self.run.model_path("train") if cfg.baseline is None else self.source_model_path(cfg.baseline)
            self._original, names, spec = load_model(path, cfg.model.name, cfg.model.num_classes)
            check_expansion(path, spec, None, "a baseline run")
            self._original_file = (path, names, spec)
            self._original.to(self.device).eval()
        return self._original

    def forget_original(self) -> None:
        """Drop the cached original (after it was moved off the run's device)."""
        self._original = self._original_file = None

    def previous_model_path(self, stage: str) -> Path:
        """The model file ``stage`` starts from: the last model-changing stage before it, or the run it builds on."""
        names = [n for n in stage_names(self.cfg) if n != "profile"]
        before = names[: names.index(stage)] if stage in names else names
        if before:
            return self.run.model_path(before[-1])
        return self.source_model_path(self.cfg.parent or self.cfg.baseline)

    def previous_model(self, stage: str) -> tuple[nn.Module, list[str], dict | None]:
        """(model, replaced layer names, spec) that ``stage`` starts from, on the CPU in training mode.

        The file must hold the expansion that metrics.json records for it (and the table shows): a model
        file of other layers, scheme or ranks is refused, never used in its place. When it is the file the
        original was loaded from, the model is a copy of the original rather than a second load.
        """
        path = self.previous_model_path(stage)
        if self._original_file is not None and self._original_file[0] == path:
            _, names, spec = self._original_file
            model = copy.deepcopy(self._original).cpu().train()
        else:
            model, names, spec = load_model(path, self.cfg.model.name, self.cfg.model.num_classes)
        expected, source = self._recorded_expansion(stage)
        check_expansion(path, spec, expected, source)
        return model, names, spec

    def _recorded_expansion(self, stage: str) -> tuple[dict | None, str]:
        """The decompose record the model ``stage`` starts from must match, and the file it is read from."""
        cfg = self.cfg
        if cfg.decompose is not None and stage != "decompose":
            return self.metrics.get("stages", {}).get("decompose"), str(self.run.metrics_path)
        if cfg.parent is not None:
            parent = RunDir(self.run.runs_dir, cfg.parent)
            return self.sources.get(cfg.parent, {}).get("decompose"), str(parent.metrics_path)
        return None, "a baseline run"

    def save_model(self, stage: str, model: nn.Module, spec=None, layers=None) -> None:
        self.run.save_model(stage, model, self.cfg.model.name, self.cfg.model.num_classes, spec, layers)


def _redo(path: Path) -> str:
    """The advice for a model file of run X that does not hold what X recorded: redo X itself."""
    return f"redo run {path.parent.name!r} with `lrx run <its config> --force`"


def check_expansion(path: Path, spec: dict | None, expected: dict | None, source: str) -> None:
    """Refuse a model file whose expansion (``spec``) is not the one ``expected`` (a decompose record of
    metrics.json: scheme, ``bases``, basis, decomposed, and the replaced layers' names where recorded)."""
    if expected is None:
        if spec is not None:
            raise UserError(f"{path} holds an expansion (scheme {spec.get('scheme')}, ranks {spec.get('ranks')}) "
                            f"where {source} has the plain model; {_redo(path)}")
        return
    if spec is None:
        raise UserError(f"{path} holds a plain model where {source} records an expansion "
                        f"(ranks {expected.get('bases')}); {_redo(path)}")
    held = {"scheme": spec.get("scheme"), "ranks": list(spec.get("ranks") or []),
            "decomposed": bool(spec.get("decomposed"))}
    recorded = {"scheme": expected.get("scheme"), "ranks": list(expected.get("bases") or []),
                "decomposed": bool(expected.get("decomposed"))}
    if held["scheme"] == "v1":
        held["basis"], recorded["basis"] = spec.get("basis"), expected.get("basis")
    if expected.get("names") is not None:
        held["layers"], recorded["layers"] = list(spec.get("layers") or []), list(expected["names"])
    wrong = [key for key in held if held[key] != recorded[key]]
    if wrong:
        shown = "; ".join(f"{key} {held[key]} (recorded: {recorded[key]})" for key in wrong)
        raise UserError(f"{path} does not hold the expansion {source} records: {shown}; "
                        f"{_redo(path)}")


# ---------------------------------------------------------------- stages


class ModelStage:
    """A stage whose result is its model file: done when the file is there and loads (and its hash unchanged)."""

    @staticmethod
    def done(ctx: Context, name: str) -> bool:
        return ctx.run.has_model(name, ctx.say)


class Train(ModelStage):
    @staticmethod
    def run(ctx: Context, name: str) -> dict:
        cfg = ctx.cfg
        torch.manual_seed(cfg.seed)
        # model.checkpoint: the user's trained weights; with train.epochs: 0 the stage only evaluates them.
        model = initial_model(cfg.model).to(ctx.device)
        train, test = ctx.data()
        result = train_baseline(model, train, test, cfg.train, ctx.run.checkpoint_path(name), log=ctx.say,
                                quiet=ctx.quiet, runtime=cfg.runtime, seed=cfg.seed, val=ctx.validation())
        ctx.save_model(name, model)
        return result


class Decompose(ModelStage):
    @staticmethod
    def run(ctx: Context, name: str) -> dict:
        cfg, settings = ctx.cfg, ctx.cfg.decompose
        original = ctx.original()
        start, _, _ = ctx.previous_model(name)
        train, _ = ctx.data()
        if settings.fit == "data":
            start.to(ctx.device)
            train.set_epoch(0)  # the calibration images: the first of epoch 0's (seeded) order
        _, test = ctx.data()
        expanded, report = expand_model(start, cfg, batches=train, log=ctx.say,
                                        held_out=test, notes_in=str(ctx.run.log_path()))
        if summarise_notes(report.notes) != report.notes:  # the said lines group skipped convs: each in the log
            for note in report.notes:
                ctx.run.log(f"note: {note}")
        expanded.to(ctx.device)
        names = [layer["name"] for layer in report.layers]
        ctx.save_model(name, expanded, report.spec, names)
        ctx.say(report_text(report))
        bits: list = []  # the expansion's acc@1, correctness and L2 norm to the original in one pass
        _, l2 = measure(expanded, original, names, test, per_image=bits)
        original_correct, correct = correct_per_image(original, test), bits[0]
        result = {"acc1_original": percent(original_correct), "acc1": percent(correct),
                  "original_test_correct": pack(original_correct.numpy()), "test_correct": pack(correct.numpy()),
                  "l2": l2, "report": report.layers,
                  "layers": report.chosen_layers or settings.layers, "names": names, "bases": report.ranks, "scheme": settings.scheme,
                  "schemes": report.spec.get("schemes"),
                  "basis": settings.basis, "method": settings.method, "decomposed": settings.decomposed,
                  "fit": settings.fit}
        for key in ("plan", "fit_data"):
            if getattr(report, key) is not None:
                result[key] = getattr(report, key)
        ctx.say(f"acc@1 {result['acc1_original']:.2f} -> {result['acc1']:.2f} after decomposition, "
                f"L2 norm {result['l2']:.1f}")
        return result


def expand_model(model: nn.Module, cfg: Config, input_size=None, batches=None, write_cache: bool = True, log=lambda message: None, held_out=None,
                 fit: str | None = None, notes_in: str = "report.notes") -> tuple[nn.Module, ExpansionReport]:
    """Expand ``model`` as ``cfg.decompose`` says, through :func:`lrx.expansion.model.expand`: ``bases: auto`` plans
    ranks from the target (a latency target timed on ``runtime.device`` at the profile's settings, its times
    kept in the machine's cache, :func:`lrx.pipeline.rundir.latency_cache_path`, unless ``write_cache`` is
    off); ``fit: data`` fits to the calibration ``batches`` (``held_out``: batches on which both fits are compared too). ``fit`` overrides the config's
    (a dry run plans with the calibration batches but fits to the weights only); without batches the weights
    fit is made and an auto plan ranks layers by filter energy."""
    settings = cfg.decompose
    fit = fit or (settings.fit if batches is not None else "weights")
    with warnings.catch_warnings():  # expand's notes (a conv a pattern skipped, a rank adding MACs): logged
        warnings.simplefilter("ignore", ExpansionNote)
        try:
            return expand(model, settings.layers, settings.scheme, settings.bases,
                          target=settings.target if settings.bases == "auto" else None, fit=fit, calibration=batches,
                          plan_on_data=settings.fit == "data" and batches is not None,
                          images=settings.calibration.images, sequential=settings.calibration.sequential,
                          iterations=settings.calibration.iterations, held_out=held_out, basis=settings.basis,
                          method=settings.method, decomposed=settings.decomposed, order=settings.order,
                          align=device_align(settings.align, cfg.runtime.device),
                          input_size=tuple(input_size or profile_input_size(cfg)),
                          timing=DeviceTiming.from_config(cfg) if "latency" in (settings.target or {}) else None,
                          cache=latency_cache_path(),
                          write_cache=write_cache, log=log, notes_in=notes_in, **settings.options)
        except UserError as err:
            raise UserError(err.message, file=cfg.path, key=err.key or "decompose") from None
        except TypeError as err:  # an unknown method option
            raise UserError(f"{err}", file=cfg.path, key="decompose.options") from None


def report_text(report: dict) -> str:
    data = report.fit_data is not None
    lines = ["layer                 rank  max   rel.error  MACs ratio" + ("  output error: weights fit -> data fit"
                                                                          if data else "")]
    for layer in report.layers:
        line = (f"{shown_name(layer['name']):<20} {layer['rank']:>5} {layer['max_rank']:>4}   {layer['rel_error']:.4f}     "
                f"{layer['mac_ratio']:.2f}x")
        if data:
            line += f"       {layer['output_error_weights']:.4f} -> {layer['output_error']:.4f}"
        lines.append(line)
    return "\n".join(lines)


class Finetune(ModelStage):
    @staticmethod
    def run(ctx: Context, name: str) -> dict:
        cfg = ctx.cfg
        index = int(name.split(".")[1])
        original = ctx.original()
        student, names, spec = ctx.previous_model(name)
        student.to(ctx.device)
        train, test = ctx.data()
        result = run_stage(student, original, names, train, test, cfg.finetune[index], ctx.run.checkpoint_path(name),
                           log=ctx.say, quiet=ctx.quiet, runtime=cfg.runtime, seed=cfg.seed + index,
                           val=ctx.validation(), before_test=_input_figures(ctx, index))
        ctx.save_model(name, student, spec, names)
        if index == 0 and cfg.decompose is None:  # the original on this run's test images, for the paired difference
            result["original_test_correct"] = pack(correct_per_image(original, test).numpy())
        return result


def _input_figures(ctx: Context, index: int) -> dict | None:
    """acc@1 and L2 norm on the test images of the model fine-tune stage ``index`` starts from, as this run's
    previous stage recorded them (not measured again); None when another run made that model."""
    stage, acc, l2 = (f"finetune.{index - 1}", "acc1_after", "l2_after") if index else ("decompose", "acc1", "l2")
    record = ctx.metrics.get("stages", {}).get(stage, {}) if index or ctx.cfg.decompose is not None else {}
    figures = {"acc1": record.get(acc), "l2": record.get(l2)}
    return figures if all(isinstance(v, float) for v in figures.values()) else None


class Profile:
    @staticmethod
    def done(ctx: Context, name: str) -> bool:
        return True

    @staticmethod
    def run(ctx: Context, name: str) -> dict:
        if not distributed.is_main():  # one process times; the others would disturb it
            distributed.barrier()
            return {}
        cfg = ctx.cfg
        original = ctx.original().cpu()
        ctx.forget_original()  # moved to the CPU here; reloaded on the run's device if needed again
        expanded, names = None, []
        if cfg.baseline is not None:
            expanded, names, _ = ctx.previous_model(name)
        result = profile_pair(original, expanded, names, profile_settings(cfg))  # "auto" device resolved there
        machine = result["latency"]["machine"]
        if machine["busy"]:
            ctx.say(f"warning: timed on a busy machine ({'; '.join(machine['reasons'])}): its times may be far off")
        distributed.barrier()
        return result


def profile_settings(cfg: Config, input_size=None) -> ProfileConfig:
    """``cfg.profile`` with its input size resolved (:func:`lrx.config.settings.profile_input_size`), or set to
    ``input_size``: what :func:`lrx.measure.profiling.profile_pair` counts and times at."""
    size = input_size if input_size is not None else profile_input_size(cfg)
    return dataclasses.replace(cfg.profile, input_size=[int(v) for v in size])


STAGES = {"train": Train, "decompose": Decompose, "finetune": Finetune, "profile": Profile}


def stage(name: str):
    """The stage class that runs stage ``name`` (``finetune.K`` -> :class:`Finetune`)."""
    return STAGES[name.split(".")[0]]


def stage_selection(record: dict) -> str | None:
    """What a training or fine-tuning stage's record chose its kept model on: "validation", "test", or None
    (nothing chosen). Records of an older lrx, without ``selected_on``, chose on the test images."""
    if "selected_on" in record:
        return record["selected_on"]
    history = next((record[key] for key in ("history", "epochs") if isinstance(record.get(key), list)), [])
    return "test" if history else None


def _combined(choices) -> str | None:
    """"test" if any choice was made on the test images, else "validation" if any was made, else None."""
    choices = set(choices)
    return "test" if "test" in choices else "validation" if "validation" in choices else None


def run_selection(metrics: dict) -> str | None:
    """What the choices behind a run's final model were made on (:func:`summarise`'s ``selected_on``; read
    off the stages for metrics.json of an older lrx)."""
    if "selected_on" in metrics:
        return metrics["selected_on"]
    stages = metrics.get("stages") if isinstance(metrics.get("stages"), dict) else {}
    return _combined(stage_selection(record) for name, record in stages.items()
                     if (name == "train" or name.startswith("finetune.")) and isinstance(record, dict))


def _correctness(record) -> dict:
    """What metrics.json says about a model's per-image correctness (``test_correct``): its acc@1 interval,
    and the bits themselves for a paired difference; {} when there is none or it is damaged."""
    try:
        bits = unpack(record)
    except ValueError:
        return {}
    if len(bits) == 0:
        return {}
    low, high = wilson(int(bits.sum()), len(bits))
    return {"bits": bits, "acc1_ci": [100 * low, 100 * high]}


def summarise(metrics: dict, inherited: dict | None = None) -> dict:
    """The table's keys, derived from the stages' results (and the run this one builds on)."""
    stages = metrics.get("stages", {})
    inherited = inherited or {}
    out = {"acc1": inherited.get("acc1"), "acc1_before": None, "l2_before": None, "l2_after": None,
           "decompose": inherited.get("decompose"), "finetune": list(inherited.get("finetune") or [])}
    if "train" in stages:
        out["acc1"] = stages["train"].get("acc1")
    if "decompose" in stages:
        d = stages["decompose"]
        out["decompose"] = {k: d.get(k) for k in ("layers", "names", "bases", "scheme", "schemes", "basis", "method",
                                                  "decomposed", "fit", "plan")}
        out["acc1_before"], out["acc1"], out["l2_after"] = d.get("acc1_original"), d.get("acc1"), d.get("l2")
    tunes = [stages[k] for k in sorted((k for k in stages if k.startswith("finetune.")), key=lambda k: int(k.split(".")[1]))]
    if tunes:
        out["acc1_before"], out["l2_before"] = tunes[0].get("acc1_before"), tunes[0].get("l2_before")
        out["acc1"], out["l2_after"] = tunes[-1].get("acc1_after"), tunes[-1].get("l2_after")
        keys = ("l2", "ce", "epochs", "acc1_before", "acc1_after", "l2_before", "l2_after", "best_epoch", "wall_s",
                "selected_on", "kept_input", "kd", "temperature")
        out["finetune"] += [{k: t.get(k) for k in keys} for t in tunes]
    prof = stages.get("profile", {})
    for key in ("macs", "params", "cpu_time_ms", "cpu_time", "cuda_time_ms", "cuda_time", "latency"):
        out[key] = prof.get(key)
    out.update(_uncertainty(stages, inherited))
    target = latency_target(out["decompose"])
    if target is not None and isinstance(out["latency"], dict) and out["latency"].get("speedup") is not None:
        out["latency"] = {**out["latency"], "target": target, "target_missed": out["latency"]["speedup"] < target}
    return out


def latency_target(decompose: dict | None) -> float | None:
    """The latency target (``{latency: X}``) the run's expansion (its own or the one it builds on) was planned for."""
    plan = (decompose or {}).get("plan")
    target = plan.get("target") if isinstance(plan, dict) else None
    value = target.get("latency") if isinstance(target, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _uncertainty(stages: dict, inherited: dict) -> dict:
    """What the choices behind the final model were made on (``selected_on``: this run's training and
    fine-tuning stages and what it builds on), the final model's ``test_correct`` and the Wilson interval of
    its acc@1 (``acc1_ci``, percent), and its paired difference from the original on the same test images
    (``vs_original``: percentage points, the 95% interval, McNemar's exact p and the discordant counts)."""
    choices = [stage_selection(record) for name, record in stages.items()
               if (name == "train" or name.startswith("finetune.")) and isinstance(record, dict)]
    out = {"selected_on": _combined(choices + [inherited.get("selected_on")]), "test_correct": None,
           "acc1_ci": None, "vs_original": None}
    models = [name for name in stages if name != "profile"]
    final = stages[models[-1]] if models else {}
    mine = _correctness(final.get("test_correct"))
    if not mine:
        return out
    out["test_correct"], out["acc1_ci"] = final["test_correct"], mine["acc1_ci"]
    source = next((stages[name] for name in models if "original_test_correct" in stages[name]), {})
    original = _correctness(source.get("original_test_correct"))
    if original and len(original["bits"]) == len(mine["bits"]):
        d = paired_difference(original["bits"], mine["bits"])
        out["vs_original"] = {"diff": 100 * d.diff, "low": 100 * d.low, "high": 100 * d.high, "p": d.p,
                              "only_original": d.only_a, "only_this": d.only_b, "images": d.n}
    return out
