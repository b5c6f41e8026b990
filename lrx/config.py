"""Experiment configs: typed dataclasses loaded from one YAML per experiment row.

A config may ``extends:`` another YAML (a path relative to it); mappings merge key by key, the
child winning. Command-line overrides are dotted keys (``finetune.0.epochs=2``). Unknown keys,
wrong types and out-of-range values raise :class:`UserError` naming the file and the key.

This module is long because the schema, its YAML reading and its model-free checks change together;
the checks that need the model are :func:`lrx.runs.check_against_model`.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import UserError

Number = Union[int, float]


@dataclass
class ModelConfig:
    name: str = "alexnet_cifar10"
    num_classes: int = 10
    init: Literal["scratch", "imagenet"] = "scratch"


@dataclass
class DataConfig:
    name: Literal["cifar10", "fashion-mnist", "synthetic"] = "cifar10"
    root: str = "data"  # overridden by --data-root, then by the LRX_DATA env var
    image_size: int = 224  # pixels; images are resized on whole batches
    batch_size: int = 64
    test_batch_size: int = 256
    train_subset: Union[int, None] = None  # a fixed, seeded subset of this many images
    test_subset: Union[int, None] = None
    download: bool = True
    synthetic_size: int = 32  # native pixels of the synthetic images


@dataclass
class TrainConfig:
    """Baseline training (the seed's row 1)."""

    epochs: int = 30
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: Literal["cosine", "none"] = "cosine"  # cosine: per step, from lr down to 0 at the last step
    warmup_epochs: float = 0.0  # linear warm-up from ~0 to lr over this many epochs (fractions allowed)
    label_smoothing: float = 0.0
    keep: Literal["best-acc", "last"] = "best-acc"


@dataclass
class DecomposeConfig:
    layers: list[Union[int, str]] = field(default_factory=lambda: [2, 3, 4, 5])
    scheme: Literal["v1", "v2"] = "v1"
    bases: Union[list[int], Literal["auto"]] = field(default_factory=lambda: [8, 8, 6, 4])
    target: Union[dict[str, float], None] = None  # with bases: auto: {speedup: 3.0} or {macs: 0.4}
    basis: Literal["shared", "per-channel"] = "shared"
    method: Literal["svd", "alternating"] = "svd"
    decomposed: bool = False
    order: Literal["vh", "hv", "auto"] = "vh"  # scheme v2: which 1-D conv runs first (auto: fewer MACs per layer)
    options: dict[str, Any] = field(default_factory=dict)  # method options (lambda, iterations, ...)


@dataclass
class StageConfig:
    """One fine-tune stage: its loss weights, epochs and optimiser (AdamW, no scheduler)."""

    l2: float = 0.0
    ce: float = 0.0
    epochs: int = 1
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    keep: Literal["best-acc", "best-l2", "last"] = "best-acc"


@dataclass
class ProfileConfig:
    enabled: bool = True
    input_size: list[int] = field(default_factory=lambda: [3, 224, 224])  # C, H, W of ptflops and timing
    batch: int = 64  # torch.profiler / latency batch, as the seed
    threads: Union[int, None] = None  # torch threads; None: torch's default
    warmup: int = 2
    repeats: int = 5
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # On CPU, time both models in their fastest layout: the original in channels_last, the expansion
    # with lrx.speed.optimise's per-layer paths (MACs and params are counted before, on the plain models).
    optimise: bool = True


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False  # autocast on GPU
    channels_last: bool = False


@dataclass
class Config:
    name: str = ""  # run name; default: the file's stem
    no: Union[int, None] = None  # row number in the table
    group: Union[int, None] = None  # rows of one group sit between separators
    remark: str = ""
    seed: int = 0
    baseline: Union[str, None] = None  # run that provides the original model; None: this run trains it
    parent: Union[str, None] = None  # run whose expanded model this one starts from
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decompose: Union[DecomposeConfig, None] = None
    finetune: list[StageConfig] = field(default_factory=list)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    path: str = ""  # the file it was loaded from (not a YAML key)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("path")
        return out


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """The safe loader with YAML 1.2 booleans: only true/false, so the table's ``no:`` key stays a key."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.1 reads 1e-4 and 3E-4 as strings (it wants a dot and a signed exponent); YAML 1.2 and people read numbers.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+.0123456789"))


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping with the safe loader; ``extends:`` is resolved recursively."""
    return _read_yaml(Path(path), seen=())


def _read_yaml(path: Path, seen: tuple) -> dict:
    if path.resolve() in seen:
        raise UserError("extends: loops back to this file", file=str(path), key="extends")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("no such file", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read: {err}", file=str(path)) from None
    try:
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader: never builds Python objects
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"not valid YAML{where}: {problem}", file=str(path)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"expected a mapping of keys, got {type(raw).__name__}", file=str(path))
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise UserError("extends: must be a path to another YAML", file=str(path), key="extends")
    base = _read_yaml(path.parent / parent, seen + (path.resolve(),))
    return _merge(base, raw)


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(raw: dict, assignment: str, file: str = "--set") -> None:
    """Apply ``a.b.0.c=value`` to the raw mapping; the value is parsed as YAML."""
    if "=" not in assignment:
        raise UserError(f"override {assignment!r} must look like key.sub=value", file=file)
    dotted, text = assignment.split("=", 1)
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        value = text
    keys = dotted.strip().split(".")
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        if isinstance(node, list):
            node = _list_slot(node, key, dotted, file)
            continue
        if key not in node or node[key] is None:
            node[key] = [] if nxt.isdigit() else {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        idx = _index(last, dotted, file)
        while len(node) <= idx:
            node.append({})
        node[idx] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"cannot set {dotted}: {'.'.join(keys[:-1])} is not a mapping", file=file, key=dotted)


def _index(key: str, dotted: str, file: str) -> int:
    if not key.isdigit():
        raise UserError(f"expected a list index, got {key!r}", file=file, key=dotted)
    return int(key)


def _list_slot(node: list, key: str, dotted: str, file: str):
    idx = _index(key, dotted, file)
    while len(node) <= idx:
        node.append({})
    return node[idx]


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Load, merge, override and validate one experiment config.

    Raises :class:`UserError` with the file and dotted key of the first problem found.
    """
    path = Path(path)
    raw = read_yaml(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = _build(Config, raw, str(path), "")
    cfg.path = str(path)
    if not cfg.name:
        cfg.name = path.stem
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- typing


def _build(cls, raw: Any, file: str, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"expected a mapping, got {_show(raw)}", file=file, key=prefix or None)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
    for key in raw:
        if key not in fields:
            allowed = ", ".join(fields)
            raise UserError(f"unknown key {key!r}; allowed: {allowed}", file=file, key=_join(prefix, str(key)))
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, file, _join(prefix, name))
    return cls(**values)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(tp, value: Any, file: str, key: str):
    origin = typing.get_origin(tp)
    if origin is Union:
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, file, key)
            except UserError as err:
                errors.append(err)
        # A mapping that failed as a dataclass says more than "expected X or null".
        for err in errors:
            if err.key != key:
                raise err
        raise UserError(f"expected {_type_name(tp)}, got {_show(value)}", file=file, key=key)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(typing.get_args(tp)[0]):
            return value
        raise UserError(f"got {_show(value)}; allowed: {', '.join(map(str, typing.get_args(tp)))}", file=file, key=key)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"expected {_type_name(tp)}, got {_show(value)}", file=file, key=key)
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, file, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UserError(f"expected a mapping, got {_show(value)}", file=file, key=key)
        _, vtype = typing.get_args(tp)
        return {k: _coerce(vtype, v, file, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, file, key)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf"):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"expected {_type_name(tp)}, got {_show(value)}", file=file, key=key)


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Range checks that need no model (the model-dependent ones are in :func:`lrx.runs.check_against_model`)."""
    file = cfg.path or None

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise UserError(message, file=file, key=key)

    need(bool(NAME_RE.match(cfg.name)) and cfg.name not in (".", ".."), "name",
         f"run name {cfg.name!r} must be letters, digits, '.', '_' or '-', not starting with '.' (it names a folder under runs/)")
    for key in ("baseline", "parent"):
        value = getattr(cfg, key)
        need(value is None or bool(NAME_RE.match(value)), key, f"{value!r} is not a run name (letters, digits, '.', '_', '-')")
    need(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    need(cfg.model.num_classes >= 2, "model.num_classes", f"must be >= 2, got {cfg.model.num_classes}")
    d = cfg.data
    need(d.image_size >= 1, "data.image_size", f"must be >= 1, got {d.image_size}")
    need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    need(d.test_batch_size >= 1, "data.test_batch_size", f"must be >= 1, got {d.test_batch_size}")
    for key in ("train_subset", "test_subset"):
        value = getattr(d, key)
        need(value is None or value >= 1, f"data.{key}", f"must be >= 1 or null, got {value}")
    need(d.synthetic_size >= 8, "data.synthetic_size", f"must be >= 8, got {d.synthetic_size}")
    t = cfg.train
    need(t.epochs >= 0, "train.epochs", f"must be >= 0, got {t.epochs}")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    need(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1), got {t.momentum}")
    need(0 <= t.label_smoothing < 1, "train.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    need(t.warmup_epochs >= 0, "train.warmup_epochs", f"must be >= 0, got {t.warmup_epochs}")
    if cfg.decompose is not None:
        _validate_decompose(cfg.decompose, need)
        need(cfg.baseline is not None or cfg.parent is not None, "baseline",
             "a run with decompose: needs baseline: (the run that trains the original model)")
    need(cfg.parent is None or cfg.baseline is not None, "baseline", "a run with parent: also needs baseline:")
    for i, stage in enumerate(cfg.finetune):
        key = f"finetune.{i}"
        need(stage.epochs >= 0, f"{key}.epochs", f"must be >= 0, got {stage.epochs}")
        need(stage.l2 >= 0 and stage.ce >= 0, key, f"loss weights must be >= 0, got l2={stage.l2}, ce={stage.ce}")
        need(stage.l2 > 0 or stage.ce > 0, key, "a stage needs l2 > 0 or ce > 0")
        need(stage.lr > 0, f"{key}.lr", f"must be > 0, got {stage.lr}")
        need(stage.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {stage.weight_decay}")
        need(len(stage.betas) == 2 and all(0 <= b < 1 for b in stage.betas), f"{key}.betas",
             f"must be two numbers in [0, 1), got {stage.betas}")
    need(not cfg.finetune or cfg.decompose is not None or cfg.parent is not None, "finetune",
         "fine-tuning needs an expanded model: add decompose: or parent:")
    p = cfg.profile
    need(len(p.input_size) == 3 and all(s >= 1 for s in p.input_size), "profile.input_size",
         f"must be [channels, height, width] of positive integers, got {p.input_size}")
    need(p.batch >= 1, "profile.batch", f"must be >= 1, got {p.batch}")
    need(p.threads is None or p.threads >= 1, "profile.threads", f"must be >= 1 or null, got {p.threads}")
    need(p.repeats >= 5, "profile.repeats", f"must be >= 5 (a median needs several runs), got {p.repeats}")
    need(p.warmup >= 0, "profile.warmup", f"must be >= 0, got {p.warmup}")


def _validate_decompose(settings: DecomposeConfig, need) -> None:
    need(len(settings.layers) >= 1, "decompose.layers", "must list at least one layer")
    need(len(set(map(str, settings.layers))) == len(settings.layers), "decompose.layers", f"lists a layer twice: {settings.layers}")
    for i, layer in enumerate(settings.layers):
        need(not isinstance(layer, int) or layer >= 1, f"decompose.layers.{i}", f"layer indices start at 1, got {layer}")
    if settings.bases == "auto":
        try:
            check_target(settings.target)
        except UserError as err:
            need(False, err.key, err.message if err.key != "decompose.target" else f"bases: auto needs {err.message}")
    else:
        need(settings.target is None, "decompose.target", "target: goes with bases: auto")
        need(len(settings.bases) == len(settings.layers), "decompose.bases",
             f"has {len(settings.bases)} entries but decompose.layers has {len(settings.layers)}")
        # Each rank's range is checked against its layer (lrx.runs.check_against_model), before anything runs.
    need(not (settings.decomposed and settings.scheme == "v2"), "decompose.decomposed",
         "decomposed: true is scheme v1's separable form; scheme v2 is separable already")
    need(settings.order == "vh" or settings.scheme == "v2", "decompose.order",
         f"order {settings.order!r} is scheme v2's choice of which 1-D conv runs first; scheme v1 takes vh (the default)")


TARGETS = ("speedup", "macs")


def check_target(target) -> tuple[str, float]:
    """``(kind, value)`` of a rank target: ``{speedup: X}`` with X > 1 (the replaced layers' MACs fall X-fold)
    or ``{macs: F}`` with 0 < F < 1 (the fraction of the whole model's MACs to keep). The one check of a
    target, for configs (``decompose.target``) and :func:`lrx.ranks.plan_ranks` alike."""
    if not isinstance(target, dict) or len(target) != 1 or next(iter(target)) not in TARGETS:
        raise UserError(f"a target {{speedup: X}} (theoretical speedup of the replaced layers, X > 1) or "
                        f"{{macs: F}} (fraction of the whole model's MACs to keep, 0 < F < 1), got {target!r}",
                        key="decompose.target")
    kind, value = next(iter(target.items()))
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if kind == "speedup" and not (number and value > 1):
        raise UserError(f"must be a number > 1, got {value!r}", key="decompose.target.speedup")
    if kind == "macs" and not (number and 0 < value < 1):
        raise UserError(f"must be a fraction in (0, 1), got {value!r}", key="decompose.target.macs")
    return kind, float(value)


def find_config(name: str, beside: str | Path, key: str | None = None) -> Path:
    """The config of run ``name``: ``<name>.yaml`` in the folder of the config ``beside``."""
    path = Path(beside).parent / f"{name}.yaml"
    if not path.exists():
        raise UserError(f"names run {name!r} but there is no config {path}", file=str(beside), key=key)
    return path
