"""One call from a model to its expansion: plan the ranks (given, or from a MACs, speedup or latency
target), then fit the factors (to the filters, or to the layers' outputs on data).

This is what ``lrx decompose`` does with a config's ``decompose:`` settings (:func:`lrx.stages.expand_model`
calls it), usable from Python with plain objects, as ``lrx.expand``::

    import lrx
    fast, report = lrx.expand(model, layers="auto", scheme="v2", ranks="auto", target={"latency": 2.0},
                              fit="data", calibration=loader)   # loader: any re-iterable (images, labels) batches

:func:`lrx.lowrank.expand` is the step below it: given ranks, fitted to the filters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .config import check_target
from .datafit import expand_to_data, retained_on_data
from .decomposition import check_choice
from .errors import UserError
from .latency import DeviceTiming, Timing, plan_latency
from .lowrank import expand as expand_at
from .ranks import device_align, plan_ranks

FITS = ("weights", "data")  # to the filters (the seed's), or to the layers' outputs (lrx.datafit)
DATA_PROXY = "output energy on the calibration images"


def _layers(layers) -> list:
    return list(layers) if isinstance(layers, (list, tuple)) else [layers]


def expand(model: nn.Module, layers: Sequence[int | str] | int | str = (2, 3, 4, 5), scheme: str = "v1",
           ranks: Sequence[int] | int | str = (8, 8, 6, 4), *, target: dict | None = None, fit: str = "weights",
           calibration: Iterable | None = None, images: int = 512, sequential: bool = True, iterations: int = 20,
           held_out: Iterable | None = None, basis: str = "shared", method: str = "svd", decomposed: bool = False,
           order: str = "vh", align: int | str = 1, input_size=(3, 224, 224), timing: Timing | None = None,
           cache: Path | None = None, write_cache: bool = True, log: Callable[[str], None] = lambda m: None,
           **method_options) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with the chosen convs replaced by low-rank expansions, and a report.

    Parameters
    ----------
    model : any module; deep-copied, never modified.
    layers : 1-based conv indices, module names, glob patterns (``"layer3.*"``) or ``"auto"`` (every conv the
        scheme can replace), one or a list (:func:`lrx.lowrank.select_layers`).
    scheme, basis, method, decomposed, order, method_options : as for :func:`lrx.lowrank.expand`.
    ranks : one rank per layer, one int for all, or ``"auto"``: planned from ``target``.
    target : with ``ranks="auto"``: ``{"speedup": X}`` (the replaced layers' MACs fall X-fold), ``{"macs": F}``
        (the model keeps the fraction F of its MACs) (:func:`lrx.ranks.plan_ranks`), or ``{"latency": X}``
        (the whole model runs X times faster, measured with ``timing``; scheme 2; :func:`lrx.latency.plan_latency`).
    fit : ``"weights"`` (filter reconstruction, the seed's) or ``"data"``: factors fitted to the layers' outputs
        on the first ``images`` images of ``calibration`` (:func:`lrx.datafit.expand_to_data`, with
        ``sequential``, ``iterations`` and ``held_out``); an auto plan then ranks layers by output energy.
    calibration : any re-iterable of ``(images, labels)`` batches (a DataLoader too), on the model's device.
    align : ranks are multiples of this (1, 8, 16, 32) or ``"auto"`` (the device's rule, :func:`lrx.ranks.device_align`).
    input_size : (C, H, W) of one image, for the MAC counts.
    timing : how a latency target is measured; default :class:`lrx.latency.DeviceTiming` on the CPU at batch
        16 and ``input_size``. ``cache``: a JSON file for its per-layer tables (kept unless ``write_cache`` is off).
    log : called with one line per planner step and note.

    Returns
    -------
    (expanded model, report): :func:`lrx.lowrank.expand`'s report, with ``ranks``, ``plan`` (an auto plan,
    its ``proxy`` among it), ``chosen_layers`` (a latency plan's layers) and ``fit_data`` (with ``fit="data"``).
    """
    check_choice(fit, FITS, "fit")
    if fit == "data" and calibration is None:
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
    layers = _layers(layers)
    device = timing.device if timing is not None and hasattr(timing, "device") else torch.device("cpu")
    align = device_align(align, device)

    plan = None
    if ranks == "auto":
        proxy = (retained_on_data(model, layers, scheme, calibration, basis=basis, images=images)
                 if fit == "data" else None)  # output energy per rank; filter energy when None
        if kind == "latency":
            timing = timing if timing is not None else DeviceTiming(torch.device("cpu"), input_size=tuple(input_size))
            plan = plan_latency(model, layers, target, timing, proxy=proxy, align=align, cache=cache,
                                write_cache=write_cache, log=log)
            layers = plan["layers"]
        else:
            plan = plan_ranks(model, layers, scheme, target, input_size=input_size, basis=basis,
                              decomposed=decomposed, align=align, retained=proxy)
        if proxy is not None:
            plan["proxy"] = DATA_PROXY
        ranks = plan["ranks"]

    if fit == "data":
        expanded, report = expand_to_data(model, layers, scheme, ranks, calibration, images=images,
                                          sequential=sequential, basis=basis, decomposed=decomposed, order=order,
                                          input_size=input_size, iterations=iterations, held_out=held_out)
        report["fit_data"] = report.pop("fit")
    else:
        expanded, report = expand_at(model, layers=layers, scheme=scheme, ranks=ranks, basis=basis, method=method,
                                     decomposed=decomposed, input_size=input_size, order=order, **method_options)
    for note in report.get("notes", []):
        log(f"note: {note}")
    report["ranks"] = list(ranks) if not isinstance(ranks, int) else ranks
    if plan is not None:
        report["plan"] = plan
        if "latency" in plan["target"]:
            report["chosen_layers"] = list(layers)
    return expanded, report
