"""The clock behind every time lrx reports: interleaved repeats, medians, spread and the noise rule.

- :func:`interleaved`: time several callables once per repeat, in an order rotating each repeat,
  so that a shared machine's drift hits them alike; medians, quartiles and a ``noisy`` flag
  (:data:`NOISY_SPREAD`). CUDA events on a GPU, :data:`_clock` elsewhere.
- :func:`latency`: whole models, interleaved (each model in its fastest layout, in rounds: lrx.measure.layouts).
- :func:`module_times`: where the time goes inside a forward, per module (forward hooks).
- :func:`steady_memory`: while lrx times, freed memory stays in the process (glibc's malloc), so that a
  forward does not pay page faults whose cost moves with the machine.

Ratios of medians are what a reader should trust; an absolute time only holds on the machine that made it.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import statistics
import time
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from lrx.base.distributed import resolve_device
from lrx.base.errors import UserError
from lrx.nn.inference import InferenceModel, Optimisable

__all__ = ["torch_threads", "steady_memory", "memory_kept", "KEEP_MEMORY", "synchronize", "eval_copy", "random_input", "NOISY_SPREAD", "NOISY_MIN_REPEATS",
           "SUMMARY_KEYS", "summarise", "MAX_REPEATS", "interleaved", "latency", "layer_inputs", "unwrapped", "timed_units", "module_times"]

# The clock behind every CPU latency figure; a module attribute so that tests can replace it.
_clock: Callable[[], float] = time.perf_counter


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


# glibc's malloc gives large freed blocks back to the OS (those it mmapped, and the heap's top beyond the trim
# threshold) and takes them again on the next forward: a CNN forward at batch 16 and 224 px then pays tens of
# thousands of page faults (resnet18 on the 2-core AMD EPYC: about 40,000, a third of a 250 ms forward in the
# kernel), and what a fault costs moves with the machine (a VM's host), by a different amount for two models.
# While lrx times, no block is mmapped and the heap is not trimmed: after the warm-up a forward reuses memory
# it already has (no page faults). Both models alike; glibc's settings are restored after.
# (A block larger than the heap can grow to in one piece is still mapped by glibc, whatever the settings.)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt's parameters (malloc.h)
_GLIBC_DEFAULTS = ((_M_TRIM_THRESHOLD, 128 * 1024), (_M_MMAP_THRESHOLD, 128 * 1024), (_M_MMAP_MAX, 65536))
_STEADY = ((_M_TRIM_THRESHOLD, 2**31 - 1), (_M_MMAP_THRESHOLD, 32 * 2**20), (_M_MMAP_MAX, 0))
_steady_depth = 0
# False: steady_memory leaves glibc as it is (to compare, benchmarks/profile_repeatability.py)
KEEP_MEMORY = True


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None where the C library has none (macOS, musl). Looked up once: finding the
    C library may run ``ldconfig``, and every timing and every latency-cache key asks."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def memory_kept() -> bool:
    """Whether :func:`steady_memory` keeps freed memory in the process here (glibc's malloc)."""
    return KEEP_MEMORY and _mallopt() is not None


@contextlib.contextmanager
def steady_memory() -> Iterator[bool]:
    """Keep freed memory in the process for the block (see above); yields whether it could (glibc only).
    Nested blocks keep it until the outermost ends."""
    global _steady_depth
    mallopt = _mallopt() if KEEP_MEMORY else None
    if mallopt is None:
        yield False
        return
    if _steady_depth == 0:
        for option, value in _STEADY:
            mallopt(option, value)
    _steady_depth += 1
    try:
        yield True
    finally:
        _steady_depth -= 1
        if _steady_depth == 0:
            for option, value in _GLIBC_DEFAULTS:
                mallopt(option, value)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eval_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy in eval mode on ``device``; the caller's model (and its mode) stay untouched."""
    return copy.deepcopy(model).to(device).eval()


def random_input(batch: int, input_size: Sequence[int], device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_size, generator=generator).to(device)


# ---------------------------------------------------------------- wall-clock latency

# The noise rule, one place: a median is "noisy" when the middle half of its repeats spans more than
# NOISY_SPREAD of it ((p75 - p25) / median), or when fewer than NOISY_MIN_REPEATS repeats were taken (too
# few to know). The table prints such a figure with a "~" and a footnote instead of as a fact.
NOISY_SPREAD = 0.2
NOISY_MIN_REPEATS = 3


# What :func:`interleaved` reports per callable (plus "runs_ms", every run): what a time column records.
SUMMARY_KEYS = ("median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms", "iqr_ms", "repeats", "noisy")


def summarise(runs_ms: list[float]) -> dict:
    """Median, quartiles (inclusive method), min, max, IQR, repeat count, noisy flag and the runs themselves."""
    q1, _, q3 = statistics.quantiles(runs_ms, n=4, method="inclusive") if len(runs_ms) > 1 else (runs_ms[0],) * 3
    median = statistics.median(runs_ms)
    return {
        "median_ms": median,
        "p25_ms": q1,
        "p75_ms": q3,
        "min_ms": min(runs_ms),
        "max_ms": max(runs_ms),
        "iqr_ms": q3 - q1,
        "repeats": len(runs_ms),
        "noisy": len(runs_ms) < NOISY_MIN_REPEATS or (q3 - q1) > NOISY_SPREAD * median,
        "runs_ms": list(runs_ms),
    }


def _time_ms(call: Callable[[], object], device: torch.device) -> float:
    """Milliseconds one call takes: CUDA events on a GPU (the kernels' time, launch gaps included), else :data:`_clock`."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    start_s = _clock()
    call()
    return (_clock() - start_s) * 1000.0


# The most repeats :func:`interleaved` adds to reach its ``min_time_s``.
MAX_REPEATS = 1000


def interleaved(calls: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                min_time_s: float = 0.0) -> dict:
    """Time each callable once per repeat, in an order that rotates by one each repeat.

    Every wall-clock figure of lrx comes from here, warm-up and repeats inside :func:`steady_memory`.
    ``repeats`` repeats at least, then more (up to
    :data:`MAX_REPEATS`) until every callable has run ``min_time_s`` seconds in all: a median of five
    forwards of a few milliseconds each is at the mercy of one hiccup of the machine, one of a second's
    worth of them is not. Returns ``{name: stats}`` (see :func:`summarise`); the first name gets no
    ``speedup``, each other one ``speedup = median(first) / median(name)``.
    """
    if repeats < 1:
        raise UserError(f"repeats must be >= 1, got {repeats}", key="profile.repeats")
    names = list(calls)
    runs: dict[str, list[float]] = {name: [] for name in names}
    with steady_memory():
        for name in names:
            for _ in range(warmup):
                calls[name]()
        synchronize(device)
        r = 0
        while r < repeats or (r < MAX_REPEATS and min(sum(times) for times in runs.values()) < 1000.0 * min_time_s):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                synchronize(device)
                runs[name].append(_time_ms(calls[name], device))
            r += 1
    out = {name: summarise(runs[name]) for name in names}
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
    order rotating by one model per round, under ``torch.inference_mode`` (on CUDA timed with CUDA
    events). Drift of a shared machine therefore hits all models alike, and the ratio of medians is
    the figure to trust.

    Returns
    -------
    ``{"threads": int, "device": str, "batch", "input_size", "warmup", "repeats",
    "models": {name: {"median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms", "iqr_ms", "repeats",
    "noisy", "runs_ms", ["speedup"]}}}`` where ``speedup = median(first model) / median(this model)``
    for every model but the first.
    """
    if not models:
        raise UserError("latency needs at least one model")
    device = resolve_device(device)
    nets = {name: eval_copy(m, device) for name, m in models.items()}
    x = random_input(batch, input_size, device)
    with torch_threads(threads) as used, torch.inference_mode():
        calls = {name: (lambda net=net: net(x)) for name, net in nets.items()}
        stats = interleaved(calls, device, warmup, repeats)
    return {
        "threads": used,
        "device": str(device),
        "batch": batch,
        "input_size": list(input_size),
        "warmup": warmup,
        "repeats": repeats,
        "models": stats,
    }


# ---------------------------------------------------------------- per layer, per module


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


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside lrx.nn.inference's :class:`InferenceModel` (whose module names are the model's), else ``model``."""
    return model.model if isinstance(model, InferenceModel) else model


def timed_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules a per-module breakdown times: every leaf module, and each lrx expansion layer whole.

    An expansion layer's children do not run on its optimised path, so it counts as one unit; units
    never nest, so their times add up. A model without children is its own unit, named ``"(model)"``.
    Names are those of the model inside an :class:`InferenceModel` (as in ``conv_layers``).
    """
    units, skip = [], ()
    for name, m in unwrapped(model).named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(m, Optimisable):
            units.append((name, m))
            skip = (f"{name}.",)
        elif next(m.children(), None) is None:
            units.append((name or "(model)", m))
    return units


class _UnitClock:
    """Forward hooks that add up, per unit, the time spent inside it during one forward.

    On CPU the hooks read :data:`_clock`; on CUDA they record CUDA events, read after the forward.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        self.device, self.handles = device, []
        self.pending: list[tuple[str, object, object]] = []
        self.open: dict[str, object] = {}
        self.times: dict[str, float] = {}
        for name, module in timed_units(model):
            self.handles.append(module.register_forward_pre_hook(lambda m, args, name=name: self._start(name)))
            self.handles.append(module.register_forward_hook(lambda m, args, out, name=name: self._stop(name)))

    def _now(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return _clock()

    def _start(self, name: str) -> None:
        self.open[name] = self._now()

    def _stop(self, name: str) -> None:
        start, end = self.open.pop(name), self._now()
        if self.device.type == "cuda":
            self.pending.append((name, start, end))
        else:
            self.times[name] = self.times.get(name, 0.0) + (end - start) * 1000.0

    def take(self) -> dict[str, float]:
        """The per-unit ms of the forward(s) since the last call, and a fresh start."""
        if self.pending:
            torch.cuda.synchronize(self.device)
            for name, start, end in self.pending:
                self.times[name] = self.times.get(name, 0.0) + float(start.elapsed_time(end))
        times, self.times, self.pending = self.times, {}, []
        return times

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def module_times(models: dict[str, tuple], replaced: Sequence[str], x: torch.Tensor, device: torch.device,
                 warmup: int, repeats: int, min_time_s: float = 0.0) -> dict:
    """Where the time goes: per-unit forward times (:func:`timed_units`) of each model, interleaved.

    ``models`` maps a name to ``(model, flags)`` as :func:`original_layouts` gives them, each on
    ``device`` in eval mode; ``replaced`` names the replaced layers (the original's convs, the
    expansion's layers at the same names). Hooks cost a little time per unit, so the totals here run
    above the whole-model medians of :func:`lrx.measure.layouts.time_pair`; shares are of this total.
    ``repeats`` and ``min_time_s`` as :func:`interleaved` takes them.

    Returns
    -------
    ``{name: {"total_ms", "outside_ms", "replaced_ms", "replaced_share", "modules": [{"name", "type",
    "ms", "share"}]}}`` with medians over ``repeats`` forwards: ``total_ms`` the hooked forward,
    ``outside_ms`` the part of it in no unit (functional ops, Python), ``replaced_share`` =
    replaced_ms / total_ms, each module's ``share`` = ms / total_ms.
    """
    clocks = {name: _UnitClock(net, device) for name, (net, _) in models.items()}
    per_call: dict[str, list[dict[str, float]]] = {name: [] for name in models}

    def hooked(name: str, net: nn.Module, flags: Callable) -> Callable[[], object]:
        def call():
            with flags():
                net(x)
            per_call[name].append(clocks[name].take())
        return call

    try:
        with torch.inference_mode():
            stats = interleaved({name: hooked(name, net, flags) for name, (net, flags) in models.items()},
                                 device, warmup, repeats, min_time_s)
    finally:
        for clock in clocks.values():
            clock.remove()
    out, replaced_set = {}, set(replaced)
    for name, (net, _) in models.items():
        calls, units = per_call[name][warmup:], timed_units(net)
        totals = stats[name]["runs_ms"]
        total = stats[name]["median_ms"]
        medians = {unit: statistics.median(c.get(unit, 0.0) for c in calls) for unit, _ in units}
        outside = statistics.median(t - sum(c.values()) for t, c in zip(totals, calls))
        replaced_ms = sum(medians[u] for u, _ in units if u in replaced_set)

        def share(ms: float) -> float | None:
            return ms / total if total > 0 else None

        out[name] = {
            "total_ms": total,
            "outside_ms": outside,
            "replaced_ms": replaced_ms if replaced else None,
            "replaced_share": share(replaced_ms) if replaced else None,
            "modules": [{"name": unit, "type": type(m).__name__, "ms": medians[unit], "share": share(medians[unit])}
                        for unit, m in units],
        }
    return out


