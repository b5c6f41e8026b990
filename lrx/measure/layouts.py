"""Each model in its fastest layout, in rounds: the whole-model comparison behind every speedup lrx reports.

- :func:`original_layouts`: the ways to run the original that need no lrx code (PyTorch's default,
  channels_last, NNPACK, cudnn.benchmark); :func:`expansion_layouts`: the expansion on lrx's inference paths
  and in the same plain layouts, so that each model is timed in its own fastest layout.
- :func:`time_pair`: all of them interleaved (:func:`lrx.measure.timing.interleaved`), each model's fastest
  layout its reference.
- :func:`time_rounds`: :func:`time_pair` in rounds on fresh copies, a time the median of the rounds' medians;
  rounds that disagree by more than :data:`ROUNDS_DISAGREE` flag the figure noisy.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from lrx.base.errors import UserError
from lrx.measure.timing import eval_copy, interleaved, random_input, summarise

__all__ = ["cudnn_autotuned", "original_layouts", "plain_expansion", "expansion_layouts", "forward_with_flags", "time_pair",
           "ROUNDS_DISAGREE", "combine_rounds", "time_rounds"]


# ---------------------------------------------------------------- the original's plain layouts


@contextlib.contextmanager
def _backend_flag(backend, name: str, value: bool) -> Iterator[None]:
    """Set one ``torch.backends`` flag for the block (its ``flags()`` helpers reset the others too)."""
    before = getattr(backend, name)
    setattr(backend, name, value)
    try:
        yield
    finally:
        setattr(backend, name, before)


def cudnn_autotuned():
    return _backend_flag(torch.backends.cudnn, "benchmark", True)


def _mkldnn_off():
    # With oneDNN off, PyTorch runs stride-1 float convs through NNPACK (from batch 16), else im2col.
    return _backend_flag(torch.backends.mkldnn, "enabled", False)


def original_layouts(model: nn.Module, device: torch.device, plain_only: bool = False) -> dict[str, tuple]:
    """The ways to run the original model that need no lrx code, for the honest baseline.

    Returns ``{name: (model, flags)}`` where ``flags()`` is the context the forward runs in:

    - ``"default"``: the model as PyTorch runs it by default (NCHW weights, global flags untouched);
    - ``"channels_last"``: its weights in channels_last (on CPU oneDNN's NHWC kernels skip the
      reorders of the NCHW path);
    - on CPU where NNPACK is built in, ``"nnpack"``: NCHW with oneDNN off, so stride-1 convs run
      through NNPACK;
    - on CUDA, ``"cudnn_benchmark"`` and ``"channels_last_cudnn_benchmark"``: cuDNN's autotuner on.

    ``plain_only`` (``profile.optimise: false``): the default layout alone. ``model`` must already be on
    ``device`` in eval mode; the channels_last variants are copies.
    """
    layouts = {"default": (model, contextlib.nullcontext)}
    if plain_only:
        return layouts
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    if device.type == "cuda":
        layouts["channels_last"] = (last, contextlib.nullcontext)
        layouts["cudnn_benchmark"] = (model, cudnn_autotuned)
        layouts["channels_last_cudnn_benchmark"] = (last, cudnn_autotuned)
    else:
        layouts["channels_last"] = (last, contextlib.nullcontext)
        if getattr(torch, "_nnpack_available", lambda: False)():
            layouts["nnpack"] = (model, _mkldnn_off)
    return layouts


def forward_with_flags(net: nn.Module, flags: Callable, x: torch.Tensor) -> Callable[[], object]:
    def call():
        with flags():
            return net(x)
    return call


def plain_expansion(expanded: nn.Module | None, device: torch.device, dtype: str = "float32",
                    compile: bool = False) -> nn.Module | None:
    """A copy of the expansion in eval mode on ``device``, without inference paths: the ``plain`` that
    :func:`expansion_layouts` times in the original's plain layouts. None without an expansion, or where both
    models run wrapped (a dtype other than float32, or compiled): plain layouts are float32 eager ones."""
    if expanded is None or dtype != "float32" or compile:
        return None
    return eval_copy(expanded, device)


def expansion_layouts(expanded: nn.Module, device: torch.device, plain: nn.Module | None = None,
                      plain_only: bool = False) -> dict[str, tuple]:
    """The ways to run the expansion, as :func:`original_layouts` gives them for the original.

    ``expanded`` is the expansion as it is to run: ``"lrx"``, its chosen inference paths (on CUDA with
    cudnn.benchmark on, as the fastest original layouts may). With ``plain`` (the same expansion without
    paths) it also gets every plain layout the original gets (default, channels_last, NNPACK or
    cudnn.benchmark), so that each model is timed in its own fastest layout: an expansion keeps dense convs
    that NNPACK may run as fast as the original's. ``plain_only`` (``profile.optimise: false``):
    ``expanded`` is plain, and runs as ``"default"`` alone.
    """
    if plain_only:
        return {"default": (expanded, contextlib.nullcontext)}
    flags = cudnn_autotuned if device.type == "cuda" else contextlib.nullcontext
    layouts = {"lrx": (expanded, flags)}
    if plain is not None:
        layouts.update(original_layouts(plain, device))
    return layouts


def time_pair(original: nn.Module, expanded: nn.Module | None, input_size: Sequence[int], batch: int,
              device: torch.device, warmup: int, repeats: int, plain_only: bool = False,
              expanded_plain: nn.Module | None = None, min_time_s: float = 0.0) -> dict:
    """Whole-model times on ``device``: every layout of the original and of the expansion, interleaved.

    ``original`` and ``expanded`` must be on ``device`` in eval mode (the expansion as it is to run,
    e.g. after lrx.nn.inference.optimise; ``expanded_plain`` the same expansion without paths, for its
    plain layouts: :func:`expansion_layouts`). Each runs ``repeats`` times at least, more until it has run
    ``min_time_s`` seconds (:func:`lrx.measure.timing.interleaved`).

    Returns
    -------
    ``{"layouts": {layout: stats}, "original_layout": the original's fastest layout, "original": its stats,
    "expanded_layouts": {layout: stats} (empty for a baseline), "expanded_layout": the expansion's fastest
    layout or None, "expanded": its stats or None, "speedup": fastest original / fastest expansion (None for
    a baseline), "speedup_default": the original in PyTorch's default layout / fastest expansion}``; stats
    as :func:`lrx.measure.timing.summarise` gives them.
    """
    x = random_input(batch, input_size, device)
    groups = {"original": original_layouts(original, device, plain_only)}
    if expanded is not None:
        groups["expanded"] = expansion_layouts(expanded, device, expanded_plain, plain_only)
    calls = {(group, name): forward_with_flags(net, flags, x)
             for group, layouts in groups.items() for name, (net, flags) in layouts.items()}
    with torch.inference_mode():
        stats = interleaved(calls, device, warmup, repeats, min_time_s)
    for s in stats.values():
        s.pop("speedup", None)  # relative to whichever call came first: meaningless here
    return _pair({group: {name: stats[(group, name)] for name in layouts} for group, layouts in groups.items()})


def _pair(groups: dict[str, dict[str, dict]]) -> dict:
    """:func:`time_pair`'s answer from ``{"original": {layout: stats}, ["expanded": {layout: stats}]}``."""
    layouts, new_layouts = groups["original"], groups.get("expanded", {})
    best = min(layouts, key=lambda name: layouts[name]["median_ms"])
    new_best = min(new_layouts, key=lambda name: new_layouts[name]["median_ms"]) if new_layouts else None
    new = new_layouts[new_best] if new_best else None

    def ratio(reference: dict) -> float | None:
        return reference["median_ms"] / new["median_ms"] if new is not None and new["median_ms"] > 0 else None

    return {"layouts": layouts, "original_layout": best, "original": layouts[best],
            "expanded_layouts": new_layouts, "expanded_layout": new_best, "expanded": new,
            "speedup": ratio(layouts[best]), "speedup_default": ratio(layouts["default"])}


# ---------------------------------------------------------------- rounds

# A profile is several rounds, each with fresh copies of both models and its own warm-up. A time is the
# median of the rounds' medians; when the rounds' speedups (or one model's medians) span more than this
# share of their median, the figure is flagged noisy: a slow state that holds a whole round (another
# process on the cores, a bad copy) shows up as a disagreeing round instead of as the answer.
ROUNDS_DISAGREE = 0.10


def _disagree(values: list[float]) -> bool:
    return len(values) > 1 and max(values) - min(values) > ROUNDS_DISAGREE * statistics.median(values)


def _over_rounds(stats: list[dict]) -> dict:
    """One model's stats over rounds: quartiles, min, max and runs pooled; the median of the rounds' medians."""
    out = summarise([run for s in stats for run in s["runs_ms"]])
    medians = [s["median_ms"] for s in stats]
    out["median_ms"] = statistics.median(medians)
    out["round_medians_ms"] = medians
    out["noisy"] = out["noisy"] or _disagree(medians)
    return out


def combine_rounds(rounds: list[dict]) -> dict:
    """:func:`time_pair`'s answers of several rounds as one: each layout's stats over the rounds
    (:func:`_over_rounds`), the fastest layouts from those medians, the speedups as the median of the rounds'
    own (each measured interleaved within its round: when the machine's speed drifts between rounds, a ratio
    of medians from different rounds can fall outside every round's), plus ``"rounds"`` (the
    count), ``"round_speedups"`` (each round's own speedup, None for a baseline) and ``"rounds_disagree"``
    (they span more than :data:`ROUNDS_DISAGREE` of their median)."""
    groups = {"original": {name: _over_rounds([r["layouts"][name] for r in rounds]) for name in rounds[0]["layouts"]}}
    if rounds[0]["expanded"] is not None:
        groups["expanded"] = {name: _over_rounds([r["expanded_layouts"][name] for r in rounds])
                              for name in rounds[0]["expanded_layouts"]}
    out = _pair(groups)
    speedups = [r["speedup"] for r in rounds if r["speedup"] is not None]
    if speedups:  # each round's ratio is interleaved; a ratio of medians taken from different rounds is not
        out["speedup"] = statistics.median(speedups)
        out["speedup_default"] = statistics.median(r["speedup_default"] for r in rounds)
    out.update(rounds=len(rounds), round_speedups=speedups or None, rounds_disagree=_disagree(speedups))
    return out


def time_rounds(make: Callable[[], tuple], input_size: Sequence[int], batch: int, device: torch.device, warmup: int,
                repeats: int, rounds: int = 1, plain_only: bool = False, min_time_s: float = 0.0) -> dict:
    """:func:`time_pair` in ``rounds`` rounds, each on fresh models, combined (:func:`combine_rounds`).

    ``make()`` returns ``(original, expanded or None, expanded_plain or None)`` as :func:`time_pair` takes
    them, new copies each call; they are dropped after their round.
    """
    if rounds < 1:
        raise UserError(f"rounds must be >= 1, got {rounds}", key="profile.rounds")
    answers = []
    for _ in range(rounds):
        original, expanded, plain = make()
        answers.append(time_pair(original, expanded, input_size, batch, device, warmup, repeats, plain_only, plain,
                                 min_time_s))
        del original, expanded, plain
    return combine_rounds(answers)
