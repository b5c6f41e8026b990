"""Model statistics and one run's profile: ptflops counts, torch.profiler times, per-layer times.

- :func:`count`: MACs and parameters with ptflops (the seed's "macs(M)" and "params(M)").
- :func:`profiler_times`: one forward under ``torch.profiler`` (the seed's way to fill its time
  columns; one run, so kept for looking inside a forward, not for the table).
- :func:`layer_latency`: each replaced layer alone against the conv it replaces, interleaved, with
  both MAC counts.
- :func:`profile_pair`: everything ``metrics.json`` holds about a run's size and speed; every time in
  it is a median of interleaved repeats from :mod:`lrx.measure.timing`.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import sys
import tempfile
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from lrx.config.settings import ProfileConfig
from lrx.base.distributed import resolve_device
from lrx.base.errors import UserError
from lrx.nn.inference import describe, optimise
from lrx.measure.machine import MachineWatch, device_name
from lrx.measure.layouts import cudnn_autotuned, forward_with_flags, original_layouts, plain_expansion, time_rounds
from lrx.measure.timing import (SUMMARY_KEYS, eval_copy, random_input, synchronize, interleaved,
                                layer_inputs, memory_kept, module_times, torch_threads, unwrapped)

__all__ = ["PTFLOPS_BACKEND", "PTFLOPS_CONFIG", "count", "profiler_times", "layer_latency", "profile_pair"]

# The ptflops setting that reproduces the seed's row 1 (698.89M MACs, 44.43M params for
# alexnet_cifar10 at 3x224x224): the "pytorch" backend (module hooks: convs and linears with their
# bias adds, ReLUs, poolings) with functional counting off. ptflops >= 0.7.3 turns functional
# counting on by default, which counts each ReLU and pooling twice (module hook + F.* patch) and gives
# 699.76M; the "aten" backend counts only convolutions and matmuls and gives 698.01M.
PTFLOPS_BACKEND = "pytorch"
PTFLOPS_CONFIG = {"count_functional": False}


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
    net = eval_copy(model, device)
    x = random_input(batch, input_size, device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch.inference_mode():
        for _ in range(warmup):
            net(x)
        synchronize(device)
        with _kineto_quiet(), profile(activities=activities) as prof:
            net(x)
            synchronize(device)
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


# ---------------------------------------------------------------- one layer at a time


def layer_latency(original: nn.Module, expanded: nn.Module, layer_names: Sequence[str], batch: int = 64,
                  input_size: Sequence[int] = (3, 224, 224), device: str | torch.device = "cpu",
                  threads: int | None = None, warmup: int = 2, repeats: int = 5,
                  counted: tuple[nn.Module, nn.Module] | None = None, original_flags: Callable = contextlib.nullcontext,
                  min_time_s: float = 0.0) -> list[dict]:
    """Time each replaced layer alone, original conv against its replacement, interleaved.

    The input of each layer is captured with a forward pre-hook on the original model for a
    ``(batch, *input_size)`` random image batch, so each layer runs on its real shape
    (e.g. ``(64, 64, 27, 27)`` for AlexNet's conv2 at 224x224).

    ``counted``: the (original, expansion) to count MACs on, when the timed ones cannot be counted
    (an expansion after lrx.nn.inference.optimise runs oneDNN ops that no counter sees); default the timed
    ones. ``original_flags``: the context the original convs run in (its layout's, e.g. oneDNN off).

    Returns
    -------
    One dict per layer: ``{"layer", "input_shape", "original_ms", "expanded_ms", "spread", "noisy",
    "speedup", "macs_original", "macs_expanded", "mac_ratio", "realised"}`` with medians in ms,
    ``spread`` the IQR of each and the repeat count, ``noisy`` whether either median is noisy
    (:data:`NOISY_SPREAD`), ``speedup`` = original / expanded median, ``mac_ratio`` = original /
    expanded MACs (ptflops, one image) and ``realised`` = speedup / mac_ratio.
    """
    device = resolve_device(device)
    orig = eval_copy(original, device)
    new = eval_copy(expanded, device)
    new_modules = dict(new.named_modules())
    missing = [n for n in layer_names if n not in new_modules]
    if missing:
        raise UserError(f"the expanded model has no layer named {', '.join(map(repr, missing))}")
    count_orig, count_new = (dict(m.named_modules()) for m in (counted or (orig, new)))
    out = []
    with torch_threads(threads):
        inputs = layer_inputs(orig, layer_names, random_input(batch, input_size, device))
        orig_modules = dict(orig.named_modules())
        for name in layer_names:
            a, b, x = orig_modules[name], new_modules[name], inputs[name]
            with torch.inference_mode():
                stats = interleaved({"original": forward_with_flags(a, original_flags, x),
                                      "expanded": forward_with_flags(b, contextlib.nullcontext, x)}, device, warmup, repeats,
                                     min_time_s)
            macs_a, _ = count(count_orig[name], tuple(x.shape[1:]))
            macs_b, _ = count(count_new[name], tuple(x.shape[1:]))
            mac_ratio = macs_a / macs_b if macs_b else None
            speedup = stats["expanded"]["speedup"]
            out.append({
                "layer": name,
                "input_shape": list(x.shape),
                "original_ms": stats["original"]["median_ms"],
                "expanded_ms": stats["expanded"]["median_ms"],
                "spread": {"original_iqr_ms": stats["original"]["iqr_ms"], "expanded_iqr_ms": stats["expanded"]["iqr_ms"],
                           "repeats": repeats},
                "noisy": stats["original"]["noisy"] or stats["expanded"]["noisy"],
                "speedup": speedup,
                "macs_original": macs_a,
                "macs_expanded": macs_b,
                "mac_ratio": mac_ratio,
                "realised": speedup / mac_ratio if speedup and mac_ratio else None,
            })
    return out


# ---------------------------------------------------------------- one run's profile


def _models_on(device: torch.device, original: nn.Module, expanded: nn.Module | None, cfg: ProfileConfig,
               input_size: Sequence[int]) -> tuple[nn.Module, nn.Module | None, dict | None]:
    """Copies of the models on ``device`` in eval mode, the expansion as it will run, and its chosen paths.

    With ``cfg.optimise`` the expansion runs lrx.nn.inference's chosen paths for ``device`` (None paths
    otherwise); the original stays plain: :func:`original_layouts` tries its layouts. A ``profile.dtype``
    other than float32, or ``profile.compile``, applies to both models alike (lrx.nn.inference's
    :class:`~lrx.nn.inference.InferenceModel` around each).
    """
    x = random_input(cfg.batch, input_size, device)
    orig = eval_copy(original, device)
    if cfg.dtype != "float32" or cfg.compile:
        orig = optimise(orig, device, x, channels_last=False, dtype=cfg.dtype, compile=cfg.compile)
    if expanded is None:
        return orig, None, None
    new = eval_copy(expanded, device)
    if not cfg.optimise:
        if cfg.dtype != "float32" or cfg.compile:
            new = optimise(new, device, x, channels_last=False, path="default", dtype=cfg.dtype, compile=cfg.compile)
        return orig, new, None
    new = optimise(new, device, x, dtype=cfg.dtype, compile=cfg.compile)  # on CUDA: an InferenceModel around it
    return orig, new, describe(unwrapped(new))


def _column(timed: dict, baseline: bool, batch: int, threads: int) -> dict:
    """The stats behind a time column: the expansion's median, or for a baseline the fastest original layout's."""
    stats = timed["original"] if baseline else timed["expanded"]
    out = {k: stats[k] for k in SUMMARY_KEYS}
    out.update(batch=batch, threads=threads, source="interleaved")
    out["layout"] = timed["original_layout"] if baseline else timed["expanded_layout"]
    return out


def profile_pair(
    original: nn.Module,
    expanded: nn.Module | None,
    replaced_layer_names: Sequence[str],
    cfg: ProfileConfig,
    device: str | torch.device | None = None,
    per_layer: bool = True,
    breakdown: bool = True,
) -> dict:
    """Everything ``metrics.json`` holds about a run's size and speed.

    Every whole-model time comes from ``cfg.rounds`` rounds (:func:`lrx.measure.layouts.time_rounds`), each on
    fresh copies of both models with its own warm-up, of ``cfg.repeats`` interleaved forwards: the original
    in each plain layout (:func:`original_layouts`) and the expansion on lrx.nn.inference's paths (with
    ``cfg.optimise``) and in the same plain layouts; a time is the median of the rounds' medians, and each
    model's fastest layout is its reference. The CPU time column is such a median on the CPU (a second
    timing when profiling on a GPU), the CUDA time column such a median on the GPU (CUDA events); the speedup
    is the ratio of the same medians. MACs and params are counted on the plain models.

    Parameters
    ----------
    original : the original (baseline) model.
    expanded : the run's expanded model, or None for a baseline run (then only ``original`` is measured).
    replaced_layer_names : qualified names of the replaced convs (``conv_layers`` names), for the per-layer times.
    cfg : input size, batch, threads, warm-up, repeats, device and whether to optimise.
    device : overrides ``cfg.device`` when given; ``"auto"`` picks CUDA when available.
    per_layer : time each replaced layer alone too (:func:`layer_latency`); on 2 CPU cores at the
        seed's input this is about half of the ~2 minutes an expanded profile takes.
    breakdown : time every module inside the forward too (:func:`module_times`), both models; not with
        ``profile.compile`` (a compiled forward runs no module hooks), then ``latency.modules`` is None.

    Returns
    -------
    ``{"macs", "params", "cpu_time_ms", "cpu_time", "cuda_time_ms", "cuda_time", "input_size",
    "batch", "optimised", "paths", "device", "device_name", "torch", "latency": {...}}``
    (``device_name``: :func:`lrx.measure.machine.device_name`, what the times were taken on).
    ``macs``/``params``/times are of the expanded model (the original for a baseline, in its fastest layout). ``cpu_time`` /
    ``cuda_time`` hold the column's stats (median, p25, p75, min, max, IQR, repeats, noisy, batch,
    threads). ``latency`` (on the profile device): ``threads``, ``repeats``, ``warmup``, ``batch``,
    ``original_ms`` (the fastest layout's median), ``original_layout``, ``original_default_ms``,
    ``expanded_ms`` (the expansion's fastest layout's median), ``expanded_layout``, ``spread``
    ({"original", "expanded", "layouts": {layout: ...}, "expanded_layouts": {layout: ...}} with each
    median's quartiles, min, max, runs, rounds' medians and noisy flag), ``speedup`` = original_ms /
    expanded_ms, ``speedup_default`` = original_default_ms / expanded_ms, ``rounds``, ``round_speedups``
    (each round's own), ``rounds_disagree``, ``noisy`` (either median, or the rounds disagree), ``mac_ratio``
    = original / expanded MACs, ``realised`` = speedup / mac_ratio, ``layers`` and ``modules`` (the
    per-module breakdown, or None), ``machine`` (:class:`lrx.measure.machine.MachineWatch`'s readings while
    everything was timed) and ``busy`` (those readings say the cores were shared: every time is suspect).
    For a baseline the expanded fields are None and ``layers`` is empty.
    """
    device = resolve_device(device if device is not None else cfg.device)
    cpu = torch.device("cpu")
    input_size = tuple(int(s) for s in cfg.input_size)
    plain_original, plain_expanded = original, expanded
    macs, params = count(expanded if expanded is not None else original, input_size)
    original_macs = count(original, input_size)[0] if expanded is not None else macs
    baseline = expanded is None
    plain_only = not cfg.optimise
    watch = MachineWatch(threads=cfg.threads or torch.get_num_threads())

    def fresh(on: torch.device) -> Callable[[], tuple]:
        # plain_only: the expansion itself runs plain (profile.optimise: false), in the default layout alone
        plain = (lambda: None) if plain_only else (lambda: plain_expansion(expanded, on, cfg.dtype, cfg.compile))
        return lambda: (*_models_on(on, original, expanded, cfg, input_size)[:2], plain())

    def rounds(on: torch.device) -> dict:  # cfg.rounds rounds of the whole models, each round on fresh copies
        return time_rounds(fresh(on), input_size, cfg.batch, on, cfg.warmup, cfg.repeats, cfg.rounds, plain_only,
                           cfg.min_time_s)

    with torch_threads(cfg.threads) as threads, watch:
        timed = cpu_timed = rounds(device)
        if device.type != "cpu":  # the seed's CPU time column is a CPU run, also on a GPU machine
            cpu_timed = rounds(cpu)
        orig, new, paths = _models_on(device, original, expanded, cfg, input_size)
        best_net, best_flags = original_layouts(orig, device, plain_only)[timed["original_layout"]]
        layers = []
        if per_layer and new is not None and replaced_layer_names:
            layers = layer_latency(unwrapped(best_net), unwrapped(new), replaced_layer_names, cfg.batch, input_size, device, None,
                                   cfg.warmup, cfg.repeats, counted=(plain_original, plain_expanded),
                                   original_flags=best_flags, min_time_s=cfg.min_time_s)
        modules = None
        if breakdown and not cfg.compile:  # a compiled forward does not run the modules' hooks
            pair = {"original": (best_net, best_flags)}
            if new is not None:
                pair["expanded"] = (new, cudnn_autotuned if device.type == "cuda" and not plain_only
                                    else contextlib.nullcontext)
            modules = module_times(pair, replaced_layer_names, random_input(cfg.batch, input_size, device), device,
                                   cfg.warmup, cfg.repeats, cfg.min_time_s)

    def spread(stats: dict) -> dict:
        return {k: stats[k] for k in (*SUMMARY_KEYS, "runs_ms", "round_medians_ms")}

    orig_stats, new_stats = timed["original"], timed["expanded"]
    mac_ratio = realised = None
    speedup = timed["speedup"]
    if new_stats is not None:
        mac_ratio = original_macs / macs if macs else None
        realised = speedup / mac_ratio if speedup and mac_ratio else None
    cuda_column = _column(timed, baseline, cfg.batch, threads) if device.type == "cuda" else None
    cpu_column = _column(cpu_timed, baseline, cfg.batch, threads)
    return {
        "macs": macs,
        "params": params,
        "cpu_time_ms": cpu_column["median_ms"],
        "cpu_time": cpu_column,
        "cuda_time_ms": cuda_column["median_ms"] if cuda_column else None,
        "cuda_time": cuda_column,
        "input_size": list(input_size),
        "batch": cfg.batch,
        "optimised": cfg.optimise,
        "paths": paths,
        "device": str(device),
        "device_name": device_name(device, threads),
        "torch": torch.__version__,
        "latency": {
            "threads": threads,
            "repeats": cfg.repeats,
            "warmup": cfg.warmup,
            "batch": cfg.batch,
            "original_ms": orig_stats["median_ms"],
            "original_layout": timed["original_layout"],
            "original_default_ms": timed["layouts"]["default"]["median_ms"],
            "expanded_ms": new_stats["median_ms"] if new_stats else None,
            "expanded_layout": timed["expanded_layout"],
            "spread": {"original": spread(orig_stats), **({"expanded": spread(new_stats)} if new_stats else {}),
                       "layouts": {name: spread(s) for name, s in timed["layouts"].items()},
                       "expanded_layouts": {name: spread(s) for name, s in timed["expanded_layouts"].items()}},
            "speedup": speedup,
            "speedup_default": timed["speedup_default"],
            "rounds": timed["rounds"],
            "min_time_s": cfg.min_time_s,
            "steady_memory": memory_kept(),  # freed memory kept in the process while timing (glibc)
            "round_speedups": timed["round_speedups"],
            "rounds_disagree": timed["rounds_disagree"],
            "noisy": orig_stats["noisy"] or bool(new_stats and new_stats["noisy"]) or timed["rounds_disagree"],
            "mac_ratio": mac_ratio,
            "realised": realised,
            "layers": layers,
            "modules": modules,
            "machine": watch.record,  # how busy the machine was while all of this was timed
            "busy": watch.record["busy"],
        },
    }
