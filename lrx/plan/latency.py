"""Ranks from a latency target (``decompose.target: {latency: X}``): planned from time measured on the device.

MACs are not time (lrx's 3x MAC plan ran AlexNet at 0.88x-1.04x on an H200). So
:func:`plan_latency` plans by what a user pays for:

1. **Candidates.** The layers given, or with ``layers: auto`` every conv scheme 2 can replace
   (:func:`candidate_layers`; conv1 included).
2. **A ladder of ranks per layer** (:func:`candidate_ranks`): for each fraction in :data:`LADDER` of the
   dense conv's MACs, the smallest aligned rank of the layer's ladder (:func:`lrx.plan.macs.cheaper_ladder`:
   ranks cheaper than the dense conv) that reaches it; and "keep the layer dense" as one more option. With
   ``scheme: auto`` a conv with a larger kernel has a second ladder, Tucker-2 at its ranks (options
   ``t<rank>``, :func:`tucker_option`; their proxy is the HOSVD's retained filter energy, or with calibration
   data the output energy its data fit can keep, :func:`lrx.factor.datafit.tucker2_output_energy`): the choice below
   weighs the two structures per layer on the same footing, and keeps Tucker-2 where it buys more time
   for less proxy.
3. **A table of times.** Each candidate layer runs alone on its real input shape (batch, channels, H, W
   at the profile's batch and input size), dense and at each ladder rank, in the layout and dtype the
   model will run in (:class:`DeviceTiming`, through :func:`lrx.nn.inference.optimise`), interleaved. The
   table is cached per device and layer shape in the machine's cache, one JSON file outside any runs
   folder (:func:`lrx.pipeline.rundir.latency_cache_path`), and so are the whole-model times below (per
   device, model structure, batch and input size): a later plan on the same machine, from any runs folder,
   reuses them and makes the same choice. The original is timed per module once for every conv and linear
   layer, whichever the plan may replace, and a check is keyed by what it builds (scheme auto's layers by the
   scheme each gets): a plan of scheme 2 and one of scheme auto on the same machine share those measurements,
   and where auto's other structures win nothing, it makes scheme 2's choice. Two fresh measurements of a table differ by a few %, and where
   many plans are within that of each other (results/cpu/plan-noise.txt) they would choose differently.
   The cache is only a cache: a file of another schema version, or an entry that is not a mapping of
   positive, finite times, is ignored with a warning naming the file, and those layers are measured again.
4. **A choice.** Each option's time in the model = the dense conv's time inside the original (channels_last,
   the expansion's layout, timed per module) times the option's time relative to dense in the table.
   Predicted whole-model time = the rest of the model + each layer's time at its choice. Greedy, as
   :func:`lrx.plan.macs.plan_ranks`: from every layer dense, repeatedly take the move (a layer to any
   faster option) that loses the least accuracy proxy per millisecond saved, until the predicted time
   meets the target (aiming :data:`MARGIN` above it, or at the target itself where only that is reachable);
   where a step overshot, layers then move back to less lossy options that still fit. With scheme auto the
   same choice is also made with only some of its structures (every combination), and the least lossy choice
   that fits is kept: a greedy pass over more options can end less well than one over fewer, and scheme
   auto never plans worse, by its proxy, than a scheme it includes. A target the table
   cannot meet is planned as the least lossy expansion within :data:`REACH_SLACK` of the fastest it allows
   (the fastest itself where that would keep every layer dense though one is faster expanded),
   and the plan says so (``best_reachable``, ``target_met``): a run is never refused for a machine that is
   slower than hoped.
   Options slower than a less lossy one are never taken. The proxy is the retained
   filter energy per rank (or any per-rank proxy the caller gives, e.g. a data-aware one).
5. **A check.** The whole expanded model is timed against the original in its fastest plain layout
   (:func:`lrx.measure.layouts.time_rounds`: PyTorch's default, channels_last, NNPACK or cudnn.benchmark, whichever
   is fastest on the device: the honest baseline). If the predicted
   speedup is off the measured one by more than :data:`TOLERANCE` (or the target is missed), the expanded
   layers' times are scaled
   so that the prediction matches what was measured (the rest of the model and the dense layers come from
   the whole original's time) and the choice is made again (at most :data:`ADJUST_ROUNDS` times). Where
   the first check contradicts cached times (the expanded layers ran more than :data:`SCALE_LIMIT` times
   slower or faster than the cache says), those layers' cached entries are dropped and measured again, with
   the whole-model times and a warning naming the cache, and the plan starts over from the fresh times.

The measuring is a :class:`DeviceTiming` or anything with its ``key``, ``layer`` and ``whole`` methods,
so tests give a fake table. Times of layers are taken eagerly even when ``profile.compile`` is on
(compiling dozens of candidate layers would take minutes); the whole-model check compiles both models,
and the adjustment step absorbs the difference.

The module is long because the planner's steps share its table and are read together: the device timing,
the cached table and what makes an entry of it valid, the choice, and the checks that correct it.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import math
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence

import torch
from torch import nn

from lrx.base.files import load_json, write_json_atomic
from lrx.config.settings import check_target, profile_input_size
from lrx.base.distributed import resolve_device
from lrx.base.errors import UserError
from lrx.nn.surgery import build_expanded, check_layer, conv_sizes, layer_label, layer_scheme, new_layer, select_layers
from lrx.measure.layouts import plain_expansion, time_rounds
from lrx.measure.machine import MachineWatch, cpu_name
from lrx.measure.timing import interleaved, memory_kept, module_times, torch_threads
from lrx.factor.choices import AUTO, TUCKER
from lrx.plan.macs import LADDER, filter_energy, fraction_ladder, layer_costs, tucker_shares
from lrx.nn.inference import optimise

__all__ = ["LADDER", "TOLERANCE", "MARGIN", "ADJUST_ROUNDS", "SCALE_LIMIT", "REACH_SLACK", "TIE", "TIE_RULE",
           "CACHE_VERSION", "DENSE", "TUCKER_MARK", "tucker_option", "RULE", "Timing", "DeviceTiming", "candidate_layers", "candidate_ranks", "read_cache", "layer_table", "choose",
           "plan_latency"]

# Fractions of a dense conv's MACs the ladder's ranks reach (a layer's time is roughly linear in its
# rank, so these span 1.4x to 20x fewer MACs for the layer).
TOLERANCE = 0.10  # predicted vs measured whole-model speedup: relative difference that triggers an adjustment
# Plans aim this much above the target, so that the noise of a later measurement (a few % between runs on
# one machine) does not put a plan that just met it under it; where the margin is out of reach they aim at
# the target itself, and a plan counts as meeting the target itself.
MARGIN = 0.05
ADJUST_ROUNDS = 3  # re-plans after the first check, at most
# The most the expanded layers' times are scaled by when a check adjusts the table (and the least, its
# inverse). A first check that needs more than this from cached times contradicts the cache: those layers
# are measured again instead.
SCALE_LIMIT = 4.0
# Where a target is out of reach, the plan is the least lossy one predicted within this share of the fastest
# time the table allows: options that close in time differ by less than the noise of a measurement, and
# choosing among them by which ran a hair faster would make the plan a coin toss and cost accuracy for nothing.
REACH_SLACK = 0.03
# Two moves of the greedy choice whose figures (proxy lost per ms saved, or proxy won back) differ by less
# than this share of them are a tie: float noise in a proxy or a time (an SVD's last bits, a sum taken in
# another order) must not decide a plan. A tie goes to the earlier layer in the model, then to the less
# lossy option of it (TIE_RULE).
TIE = 1e-9
TIE_RULE = "ties (within 1e-9 of each other) go to the earlier layer in the model, then to its less lossy option"
# The schema of latency-tables.json: {"version": 1, "tables": {layer key: {"dense" or rank: ms}},
# "models": {model key: a whole-model measurement}} ("models" is optional: files written before it are read).
CACHE_VERSION = 1
DENSE = "dense"
TUCKER_MARK = "t"  # a layer table's Tucker-2 options: "t<rank>" (tucker_option)
RULE = ("greedy on measured time: from every candidate layer dense, repeatedly move one layer to the faster "
        "option (a rank or dense) that loses the least accuracy proxy per millisecond saved, until the "
        "predicted whole-model time meets the target; then time the whole model and re-plan if the "
        "prediction is off by more than 10%; with several structures (scheme auto), the least lossy of the greedy "
        "choices over each combination of them; " + TIE_RULE)


class Timing(Protocol):
    """What the planner measures with (:class:`DeviceTiming` on a device, a fake table in tests)."""

    batch: int
    input_size: tuple

    def key(self) -> dict:
        """The device and settings a time holds for (the cache key, with each layer's shape)."""

    def layer(self, conv: nn.Module, input_shape: tuple, ranks: Sequence[int], scheme: str = "v2") -> dict[str, float]:
        """Median ms of ``conv`` alone (``"dense"``) and of its expansion at each rank (``str(rank)``) on
        ``input_shape``: scheme 2 for a conv, the channel scheme for a 1x1 conv or a linear layer (``scheme``,
        the layer's own: :func:`lrx.nn.surgery.layer_scheme`)."""

    def in_model(self, original: nn.Module, names: Sequence[str]) -> dict:
        """The original in channels_last, timed per module: ``{"total_ms": its forward, "ms": {name: the
        named conv's share of it}}``."""

    def whole(self, original: nn.Module, expanded: nn.Module | None) -> dict:
        """Whole-model medians, interleaved: ``{"original_ms"`` (the original's fastest plain layout),
        ``"layout"`` (its name), ``"layouts": {name: ms}`` (``"channels_last"`` among them),
        ``"expanded_ms"`` (the expansion's fastest layout, lrx's paths or a plain one; None without
        ``expanded``), ``"expanded_layout"``}``, each time the median of the rounds' medians."""


@dataclass
class DeviceTiming:
    """Times on a real device: models prepared with :func:`lrx.nn.inference.optimise` (layout, dtype, compile),
    random inputs, medians of ``repeats`` interleaved runs after ``warmup``, ``threads`` torch threads."""

    device: torch.device
    batch: int = 16
    input_size: tuple = (3, 224, 224)
    threads: int | None = None
    dtype: str = "float32"
    compile: bool = False
    warmup: int = 2
    repeats: int = 5
    rounds: int = 1  # of the whole-model check, as a profile's (profile.rounds)
    min_time_s: float = 0.0  # least seconds each timed thing runs per table or round (profile.min_time_s)

    @classmethod
    def from_config(cls, cfg) -> "DeviceTiming":
        """The timing a config asks for: ``runtime.device``, and the profile's batch, input size (as resolved:
        :func:`lrx.config.settings.profile_input_size`), threads, dtype, compile, warm-up, repeats, rounds and
        least time per round."""
        p = cfg.profile
        return cls(resolve_device(cfg.runtime.device), p.batch, profile_input_size(cfg), p.threads, p.dtype,
                   p.compile, p.warmup, p.repeats, p.rounds, p.min_time_s)

    def watch(self) -> MachineWatch:
        """Readings of the machine's load around a planning (the threads lrx itself runs are its own)."""
        return MachineWatch(threads=self.threads or torch.get_num_threads())

    def key(self) -> dict:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
        else:
            name = f"{cpu_name()}, {torch.get_num_threads() if self.threads is None else self.threads} threads"
        # "memory": times taken with freed memory kept in the process (lrx.measure.timing.steady_memory) differ from
        # times taken with glibc's defaults (page faults): a cache of those is not used for these
        return {"host": socket.gethostname(), "device": f"{self.device.type}: {name}", "torch": torch.__version__,
                "threads": self.threads, "dtype": self.dtype, "memory": "kept" if memory_kept() else "default"}

    def _prepare(self, model: nn.Module, channels_last: bool, x: torch.Tensor, compile: bool) -> nn.Module:
        net = copy.deepcopy(model).to(self.device).eval()
        return optimise(net, self.device, x, channels_last=channels_last, dtype=self.dtype, compile=compile)

    def _input(self, shape) -> torch.Tensor:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    def layer(self, conv: nn.Module, input_shape: tuple, ranks: Sequence[int], scheme: str = "v2") -> dict[str, float]:
        x = self._input(input_shape)
        modules = {DENSE: nn.Sequential(copy.deepcopy(conv))}
        for rank in ranks:  # random factors: the time does not depend on the values
            modules[str(rank)] = nn.Sequential(new_layer(conv, scheme, rank, "shared", False))
        with torch.no_grad():
            nets = {k: self._prepare(m, True, x, False) for k, m in modules.items()}
        with torch_threads(self.threads), torch.inference_mode():
            stats = interleaved({k: (lambda net=net: net(x)) for k, net in nets.items()}, self.device,
                                 self.warmup, self.repeats, self.min_time_s)
        return {k: s["median_ms"] for k, s in stats.items()}

    def in_model(self, original: nn.Module, names: Sequence[str]) -> dict:
        x = self._input((self.batch, *self.input_size)).contiguous()
        with torch.no_grad():
            net = self._prepare(original, True, x, False)
        with torch_threads(self.threads):
            part = module_times({"original": (net, contextlib.nullcontext)}, names, x, self.device, self.warmup,
                                self.repeats, self.min_time_s)["original"]
        return {"total_ms": part["total_ms"], "ms": {m["name"]: m["ms"] for m in part["modules"] if m["name"] in names}}

    def whole(self, original: nn.Module, expanded: nn.Module | None) -> dict:
        x = self._input((self.batch, *self.input_size)).contiguous()

        def make() -> tuple:  # fresh copies each round, as a profile times them
            with torch.no_grad():
                # The original as PyTorch runs it (NCHW); lrx.measure.timing tries its other plain layouts itself.
                base = self._prepare(original, False, x, self.compile)
                new = self._prepare(expanded, True, x, self.compile) if expanded is not None else None
            return base, new, plain_expansion(expanded, self.device, self.dtype, self.compile)

        with torch_threads(self.threads):
            timed = time_rounds(make, self.input_size, self.batch, self.device, self.warmup, self.repeats, self.rounds,
                                min_time_s=self.min_time_s)
        return {"original_ms": timed["original"]["median_ms"], "layout": timed["original_layout"],
                "layouts": {k: v["median_ms"] for k, v in timed["layouts"].items()},
                "expanded_ms": timed["expanded"]["median_ms"] if expanded is not None else None,
                "expanded_layout": timed["expanded_layout"], "speedup": timed["speedup"]}


# ---------------------------------------------------------------- the ladder and the table


def candidate_layers(model: nn.Module, layers, scheme: str = "v2") -> list[tuple[int | None, str, nn.Module]]:
    """(1-based conv index or None, name, module) of the layers to plan, as :func:`lrx.nn.surgery.select_layers`
    reads ``layers`` for ``scheme`` (scheme 2, the channel scheme or ``auto``: ``"auto"`` or a glob pattern
    keeps the layers the scheme can replace); a layer named by index or name that it cannot replace is
    refused, naming it."""
    chosen = select_layers(model, layers, scheme)
    for index, name, conv in chosen:
        check_layer(conv, scheme, False, layer_label(index, name))
    return chosen


def candidate_ranks(conv: nn.Module, in_hw, out_hw, align: int = 1, scheme: str = "v2", positions: int = 1) -> list[int]:
    """The ranks worth timing for ``conv``, ascending: per fraction f of :data:`LADDER`, the smallest rank
    of the layer's ladder (:func:`lrx.plan.macs.affordable_ladder`, which tops out at the largest rank cheaper
    than the dense layer) whose MACs reach f times the dense layer's; only ranks with fewer MACs than the
    dense layer (a rank at or above them cannot be faster). Scheme 2 for a conv; the channel scheme (at
    ``positions`` output positions) for a 1x1 conv or a linear layer, as ``scheme`` replaces it."""
    return fraction_ladder(*layer_costs(conv, scheme, in_hw, out_hw, positions), align, LADDER)


def _cache_key(device_key: dict, conv: nn.Module, input_shape) -> str:
    if isinstance(conv, nn.Linear):  # the channel scheme's ranks; a conv's key is as before linear layers were timed
        shape = {"kind": "linear", "in": conv.in_features, "out": conv.out_features, "bias": conv.bias is not None,
                 "input_shape": list(input_shape)}
        return json.dumps({**device_key, **shape}, sort_keys=True)
    shape = {"in": conv.in_channels, "out": conv.out_channels, "kernel": list(conv.kernel_size),
             "stride": list(conv.stride), "padding": list(conv.padding) if not isinstance(conv.padding, str)
             else conv.padding, "dilation": list(conv.dilation), "bias": conv.bias is not None,
             "input_shape": list(input_shape)}
    return json.dumps({**device_key, **shape}, sort_keys=True)


def _is_time(value: Any) -> bool:
    """A time a cache may hold: a positive, finite number of milliseconds (not a boolean)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # an integer too large for a float
        return False


def _valid_entry(entry: Any) -> bool:
    """One layer's cached table: a mapping of ``"dense"`` and ranks (as strings) to times."""
    return (isinstance(entry, dict) and DENSE in entry
            and all((k == DENSE or (k.isascii() and k.isdigit())) and _is_time(v) for k, v in entry.items()))


def _read_file(path: Path | None, log: Callable[[str], None]) -> dict:
    """The cache file's object when it is one of this schema (else ``{}``, with one ``log`` line naming the file
    when there is a file lrx cannot use)."""
    if path is None:
        return {}
    path = Path(path)
    try:
        data = load_json(path)
    except FileNotFoundError:
        return {}
    except UserError as err:
        log(f"warning: latency cache {path}: ignored ({err.message}); measuring the layers again")
        return {}
    version = data.get("version") if isinstance(data, dict) else None
    if not isinstance(data, dict) or version != CACHE_VERSION or not isinstance(data.get("tables"), dict):
        why = ("it is not a JSON object" if not isinstance(data, dict) else
               f"schema version {str(version)[:20]!r}, this lrx reads {CACHE_VERSION}" if version != CACHE_VERSION
               else "its 'tables' is not an object")
        log(f"warning: latency cache {path}: ignored ({why}); measuring the layers again")
        return {}
    return data


def read_cache(path: Path | None, log: Callable[[str], None] = lambda m: None) -> dict:
    """The valid cached layer tables of ``path`` (``{key: {rank or "dense": ms}}``); empty when there is none.

    The cache is only a cache: a file that cannot be read, is not JSON, is of another schema version
    (:data:`CACHE_VERSION`) or does not hold a ``tables`` object is ignored, and so is each entry that is
    not a mapping of ``"dense"`` and ranks to positive, finite times; each with one ``log`` line naming the
    file. What is ignored is measured again (and written over it).
    """
    data = _read_file(path, log)
    if not data:
        return {}
    tables = {k: {t: float(ms) for t, ms in v.items()} for k, v in data["tables"].items() if _valid_entry(v)}
    bad = len(data["tables"]) - len(tables)
    if bad:
        log(f"warning: latency cache {path}: {bad} of {len(data['tables'])} entries ignored (not a mapping of "
            "'dense' and ranks to positive, finite times in ms); measuring those layers again")
    return tables


def read_models(path: Path | None) -> dict:
    """The cached whole-model measurements of ``path`` (``{key: what the timing returned}``): those whose
    numbers are all positive and finite (:func:`_valid_measure`); the others, and a file :func:`read_cache`
    ignores, are measured again without a word (read_cache says what is wrong with the file)."""
    models = _read_file(path, lambda m: None).get("models")
    return {k: v for k, v in models.items() if _valid_measure(v)} if isinstance(models, dict) else {}


def _valid_measure(entry: Any) -> bool:
    """A whole-model measurement a cache may hold: a mapping whose numbers (nested mappings' too) are positive
    and finite, among them the time it is for (``total_ms`` per module, else ``original_ms``)."""
    def fine(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and fine(v) for k, v in value.items())
        return value is None or isinstance(value, str) or _is_time(value)

    return isinstance(entry, dict) and fine(entry) and (_is_time(entry.get("total_ms")) or _is_time(entry.get("original_ms")))


def _save(path: Path, tables: dict | None = None, models: dict | None = None) -> None:
    """Write ``tables`` and ``models`` (replacing those sections; a section not given keeps what the file holds)
    into the cache ``path``, atomically; a cache that cannot be replaced is refused naming it."""
    held = _read_file(path, lambda m: None)
    data = {"version": CACHE_VERSION, "tables": tables if tables is not None else held.get("tables", {}),
            "models": models if models is not None else read_models(path)}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(data, path)
    except (UserError, OSError) as err:  # the file's name goes into the message: a caller may put its own file first
        why = err.message if isinstance(err, UserError) else err.strerror or str(err)
        raise UserError(f"cannot replace the latency cache {path}: {why}") from None


class _Remembered:
    """Whole-model measurements through the cache: each is read from it when it holds one for the same device,
    model structure, batch and input size (times do not depend on the weights), else measured and written.
    With ``fresh`` set, everything is measured again (and replaces what the cache held)."""

    def __init__(self, cache: Path | None, write: bool, timing: Timing, model: nn.Module,
                 log: Callable[[str], None] = lambda m: None) -> None:
        self.cache, self.write, self.timing, self.log, self.fresh, self.reused = cache, write, timing, log, False, []
        shapes = [(name, list(p.shape)) for name, p in model.state_dict().items()]
        self.model = hashlib.sha256(json.dumps([repr(model), shapes]).encode()).hexdigest()[:16]

    def __call__(self, what: str, measure: Callable[[], dict]) -> dict:
        key = json.dumps({**self.timing.key(), "model": self.model, "batch": self.timing.batch,
                          "input_size": list(self.timing.input_size), "compile": bool(getattr(self.timing, "compile", False)),
                          "measure": what}, sort_keys=True)
        held = None if self.fresh else read_models(self.cache).get(key)
        if held is not None:
            if not self.reused:
                self.log(f"reusing the model's times cached in {self.cache} (delete the file to measure again)")
            self.reused.append(what)
            return held
        value = measure()
        if self.write and self.cache is not None:
            _save(self.cache, models={**read_models(self.cache), key: value})
        return value


def layer_table(timing: Timing, chosen, sizes: dict, align: int, cache: Path | None = None,
                write_cache: bool = True, log: Callable[[str], None] = lambda m: None,
                remeasure: Collection[str] = (), scheme: str = "v2", inputs: Mapping[str, tuple] | None = None,
                tucker_proxy: Mapping[str, Callable[[Sequence[int]], Sequence[float]]] | None = None) -> list[dict]:
    """Per candidate layer: ``{"index", "name", "scheme", "input_shape", "ranks", "ms": {"dense": t, "<rank>": t},
    "macs": {...}, "cached"}``, times from ``cache`` (:func:`read_cache`) where it holds every rank, else
    measured (and cached); the layers named in ``remeasure`` are measured whatever the cache holds, and
    their entries replaced. A cache that cannot be replaced (a directory in its place, a full disk) is
    refused naming it (:class:`UserError`). ``sizes``: each layer's input and output (H, W)
    (:func:`lrx.nn.surgery.conv_sizes`); ``inputs``: each linear layer's input shape without the batch
    (needed with linear layers among ``chosen``). Each layer is planned with the scheme that replaces it in
    an expansion of ``scheme`` (:func:`lrx.nn.surgery.layer_scheme`). With scheme auto a conv with a larger
    kernel also has Tucker-2's times and ``"tucker_loss"``, the proxy lost at each of its ranks: 1 - the share
    ``tucker_proxy[name](ranks)`` keeps (e.g. :func:`lrx.factor.datafit.tucker2_output_energy`), else 1 - the HOSVD's
    retained filter energy."""
    if cache is not None and write_cache and Path(cache).is_dir():
        raise UserError(f"the latency cache {cache} is a directory: lrx cannot replace it with the times it "
                        "measures; move it away and run again")
    tables = read_cache(cache, log)
    # "cached" is what the file held: a layer of the shape of one measured a moment ago reuses that table, and
    # is as fresh as it (the check that contradicts cached times must not measure it again)
    on_file = set(tables)
    device_key, rows, changed = timing.key(), [], False

    def table_of(name: str, shape: tuple, key: str, ranks: Sequence[int], what: str,
                 measure: Callable[[], dict]) -> tuple[dict, bool]:
        """The times under ``key``: as held where they cover dense and ``ranks``, else measured now (on ``shape``)
        and kept; and whether the file held them."""
        nonlocal changed
        held = tables.get(key, {}) if name not in remeasure else {}
        complete = all(str(r) in held for r in ranks) and DENSE in held
        if not complete:
            log(f"timing {name} on {tuple(shape)}: {what} {', '.join(map(str, ranks))}")
            held = {**held, **measure()}
            tables[key], changed = held, True
        return held, complete and key in on_file

    for index, name, conv in chosen:
        in_hw, out_hw = sizes[name]
        own = layer_scheme(conv, scheme)
        if isinstance(conv, nn.Linear):
            shape = (timing.batch, *inputs[name])
            positions = math.prod(inputs[name][:-1])
        else:
            shape = (timing.batch, conv.in_channels, *in_hw)
            positions = out_hw[0] * out_hw[1]
        ranks = candidate_ranks(conv, in_hw, out_hw, align, own, positions)
        held, cached = table_of(name, shape, _cache_key(device_key, conv, shape), ranks, "dense and ranks",
                                lambda: timing.layer(conv, shape, ranks) if own == "v2"
                                else timing.layer(conv, shape, ranks, scheme=own))
        dense, cost = layer_costs(conv, own, in_hw, out_hw, positions)
        macs = {DENSE: dense, **{str(r): cost[r - 1] for r in ranks}}
        row = {"index": index, "name": name, "scheme": own, "input_shape": list(shape), "ranks": ranks,
               "ms": {k: float(held[k]) for k in [DENSE, *map(str, ranks)]}, "macs": macs, "cached": cached}
        if scheme == AUTO and own == "v2":  # the other structure for a KxK conv: Tucker-2, timed as its own table
            tranks = candidate_ranks(conv, in_hw, out_hw, align, TUCKER)
            theld, tcached = table_of(name, shape, _cache_key({**device_key, "scheme": TUCKER}, conv, shape), tranks,
                                      "Tucker-2 at ranks", lambda: timing.layer(conv, shape, tranks, scheme=TUCKER))
            row["cached"] = cached and tcached
            tcost = layer_costs(conv, TUCKER, in_hw, out_hw)[1]
            kept = tucker_shares(conv, tranks, (tucker_proxy or {}).get(name))
            row["tucker_ranks"] = tranks
            row["tucker_loss"] = {tucker_option(r): 1.0 - k for r, k in zip(tranks, kept)}
            # relative to this table's own dense time: each table is one interleaved measurement
            row["ms"].update({tucker_option(r): row["ms"][DENSE] * theld[str(r)] / theld[DENSE] for r in tranks})
            row["macs"].update({tucker_option(r): tcost[r - 1] for r in tranks})
        rows.append(row)
    if changed and write_cache and cache is not None:
        _save(cache, tables=tables)
    return rows


# ---------------------------------------------------------------- the choice


def tucker_option(rank: int) -> str:
    """How a layer table names the option "Tucker-2 at rank ``rank``" (its other options: "dense" and scheme
    ranks as plain numbers)."""
    return f"{TUCKER_MARK}{rank}"


def _family(row: dict, option: str) -> str:
    """The structure an option of ``row`` stands for: "dense", "tucker2" (``t<rank>``) or the row's own scheme
    (scheme 2 where the row does not say)."""
    if option == DENSE:
        return DENSE
    return TUCKER if option.startswith(TUCKER_MARK) else row.get("scheme", "v2")


def _options(row: dict, retained: Sequence[float], scale: float,
             families: Collection[str] | None = None) -> list[tuple[str, float, float]]:
    """(option, ms, proxy loss) of one layer, dense first, without options slower than a less lossy one;
    the ranks' times multiplied by ``scale``. A KxK conv planned with scheme auto has Tucker-2 options too, with
    their own proxy (``row["tucker_loss"]``). ``families``: only the options of these structures (and dense)."""
    options = [(DENSE, row["model_ms"][DENSE], 0.0)]
    options += [(str(r), scale * row["model_ms"][str(r)], 1.0 - float(retained[r - 1]))
                for r in sorted(row["ranks"], reverse=True)]
    options += [(tucker_option(r), scale * row["model_ms"][tucker_option(r)], row["tucker_loss"][tucker_option(r)])
                for r in sorted(row.get("tucker_ranks", ()), reverse=True)]
    if families is not None:
        options = [o for o in options if o[0] == DENSE or _family(row, o[0]) in families]
    options.sort(key=lambda o: (o[2], o[1]))
    kept = []
    for option in options:
        if not kept or option[1] < min(k[1] for k in kept):
            kept.append(option)
    return kept


def _beyond_tie(larger: float, smaller: float) -> bool:
    """Whether ``larger`` exceeds ``smaller`` by more than :data:`TIE` of their size (not a tie)."""
    return larger - smaller > TIE * max(abs(larger), abs(smaller))


def choose(table: list[dict], retained: Mapping[str, Sequence[float]], rest_ms: float, budget_ms: float,
           scale: float = 1.0) -> list[str]:
    """Each layer's option (``"dense"`` or a rank as a string) so that ``rest_ms`` + the layers' times (the
    ranks' times times ``scale``) <= ``budget_ms``, by the greedy rule of the module doc; then, where a step
    overshot, layers move back to less lossy options that still fit. Equal moves are chosen by
    :data:`TIE_RULE`, so the same table gives the same choice whatever the float noise in it. Raises
    ``ValueError`` with the best reachable time when even every layer's fastest option misses the budget.

    Where the table holds more than one structure (scheme auto: scheme 2, the channel scheme, Tucker-2), the
    greedy choice is also made with only some of them, every combination, and the least lossy of the choices
    that fit is kept (the one with every structure on a tie): a greedy pass over more options can end less
    well than one over fewer, and scheme auto must never plan worse, by its proxy, than a scheme it includes."""
    families = sorted({_family(row, o) for row in table for o in row["model_ms"]} - {DENSE})
    subsets = [None] + [kept for size in range(len(families) - 1, 0, -1)
                        for kept in itertools.combinations(families, size)]
    best = None
    for kept in subsets:
        options = [_options(row, retained[row["name"]], scale, kept) for row in table]
        try:
            at = _greedy(options, rest_ms, budget_ms)
        except ValueError:
            if kept is None:  # every structure together is the fastest the table allows
                raise
            continue
        loss = sum(layer[a][2] for layer, a in zip(options, at))
        if best is None or _beyond_tie(best[0], loss):
            best = (loss, [layer[a][0] for layer, a in zip(options, at)])
    return best[1]


def _greedy(options: list[list[tuple[str, float, float]]], rest_ms: float, budget_ms: float) -> list[int]:
    """:func:`choose`'s greedy pass over each layer's ``(option, ms, loss)``: the index of each layer's choice."""
    at = [0] * len(options)

    def time_at() -> float:  # summed afresh in one order, so that every layer at its fastest is exactly ``fastest``
        return rest_ms + sum(layer[a][1] for layer, a in zip(options, at))

    total = time_at()
    fastest = rest_ms + sum(min(t for _, t, _ in o) for o in options)
    if fastest > budget_ms:
        raise ValueError(fastest)
    while total > budget_ms:
        best = None
        for i, layer in enumerate(options):
            _, t_now, loss_now = layer[at[i]]
            for j in range(at[i] + 1, len(layer)):
                _, t, loss = layer[j]
                if t < t_now:
                    cost = (loss - loss_now) / (t_now - t)
                    if best is None or _beyond_tie(best[0], cost):  # scanned in TIE_RULE's order: a tie keeps the first
                        best = (cost, i, j)
        if best is None:  # cannot happen while fastest <= budget
            raise ValueError(fastest)
        _, i, j = best
        at[i] = j
        total = time_at()
    # A big step may overshoot the budget: give back, as long as it still fits, the move to a less lossy
    # option that wins back the most proxy.
    while True:
        best = None
        for i, layer in enumerate(options):
            _, t_now, loss_now = layer[at[i]]
            for j in range(at[i]):
                _, t, loss = layer[j]
                if total + t - t_now <= budget_ms and (best is None or _beyond_tie(loss_now - loss, best[0])):
                    best = (loss_now - loss, i, j)
        if best is None or best[0] <= 0:
            return at
        _, i, j = best
        at[i] = j
        total = time_at()


# ---------------------------------------------------------------- the planner


def plan_latency(model: nn.Module, layers, target: dict, timing: Timing,
                 proxy: Mapping[str, Sequence[float]] | None = None, align: int = 1, cache: Path | None = None,
                 write_cache: bool = True, rounds: int = ADJUST_ROUNDS, tolerance: float = TOLERANCE,
                 log: Callable[[str], None] = lambda m: None, scheme: str = "v2",
                 tucker_proxy: Mapping[str, Callable[[Sequence[int]], Sequence[float]]] | None = None) -> dict:
    """Choose which layers to expand (scheme 2) and at which ranks so that the whole model runs
    ``target["latency"]`` times faster on ``timing``'s device (see the module doc for the steps).

    Parameters
    ----------
    model : the original model (not modified).
    layers : 1-based conv indices or names, or ``"auto"``: the layers the planner may replace.
    scheme : "v2" (convs with a kernel larger than 1x1), "channel" (1x1 convs and linear layers), "tucker2" or
        "auto" (each layer by the scheme that replaces it, :func:`lrx.nn.surgery.layer_scheme`: per layer the
        choice is dense or that scheme at a ladder of ranks, and for a conv with a larger kernel Tucker-2 at a
        ladder of ranks too, all layers in one greedy choice).
    target : ``{"latency": X}``, X > 1.
    timing : a :class:`DeviceTiming` (or a fake with the same methods).
    proxy : ``{layer name: retained[r - 1] for r = 1..max rank}``, the accuracy proxy per rank (higher is
        better, 1.0 = lossless); default the retained filter energy of scheme 2.
    tucker_proxy : with scheme auto, ``{layer name: f}``, ``f(ranks)`` Tucker-2's share kept at those ranks (the
        same footing as ``proxy``; e.g. :func:`lrx.factor.datafit.tucker2_output_energy` where ``proxy`` is the
        output energy); default the HOSVD's retained filter energy.
    align : candidate ranks are multiples of this (or the maximum rank).
    cache, write_cache : the JSON file of cached layer tables; read it, and write what was measured.
    rounds, tolerance : adjustment steps after the first whole-model check, and when they run.

    Returns
    -------
    ``{"rule", "target", "align", "device", "batch", "input_size", "table": [per layer: times, MACs,
    choice], "baseline": {"layout", "layouts_ms"}, "rounds": [{"choice", "predicted_speedup",
    "measured_speedup", "scale"}], "layers": [chosen 1-based conv indices, None for linear layers], "names", "ranks",
    "schemes" (per chosen layer, where the plan holds a Tucker-2 layer of scheme auto; else None),
    "predicted_speedup", "measured_speedup", "target_met", "best_reachable"}``; ``layers``/``ranks`` are those
    expanded (dense ones left out). A target the measured layer times cannot meet is not an error: the
    fastest expansion they allow is planned, ``best_reachable`` holds its predicted speedup (never below
    1.0: every layer kept dense is the original), and ``target_met`` says whether the kept plan measured
    at the target. Raises :class:`UserError` only when no layer is faster expanded than dense.

    Where ``timing`` has a ``watch()`` (a :class:`lrx.measure.machine.MachineWatch`, as :class:`DeviceTiming`
    has), the plan also holds ``"machine"``, its readings of the machine's load over the whole planning, and
    a busy machine is warned of: the times it measures, and so the choice, are not a quiet machine's.
    """
    args = (model, layers, target, timing, proxy, align, cache, write_cache, rounds, tolerance, log, scheme, tucker_proxy)
    watch = timing.watch() if callable(getattr(timing, "watch", None)) else None
    if watch is None:
        return _plan_latency(*args)
    with watch:
        plan = _plan_latency(*args)
    plan["machine"] = watch.record
    if watch.record["busy"]:
        cached = f" (and delete the layer times cached in {cache})" if cache is not None and write_cache else ""
        log(f"warning: the plan was timed on a busy machine ({'; '.join(watch.record['reasons'])}): its layer times, "
            f"and so its choice, may be far from a quiet machine's; plan again on a quiet machine{cached}")
    return plan


def _plan_latency(model: nn.Module, layers, target: dict, timing: Timing,
                  proxy: Mapping[str, Sequence[float]] | None = None, align: int = 1, cache: Path | None = None,
                  write_cache: bool = True, rounds: int = ADJUST_ROUNDS, tolerance: float = TOLERANCE,
                  log: Callable[[str], None] = lambda m: None, scheme: str = "v2",
                  tucker_proxy: Mapping[str, Callable[[Sequence[int]], Sequence[float]]] | None = None) -> dict:
    """:func:`plan_latency`'s steps, without the watch on the machine."""
    kind, value = check_target(target)
    if kind != "latency":
        raise UserError(f"plan_latency plans a latency target, got {kind} (use lrx.plan.macs.plan_ranks)",
                        key="decompose.target")
    chosen = candidate_layers(model, layers, scheme)
    input_size = tuple(timing.input_size)
    sizes = conv_sizes(model, [name for _, name, _ in chosen], input_size)
    given = proxy
    if proxy is None:
        proxy = {name: filter_energy(conv, scheme) for _, name, conv in chosen}
    inputs = _input_shapes(model, [name for _, name, conv in chosen if isinstance(conv, nn.Linear)], input_size)
    table = layer_table(timing, chosen, sizes, align, cache, write_cache, log, scheme=scheme, inputs=inputs,
                        tucker_proxy=tucker_proxy)

    remembered = _Remembered(cache, write_cache, timing, model, log)
    base = _place_in_model(table, model, timing, remembered)
    base_ms, cl_ms = base["original_ms"], base["layouts"]["channels_last"]
    rest_ms = max(cl_ms - _dense_ms(table, 0.0), 0.0)
    # Aim a margin above the target; where only the target itself is reachable, aim at it; where not even
    # that is, plan the fastest the table allows and say so (the original, every layer dense, is 1.0x).
    budgets = (base_ms / (value * (1 + MARGIN)), base_ms / value)
    scale, history, best_reachable = 1.0, [], None
    while len(history) <= rounds:
        try:
            choice = _choose_within(table, proxy, rest_ms, budgets, scale)
        except ValueError as err:
            if history:  # the adjusted table says the target is out of reach: keep the best plan measured
                log(f"adjusted for what was measured, target {value:g}x is out of reach; keeping the best plan measured")
                break
            fastest = float(err.args[0])
            best_reachable = max(1.0, base_ms / fastest)
            log(f"target latency {value:g}x cannot be met on {timing.key()['device']} by layers "
                f"{', '.join(r['name'] for r in table)}: the best reachable is {best_reachable:.2f}x by the measured "
                f"layer times; planning the least lossy expansion within {REACH_SLACK:.0%} of the fastest instead")
            choice = choose(table, proxy, rest_ms, fastest * (1 + REACH_SLACK), scale)
            if all(c == DENSE for c in choice) and fastest < _dense_ms(table, rest_ms):
                # every layer gains less than the slack (a busy machine, a model too small to gain): the
                # fastest plan, not a refusal, so that a demo on a slower machine still finishes its table
                log(f"no expansion gains {REACH_SLACK:.0%} by the measured layer times; planning the fastest one")
                choice = choose(table, proxy, rest_ms, fastest, scale)
        if all(c == DENSE for c in choice) or any(h["choice"] == choice for h in history):
            break  # nothing to expand, or the adjusted plan is one already measured
        dense_ms = rest_ms + sum(row["model_ms"][c] for row, c in zip(table, choice) if c == DENSE)
        factored_ms = sum(row["model_ms"][c] for row, c in zip(table, choice) if c != DENSE)
        predicted_ms = dense_ms + scale * factored_ms
        spec = _spec(table, choice, scheme)
        measured = remembered(f"expansion: {json.dumps(_built(model, spec), sort_keys=True)}",
                              lambda: timing.whole(model, build_expanded(model, spec)))
        # the median of the rounds' own speedups where the timing gives it (a profile's figure), else the ratio
        measured_speedup = measured.get("speedup") or measured["original_ms"] / measured["expanded_ms"]
        predicted_speedup = base_ms / predicted_ms
        history.append({"choice": choice, "ranks": spec["ranks"], "names": spec["layers"], "schemes": spec.get("schemes"),
                        "scale": scale,
                         "predicted_speedup": predicted_speedup, "measured_speedup": measured_speedup,
                         "original_ms": measured["original_ms"], "original_layout": measured["layout"],
                         "expanded_ms": measured["expanded_ms"]})
        log(f"plan {dict(zip(spec['layers'], spec['ranks']))}: predicted {predicted_speedup:.2f}x, "
            f"measured {measured_speedup:.2f}x")
        if abs(predicted_speedup / measured_speedup - 1) <= tolerance and measured_speedup >= value:
            break
        # The rest and the dense layers come from the whole original's time; what the table cannot know is
        # how the expansion's layers run in the model (layouts between them, caches, fusion). Put the
        # difference on them and choose again.
        needed = (base_ms / measured_speedup - dense_ms) / factored_ms
        stale = [row["name"] for row, c in zip(table, choice) if c != DENSE and row["cached"]]
        if stale and len(history) == 1 and not 1 / SCALE_LIMIT <= needed <= SCALE_LIMIT:
            # Far more than a layer's time inside a model differs from its time alone: the cached times are
            # not this machine's (another load, a changed machine, or a file edited by hand). Measure
            # those layers again and plan from the start, as without the cache (each layer is measured
            # again at most once: then it is no longer cached).
            log(f"warning: latency cache {cache}: the cached times of layers {', '.join(stale)} predicted "
                f"{predicted_speedup:.2f}x, the model measured {measured_speedup:.2f}x; measuring those layers again")
            table = layer_table(timing, chosen, sizes, align, cache, write_cache, log, remeasure=stale, scheme=scheme,
                                inputs=inputs, tucker_proxy=tucker_proxy)
            remembered.fresh = True  # and the whole-model times: they were taken on the same machine
            base = _place_in_model(table, model, timing, remembered)
            base_ms, cl_ms = base["original_ms"], base["layouts"]["channels_last"]
            rest_ms = max(cl_ms - _dense_ms(table, 0.0), 0.0)
            budgets = (base_ms / (value * (1 + MARGIN)), base_ms / value)
            scale, history = 1.0, []
            continue
        scale = min(max(needed, 1 / SCALE_LIMIT), SCALE_LIMIT)
    if not history:
        raise UserError(f"target latency {value:g}: no layer of {', '.join(r['name'] for r in table)} is faster "
                        f"expanded than dense on {timing.key()['device']}", key="decompose.target.latency")
    final = _final(history, value)
    for row, c in zip(table, final["choice"]):
        row["choice"] = c
    indices = {row["name"]: row["index"] for row in table}
    met = final["measured_speedup"] >= value
    if not met:
        log(f"target latency {value:g}x missed: the plan kept measured {final['measured_speedup']:.2f}x")
    return {"rule": RULE, "proxy": "filter energy" if given is None else "given", "target": {kind: value},
            "target_met": met, "best_reachable": best_reachable,
            "align": align, "device": timing.key()["device"],
            "batch": timing.batch, "input_size": list(input_size), "table": table,
            "baseline": {"layout": base["layout"], "layouts_ms": base["layouts"]},
            "rounds": history, "layers": [indices[n] for n in final["names"]], "names": final["names"],
            "schemes": final["schemes"],
            "ranks": final["ranks"], "predicted_speedup": final["predicted_speedup"],
            "measured_speedup": final["measured_speedup"],
            "cache": {"file": None if cache is None else str(cache), "reused": remembered.reused}}


def _choose_within(table: list[dict], proxy, rest_ms: float, budgets: Sequence[float], scale: float) -> list[str]:
    """:func:`choose` for the first of ``budgets`` (ms, tightest first) the table can meet; ``ValueError``
    with the fastest reachable time when it meets none."""
    for budget in budgets[:-1]:
        try:
            return choose(table, proxy, rest_ms, budget, scale)
        except ValueError:
            continue
    return choose(table, proxy, rest_ms, budgets[-1], scale)


def _dense_ms(table: list[dict], rest_ms: float) -> float:
    """The predicted time of the original: every candidate layer dense."""
    return rest_ms + sum(row["model_ms"][DENSE] for row in table)


def _place_in_model(table: list[dict], model: nn.Module, timing: Timing, remembered: _Remembered) -> dict:
    """Time the original whole (its plain layouts) and per module, each through ``remembered``, and place the
    table's options in it (:func:`_place`); returns the whole-model times (:meth:`Timing.whole`)."""
    base = remembered("original", lambda: timing.whole(model, None))
    # A layer alone runs slower or faster than inside the model (caches, a shared machine's drift between
    # measurements): take from the table only each option's time relative to the dense conv, and the
    # dense conv's time from the whole original, timed per module.
    # every conv and linear layer, whichever the plan may replace: plans of one model with other candidates (scheme
    # 2's and scheme auto's) place their common layers by one measurement, and so choose alike where they can
    every = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    inside = remembered("in model: every conv and linear layer", lambda: timing.in_model(model, every))
    unit = base["layouts"]["channels_last"] / inside["total_ms"]  # per-module times (with hooks) to the whole-model clock
    _place(table, inside, unit)
    return base


def _place(table: list[dict], inside: dict, unit: float) -> None:
    """Each row's ``model_ms``: its options' times inside the model, the dense conv's from ``inside``
    (:meth:`Timing.in_model`, times ``unit`` to the whole-model clock), the others by their ratio to it."""
    for row in table:
        dense_in_model = unit * inside["ms"][row["name"]]
        row["model_ms"] = {k: dense_in_model * t / row["ms"][DENSE] for k, t in row["ms"].items()}


def _input_shapes(model: nn.Module, names: Sequence[str], input_size) -> dict[str, tuple]:
    """Each named layer's input shape without the batch, for one input of ``input_size`` (one forward in eval
    mode on a copy)."""
    if not names:
        return {}
    probe = copy.deepcopy(model).eval()
    shapes: dict[str, tuple] = {}

    def keep(name, inputs) -> None:  # a pre-hook's return value would replace the input
        shapes.setdefault(name, tuple(inputs[0].shape[1:]))

    hooks = [probe.get_submodule(name).register_forward_pre_hook(lambda m, inputs, name=name: keep(name, inputs))
             for name in names]
    first = next(probe.parameters(), None)
    try:
        with torch.no_grad():
            probe(torch.zeros(1, *input_size, device=first.device if first is not None else None))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _spec(table: list[dict], choice: list[str], scheme: str = "v2") -> dict:
    """The expansion a choice stands for; ``schemes`` (per layer) where it holds a Tucker-2 option."""
    picked = [(row["name"], c) for row, c in zip(table, choice) if c != DENSE]
    spec = {"layers": [n for n, _ in picked], "scheme": scheme,
            "ranks": [int(c.removeprefix(TUCKER_MARK)) for _, c in picked], "basis": "shared", "decomposed": False}
    if any(c.startswith(TUCKER_MARK) for _, c in picked):
        spec["schemes"] = [TUCKER if c.startswith(TUCKER_MARK) else scheme for _, c in picked]
    return spec


def _built(model: nn.Module, spec: dict) -> dict:
    """What ``spec`` builds, as the cache keys a whole-model check: each layer with the scheme that replaces it
    (scheme auto's resolved per layer), so that scheme 2's plan and the same plan of scheme auto share one check."""
    schemes = spec.get("schemes") or [spec["scheme"]] * len(spec["layers"])
    layers = [[name, layer_scheme(model.get_submodule(name), scheme), rank]
              for name, scheme, rank in zip(spec["layers"], schemes, spec["ranks"])]
    return {"layers": layers, "basis": spec["basis"], "decomposed": spec["decomposed"]}


def _final(history: list[dict], target: float) -> dict:
    """The round to keep: the last one that measured at the target or above, else the fastest measured."""
    met = [h for h in history if h["measured_speedup"] >= target]
    if met:
        return met[-1]
    return max(history, key=lambda h: h["measured_speedup"])
