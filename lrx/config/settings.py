"""Experiment configs: typed dataclasses loaded from one YAML per experiment row.

A config may ``extends:`` another YAML (a path relative to it); mappings merge key by key, the
child winning. Command-line overrides are dotted keys (``finetune.0.epochs=2``). Unknown keys,
wrong types and out-of-range values raise :class:`UserError` naming the file and the key.

Every mistake found without the model is refused here, before anything runs or is written: an empty
file, a run that names itself as baseline or parent, counts and sizes outside their bounds (``MAX_*``),
method options the method does not take. Reading the YAML itself (limits, duplicate keys, no aliases,
``extends:``, ``--set``) is :mod:`lrx.base.yamlread`'s. The checks that need the model are
:func:`lrx.pipeline.runner.check_against_model`.

It is long because every config rule that needs no model lives here, beside the dataclass it checks,
and so does finding the config of a run that another names (:func:`find_config`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union


from lrx.base.errors import UserError
from lrx.base.yamlread import apply_override, is_finite_number, is_number, key_text, read_yaml, show
from lrx.factor.choices import MAX_ITERATIONS, check_method_options

__all__ = ["ModelConfig", "DataConfig", "TrainConfig", "CalibrationConfig", "DecomposeConfig", "layer_pattern",
           "StageConfig", "ProfileConfig", "RuntimeConfig", "Config", "NAME_RE", "load_config", "MAX_SEED",
           "MAX_EPOCHS", "MAX_IMAGE_SIZE", "MAX_BATCH", "MAX_SUBSET", "MAX_CLASSES", "MAX_CHANNELS", "MAX_ROW",
           "MAX_LAYER", "MAX_RANK", "MAX_NAME", "validate", "PYTHON_MODEL_RE", "TORCHVISION_RE", "DATASETS",
           "MAX_WORKERS", "TARGETS", "check_target", "config_candidates", "find_config", "stage_settings",
           "IMAGE_CHANNELS", "profile_input_size", "parse_input_size", "size_text", "MAX_SEEDS", "NOT_KEYS",
           "check_seeds", "parse_seeds", "seed_suffix", "with_seed", "seed_runs", "one_run"]

Number = Union[int, float]


@dataclass
class ModelConfig:
    # A registry name (lrx.nn.models.MODELS), "torchvision:<name>" (torchvision's model registry) or
    # "python:<package.module>:<factory>" (the user's code: a callable(num_classes=...) returning an nn.Module).
    name: str = "alexnet_cifar10"
    num_classes: int = 10
    init: Literal["scratch", "imagenet"] = "scratch"
    weights: Union[str, None] = None  # torchvision: models only: a weights name (DEFAULT, IMAGENET1K_V1, ...)
    checkpoint: Union[str, None] = None  # the user's trained weights (state_dict or lrx model file) to start from


@dataclass
class DataConfig:
    # cifar10, fashion-mnist, synthetic, imagefolder (data.root holds train/ and val/), torchvision:<Dataset>
    name: str = "cifar10"
    root: str = "data"  # overridden by --data-root, then by the LRX_DATA env var
    image_size: int = 224  # pixels; images are resized on whole batches
    batch_size: int = 64
    test_batch_size: int = 256
    train_subset: Union[int, None] = None  # a fixed, seeded subset of this many images
    test_subset: Union[int, None] = None
    # Validation images (select_on: validation), seeded, held out of the training split before train_subset
    # is drawn from the rest: this many; null with val_fraction null: 10% of the split, at most 5000 images
    # (an image folder with train/, val/ and test/ validates on val/, this many of them when set).
    val_subset: Union[int, None] = None
    val_fraction: Union[float, None] = None  # or this fraction of the training split, in (0, 1)
    download: bool = True
    synthetic_size: int = 32  # native pixels of the synthetic images
    stream: Union[bool, None] = None  # read batches with a DataLoader; null: when the images exceed 4 GiB in memory
    workers: int = 2  # DataLoader worker processes (streaming, and decoding imagefolder / torchvision: sets)


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
class CalibrationConfig:
    """What ``fit: data`` fits to: the first ``images`` training images of the run's data (epoch 0's order)."""
    images: int = 512
    sequential: bool = True  # each layer's input from the model whose earlier layers are already expanded
    iterations: int = 20  # alternating least-squares sweeps after the closed form


@dataclass
class DecomposeConfig:
    # 1-based conv indices, module names, glob patterns ("layer3.*") or "auto"; a single entry may stand alone
    layers: Union[list[Union[int, str]], int, str] = field(default_factory=lambda: [2, 3, 4, 5])
    # v1, v2 (convs with a kernel larger than 1x1), channel (1x1 convs and linear layers, W as C -> R -> N),
    # tucker2 (convs with a kernel larger than 1x1: 1x1 C -> R1, KxK R1 -> R2, 1x1 R2 -> N) or auto (per layer: v2
    # for a larger kernel, channel for a 1x1 conv or a linear layer; bases: auto plans both, and a latency
    # target also weighs tucker2 for each larger kernel)
    scheme: Literal["v1", "v2", "channel", "tucker2", "auto"] = "v1"
    bases: Union[list[int], Literal["auto"]] = field(default_factory=lambda: [8, 8, 6, 4])
    target: Union[dict[str, float], None] = None  # with bases: auto: {speedup: 3.0}, {macs: 0.4} or {latency: 2.0}
    # Ranks are multiples of this (capped at the layer's maximum rank), for every target; auto: the
    # device's rule (lrx.plan.macs.device_align: 32 on CUDA, 1 on CPU).
    align: Union[Literal[1, 8, 16, 32], Literal["auto"]] = 1
    basis: Literal["shared", "per-channel"] = "shared"
    method: Literal["svd", "alternating"] = "svd"
    decomposed: bool = False
    order: Literal["vh", "hv", "auto"] = "vh"  # scheme v2: which 1-D conv runs first (auto: fewer MACs per layer)
    options: dict[str, Any] = field(default_factory=dict)  # method options (lambda, iterations, ...)
    fit: Literal["weights", "data"] = "weights"  # to the filters (the seed's), or to outputs (lrx.factor.datafit)
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig())

    def __post_init__(self):
        if not isinstance(self.layers, list):  # `layers: auto` means `layers: [auto]`
            self.layers = [self.layers]


def layer_pattern(entry) -> bool:
    """Whether a ``decompose.layers`` entry stands for several convs: ``auto`` or a glob pattern (``*?[``);
    how many it selects is known only with the model (:func:`lrx.nn.surgery.select_layers`)."""
    return isinstance(entry, str) and (entry == "auto" or any(c in entry for c in "*?["))


@dataclass
class StageConfig:
    """One fine-tune stage: its loss weights, epochs and optimiser (AdamW, no scheduler)."""

    l2: float = 0.0
    ce: float = 0.0
    # Knowledge distillation (Hinton et al. 2015): weight of T^2 * KL(original || expansion) on the logits
    # softened by temperature T; combines with l2 and ce.
    kd: float = 0.0
    temperature: float = 4.0  # kd's T, > 0: higher shows more of the original's smaller class scores
    epochs: int = 1
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    keep: Literal["best-acc", "best-l2", "last"] = "best-acc"


@dataclass
class ProfileConfig:
    enabled: bool = True
    # C, H, W of one image for the MACs count, the times and a latency target's plan; null: the data's images
    # as the run trains and evaluates on them, 3 x data.image_size x data.image_size (profile_input_size).
    input_size: Union[list[int], None] = None
    batch: int = 64  # torch.profiler / latency batch, as the seed
    threads: Union[int, None] = None  # torch threads; None: torch's default
    warmup: int = 2
    repeats: int = 5
    # Rounds of a profile: each with fresh copies of both models and its own warm-up; a time is the median of
    # the rounds' medians, and rounds whose speedups disagree by more than 10% mark the profile noisy.
    rounds: int = 3
    # Seconds each model runs at least per round: repeats are added beyond `repeats` until it has (a median of
    # five forwards of a few ms is one hiccup away from another figure; of half a second's worth it is not).
    min_time_s: float = 0.5
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # On CPU, time both models in their fastest layout: the original in channels_last, the expansion
    # with lrx.nn.inference.optimise's per-layer paths (MACs and params are counted before, on the plain models).
    optimise: bool = True
    # The dtype models run in for latency (a latency target plans for it too): float32, or bfloat16 /
    # float16 under autocast (GPU; on CPU bfloat16 autocast only).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compile: bool = False  # torch.compile both models (original and expansion alike) before timing them


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
    # One seed, or a list of seeds: `lrx run` then runs the row once per seed, each in its own run folder
    # <name>-s<seed> built on its baseline and parent run with the same seed (lrx.config.settings.seed_runs).
    seed: Union[int, list[int]] = 0
    # The images that choose the kept epoch of training and fine-tuning (keep: best-acc, best-l2): validation
    # images held out of the training split (data.val_subset), or test, the images acc@1 is reported on
    # (lrx's earlier rule, optimistic; the table marks such rows).
    select_on: Literal["validation", "test"] = "validation"
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
    seed_of: Union[str, None] = None  # a run of a seed list: the row's own name (not a YAML key; with_seed sets it)

    def to_dict(self) -> dict:
        """The settings as plain data (a run's config.yaml), ``profile.input_size`` resolved
        (:func:`profile_input_size`): the file says at what size the run was counted and timed."""
        out = dataclasses.asdict(self)
        for key in NOT_KEYS:
            out.pop(key)
        out["profile"]["input_size"] = list(profile_input_size(self))
        return out


NOT_KEYS = ("path", "seed_of")  # Config fields that are not YAML keys


# Every dataset lrx reads gives RGB images: grayscale ones are repeated to 3 channels (lrx.data.datasets).
IMAGE_CHANNELS = 3


def profile_input_size(cfg: Config) -> tuple[int, int, int]:
    """(C, H, W) of one image at which a run's MACs are counted, its models timed and a latency target planned:
    ``profile.input_size`` when given, else the data's images as the model is trained and evaluated on them,
    ``(IMAGE_CHANNELS, data.image_size, data.image_size)``. The one rule every consumer of the size uses (the
    profile stage, the latency planner, the dry run, the config checks, config.yaml and the stage hashes)."""
    given = cfg.profile.input_size
    if given is not None:
        return tuple(int(v) for v in given)
    return (IMAGE_CHANNELS, cfg.data.image_size, cfg.data.image_size)


def size_text(size) -> str:
    """``(3, 64, 64)`` -> ``"3x64x64"``: how lrx writes an input size in file names, tables and messages."""
    return "x".join(str(int(v)) for v in size)


def parse_input_size(text: str, option: str = "--input-size") -> tuple[int, int, int]:
    """``"3,224,224"`` -> ``(3, 224, 224)``: an input size given on the command line, within the bounds of
    ``profile.input_size`` (C <= MAX_CHANNELS, H and W <= MAX_IMAGE_SIZE); :class:`UserError` naming
    ``option`` and the allowed values otherwise."""
    allowed = (f"give C,H,W as three integers, 1 <= C <= {MAX_CHANNELS} and 1 <= H, W <= {MAX_IMAGE_SIZE}, "
               "e.g. 3,224,224")
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isascii() and p.strip().isdigit() and len(p.strip()) <= 6 for p in parts):
        raise UserError(f"{option} {show(text)}: {allowed}")
    size = tuple(int(p) for p in parts)
    if not (1 <= size[0] <= MAX_CHANNELS and all(1 <= v <= MAX_IMAGE_SIZE for v in size[1:])):
        raise UserError(f"{option} {show(text)}: {allowed}")
    return size


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
    if cfg.model.name.startswith("python:"):  # the user's module may sit next to the config
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.append(folder)
    return cfg


# ---------------------------------------------------------------- typing


def _build(cls, raw: Any, file: str, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"expected a mapping, got {show(raw)}", file=file, key=prefix or None)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in NOT_KEYS}
    for key in raw:
        if key not in fields:
            allowed = ", ".join(fields)
            raise UserError(f"unknown key {show(key)}; allowed: {allowed}", file=file, key=_join(prefix, key_text(key)))
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, file, _join(prefix, name))
    return cls(**values)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


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
        raise UserError(f"expected {_type_name(tp)}, got {show(value)}", file=file, key=key)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(typing.get_args(tp)[0]):
            return value
        raise UserError(f"got {show(value)}; allowed: {', '.join(map(str, typing.get_args(tp)))}", file=file, key=key)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"expected {_type_name(tp)}, got {show(value)}", file=file, key=key)
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, file, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UserError(f"expected a mapping, got {show(value)}", file=file, key=key)
        _, vtype = typing.get_args(tp)
        return {k: _coerce(vtype, v, file, f"{key}.{key_text(k)}") for k, v in value.items()}
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
        if is_number(value):
            if is_finite_number(value):
                return float(value)
            raise UserError(f"must be a finite number, got {show(value)}", file=file, key=key)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"expected {_type_name(tp)}, got {show(value)}", file=file, key=key)


# ---------------------------------------------------------------- validation


# Upper bounds of counts and sizes: far above any real run, low enough that nothing downstream
# overflows, allocates without bound or loops for ever.
MAX_SEED = 2**32 - 1  # numpy and random take 32-bit seeds; lrx.data.datasets's seed * 1_000_003 + epoch stays in torch's 64 bits
MAX_EPOCHS = 100_000
MAX_IMAGE_SIZE = 4096  # pixels per side
MAX_BATCH = 65_536
MAX_SUBSET = 10**9  # images; more than any dataset lrx reads (null means all of them)
MAX_CLASSES = 100_000
MAX_CHANNELS = 1024  # profile.input_size's C
MAX_ROW = 10**6  # the table's no: and group:
MAX_LAYER = 1000  # a conv layer's 1-based position
MAX_RANK = 100_000  # above any conv's maximum rank; the exact maximum is checked against the model
MAX_NAME = 100  # characters of a run name (it names a folder)
MAX_SEEDS = 100  # seeds of one row (each is a whole run)

# Method options of decompose.options (the source of truth; tests check lrx.factor.decomposition's defaults
# name the same options).


def validate(cfg: Config) -> None:
    """Range checks that need no model (the model-dependent ones are in :func:`lrx.pipeline.runner.check_against_model`)."""
    file = cfg.path or None

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise UserError(message, file=file, key=key)

    def within(value, key: str, low, high, why_low: str = "", why_high: str = "") -> None:
        need(value >= low, key, f"must be >= {low}{why_low}, got {show(value)}")
        need(value <= high, key, f"must be <= {high}{why_high}, got {show(value)}")

    for key in ("name", "baseline", "parent"):
        value = getattr(cfg, key)
        if value is not None:
            need(bool(NAME_RE.match(value)) and len(value) <= MAX_NAME and value not in (".", ".."), key,
                 f"run name {show(value)} must be letters, digits, '.', '_' or '-', not starting with '.', "
                 f"at most {MAX_NAME} characters (it names a folder under runs/)")
        if key != "name":
            need(value != cfg.name, key, f"names this run itself ({cfg.name!r}); {key}: names another run")
    check_seeds(cfg.seed, file, "seed")
    for key in ("no", "group"):
        value = getattr(cfg, key)
        if value is not None:
            within(value, key, 0, MAX_ROW)
    within(cfg.model.num_classes, "model.num_classes", 2, MAX_CLASSES)
    _validate_sources(cfg, need)
    d = cfg.data
    within(d.image_size, "data.image_size", 1, MAX_IMAGE_SIZE)
    within(d.batch_size, "data.batch_size", 1, MAX_BATCH)
    within(d.test_batch_size, "data.test_batch_size", 1, MAX_BATCH)
    for key in ("train_subset", "test_subset"):
        value = getattr(d, key)
        if value is not None:
            within(value, f"data.{key}", 1, MAX_SUBSET, why_low=" or null", why_high=" or null (every image)")
    within(d.synthetic_size, "data.synthetic_size", 8, MAX_IMAGE_SIZE)
    _validate_validation(cfg, need, within)
    t = cfg.train
    within(t.epochs, "train.epochs", 0, MAX_EPOCHS)
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    need(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1), got {t.momentum}")
    need(0 <= t.label_smoothing < 1, "train.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    within(t.warmup_epochs, "train.warmup_epochs", 0, MAX_EPOCHS)
    if cfg.decompose is not None:
        _validate_decompose(cfg.decompose, need, within)
        need(cfg.baseline is not None or cfg.parent is not None, "baseline",
             "a run with decompose: needs baseline: (the run that trains the original model)")
    need(cfg.parent is None or cfg.baseline is not None, "baseline", "a run with parent: also needs baseline:")
    for i, stage in enumerate(cfg.finetune):
        key = f"finetune.{i}"
        within(stage.epochs, f"{key}.epochs", 0, MAX_EPOCHS)
        need(stage.l2 >= 0 and stage.ce >= 0 and stage.kd >= 0, key,
             f"loss weights must be >= 0, got l2={stage.l2}, ce={stage.ce}, kd={stage.kd}")
        need(stage.l2 > 0 or stage.ce > 0 or stage.kd > 0, key, "a stage needs l2 > 0, ce > 0 or kd > 0")
        need(stage.temperature > 0, f"{key}.temperature", f"must be > 0, got {show(stage.temperature)}")
        need(stage.lr > 0, f"{key}.lr", f"must be > 0, got {stage.lr}")
        need(stage.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {stage.weight_decay}")
        need(len(stage.betas) == 2 and all(0 <= b < 1 for b in stage.betas), f"{key}.betas",
             f"must be two numbers in [0, 1), got {show(stage.betas)}")
    need(not cfg.finetune or cfg.decompose is not None or cfg.parent is not None, "finetune",
         "fine-tuning needs an expanded model: add decompose: or parent:")
    p = cfg.profile
    if p.input_size is not None:  # null: the data's images (profile_input_size), checked with data.image_size
        need(len(p.input_size) == 3, "profile.input_size",
             f"must be [channels, height, width] of positive integers, or null (the data's images: "
             f"{IMAGE_CHANNELS} x data.image_size x data.image_size), got {show(p.input_size)}")
        for i, (size, top) in enumerate(zip(p.input_size, (MAX_CHANNELS, MAX_IMAGE_SIZE, MAX_IMAGE_SIZE))):
            within(size, f"profile.input_size.{i}", 1, top)
    within(p.batch, "profile.batch", 1, MAX_BATCH)
    if p.threads is not None:
        within(p.threads, "profile.threads", 1, 1024, why_low=" or null")
    within(p.repeats, "profile.repeats", 5, 10_000, why_low=" (a median needs several runs)")
    within(p.warmup, "profile.warmup", 0, 1000)
    within(p.rounds, "profile.rounds", 1, 100)
    need(is_finite_number(p.min_time_s) and 0 <= p.min_time_s <= 60, "profile.min_time_s",
         f"must be a number of seconds in [0, 60], got {show(p.min_time_s)}")


def _validate_validation(cfg: Config, need, within) -> None:
    """The validation split's keys; its size against the training split is checked with the data
    (:func:`lrx.data.splits.check_split_sizes`)."""
    d = cfg.data
    given = [key for key in ("val_subset", "val_fraction") if getattr(d, key) is not None]
    need(len(given) < 2, "data.val_fraction", f"data.val_subset ({d.val_subset}) and data.val_fraction "
         f"({d.val_fraction}) both size the validation split; keep one")
    need(not given or cfg.select_on == "validation", f"data.{given[0]}" if given else "data",
         "sizes the validation split, but select_on: test uses none; drop it or set select_on: validation")
    if d.val_subset is not None:
        within(d.val_subset, "data.val_subset", 1, MAX_SUBSET, why_low=" or null")
    if d.val_fraction is not None:
        need(0 < d.val_fraction < 1, "data.val_fraction", f"must be a fraction in (0, 1), got {show(d.val_fraction)}")


PYTHON_MODEL_RE = re.compile(r"^python:[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
TORCHVISION_RE = re.compile(r"^torchvision:[A-Za-z_]\w*$")
DATASETS = ("cifar10", "fashion-mnist", "synthetic", "imagefolder")
MAX_WORKERS = 256


def _validate_sources(cfg: Config, need) -> None:
    """The forms of model.name and data.name, and the model's starting weights (one source of them)."""
    m, d = cfg.model, cfg.data
    if m.name.startswith("python:"):
        need(bool(PYTHON_MODEL_RE.match(m.name)), "model.name",
             f"{show(m.name)} must be python:<package.module>:<factory>, e.g. python:mynets:build")
    if m.name.startswith("torchvision:"):
        need(bool(TORCHVISION_RE.match(m.name)), "model.name",
             f"{show(m.name)} must be torchvision:<model name>, e.g. torchvision:resnet18")
    need(m.weights is None or m.name.startswith("torchvision:"), "model.weights",
         f"weights {show(m.weights)} name torchvision's pretrained weights and go with a torchvision:<name> model; "
         f"model.name is {show(m.name)}")
    need(m.init == "scratch" or not m.name.startswith(("torchvision:", "python:")), "model.init",
         f"init {m.init} is for registry models; {m.name} starts from scratch, model.weights (torchvision: models) "
         "or model.checkpoint")
    starts = [key for key, on in (("model.init: imagenet", m.init == "imagenet"), ("model.weights", m.weights),
                                  ("model.checkpoint", m.checkpoint)) if on]
    need(len(starts) <= 1, "model.checkpoint" if m.checkpoint else "model.weights",
         f"{' and '.join(starts)} both set the starting weights; keep one")
    need(m.checkpoint is None or bool(m.checkpoint.strip()), "model.checkpoint", "must be a file path or null")
    need(d.name in DATASETS or bool(TORCHVISION_RE.match(d.name)), "data.name",
         f"got {show(d.name)}; allowed: {', '.join(DATASETS)}, torchvision:<Dataset> (e.g. torchvision:CIFAR100)")
    need(0 <= d.workers <= MAX_WORKERS, "data.workers", f"must be in 0..{MAX_WORKERS}, got {show(d.workers)}")


def _validate_decompose(settings: DecomposeConfig, need, within) -> None:
    need(len(settings.layers) >= 1, "decompose.layers", "must list at least one layer")
    need(len(set(map(str, settings.layers))) == len(settings.layers), "decompose.layers",
         f"lists a layer twice: {show(settings.layers)}")
    for i, layer in enumerate(settings.layers):
        if isinstance(layer, int):
            within(layer, f"decompose.layers.{i}", 1, MAX_LAYER, why_low=" (layer indices start at 1)")
    need(settings.fit == "weights" or settings.method == "svd", "decompose.method",
         f"fit: data starts from the SVD and refits to the outputs; method {settings.method!r} fits the weights only")
    within(settings.calibration.images, "decompose.calibration.images", 1, MAX_SUBSET)
    within(settings.calibration.iterations, "decompose.calibration.iterations", 0, MAX_ITERATIONS)
    if settings.bases == "auto":
        try:
            check_target(settings.target)
        except UserError as err:
            need(False, err.key, err.message if err.key != "decompose.target" else f"bases: auto needs {err.message}")
    else:
        need(settings.target is None, "decompose.target",
             "target: goes with bases: auto; with explicit ranks set it to null (--set decompose.target=null)")
        need(len(settings.bases) == len(settings.layers) or any(map(layer_pattern, settings.layers)),
             "decompose.bases", f"has {len(settings.bases)} entries but decompose.layers has {len(settings.layers)}")
        # Each rank's range is checked against its layer (lrx.pipeline.runner.check_against_model), before anything
        # runs; only a rank no conv can have is refused here.
        for i, rank in enumerate(settings.bases):
            need(rank <= MAX_RANK, f"decompose.bases.{i}", f"must be <= {MAX_RANK}, got {show(rank)}")
    if settings.bases == "auto" and "latency" in (settings.target or {}):
        need(settings.scheme != "v1", "decompose.target",
             "a latency target plans scheme v2, channel or auto; scheme 'v1' writes a "
             "C*M-channel map and ran at about half a dense conv's MAC rate on CPU (0.37x-0.61x the original "
             "on an H100), so its measured plans would keep nearly every layer dense: use scheme: v2 or auto")
    need(not (settings.decomposed and settings.scheme != "v1"), "decompose.decomposed",
         f"decomposed: true is scheme v1's separable form; scheme {settings.scheme} takes decomposed: false")
    need(settings.basis == "shared" or settings.scheme == "v1", "decompose.basis",
         f"basis {settings.basis!r} is scheme v1's choice; scheme {settings.scheme} takes shared (the default)")
    need(settings.method == "svd" or settings.scheme == "v1", "decompose.method",
         f"method {settings.method!r} is scheme v1's; scheme {settings.scheme} takes svd (the default): its "
         "truncated SVD is already the optimum")
    need(settings.order == "vh" or settings.scheme in ("v2", "auto"), "decompose.order",
         f"order {settings.order!r} is scheme v2's choice of which 1-D conv runs first; scheme {settings.scheme} "
         "takes vh (the default)")
    try:
        check_method_options(settings.method, settings.options)
    except UserError as err:
        need(False, err.key, err.message)


# ---------------------------------------------------------------- seeds


def check_seeds(seeds, file: str | None = None, key: str = "seed") -> list[int]:
    """The seeds a ``seed:`` value (one integer or a list) or ``--seeds`` stands for: each an integer in
    0..:data:`MAX_SEED`, a list non-empty, without repeats, at most :data:`MAX_SEEDS` long. The one check of
    seeds; :class:`UserError` naming ``file`` and ``key`` otherwise."""
    allowed = f"integers 0..{MAX_SEED}"
    values = seeds if isinstance(seeds, list) else [seeds]
    if not values or len(values) > MAX_SEEDS:
        raise UserError(f"must list 1 to {MAX_SEEDS} seeds, got {len(values)}", file=file, key=key)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
            raise UserError(f"seeds are {allowed} (numpy and random take 32-bit seeds), got {show(value)}",
                            file=file, key=key)
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise UserError(f"lists seed {', '.join(map(str, repeated))} twice; each seed is one run: give distinct "
                        f"{allowed}", file=file, key=key)
    return values


def parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds 0,1,2`` (comma-separated integers), checked by :func:`check_seeds`."""
    parts = [part.strip() for part in text.split(",")]
    if not all(re.fullmatch(r"\d{1,10}", part) for part in parts):
        raise UserError(f"{show(text)}: give distinct integers 0..{MAX_SEED} separated by commas, e.g. 0,1,2",
                        key="--seeds")
    return check_seeds([int(part) for part in parts], key="--seeds")


def seed_suffix(seed: int) -> str:
    """What a run of a seed list adds to its row's name (and to its baseline's and parent's): ``-s<seed>``."""
    return f"-s{seed}"


def with_seed(cfg: Config, seed: int) -> Config:
    """The run of ``cfg`` with seed ``seed`` of a seed list: named ``<name>-s<seed>``, built on the runs of its
    baseline and parent with the same seed (whose splits, validation images and training it shares)."""
    assert cfg.seed_of is None, "a config is given its seed once"
    out = copy.deepcopy(cfg)
    suffix = seed_suffix(seed)
    out.seed, out.seed_of, out.name = seed, cfg.name, cfg.name + suffix
    if len(out.name) > MAX_NAME:
        raise UserError(f"run name {out.name!r} of seed {seed} is longer than {MAX_NAME} characters; shorten name:",
                        file=cfg.path or None, key="name")
    for key in ("baseline", "parent"):
        if getattr(cfg, key) is not None:
            setattr(out, key, getattr(cfg, key) + suffix)
    return out


def seed_runs(cfg: Config, seeds: list[int] | None = None) -> list[Config]:
    """The runs of one row: ``cfg`` itself when it has one seed (and ``seeds`` is None), else one run per seed
    (:func:`with_seed`); ``seeds`` (``--seeds``, checked by :func:`parse_seeds`) replaces the config's ``seed:``."""
    if seeds is None and isinstance(cfg.seed, int):
        return [cfg]
    return [with_seed(cfg, seed) for seed in (seeds if seeds is not None else cfg.seed)]


def one_run(cfg: Config) -> Config:
    """The one run a stage command works on: ``cfg`` with one seed, the run of seed N for ``seed: [N]``;
    :class:`UserError` when ``seed:`` lists several (``lrx run`` makes one run per seed)."""
    if not isinstance(cfg.seed, list):
        return cfg
    if len(cfg.seed) == 1:
        return with_seed(cfg, cfg.seed[0])
    raise UserError(f"lists {len(cfg.seed)} seeds {cfg.seed}: `lrx run` makes one run per seed; this command works "
                    f"on one run: --set seed=[N] for the run of seed N ({cfg.name}{seed_suffix(cfg.seed[0])}, ...)",
                    file=cfg.path or None, key="seed")


def stage_settings(stage: StageConfig) -> dict:
    """A fine-tune stage's settings as its hash and its checkpoint record them: without ``kd`` and
    ``temperature`` while ``kd`` is 0, so that stages made before distillation existed keep their hash."""
    out = dataclasses.asdict(stage)
    if out["kd"] == 0:
        del out["kd"], out["temperature"]
    return out


TARGETS = ("speedup", "macs", "latency")


def check_target(target) -> tuple[str, float]:
    """``(kind, value)`` of a rank target: ``{speedup: X}`` with X > 1 (the replaced layers' MACs fall X-fold),
    ``{macs: F}`` with 0 < F < 1 (the fraction of the whole model's MACs to keep) or ``{latency: X}`` with
    X > 1 (the whole model runs X times faster, measured: :func:`lrx.plan.latency.plan_latency`). The one check
    of a target, for configs (``decompose.target``), :func:`lrx.plan.macs.plan_ranks` and the latency planner."""
    if not isinstance(target, dict) or len(target) != 1 or next(iter(target)) not in TARGETS:
        raise UserError(f"a target {{speedup: X}} (theoretical speedup of the replaced layers, X > 1), "
                        f"{{macs: F}} (fraction of the whole model's MACs to keep, 0 < F < 1) or {{latency: X}} "
                        f"(the whole model measured X times faster, X > 1), got {show(target)}",
                        key="decompose.target")
    kind, value = next(iter(target.items()))
    number = is_finite_number(value)
    if kind in ("speedup", "latency") and not (number and value > 1):
        raise UserError(f"must be a number > 1, got {show(value)}", key=f"decompose.target.{kind}")
    if kind == "macs" and not (number and 0 < value < 1):
        raise UserError(f"must be a fraction in (0, 1), got {show(value)}", key="decompose.target.macs")
    return kind, float(value)


def config_candidates(name: str, beside: str | Path) -> list[Path]:
    """Where the config of run ``name`` may be, first match wins: beside the config ``beside``, in the
    current directory, in ``configs/`` under the current directory (each ``<name>.yaml``)."""
    out: list[Path] = []
    for folder in (Path(beside).parent, Path("."), Path("configs")):
        path = folder / f"{name}.yaml"
        if not any(_same_place(path, seen) for seen in out):
            out.append(path)
    return out


def _same_place(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def find_config(name: str, beside: str | Path, key: str | None = None) -> Path:
    """The config of run ``name`` (a ``baseline:`` or ``parent:``), the first of :func:`config_candidates`
    that is a file; :class:`UserError` naming every place looked at when none is."""
    candidates = config_candidates(name, beside)
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"names run {name!r} but there is no config {name}.yaml; looked for "
                    + ", ".join(str(p) for p in candidates), file=str(beside), key=key)
