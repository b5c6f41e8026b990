"""Model statistics and timing: ptflops counts, torch.profiler times, interleaved wall-clock latency.

Three kinds of numbers, each with a different use:

- :func:`count`: MACs and parameters with ptflops (the seed's "macs(M)" and "params(M)").
- :func:`profiler_times`: the seed's "CPU time(ms)" and "CUDA time(ms)", from ``torch.profiler``.
- :func:`latency` / :func:`layer_latency`: plain wall-clock medians of repeated forwards, the
  models timed in turn within each repeat, so that a shared machine's drift hits them alike. Their
  *ratio* is what a reader should trust; an absolute time only holds on the machine that made it.

:func:`profile_pair` runs all of them for one run and returns the ``metrics.json`` fields.

This module is long because the three share their helpers (device, threads, inputs, the interleaved clock) and one
``profile_pair`` reads them all; split it where a fourth kind of number arrives.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from .config import ProfileConfig
from .distributed import resolve_device
from .errors import UserError
from .speed import describe, optimise

# The clock behind every latency figure; a module attribute so that tests can replace it.
_clock: Callable[[], float] = time.perf_counter

# The ptflops setting that reproduces the seed's row 1 (698.89M MACs, 44.43M params for
# alexnet_cifar10 at 3x224x224): the "pytorch" backend (module hooks: convs and linears with their
# bias adds, ReLUs, poolings) with functional counting off. ptflops >= 0.7.3 turns functional
# counting on by default, which counts each ReLU and pooling twice (module hook + F.* patch) and gives
# 699.76M; the "aten" backend counts only convolutions and matmuls and gives 698.01M.
PTFLOPS_BACKEND = "pytorch"
PTFLOPS_CONFIG = {"count_functional": False}


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Set ``torch.set_num_threads`` for the block (None: leave it) and restore it after.

    Yields the number of threads in effect.
    """
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads must be >= 1 or None, got {threads}", key="profile.threads")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepared(model: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy in eval mode on ``device``; the caller's model (and its mode) stay untouched."""
    return copy.deepcopy(model).to(device).eval()


def _random_input(batch: int, input_size: Sequence[int], device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_size, generator=generator).to(device)


# ---------------------------------------------------------------- counts


def count(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> tuple[int, int]:
    """MACs and parameters of one forward of a single image, with ptflops.

    Parameters
    ----------
    model : any ``nn.Module``; it is deep-copied, put on the CPU in eval mode, and left untouched.
    input_size : (C, H, W) of one image; ptflops adds the batch dimension of 1.

    Returns
    -------
    (macs, params) as ints. Every parameter is counted, frozen ones included (ptflops by itself
    counts only those with ``requires_grad``, which would change with a fine-tune's freezing).
    """
    from ptflops import get_model_complexity_info  # local: a 2 s import (its aten backend); only counting needs it

    net = copy.deepcopy(model).cpu().eval()
    for p in net.parameters():
        p.requires_grad_(True)
    sink = io.StringIO()
    # ptflops prints warnings and summaries on stdout; the caller wants numbers only.
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), torch.no_grad():
        macs, params = get_model_complexity_info(
            net,
            tuple(int(s) for s in input_size),
            as_strings=False,
            print_per_layer_stat=False,
            verbose=False,
            ost=sink,
            backend=PTFLOPS_BACKEND,
            backend_specific_config=PTFLOPS_CONFIG,
            custom_modules_hooks=_fallback_hooks(net),
        )
    if macs is None or params is None:
        raise UserError(f"ptflops could not count {type(model).__name__} at input {tuple(input_size)}: {sink.getvalue().strip()}")
    return int(macs), int(params)


def _fallback_hooks(model: nn.Module) -> dict:
    """ptflops hooks for module types it does not know that hold parameters of their own.

    ptflops' pytorch backend counts only known module types (``nn.Conv2d``, ``nn.Linear``, ...); a
    layer that keeps its weights as ``nn.Parameter`` and calls ``F.conv2d`` would count as 0 MACs.
    Such a module is counted instead by re-running its forward under ``torch.utils.flop_counter``
    (convolutions and matmuls; FLOPs / 2 = MACs; bias adds are not included).
    """
    try:
        from ptflops.pytorch_ops import MODULES_MAPPING  # local: heavy, see count()
    except ImportError:  # a ptflops layout we do not know: count with ptflops alone
        return {}
    return {
        type(m): _flop_counter_hook
        for m in model.modules()
        if type(m) not in MODULES_MAPPING and next(m.parameters(recurse=False), None) is not None
    }


def _flop_counter_hook(module: nn.Module, inputs: tuple, output) -> None:
    with FlopCounterMode(display=False) as counter:
        module.forward(*inputs)
    module.__flops__ += int(counter.get_total_flops()) // 2


# ---------------------------------------------------------------- torch.profiler


def profiler_times(
    model: nn.Module,
    batch: int = 64,
    input_size: Sequence[int] = (3, 224, 224),
    device: str | torch.device = "cpu",
    warmup: int = 2,
) -> dict:
    """The seed's "CPU time" and "CUDA time": ``torch.profiler`` around one forward.

    The model (a deep copy in eval mode on ``device``) runs ``warmup`` forwards, then one profiled
    forward of a ``(batch, *input_size)`` random input under ``torch.inference_mode``, CUDA
    synchronised before the profiler stops.

    Returns
    -------
    ``{"cpu_time_ms": float, "cuda_time_ms": float | None}`` where

    - ``cpu_time_ms`` is the profiler's total *self* CPU time: the sum over all operators of the time
      spent in each operator itself, not in its children ("Self CPU time total" of
      ``prof.key_averages().table()``). On a CPU run this is the forward's compute time, summed over
      threads' parent operators; on a GPU run it is mostly kernel-launch overhead.
    - ``cuda_time_ms`` is the total self device time of all kernels ("Self CUDA time total"), or None
      when the run is not on a GPU.
    """
    device = resolve_device(device)
    net = _prepared(model, device)
    x = _random_input(batch, input_size, device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch.inference_mode():
        for _ in range(warmup):
            net(x)
        _sync(device)
        with _kineto_quiet(), profile(activities=activities) as prof:
            net(x)
            _sync(device)
    events = prof.key_averages()
    cpu_us = sum(e.self_cpu_time_total for e in events)
    cuda_ms = None
    if device.type == "cuda":
        cuda_us = sum(_self_device_us(e) for e in events)
        cuda_ms = cuda_us / 1000.0
    return {"cpu_time_ms": cpu_us / 1000.0, "cuda_time_ms": cuda_ms}


# Kineto (the profiler's C++ backend) logs "USDT:<date> ... profiler_start" lines straight to file
# descriptor 2, past Python's sys.stderr; they would clutter the CLI's output.
_KINETO_LINE = re.compile(r"^(USDT|INFO|WARNING|ERROR):\d{4}-\d\d-\d\d ")


@contextlib.contextmanager
def _kineto_quiet() -> Iterator[None]:
    """Hold back Kineto's own log lines on fd 2 during the block; pass every other line on."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. some notebooks): nothing to filter
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            text = buf.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines(keepends=True) if not _KINETO_LINE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))


def _self_device_us(event) -> float:
    # torch >= 2.4 names it self_device_time_total; older versions self_cuda_time_total.
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


# ---------------------------------------------------------------- wall-clock latency


def _stats(runs_ms: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(runs_ms, n=4, method="inclusive") if len(runs_ms) > 1 else (runs_ms[0],) * 3
    return {
        "median_ms": statistics.median(runs_ms),
        "min_ms": min(runs_ms),
        "max_ms": max(runs_ms),
        "iqr_ms": q3 - q1,
        "runs_ms": list(runs_ms),
    }


def _interleaved(calls: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> dict:
    """Time each callable once per repeat, in an order that rotates by one each repeat.

    Returns ``{name: stats}`` (see :func:`_stats`); the first name gets no ``speedup``, each other
    one ``speedup = median(first) / median(name)``.
    """
    if repeats < 1:
        raise UserError(f"repeats must be >= 1, got {repeats}", key="profile.repeats")
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    _sync(device)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = _clock()
            calls[name]()
            _sync(device)
            runs[name].append((_clock() - start) * 1000.0)
    out = {name: _stats(runs[name]) for name in names}
    reference = out[names[0]]["median_ms"]
    for name in names[1:]:
        median = out[name]["median_ms"]
        out[name]["speedup"] = reference / median if median > 0 else None
    return out


def latency(
    models: dict[str, nn.Module],
    batch: int = 64,
    input_size: Sequence[int] = (3, 224, 224),
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 2,
    repeats: int = 5,
) -> dict:
    """Wall-clock forward latency of several models, interleaved in one process.

    Each model (a deep copy in eval mode on ``device``) runs ``warmup`` untimed forwards; then each
    of ``repeats`` rounds times every model once on the same ``(batch, *input_size)`` input, the
    order rotating by one model per round, under ``torch.inference_mode`` with CUDA synchronised
    around each forward. Drift of a shared machine therefore hits all models alike, and the ratio
    of medians is the figure to trust.

    Returns
    -------
    ``{"threads": int, "device": str, "batch", "input_size", "warmup", "repeats",
    "models": {name: {"median_ms", "min_ms", "max_ms", "iqr_ms", "runs_ms", ["speedup"]}}}``
    where ``speedup = median(first model) / median(this model)`` for every model but the first.
    """
    if not models:
        raise UserError("latency needs at least one model")
    device = resolve_device(device)
    nets = {name: _prepared(m, device) for name, m in models.items()}
    x = _random_input(batch, input_size, device)
    with torch_threads(threads) as used, torch.inference_mode():
        calls = {name: (lambda net=net: net(x)) for name, net in nets.items()}
        stats = _interleaved(calls, device, warmup, repeats)
    return {
        "threads": used,
        "device": str(device),
        "batch": batch,
        "input_size": list(input_size),
        "warmup": warmup,
        "repeats": repeats,
        "models": stats,
    }


def layer_inputs(model: nn.Module, layer_names: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input tensor each named submodule receives in one forward of ``x`` (forward pre-hooks)."""
    modules = dict(model.named_modules())
    missing = [n for n in layer_names if n not in modules]
    if missing:
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        raise UserError(f"no layer named {', '.join(map(repr, missing))}; conv layers: {', '.join(convs)}")
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in layer_names:
        def hook(module, args, name=name):
            captured.setdefault(name, args[0].detach())
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return captured


def layer_latency(
    original: nn.Module,
    expanded: nn.Module,
    layer_names: Sequence[str],
    batch: int = 64,
    input_size: Sequence[int] = (3, 224, 224),
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 2,
    repeats: int = 5,
) -> list[dict]:
    """Time each replaced layer alone, original conv against its replacement, interleaved.

    The input of each layer is captured with a forward pre-hook on the original model for a
    ``(batch, *input_size)`` random image batch, so each layer runs on its real shape
    (e.g. ``(64, 64, 27, 27)`` for AlexNet's conv2 at 224x224).

    Returns
    -------
    One dict per layer: ``{"layer", "input_shape", "original_ms", "expanded_ms", "spread",
    "speedup", "macs_original", "macs_expanded", "mac_ratio", "realised"}`` with medians in ms,
    ``spread`` the IQR of each, ``speedup`` = original / expanded median, ``mac_ratio`` = original /
    expanded MACs (ptflops, one image) and ``realised`` = speedup / mac_ratio.
    """
    device = resolve_device(device)
    orig = _prepared(original, device)
    new = _prepared(expanded, device)
    new_modules = dict(new.named_modules())
    missing = [n for n in layer_names if n not in new_modules]
    if missing:
        raise UserError(f"the expanded model has no layer named {', '.join(map(repr, missing))}")
    out = []
    with torch_threads(threads):
        inputs = layer_inputs(orig, layer_names, _random_input(batch, input_size, device))
        orig_modules = dict(orig.named_modules())
        for name in layer_names:
            a, b, x = orig_modules[name], new_modules[name], inputs[name]
            with torch.inference_mode():
                stats = _interleaved({"original": lambda: a(x), "expanded": lambda: b(x)}, device, warmup, repeats)
            macs_a, _ = count(a, tuple(x.shape[1:]))
            macs_b, _ = count(b, tuple(x.shape[1:]))
            mac_ratio = macs_a / macs_b if macs_b else None
            speedup = stats["expanded"]["speedup"]
            out.append({
                "layer": name,
                "input_shape": list(x.shape),
                "original_ms": stats["original"]["median_ms"],
                "expanded_ms": stats["expanded"]["median_ms"],
                "spread": {"original_iqr_ms": stats["original"]["iqr_ms"], "expanded_iqr_ms": stats["expanded"]["iqr_ms"]},
                "speedup": speedup,
                "macs_original": macs_a,
                "macs_expanded": macs_b,
                "mac_ratio": mac_ratio,
                "realised": speedup / mac_ratio if speedup and mac_ratio else None,
            })
    return out


# ---------------------------------------------------------------- one run's profile


def _cpu_models(original: nn.Module, expanded: nn.Module | None, cfg: ProfileConfig,
                input_size: Sequence[int]) -> tuple[dict[str, nn.Module], list | None]:
    """The models as timed on the CPU, and the expansion's chosen paths (None unless optimised).

    With ``cfg.optimise``, each in its fastest layout: channels_last for the original, lrx.speed's
    chosen paths for the expansion (MACs are counted before, on the plain models: an optimised layer no
    longer runs its nn.Conv2d children). Models already on the CPU are copied only when optimised.
    """
    def on_cpu(model: nn.Module) -> nn.Module:
        on_gpu = any(p.device.type != "cpu" for p in model.parameters())
        return copy.deepcopy(model).cpu() if on_gpu or cfg.optimise else model

    models = {"original": on_cpu(original)}
    if expanded is not None:
        models["expanded"] = on_cpu(expanded)
    if not cfg.optimise:
        return models, None
    models["original"] = models["original"].to(memory_format=torch.channels_last)
    if expanded is None:
        return models, None
    cpu = torch.device("cpu")
    models["expanded"] = optimise(models["expanded"], cpu, torch.randn(cfg.batch, *input_size))
    return models, describe(models["expanded"])


def profile_pair(
    original: nn.Module,
    expanded: nn.Module | None,
    replaced_layer_names: Sequence[str],
    cfg: ProfileConfig,
    device: str | torch.device | None = None,
    per_layer: bool = True,
) -> dict:
    """Everything ``metrics.json`` holds about a run's size and speed.

    Parameters
    ----------
    original : the original (baseline) model.
    expanded : the run's expanded model, or None for a baseline run (then only ``original`` is measured).
    replaced_layer_names : qualified names of the replaced convs (``conv_layers`` names), for the per-layer times.
    cfg : input size, batch, threads, warm-up, repeats and device.
    device : overrides ``cfg.device`` when given; ``"auto"`` picks CUDA when available.
    per_layer : time each replaced layer alone too (:func:`layer_latency`); on 2 CPU cores at the
        seed's input this is about half of the ~2 minutes an expanded profile takes.

    Returns
    -------
    ``{"macs", "params", "cpu_time_ms", "cuda_time_ms", "input_size", "batch", "device",
    "latency": {"threads", "repeats", "warmup", "original_ms", "expanded_ms", "spread", "speedup",
    "mac_ratio", "realised", "layers"}}``. ``macs``/``params``/times are of the expanded model (the
    original for a baseline). ``spread`` maps "original"/"expanded" to ``{"min_ms", "max_ms",
    "iqr_ms", "runs_ms"}``; ``speedup`` = original / expanded median latency; ``mac_ratio`` =
    original / expanded MACs; ``realised`` = speedup / mac_ratio, the share of the theoretical
    speedup that is real. For a baseline the expanded fields are None and ``layers`` is empty.
    """
    device = resolve_device(device if device is not None else cfg.device)
    input_size = tuple(int(s) for s in cfg.input_size)
    target = expanded if expanded is not None else original
    macs, params = count(target, input_size)
    original_macs = count(original, input_size)[0] if expanded is not None else macs
    on_cpu, paths = _cpu_models(original, expanded, cfg, input_size)
    if device.type == "cpu":
        original, expanded = on_cpu["original"], on_cpu.get("expanded")
        target = expanded if expanded is not None else original
    with torch_threads(cfg.threads) as threads:
        times = profiler_times(target, cfg.batch, input_size, device, cfg.warmup)
        if device.type != "cpu":  # the seed's CPU time column is a CPU run, also on a GPU machine
            cpu_target = on_cpu.get("expanded", on_cpu["original"])
            times["cpu_time_ms"] = profiler_times(cpu_target, cfg.batch, input_size, "cpu", cfg.warmup)["cpu_time_ms"]
        models = {"original": original} if expanded is None else {"original": original, "expanded": expanded}
        lat = latency(models, cfg.batch, input_size, device, None, cfg.warmup, cfg.repeats)
        layers = []
        if per_layer and expanded is not None and replaced_layer_names:
            layers = layer_latency(original, expanded, replaced_layer_names, cfg.batch, input_size, device,
                                   None, cfg.warmup, cfg.repeats)

    def spread(stats: dict) -> dict:
        return {k: stats[k] for k in ("min_ms", "max_ms", "iqr_ms", "runs_ms")}

    orig_stats = lat["models"]["original"]
    new_stats = lat["models"].get("expanded")
    speedup = mac_ratio = realised = None
    if new_stats is not None:
        speedup = new_stats["speedup"]
        mac_ratio = original_macs / macs if macs else None
        realised = speedup / mac_ratio if speedup and mac_ratio else None
    return {
        "macs": macs,
        "params": params,
        "cpu_time_ms": times["cpu_time_ms"],
        "cuda_time_ms": times["cuda_time_ms"],
        "input_size": list(input_size),
        "batch": cfg.batch,
        "optimised": cfg.optimise,  # on CPU: the CPU time and latency; on a GPU: the CPU time column only
        "paths": paths,
        "device": str(device),
        "latency": {
            "threads": threads,
            "repeats": cfg.repeats,
            "warmup": cfg.warmup,
            "original_ms": orig_stats["median_ms"],
            "expanded_ms": new_stats["median_ms"] if new_stats else None,
            "spread": {"original": spread(orig_stats), **({"expanded": spread(new_stats)} if new_stats else {})},
            "speedup": speedup,
            "mac_ratio": mac_ratio,
            "realised": realised,
            "layers": layers,
        },
    }
