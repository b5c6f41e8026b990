"""Per-layer ranks from a speed or MACs target (``bases: auto``), chosen from the singular-value spectra.

The rule, greedy on reconstruction energy per MAC: start every layer at the top of its ladder of ranks
(:func:`cheaper_ladder`: the largest rank whose expansion costs fewer MACs than the dense conv; a thin
first conv such as 3 -> 32 channels costs more than itself at its maximum rank, and a planner never
chooses that); then, until the target is met, lower by one the rank of the layer whose next dropped
singular value removes the least share of that layer's filter energy (sigma_r^2 / ||W||_F^2) per MAC saved.
With ``align`` > 1 a layer's ranks are the multiples of ``align`` below its maximum rank and the maximum
itself (:func:`rank_ladder`), those cheaper than the dense conv, and each step lowers a rank by one rung.
Dropping singular values in this order is what the truncated SVD would lose, so a layer whose
spectrum decays fast gives up rank before one whose spectrum is flat, and a layer where a rank
step saves many MACs gives it up before one where it saves few.

With scheme auto a conv with a larger kernel may also become Tucker-2 (:data:`RULE_AUTO`): its Tucker-2 options
are the ranks of :func:`fraction_ladder`, and a move goes down the structure a layer is in, or to the most
expensive option of the other structure that costs fewer MACs, by the same rule. The greedy choice is made
with and without Tucker-2, and the one losing less proxy is kept: scheme auto never plans worse, by its
proxy, than scheme 2 and the channel scheme alone.
"""
from __future__ import annotations

import heapq
from typing import Callable, Collection, Mapping, Sequence

from torch import nn

from lrx.factor.channel import channel_energy, channel_macs
from lrx.factor.choices import AUTO, CHANNEL, EXPANSIONS, TUCKER
from lrx.factor.decomposition import BASES, check_choice, expanded_macs, max_rank, original_macs, retained_energy
from lrx.factor.tucker import tucker2_energy, tucker2_macs, tucker2_max_rank
from lrx.config.settings import check_target
from lrx.base.distributed import resolve_device
from lrx.base.errors import UserError
from lrx.nn.channel import channel_positions, channel_shape
from lrx.nn.surgery import check_layer, conv_sizes, layer_label, layer_scheme, select_layers
from lrx.measure.profiling import count

__all__ = ["RULE", "RULE_AUTO", "LADDER", "ALIGNS", "DEVICE_ALIGN", "device_align", "rank_ladder", "layer_costs", "affordable_ladder",
           "cheaper_ladder", "fraction_ladder", "filter_energy", "tucker_shares", "plan_ranks", "check_reachable"]

RULE = ("greedy: from each layer's largest rank cheaper than its dense conv, repeatedly lower by one the rank of "
        "the layer whose next dropped singular value removes the least share of that layer's filter energy "
        "(sigma_r^2 / ||W||_F^2) per MAC saved, until the target is met")
# Scheme auto with a MACs or speedup target: a conv with a larger kernel also has Tucker-2's options.
RULE_AUTO = (RULE + "; with scheme auto a conv with a larger kernel may also move to Tucker-2 at the ranks of the "
             "ladder of fractions of its MACs (fraction_ladder), and from there down that ladder or back to its "
             "scheme, by the same rule (proxy lost per MAC saved); the choice made without Tucker-2 is kept where it "
             "loses less proxy")
# The rungs of a ladder of ranks as fractions of the dense layer's MACs: the ranks a latency plan times
# (lrx.plan.latency.candidate_ranks), and Tucker-2's ranks in a MACs plan of scheme auto.
LADDER = (0.7, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05)
ALIGNS = (1, 8, 16, 32)
# decompose.align: auto. On CUDA, ranks off the tensor-core tiles cost time: on an H200 (bf16, batch 64)
# lrx's 3x plan for AlexNet conv2-5 ran at 0.88x the original, 1.01x with its ranks rounded up to
# multiples of 32. On CPU padding a rank to a multiple of 8 gained nothing beyond noise (lrx.nn.inference's notes).
DEVICE_ALIGN = {"cuda": 32, "cpu": 1}


def device_align(align, device=None) -> int:
    """``decompose.align`` as a number: ``"auto"`` becomes the device's rule (:data:`DEVICE_ALIGN`: 32 on
    CUDA, 1 elsewhere), a number in :data:`ALIGNS` is kept; anything else is refused naming the key."""
    if align == "auto":
        return DEVICE_ALIGN.get(resolve_device(device if device is not None else "auto").type, 1)
    if isinstance(align, bool) or align not in ALIGNS:
        raise UserError(f"must be auto or one of {', '.join(map(str, ALIGNS))}, got {align!r}", key="decompose.align")
    return int(align)


def rank_ladder(top: int, align: int = 1) -> list[int]:
    """The ranks a layer of maximum rank ``top`` may take with alignment ``align``, ascending: the
    multiples of ``align`` below ``top``, and ``top`` itself (a rank rounded up to a multiple is capped there)."""
    return [r for r in range(align, top, align)] + [top]


def cheaper_ladder(conv: nn.Conv2d, scheme: str, in_hw, out_hw, align: int = 1, basis: str = "shared",
                   decomposed: bool = False) -> list[int]:
    """The ranks a planner may give ``conv``, ascending: the ranks of :func:`rank_ladder` whose expansion
    costs fewer MACs than the dense conv itself (an expansion that costs more is never chosen: keeping the
    conv is cheaper and exact). With ``align`` 1 the ladder tops out at the largest rank cheaper than the
    dense conv; with ``align`` > 1 at the largest such multiple of ``align`` (or at the largest cheaper rank
    when it is below ``align``). When no rank is cheaper (a conv with very few channels), the ladder is its
    lowest rung alone, the least costly expansion there is.

    ``in_hw``, ``out_hw``: the conv's input and output (H, W), as for
    :func:`lrx.factor.decomposition.expanded_macs`.
    """
    dense, cost = layer_costs(conv, scheme, in_hw, out_hw, basis=basis, decomposed=decomposed)
    return affordable_ladder(dense, cost, align)


def affordable_ladder(dense: int, cost: list[int], align: int = 1) -> list[int]:
    """:func:`cheaper_ladder`'s rule on a layer's MACs: ``dense`` those of the layer itself, ``cost[r - 1]``
    those of its expansion at rank r, r = 1..max rank."""
    top = len(cost)
    ladder = rank_ladder(top, align)
    kept = [r for r in ladder if cost[r - 1] < dense]
    if kept:
        return kept
    cheaper = [r for r in range(1, min(top, align) + 1) if cost[r - 1] < dense]
    return cheaper[-1:] or ladder[:1]


def layer_costs(module: nn.Module, scheme: str, in_hw, out_hw, positions: int = 1, basis: str = "shared",
                decomposed: bool = False) -> tuple[int, list[int]]:
    """(MACs of ``module`` itself on one image, [MACs of its expansion at rank r for r = 1..max rank]): the one
    cost rule of the planners, for the scheme that replaces the layer (:func:`lrx.nn.surgery.layer_scheme`).
    A conv: :func:`lrx.factor.decomposition.original_macs` and ``expanded_macs`` at its input and output sizes;
    the channel scheme: :func:`lrx.factor.channel.channel_macs` at ``positions`` output positions."""
    own = layer_scheme(module, scheme)
    if own == CHANNEL:
        n, c = channel_shape(module)
        return (channel_macs(c, n, None, positions),
                [channel_macs(c, n, r, positions) for r in range(1, min(n, c) + 1)])
    if own == TUCKER:
        shape, bias = module.weight.shape, module.bias is not None
        return (original_macs(module, out_hw),
                [tucker2_macs(shape, r, in_hw, out_hw, bias) for r in range(1, tucker2_max_rank(shape) + 1)])
    top = max_rank(module, own, basis)
    return (original_macs(module, out_hw),
            [expanded_macs(module, own, r, in_hw, out_hw, decomposed) for r in range(1, top + 1)])


def filter_energy(module: nn.Module, scheme: str, basis: str = "shared") -> list[float]:
    """The share of the filter energy the best expansion of each rank keeps, r = 1..max rank, for the scheme
    that replaces the layer: :func:`lrx.factor.decomposition.retained_energy` or
    :func:`lrx.factor.channel.channel_energy`. The proxy planners rank layers by without data."""
    own = layer_scheme(module, scheme)
    if own == CHANNEL:
        return channel_energy(module.weight).tolist()
    if own == TUCKER:
        return tucker2_energy(module.weight).tolist()
    return retained_energy(module.weight, own, basis).tolist()


def _given_shares(retained: dict, name: str, top: int) -> list[float]:
    """Layer ``name``'s entry of plan_ranks' ``retained``: one share per rank 1..``top``, refused otherwise."""
    shares = retained.get(name)
    if shares is None or len(shares) != top:
        raise UserError(f"retained energies for layer {name} must list {top} shares (ranks 1..{top}), got "
                        f"{'none' if shares is None else len(shares)}")
    return [float(v) for v in shares]


def plan_ranks(model: nn.Module, layers: Sequence[int | str], scheme: str, target: dict,
               input_size=(3, 224, 224), basis: str = "shared", decomposed: bool = False, align: int = 1,
               retained: dict[str, Sequence[float]] | None = None,
               tucker_retained: Mapping[str, Callable[[Sequence[int]], Sequence[float]]] | None = None) -> dict:
    """Choose a rank per layer so that the expanded model meets ``target`` (see the module doc for the rule).

    Parameters
    ----------
    model : the model to expand (not modified).
    layers : 1-based conv indices or module names, as for :func:`lrx.expansion.model.expand`.
    scheme : "v1", "v2", "channel", "tucker2" or "auto" (each layer by the scheme that replaces it,
        :func:`lrx.nn.surgery.layer_scheme`; the same greedy rule across schemes; a conv with a larger kernel
        may also take Tucker-2 at the ranks of :func:`fraction_ladder`, see :data:`RULE_AUTO`).
    target : ``{"speedup": X}``: the replaced layers' MACs fall X-fold (theoretical, before/after);
        or ``{"macs": F}``: the whole model keeps at most the fraction F of its MACs.
    input_size : (C, H, W) of one image, for the MAC counts.
    basis, decomposed : scheme 1's options, as for ``expand`` (they change spectra and MACs).
    align : every rank a multiple of this or the layer's maximum rank (:func:`rank_ladder`).
    retained : ``{layer name: [share kept at rank 1, ..., max rank]}`` to rank layers by instead of the
        filter energy, e.g. the output energy on calibration data (:func:`lrx.expansion.model.output_energy`).
    tucker_retained : with scheme auto, ``{layer name: f}``, ``f(ranks)`` the share Tucker-2 keeps at each of
        ``ranks`` (e.g. :func:`lrx.factor.datafit.tucker2_output_energy`); default its filter energy.

    Returns
    -------
    ``{"rule", "proxy" ("filter energy", or "given" with ``retained``), "target", "scheme", "basis",
    "decomposed", "ranks": [...], "layers": [{"index",
    "name", "rank", "max_rank", "macs_before", "macs_after", "retained_energy"}],
    "model_macs_before", "predicted_macs" (whole model after), "predicted_speedup" (replaced
    layers, before/after)}``; with scheme auto each layer also has its ``"scheme"``, and where a layer takes
    Tucker-2, ``"schemes"`` lists per layer ``"auto"`` or ``"tucker2"`` (as an expansion spec takes it). MACs are
    per image and match ptflops (lrx.measure.profiling.count). The target is met, and lowering stopped at the
    first step that met it; no rank costs more MACs than its layer's dense conv (:func:`cheaper_ladder`) unless
    even the layer's lowest rank does.
    """
    scheme, basis, decomposed, kind, value, align = _settings(scheme, target, basis, decomposed, align)
    plans, total = _costs(model, layers, scheme, input_size, basis, decomposed, align)
    before, budget = _budget(kind, value, plans, total, scheme, align)
    for p in plans:
        shares = (filter_energy(p["conv"], scheme, basis) if retained is None
                  else _given_shares(retained, p["name"], p["max_rank"]))
        p["families"][p["own"]]["retained"] = dict(enumerate(shares, 1))
        if p["own"] != TUCKER and TUCKER in p["families"]:
            ladder = p["families"][TUCKER]["ladder"]
            p["families"][TUCKER]["retained"] = dict(zip(ladder, tucker_shares(p["conv"], ladder,
                                                                             (tucker_retained or {}).get(p["name"]))))

    passes = [_lower_to_budget(plans, budget, {p["own"] for p in plans})]
    if any(TUCKER in p["families"] for p in plans):
        passes.append(_lower_to_budget(plans, budget, {TUCKER, *(p["own"] for p in plans)}))
    reached = [states for states in passes if states is not None]
    # the least proxy lost; on a tie, the choice with Tucker-2 among the structures
    states = min(reached[::-1], key=lambda st: sum(1.0 - _share(p, f, r) for p, (f, r) in zip(plans, st)))
    after = sum(_cost(p, f, r) for p, (f, r) in zip(plans, states))

    rows = [{"index": p["index"], "name": p["name"], "rank": r, "max_rank": len(p["families"][f]["cost"]),
             "macs_before": p["macs_before"], "macs_after": _cost(p, f, r), "retained_energy": _share(p, f, r)}
            for p, (f, r) in zip(plans, states)]
    plan = {"rule": RULE if scheme != AUTO else RULE_AUTO, "proxy": "filter energy" if retained is None else "given",
            "target": {kind: value}, "align": align, "scheme": scheme, "basis": basis, "decomposed": decomposed,
            "ranks": [r for _, r in states], "layers": rows, "model_macs_before": total,
            "predicted_macs": total - before + after, "predicted_speedup": before / after}
    if scheme == AUTO:
        for row, (family, _) in zip(rows, states):
            row["scheme"] = family
        if any(f == TUCKER for f, _ in states):
            plan["schemes"] = [TUCKER if f == TUCKER else AUTO for f, _ in states]
    return plan


def fraction_ladder(dense: int, cost: list[int], align: int = 1, fractions: Sequence[float] = LADDER) -> list[int]:
    """The ranks of a layer worth weighing, ascending: per fraction f of ``fractions``, the smallest rank of its
    ladder (:func:`affordable_ladder`) whose MACs reach f times ``dense`` (the layer's own), only ranks cheaper
    than ``dense``. ``cost[r - 1]``: the expansion's MACs at rank r."""
    ladder = affordable_ladder(dense, cost, align)
    out = set()
    for fraction in fractions:
        reach = [r for r in ladder if cost[r - 1] >= fraction * dense]
        rank = reach[0] if reach else ladder[-1]
        if cost[rank - 1] < dense:
            out.add(rank)
    return sorted(out)


def tucker_shares(conv: nn.Module, ranks: Sequence[int],
                  share_of: Callable[[Sequence[int]], Sequence[float]] | None = None) -> list[float]:
    """The share Tucker-2 keeps of ``conv`` at each of ``ranks``: ``share_of(ranks)`` where a planner was given one
    (e.g. :func:`lrx.factor.datafit.tucker2_output_energy` on calibration data), else the HOSVD's retained filter
    energy (:func:`lrx.factor.tucker.tucker2_energy`)."""
    if share_of is not None:
        return [float(v) for v in share_of(ranks)]
    energy = tucker2_energy(conv.weight)
    return [float(energy[r - 1]) for r in ranks]


def _cheapest(p: dict, allowed: Collection[str] | None = None) -> int:
    """The MACs of a plan's layer at its cheapest option among the structures ``allowed`` (default all of its)."""
    return min(o["cost"][o["ladder"][0] - 1] for f, o in p["families"].items() if allowed is None or f in allowed)


def _cost(p: dict, family: str, rank: int) -> int:
    return p["families"][family]["cost"][rank - 1]


def _share(p: dict, family: str, rank: int) -> float:
    return p["families"][family]["retained"][rank]


def _lower_to_budget(plans: list[dict], budget: float, allowed: Collection[str]) -> list[tuple[str, int]] | None:
    """:func:`plan_ranks`' greedy pass over the structures ``allowed``: each layer's (structure, rank), from the top of
    its own scheme's ladder; None where their lowest ranks miss ``budget``.

    A layer's moves: to the next rung of its structure's ladder, and to the most expensive option of each other
    structure that costs fewer MACs than where it is; the move taken is the one that loses the least proxy per
    MAC saved, over all layers (a move to a structure that keeps more proxy for fewer MACs goes first)."""
    states = [(p["own"], p["families"][p["own"]]["ladder"][-1]) for p in plans]
    if sum(_cheapest(p, allowed) for p in plans) > budget:
        return None

    def best_move(i):
        p, (family, rank) = plans[i], states[i]
        now, kept = _cost(p, family, rank), _share(p, family, rank)
        moves = []
        for other, options in p["families"].items():
            if other not in allowed:
                continue
            ladder = options["ladder"]
            if other == family:
                lower = ladder[:ladder.index(rank)]
            else:
                lower = [r for r in ladder if options["cost"][r - 1] < now]
            if lower:
                q = lower[-1]
                moves.append(((kept - _share(p, other, q)) / (now - _cost(p, other, q)), other, q))
        return min(moves, default=None)

    heap = []

    def push(i):
        move = best_move(i)
        if move is not None:
            heapq.heappush(heap, (move[0], i, move[1], move[2]))

    for i in range(len(plans)):
        push(i)
    after = sum(_cost(p, *st) for p, st in zip(plans, states))
    while after > budget:
        _, i, family, rank = heapq.heappop(heap)  # never empty here: at the lowest rungs, after <= budget
        after += _cost(plans[i], family, rank) - _cost(plans[i], *states[i])
        states[i] = (family, rank)
        push(i)
    return states


def check_reachable(model: nn.Module, layers: Sequence[int | str], scheme: str, target: dict,
                    input_size=(3, 224, 224), basis: str = "shared", decomposed: bool = False, align: int = 1) -> None:
    """Refuse a MACs or speedup ``target`` that no ranks of ``layers`` can meet (a :class:`UserError` naming the
    best reachable), without planning: what a config check needs before anything runs (MACs depend on the
    shapes alone, so fresh weights tell it). :func:`plan_ranks` applies the same rule."""
    scheme, basis, decomposed, kind, value, align = _settings(scheme, target, basis, decomposed, align)
    plans, total = _costs(model, layers, scheme, input_size, basis, decomposed, align)
    _budget(kind, value, plans, total, scheme, align)


def _settings(scheme: str, target: dict, basis: str, decomposed: bool, align) -> tuple:
    check_choice(scheme, EXPANSIONS, "scheme")
    check_choice(basis, BASES, "basis")
    if scheme != "v1":
        basis, decomposed = "shared", False
    kind, value = check_target(target)
    if kind == "latency":
        raise UserError("a latency target is measured on the device: plan it with lrx.plan.latency.plan_latency "
                        "(lrx decompose does)", key="decompose.target")
    return scheme, basis, decomposed, kind, value, device_align(align)


def _costs(model: nn.Module, layers, scheme: str, input_size, basis: str, decomposed: bool, align: int) -> tuple[list, int]:
    """Per chosen layer its MACs before, and per structure it may take (``families``: its own scheme's, and with
    scheme auto Tucker-2's for a conv with a larger kernel) its MACs at every rank and its ladder of ranks; and
    the model's MACs."""
    chosen = select_layers(model, layers, scheme, decomposed)
    for index, name, conv in chosen:
        check_layer(conv, scheme, decomposed, layer_label(index, name))
    sizes = conv_sizes(model, [name for _, name, _ in chosen], input_size)
    channels = [name for _, name, conv in chosen if layer_scheme(conv, scheme) == CHANNEL]
    positions = channel_positions(model, channels, input_size) if channels else {}
    total = count(model, input_size)[0]
    plans = []
    for index, name, conv in chosen:
        dense, cost = layer_costs(conv, scheme, *sizes[name], positions.get(name, 1), basis, decomposed)
        own = layer_scheme(conv, scheme)
        families = {own: {"cost": cost, "ladder": affordable_ladder(dense, cost, align)}}
        if scheme == AUTO and own not in (CHANNEL, TUCKER):  # a conv with a larger kernel: Tucker-2 too
            tucker = layer_costs(conv, TUCKER, *sizes[name])[1]
            ladder = fraction_ladder(dense, tucker, align)
            if ladder:
                families[TUCKER] = {"cost": tucker, "ladder": ladder}
        plans.append({"index": index, "name": name, "conv": conv, "max_rank": len(cost), "macs_before": dense,
                      "own": own, "families": families})
    return plans, total


def _budget(kind: str, value: float, plans: list, total: int, scheme: str, align: int) -> tuple[int, float]:
    """(the replaced layers' MACs, the MACs they may keep); a :class:`UserError` when the lowest ranks exceed it."""
    before = sum(p["macs_before"] for p in plans)
    budget = before / value if kind == "speedup" else value * total - (total - before)
    floor = sum(_cheapest(p) for p in plans)
    if floor > budget:
        lowest = ("every layer at its cheapest option" if any(len(p["families"]) > 1 for p in plans)
                  else f"rank {align} in every layer")
        if kind == "speedup":
            best = f"the best reachable is {before / floor:.3g}x ({lowest})"
        else:
            best = f"the best reachable is {(total - before + floor) / total:.4g} of the model's MACs ({lowest})"
        raise UserError(f"target {kind} {value:g} cannot be met by layers {', '.join(p['name'] for p in plans)} "
                        f"with scheme {scheme}: {best}", key=f"decompose.target.{kind}")
    return before, budget
