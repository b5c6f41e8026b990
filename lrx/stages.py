"""What each stage of a run does: train, decompose, finetune.K, profile.

Every stage reads the model it starts from out of a file and writes the model it ends with to a
file of its own (``model.pt``, ``expanded.pt``, ``stageK.pt``), so any stage can be redone alone.
The table's keys (acc1, l2_before, ...) are derived from the stages' results by :func:`summarise`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_checkpoint, save_atomic
from .errors import UserError
from .models import build_model

MODEL_FILES = {"train": "model.pt", "decompose": "expanded.pt"}


def model_file(stage: str) -> str:
    """The file a model-changing stage writes."""
    if stage.startswith("finetune."):
        return f"stage{stage.split('.')[1]}.pt"
    return MODEL_FILES[stage]


def checkpoint_file(stage: str) -> str | None:
    """The per-epoch checkpoint a training stage resumes from (None for stages without epochs)."""
    if stage.startswith("finetune."):
        return f"stage{stage.split('.')[1]}.ckpt"
    return "train.ckpt" if stage == "train" else None


def save_model(path: Path, model: torch.nn.Module, arch: str, num_classes: int, spec=None, layers=None) -> None:
    """Rank 0 writes the model file; every process waits until it is there."""
    from . import distributed

    if distributed.is_main():
        save_atomic({"model": model.state_dict(), "arch": arch, "num_classes": num_classes,
                    "spec": spec, "layers": layers or []}, path)
    distributed.barrier()


def load_model(path: Path, arch: str, num_classes: int):
    """Rebuild a saved model (expanded or not) and load its weights.

    Returns (model, replaced layer names, spec), the spec being what :func:`lrx.lowrank.build_expanded` took.
    """
    blob = load_checkpoint(path)
    if blob.get("arch") != arch or blob.get("num_classes") != num_classes:
        raise UserError(f"{path} holds a {blob.get('arch')} with {blob.get('num_classes')} classes, "
                        f"but the config asks for {arch} with {num_classes}; use --force to rebuild it")
    model = build_model(arch, num_classes)
    if blob.get("spec"):
        from .lowrank import build_expanded

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


def previous_model_file(runner, stage: str) -> Path:
    """The model file a stage starts from: the last model-changing stage before it, or the run it builds on."""
    from .runs import stage_names

    cfg = runner.cfg
    names = [n for n in stage_names(cfg) if n != "profile"]
    before = names[: names.index(stage)] if stage in names else names
    if before:
        return runner.dir.file(model_file(before[-1]))
    source = cfg.parent or cfg.baseline
    return final_model_file(runner.runs_dir, source)


def final_model_file(runs_dir: Path, name: str) -> Path:
    """The last model file a finished run wrote."""
    from .runs import RunDir

    run = RunDir(runs_dir, name)
    stages = [s for s in run.read_metrics().get("stages", {}) if s != "profile"]
    if not stages:
        raise UserError(f"run {name!r} in {runs_dir} has no finished model")
    return run.file(model_file(stages[-1]))


def original_model(runner):
    """The baseline model this run compresses (the teacher of L2 fine-tuning)."""
    cfg = runner.cfg
    if runner._original is None:
        path = runner.dir.file("model.pt") if cfg.baseline is None else final_model_file(runner.runs_dir, cfg.baseline)
        runner._original, _, _ = load_model(path, cfg.model.name, cfg.model.num_classes)
        runner._original.to(runner.device).eval()
    return runner._original


def data(runner):
    from .data import load_data

    if runner._data is None:
        runner._data = load_data(runner.cfg, runner.device, runner.data_root)
    return runner._data


# ---------------------------------------------------------------- stages


class Train:
    @staticmethod
    def done(runner, name) -> bool:
        return runner.dir.file("model.pt").exists()

    @staticmethod
    def run(runner, name, metrics) -> dict:
        from .train import train_baseline

        cfg = runner.cfg
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model.name, cfg.model.num_classes, cfg.model.init).to(runner.device)
        train, test = data(runner)
        result = train_baseline(model, train, test, cfg.train, runner.dir.file(checkpoint_file(name)), log=runner.say,
                                quiet=runner.quiet, runtime=cfg.runtime, seed=cfg.seed)
        save_model(runner.dir.file("model.pt"), model, cfg.model.name, cfg.model.num_classes)
        return result


class Decompose:
    @staticmethod
    def done(runner, name) -> bool:
        return runner.dir.file("expanded.pt").exists()

    @staticmethod
    def run(runner, name, metrics) -> dict:
        from .finetune import l2_norm
        from .train import evaluate

        cfg, dec = runner.cfg, runner.cfg.decompose
        original = original_model(runner)
        start, _, _ = load_model(previous_model_file(runner, name), cfg.model.name, cfg.model.num_classes)
        expanded, report = expand_model(start.cpu(), cfg)
        expanded.to(runner.device)
        names = [layer["name"] for layer in report["layers"]]
        save_model(runner.dir.file("expanded.pt"), expanded, cfg.model.name, cfg.model.num_classes, report["spec"], names)
        runner.say(report_text(report))
        _, test = data(runner)
        result = {"acc1_original": evaluate(original, test), "acc1": evaluate(expanded, test),
                  "l2": l2_norm(expanded, original, names, test), "report": report["layers"],
                  "layers": dec.layers, "bases": report["ranks"], "scheme": dec.scheme, "basis": dec.basis,
                  "method": dec.method, "decomposed": dec.decomposed}
        if "plan" in report:
            result["plan"] = report["plan"]
        runner.say(f"acc@1 {result['acc1_original']:.2f} -> {result['acc1']:.2f} after decomposition, L2 norm {result['l2']:.1f}")
        return result


def expand_model(model, cfg, input_size=None):
    """Expand ``model`` as ``cfg.decompose`` says; ``bases: auto`` first plans ranks from the target."""
    from .lowrank import expand

    dec = cfg.decompose
    input_size = tuple(input_size or cfg.profile.input_size)
    plan = None
    ranks = dec.bases
    if dec.bases == "auto":
        from .ranks import plan_ranks

        plan = plan_ranks(model, dec.layers, dec.scheme, dec.target, input_size=input_size, basis=dec.basis,
                          decomposed=dec.decomposed)
        ranks = plan["ranks"]
    try:
        expanded, report = expand(model, layers=dec.layers, scheme=dec.scheme, bases=ranks, basis=dec.basis,
                                  method=dec.method, decomposed=dec.decomposed, input_size=input_size,
                                  order=dec.order, **dec.options)
    except UserError as err:
        raise UserError(err.message, file=cfg.path, key=err.key or "decompose") from None
    except TypeError as err:  # an unknown method option
        raise UserError(f"{err}", file=cfg.path, key="decompose.options") from None
    report["ranks"] = list(ranks)
    if plan is not None:
        report["plan"] = plan
    return expanded, report


def report_text(report) -> str:
    lines = ["layer                 rank  max   rel.error  MACs ratio"]
    for layer in report["layers"]:
        lines.append(f"{layer['name']:<20} {layer['rank']:>5} {layer['max_rank']:>4}   {layer['rel_error']:.4f}     "
                     f"{layer['mac_ratio']:.2f}x")
    return "\n".join(lines)


class Finetune:
    @staticmethod
    def done(runner, name) -> bool:
        return runner.dir.file(model_file(name)).exists()

    @staticmethod
    def run(runner, name, metrics) -> dict:
        from .finetune import run_stage

        cfg = runner.cfg
        index = int(name.split(".")[1])
        stage = cfg.finetune[index]
        original = original_model(runner)
        student, names, spec = load_model(previous_model_file(runner, name), cfg.model.name, cfg.model.num_classes)
        student.to(runner.device)
        train, test = data(runner)
        result = run_stage(student, original, names, train, test, stage, runner.dir.file(checkpoint_file(name)),
                           log=runner.say, quiet=runner.quiet, runtime=cfg.runtime, seed=cfg.seed + index)
        save_model(runner.dir.file(model_file(name)), student, cfg.model.name, cfg.model.num_classes, spec, names)
        return result


class Profile:
    @staticmethod
    def done(runner, name) -> bool:
        return True

    @staticmethod
    def run(runner, name, metrics) -> dict:
        from . import distributed
        from .profiling import profile_pair

        if not distributed.is_main():  # one process times; the others would disturb it
            distributed.barrier()
            return {}
        cfg = runner.cfg
        original = original_model(runner).cpu()
        expanded, names = (None, [])
        if cfg.baseline is not None:
            expanded, names, _ = load_model(previous_model_file(runner, name), cfg.model.name, cfg.model.num_classes)
        result = profile_pair(original, expanded, names, cfg.profile)  # cfg.profile.device, "auto" resolved there
        runner._original = None  # moved to CPU above; reload on the run's device if needed again
        distributed.barrier()
        return result


STAGES = {"train": Train, "decompose": Decompose, "finetune": Finetune, "profile": Profile}


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
        out["decompose"] = {k: d.get(k) for k in ("layers", "bases", "scheme", "basis", "method", "decomposed", "plan")}
        out["acc1_before"], out["acc1"], out["l2_after"] = d.get("acc1_original"), d.get("acc1"), d.get("l2")
    tunes = [stages[k] for k in sorted((k for k in stages if k.startswith("finetune.")), key=lambda k: int(k.split(".")[1]))]
    if tunes:
        out["acc1_before"], out["l2_before"] = tunes[0].get("acc1_before"), tunes[0].get("l2_before")
        out["acc1"], out["l2_after"] = tunes[-1].get("acc1_after"), tunes[-1].get("l2_after")
        out["finetune"] += [{k: t.get(k) for k in ("l2", "ce", "epochs", "acc1_before", "acc1_after", "l2_before",
                                                   "l2_after", "best_epoch", "wall_s")} for t in tunes]
    prof = stages.get("profile", {})
    for key in ("macs", "params", "cpu_time_ms", "cuda_time_ms", "latency"):
        out[key] = prof.get(key)
    return out
