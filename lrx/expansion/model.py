"""Model in, expanded model out: the one call from a model to its expansion (``lrx.expand``).

It plans the ranks (given, or from a MACs, speedup or latency target), builds the expansion layers fitted to
the filters (the seed's filter reconstruction), and with ``fit="data"`` refits each replaced layer to its
outputs on calibration images. ``lrx decompose`` calls it with a config's ``decompose:`` settings
(:func:`lrx.pipeline.stages.expand_model`); from Python::

    import lrx
    fast, report = lrx.expand(model, layers="auto", scheme="v2", ranks="auto", target={"latency": 2.0},
                              fit="data", calibration=loader)   # loader: any re-iterable (images, labels) batches
    torch.save({"model": fast.state_dict(), "spec": report.spec}, "expanded.pt")
    again = lrx.build_expanded(build_model("alexnet_cifar10"), saved["spec"])  # no decomposition rerun
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from lrx.base.errors import UserError
from lrx.config.settings import check_target
from lrx.expansion.channels import channel_layer, channel_proxy, channel_refit
from lrx.factor.channel import channel_stats_error, collect_channel_stats
from lrx.factor.choices import AUTO, CHANNEL, EXPANSIONS, TUCKER
from lrx.factor.datafit import (TOL, collect_stats, fit_scheme1, fit_scheme2, fit_tucker2, output_error,
                                refit_coefficients, retained_output_energy, tucker2_output_energy)
from lrx.factor.decomposition import (BASES, METHODS, ORDERS, Scheme1Factors, check_choice, check_method_options,
                                      energy_first_sv, expanded_macs, max_rank, original_macs, scheme1)
from lrx.factor.tucker import tucker2_macs, tucker2_max_rank, tucker2_ranks
from lrx.nn.channel import channel_positions
from lrx.nn.tucker import LowRankTucker2
from lrx.nn.layers import LowRankExpConvV1, LowRankExpConvV2
from lrx.nn.surgery import (check_layer, check_layer_rank, conv_sizes, layer_label, layer_scheme, per_layer_ranks,
                            select_layers, summarise_notes)
from lrx.plan.latency import DeviceTiming, Timing, plan_latency
from lrx.plan.macs import device_align, plan_ranks

__all__ = ["expand", "ExpansionReport", "ExpansionNote", "FITS", "DATA_PROXY"]

FITS = ("weights", "data")  # to the filters (the seed's), or to the layers' outputs (lrx.factor.datafit)
DATA_PROXY = "output energy on the calibration images"


class ExpansionNote(UserWarning):
    """What :func:`expand` tells about its choice (``report.notes`` holds the same lines): a conv a pattern or
    ``auto`` skipped, a layer whose rank costs more MACs than the conv."""


@dataclass
class ExpansionReport:
    """What :func:`expand` did. Its fields are the keys metrics.json keeps (:meth:`to_dict`).

    spec : what :func:`lrx.nn.surgery.build_expanded` needs to rebuild the structure: layers (names), scheme,
        ranks, basis, decomposed, method, method_options, and orders (scheme 2).
    layers : one dict per replaced layer: index (1-based among the convs), name, shape [N, C, dh, dw], rank,
        max_rank, rel_error ||W - W_hat||_F / ||W||_F as built, macs_before, macs_after (one image, as ptflops
        counts the convs), mac_ratio, energy_first_sv (scheme 1: per basis filter the share of its energy in
        its first singular value; None for scheme 2) and order ("vh"/"hv" for scheme 2, None for scheme 1).
        With ``fit="data"`` also fit ("data"), output_error_weights and output_error (relative output error of
        the filter fit and of the data fit on the calibration statistics), sweeps, and with held-out batches
        held_out_error_weights and held_out_error.
    notes : one line per conv a pattern skipped and per layer whose rank adds MACs.
    ranks : the ranks used, one per layer.
    plan : an auto plan (:func:`lrx.plan.macs.plan_ranks` or :func:`lrx.plan.latency.plan_latency`), its
        ``proxy`` among it when ranked by output energy; None for given ranks.
    chosen_layers : the layers a latency plan chose (a subset of those asked for); None otherwise.
    fit_data : with ``fit="data"``: images, sequential, iterations, tol, seconds, seconds_stats, seconds_fit.
    """

    spec: dict
    layers: list[dict]
    notes: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    plan: dict | None = None
    chosen_layers: list[str] | None = None
    fit_data: dict | None = None

    @property
    def names(self) -> list[str]:
        """The replaced layers' module names, in the order of :attr:`layers`."""
        return [row["name"] for row in self.layers]

    def to_dict(self) -> dict:
        """The report as metrics.json keeps it (fields that are None left out)."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


def expand(model: nn.Module, layers: Sequence[int | str] | int | str = (2, 3, 4, 5), scheme: str = "v1",
           ranks: Sequence[int] | int | str = (8, 8, 6, 4), *, target: dict | None = None, fit: str = "weights",
           calibration: Iterable | None = None, images: int = 512, sequential: bool = True, iterations: int = 20,
           held_out: Iterable | None = None, basis: str = "shared", method: str = "svd", decomposed: bool = False,
           order: str = "vh", align: int | str = 1, input_size=(3, 224, 224), timing: Timing | None = None,
           cache: Path | None = None, write_cache: bool = True, plan_on_data: bool | None = None,
           log: Callable[[str], None] = lambda m: None, notes_in: str = "report.notes",
           **method_options) -> tuple[nn.Module, ExpansionReport]:
    """A copy of ``model`` with the chosen convs replaced by low-rank expansions, and a report.

    Parameters
    ----------
    model : any module; deep-copied, never modified.
    layers : 1-based conv indices (module order; the seed's "layers 2,3,4,5"), module names, glob patterns
        (``"layer3.*"``) or ``"auto"`` (every conv the scheme can replace), one or a list
        (:func:`lrx.nn.surgery.select_layers`; what a pattern skips is in ``report.notes`` and warned as
        :class:`ExpansionNote`).
    scheme : "v1" (:class:`lrx.nn.layers.LowRankExpConvV1`), "v2" (:class:`lrx.nn.layers.LowRankExpConvV2`),
        "channel" (1x1 convs and linear layers, :class:`lrx.nn.channel.LowRankChannel`; ``layers`` then match
        linear layers too, by name or pattern) or "auto" (per layer: v2 for a larger kernel, channel for a 1x1
        conv or a linear layer; with ``ranks="auto"`` a planner chooses among them and keeping a layer dense).
    ranks : one rank per layer (the seed's "#bases": M basis filters for v1, K channels for v2, R for the channel
        scheme), one int for all, or ``"auto"``: planned from ``target``.
    target : with ``ranks="auto"``: ``{"speedup": X}`` (the replaced layers' MACs fall X-fold), ``{"macs": F}``
        (the model keeps the fraction F of its MACs) (:func:`lrx.plan.macs.plan_ranks`), or ``{"latency": X}``
        (the whole model runs X times faster, measured with ``timing``; scheme 2; :func:`lrx.plan.latency.plan_latency`).
    fit : ``"weights"`` (filter reconstruction, the seed's) or ``"data"``: factors fitted to the layers' outputs
        on the first ``images`` images of ``calibration``. ``sequential=True``: a layer's inputs come from the
        model with the earlier layers already refitted, its targets from the original (Zhang et al.);
        ``iterations``: ALS sweeps per layer at most; ``held_out``: batches on which both fits are compared too.
        An auto plan then ranks layers by output energy on the calibration images.
    calibration : any re-iterable of ``(images, labels)`` batches (a DataLoader too), on the model's device.
    basis : v1 only: "shared" or "per-channel". ``decomposed``: v1 only: split every basis filter into
        dh x 1 and 1 x dw (the seed's "decomped").
    method : "svd", or "alternating" (v1 only) with ``method_options`` (lam, lam_start, lam_growth,
        iterations, tol; :func:`lrx.factor.decomposition.scheme1_alternating`).
    order : v2 only: "vh" (vertical 1-D conv first, Tai et al.), "hv" or "auto" (per layer, fewer MACs).
    align : ranks are multiples of this (1, 8, 16, 32) or ``"auto"`` (the device's rule, :func:`lrx.plan.macs.device_align`).
    input_size : (C, H, W) of one image, for the MAC counts.
    timing : how a latency target is measured; default :class:`lrx.plan.latency.DeviceTiming` on the CPU at batch
        16 and ``input_size``. ``cache``: a JSON file for its per-layer tables (kept unless ``write_cache`` is off).
    plan_on_data : an auto plan ranks layers by their output energy on the calibration images (default: with
        ``fit="data"``), else by filter energy. A dry run plans on data and fits to the weights.
    log : called with one line per planner step and note; the convs a pattern skipped are told one line per
        reason, with a count and the first names (``report.notes`` lists each; ``notes_in`` names where the
        caller keeps them, for the line's "each in ...").
    """
    check_choice(fit, FITS, "fit")
    if fit == "data" and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
        raise UserError(f"images {images!r} must be a positive integer", key="decompose.calibration.images")
    plan_on_data = fit == "data" if plan_on_data is None else plan_on_data
    if (fit == "data" or plan_on_data) and calibration is None:
        raise UserError("fit 'data' needs calibration batches: pass calibration=<your (images, labels) batches>",
                        key="decompose.calibration")
    if ranks == "auto":
        if target is None:
            raise UserError("ranks 'auto' plan from a target: pass target={'speedup': X}, {'macs': F} or "
                            "{'latency': X}", key="decompose.target")
        kind, _ = check_target(target)
    elif target is not None:
        raise UserError(f"a target ({target!r}) plans ranks only with ranks 'auto'; with explicit ranks drop it "
                        "(decompose.target: null)", key="decompose.target")
    _check_form(scheme, basis, method, decomposed, order)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    device = timing.device if timing is not None and hasattr(timing, "device") else torch.device("cpu")
    align = device_align(align, device)

    plan = stats = proxy = tucker_proxy = None
    if ranks == "auto":
        if plan_on_data:  # the statistics of the original model's layers, kept for a fit that needs them again
            stats, proxy = _output_energy(model, layers, scheme, calibration, basis, images)
            tucker_proxy = _tucker_proxy(model, layers, scheme, stats)
        if kind == "latency":
            timing = timing if timing is not None else DeviceTiming(torch.device("cpu"), input_size=tuple(input_size))
            plan = plan_latency(model, layers, target, timing, proxy=proxy, align=align, cache=cache,
                                write_cache=write_cache, log=log, scheme=scheme, tucker_proxy=tucker_proxy)
            # Convs by their index (the seed's numbering), linear layers (no index) by name.
            layers = [index if index is not None else name for index, name in zip(plan["layers"], plan["names"])]
        else:
            plan = plan_ranks(model, layers, scheme, target, input_size=input_size, basis=basis,
                              decomposed=decomposed, align=align, retained=proxy, tucker_retained=tucker_proxy)
        if proxy is not None:
            plan["proxy"] = DATA_PROXY
        ranks = plan["ranks"]

    expanded, report = _fit_weights(model, layers, scheme, ranks, basis, method, decomposed, input_size, order,
                                    method_options, plan.get("schemes") if plan is not None else None)
    if fit == "data":
        report.fit_data = _fit_data(model, expanded, report, calibration, images=images, sequential=sequential,
                                    basis=basis, decomposed=decomposed, iterations=iterations, held_out=held_out,
                                    stats=stats)
    for note in summarise_notes(report.notes, notes_in):  # skipped convs one line per reason; each in report.notes
        warnings.warn(note, ExpansionNote, stacklevel=2)
        log(f"note: {note}")
    if plan is not None:
        report.plan = plan
        if "latency" in plan["target"]:
            report.chosen_layers = list(layers)
    return expanded, report


def output_energy(model: nn.Module, layers: Sequence[int | str], scheme: str, batches: Iterable, *,
                  images: int = 512, basis: str = "shared") -> dict[str, list[float]]:
    """The share of each chosen conv's output energy kept at each rank, from one pass of ``model`` over the
    first ``images`` calibration images: ``{name: [share kept at rank 1, 2, ...]}``, the proxy an auto plan
    ranks layers by with ``fit="data"`` (:func:`lrx.factor.datafit.retained_output_energy`)."""
    return _output_energy(model, layers, scheme, batches, basis, images)[1]


def _output_energy(model, layers, scheme, batches, basis, images) -> tuple[dict, dict[str, list[float]]]:
    """(the chosen layers' input statistics on the original model, their output energy kept per rank)."""
    chosen = select_layers(model, layers, scheme)
    stats = _statistics(model, [(name, layer_scheme(module, scheme)) for _, name, module in chosen], batches, images)
    return stats, {name: _data_proxy(module, layer_scheme(module, scheme), stats[name], basis)
                   for _, name, module in chosen}


def _data_proxy(module: nn.Module, own: str, stats, basis: str) -> list[float]:
    """A layer's share of output energy kept per rank (the plan's proxy with calibration data)."""
    if own == CHANNEL:
        return channel_proxy(module, stats)
    if own == TUCKER:
        return tucker2_output_energy(module.weight, stats)
    return retained_output_energy(module.weight, stats, own, basis).tolist()


def _tucker_proxy(model, layers, scheme: str, stats: dict) -> dict[str, Callable[[Sequence[int]], list[float]]] | None:
    """With scheme auto, per conv with a larger kernel the share of output energy Tucker-2 keeps at the ranks a
    plan asks for (:func:`lrx.factor.datafit.tucker2_output_energy`), on the statistics already collected."""
    if scheme != AUTO:
        return None
    return {name: functools.partial(tucker2_output_energy, module.weight, stats[name])
            for _, name, module in select_layers(model, layers, scheme) if layer_scheme(module, scheme) not in (CHANNEL, TUCKER)}


def _statistics(model, layers: Sequence[tuple[str, str]], batches, images, reference=None) -> dict:
    """The input statistics of ``layers`` ((name, its scheme) pairs): patch statistics of the convs of schemes v1
    and v2 (:func:`lrx.factor.datafit.collect_stats`), channel statistics of the rest
    (:func:`lrx.factor.channel.collect_channel_stats`); with ``reference``, sequential ones."""
    convs = [name for name, own in layers if own != CHANNEL]
    channels = [name for name, own in layers if own == CHANNEL]
    stats = collect_stats(model, convs, batches, images, reference=reference) if convs else {}
    if channels:
        stats.update(collect_channel_stats(model, channels, batches, images, reference=reference))
    return stats


def _check_form(scheme: str, basis: str, method: str, decomposed: bool, order: str) -> None:
    check_choice(scheme, EXPANSIONS, "scheme")
    check_choice(basis, BASES, "basis")
    check_choice(method, METHODS, "method")
    if scheme != "v1" and (method != "svd" or decomposed or basis != "shared"):
        raise UserError(f"scheme {scheme} takes method 'svd', basis 'shared' and decomposed false only "
                        f"(got method {method!r}, basis {basis!r}, decomposed {decomposed}): its SVD is exact and "
                        "its factors are already separable")
    check_choice(order, ORDERS, "order")
    if scheme in ("v1", CHANNEL, TUCKER) and order != "vh":
        raise UserError(f"order {order!r} is scheme v2's choice of which 1-D conv runs first; scheme {scheme} "
                        "takes none")


def _fit_weights(model, layers, scheme, ranks, basis, method, decomposed, input_size, order,
                 method_options, schemes=None) -> tuple[nn.Module, ExpansionReport]:
    """The expansion fitted to the filters (the seed's filter reconstruction), every check before any work.
    ``schemes``: each layer's own scheme where a latency plan chose among them (Tucker-2 for a conv)."""
    notes: list[str] = []
    chosen = select_layers(model, layers, scheme, decomposed, notes)
    ranks = per_layer_ranks(ranks, len(chosen), [name for _, name, _ in chosen])
    # each layer's own scheme; a plan's list names scheme auto's layers "auto" (as build_expanded takes it)
    owns = [layer_scheme(module, own) for (_, _, module), own in zip(chosen, schemes or [scheme] * len(chosen))]
    for (index, name, module), rank, own in zip(chosen, ranks, owns):
        check_layer(module, own, decomposed, layer_label(index, name))
        check_layer_rank(rank, module, own, basis, order, layer_label(index, name))
    check_method_options(method, method_options)

    names = [name for _, name, _ in chosen]
    sizes = conv_sizes(model, names, input_size)
    channels = [name for name, own in zip(names, owns) if own == CHANNEL]
    positions = channel_positions(model, channels, input_size) if channels else {}
    new = copy.deepcopy(model)
    rows = []
    for (index, name, _), rank, own in zip(chosen, ranks, owns):
        conv = new.get_submodule(name)
        if own == CHANNEL:
            layer, row = channel_layer(conv, rank, positions[name])
        elif own == TUCKER:
            layer, row = _tucker_layer(conv, rank, sizes[name])
        else:
            layer, row = _conv_layer(conv, own, rank, basis, method, decomposed, order, sizes[name], method_options)
        row = {"index": index, "name": name, **row}
        if scheme == AUTO:
            row["scheme"] = own
        if row["macs_after"] > row["macs_before"]:
            notes.append(f"layer {layer_label(index, name)}: rank {rank} costs {row['macs_after'] / row['macs_before']:.2f}x "
                         f"the {'conv' if row.get('scheme', 'v1') != CHANNEL else 'layer'}'s MACs (MAC ratio {row['mac_ratio']:.2f}); a lower rank saves MACs")
        rows.append(row)
        new.set_submodule(name, layer)
    spec = {"layers": names, "scheme": scheme, "ranks": list(ranks), "basis": basis, "decomposed": decomposed,
            "method": method, "method_options": dict(method_options)}
    if scheme in ("v2", AUTO):
        spec["orders"] = [row["order"] for row in rows]
    if schemes:
        spec["schemes"] = list(schemes)
    return new, ExpansionReport(spec=spec, layers=rows, notes=notes, ranks=list(ranks))


def _conv_layer(conv, scheme, rank, basis, method, decomposed, order, size, method_options) -> tuple[nn.Module, dict]:
    """A conv replaced by scheme v1 or v2 at ``rank``, fitted to its filters, and its report row."""
    weight = conv.weight.detach()
    energy = layer_order = None
    if scheme == "v1":
        factors = scheme1(weight, rank, basis, method, **method_options)
        share = energy_first_sv(factors.bases)
        energy = (share if share.dim() == 1 else share.mean(0)).tolist()
        layer = LowRankExpConvV1.from_factors(conv, factors, decomposed=decomposed, basis=basis)
    else:
        layer = LowRankExpConvV2.from_conv(conv, rank, order=order)
        layer_order = layer.order
    in_hw, out_hw = size
    before = original_macs(conv, out_hw)
    after = expanded_macs(conv, scheme, rank, in_hw, out_hw, decomposed, layer_order or "vh")
    return layer, {"shape": list(weight.shape), "rank": rank, "max_rank": max_rank(conv, scheme, basis, layer_order or "vh"),
                   "rel_error": _relative_error(weight, layer.dense_weight()),
                   "macs_before": before, "macs_after": after, "mac_ratio": before / after,
                   "energy_first_sv": energy, "order": layer_order}


def _tucker_layer(conv, rank, size) -> tuple[nn.Module, dict]:
    """A conv replaced by Tucker-2 at ``rank`` (the truncated HOSVD of its filters), and its report row."""
    weight = conv.weight.detach()
    ranks = tucker2_ranks(rank, weight.shape)
    layer = LowRankTucker2.from_conv(conv, ranks)
    in_hw, out_hw = size
    before = original_macs(conv, out_hw)
    after = tucker2_macs(weight.shape, rank, in_hw, out_hw, conv.bias is not None)
    return layer, {"shape": list(weight.shape), "rank": rank, "max_rank": tucker2_max_rank(weight.shape),
                   "tucker_ranks": list(ranks), "rel_error": _relative_error(weight, layer.dense_weight()),
                   "macs_before": before, "macs_after": after, "mac_ratio": before / after,
                   "energy_first_sv": None, "order": None}


def _relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    w = weight.double()
    return ((w - approx).norm() / w.norm().clamp_min(1e-300)).item()


def _fit_data(model: nn.Module, expanded: nn.Module, report: ExpansionReport, batches: Iterable, *, images: int,
              sequential: bool, basis: str, decomposed: bool, iterations: int, tol: float = TOL,
              held_out: Iterable | None = None, stats: dict | None = None) -> dict:
    """Refit each layer of the filter-fitted ``expanded`` (in place, in module order) to its outputs on the first
    ``images`` images of ``batches``; the filter fit stays in the report as the data fit's reference
    (``output_error_weights``). ``sequential=False``: all statistics from the original model, one pass (or
    ``stats``, collected by the plan on the same images). Returns the record of the fit (``report.fit_data``)."""
    started = time.perf_counter()
    scheme = report.spec["scheme"]
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    rows = sorted(report.layers, key=lambda row: position[row["name"]])
    kinds = [(row["name"], row.get("scheme") or layer_scheme(model.get_submodule(row["name"]), scheme)) for row in rows]
    clock = time.perf_counter()
    if sequential:
        stats = None
    elif stats is None or not {name for name, _ in kinds} <= set(stats):
        stats = _statistics(model, kinds, batches, images)
    seconds_stats = time.perf_counter() - clock
    filter_fits = {}
    for row, (name, own) in zip(rows, kinds):
        conv = model.get_submodule(name)
        weight = conv.weight.detach()
        clock = time.perf_counter()
        layer_stats = (_statistics(expanded, [(name, own)], batches, images, reference=model)[name] if sequential
                       else stats[name])
        seconds_stats += time.perf_counter() - clock
        before = expanded.get_submodule(name)
        filter_fits[name] = before.dense_weight()
        if own == CHANNEL:
            expanded.set_submodule(name, channel_refit(conv, before, row, layer_stats))
            continue
        row["output_error_weights"] = output_error(weight, filter_fits[name], layer_stats)
        history = []
        if own == TUCKER:
            factors = fit_tucker2(weight, row["rank"], layer_stats, iterations, tol=tol, history=history)
            layer = LowRankTucker2.from_factors(conv, factors)
        elif own == "v2":
            factors = fit_scheme2(weight, row["rank"], layer_stats, row["order"], iterations, tol=tol, history=history)
            layer = LowRankExpConvV2.from_factors(conv, factors, order=row["order"])
        else:
            factors = fit_scheme1(weight, row["rank"], layer_stats, basis, iterations, tol=tol, history=history)
            if decomposed:
                factors = Scheme1Factors(factors.bases, refit_coefficients(weight, factors.bases, layer_stats))
            layer = LowRankExpConvV1.from_factors(conv, factors, decomposed=decomposed, basis=basis)
        layer.train(before.training)
        expanded.set_submodule(name, layer)
        dense = layer.dense_weight()
        row.update(fit="data", output_error=output_error(weight, dense, layer_stats), sweeps=len(history) - 1,
                   rel_error=_relative_error(weight, dense))
    if held_out is not None:
        unseen = _statistics(model, kinds, held_out, images)
        for row, (name, own) in zip(rows, kinds):
            weight = model.get_submodule(name).weight
            error = channel_stats_error if own == CHANNEL else output_error
            row.update(held_out_error_weights=error(weight, filter_fits[name], unseen[name]),
                       held_out_error=error(weight, expanded.get_submodule(name).dense_weight(), unseen[name]))
    seconds = time.perf_counter() - started
    return {"images": layer_stats.images, "sequential": sequential, "iterations": iterations, "tol": tol,
            "seconds": seconds, "seconds_stats": seconds_stats, "seconds_fit": seconds - seconds_stats}
