"""Model in, model with channel low-rank layers out: a model's chosen 1x1 convs and linear layers, each W (N x C)
replaced by C -> R -> N (:class:`lrx.nn.channel.LowRankChannel`), fitted to the weights or to calibration data::

    fast, report = expand_channels(model, ["features.*.conv1x1", "classifier.1"], [64, 512], fit="data",
                                   calibration=loader)          # loader: re-iterable (images, labels) batches
    torch.save({"model": fast.state_dict(), "spec": report["spec"]}, "channels.pt")
    again = build_channels(original, saved["spec"]); again.load_state_dict(saved["model"])

The fits (:mod:`lrx.factor.channel`): ``fit="weights"`` the truncated SVD of W (the least ||W - W_hat||_F);
``fit="data"`` the whitened closed form, the least output error on the calibration inputs (1% damped).
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import nn

from lrx.base.errors import UserError
from lrx.factor.channel import (channel_data_fit, channel_macs, channel_max_rank, channel_output_error,
                                channel_svd, channel_weight, check_channel_rank, collect_channel_stats)
from lrx.nn.channel import LowRankChannel, channel_positions, select_channel_layers
from lrx.nn.surgery import per_layer_ranks

__all__ = ["CHANNEL_FITS", "expand_channels"]

CHANNEL_FITS = ("weights", "data")  # the truncated SVD of W, or the whitened closed form on calibration inputs


def _relative(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F, float64."""
    w = weight.detach().double().reshape(approx.shape)
    return ((w - approx).norm() / w.norm().clamp_min(1e-300)).item()


def expand_channels(model: nn.Module, layers: Sequence[str] | str, ranks: Sequence[int] | int, *,
                    fit: str = "weights", calibration: Iterable | None = None, images: int = 512,
                    input_size=(3, 224, 224)) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with the chosen 1x1 convs and linear layers replaced by channel low-rank layers.

    Parameters
    ----------
    model : any module; deep-copied, never modified.
    layers : module names or glob patterns (``"classifier.*"``, ``"auto"``), one or a list
        (:func:`lrx.nn.channel.select_channel_layers`: a layer named outright that is not a 1x1 conv with
        groups 1 or an ``nn.Linear`` is refused; what a pattern skips goes to ``report["notes"]``).
    ranks : one rank per chosen layer (in the order :func:`lrx.nn.channel.select_channel_layers` returns them),
        or one int for all; each in 1..min(C, N).
    fit : "weights" (truncated SVD of W) or "data" (whitened closed form on the calibration inputs).
    calibration : re-iterable ``(images, labels)`` batches on the model's device; needed for ``fit="data"``.
        Given with ``fit="weights"`` it adds the output errors to the report.
    images : calibration images used (the first ones).
    input_size : (C, H, W) of one image (or (C,) for a model of vectors), for the MAC counts.

    Returns
    -------
    (expanded copy, report). ``report``: ``fit``, ``images`` (calibration images used, 0 without),
    ``macs_before``/``macs_after`` (sums over the layers), ``spec`` (``{"layers", "ranks"}`` for
    :func:`lrx.nn.channel.build_channels`), ``notes``, and ``layers``: per layer ``name``, ``kind``
    ("conv"/"linear"), ``shape`` [N, C], ``rank``, ``max_rank``, ``rel_error`` (the relative output error on
    the calibration inputs where given, else ``weight_error``), ``weight_error`` ||W - W_hat||_F / ||W||_F,
    ``output_error`` and ``output_error_weights`` (the SVD's, for comparison) where calibration was given,
    ``positions`` (output positions per image), ``macs_before`` C N and ``macs_after`` R (C + N) per position
    times ``positions``, bias adds excluded (the same before and after).
    """
    if fit not in CHANNEL_FITS:
        raise UserError(f"fit {fit!r} is not one of {', '.join(map(repr, CHANNEL_FITS))}")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise UserError(f"images {images!r} must be a positive integer")
    if fit == "data" and calibration is None:
        raise UserError("fit 'data' needs calibration batches: pass calibration=<your (images, labels) batches>")
    new = copy.deepcopy(model)
    notes: list[str] = []
    chosen = select_channel_layers(new, layers, notes)
    names = [name for name, _ in chosen]
    ranks = per_layer_ranks(ranks, len(chosen), names)
    for (name, module), rank in zip(chosen, ranks):
        check_channel_rank(rank, module.weight.shape, name=name)
    positions = channel_positions(new, names, input_size)
    stats = collect_channel_stats(model, names, calibration, images) if calibration is not None else {}
    rows = []
    for (name, module), rank in zip(chosen, ranks):
        weight = module.weight.detach()
        n, c = weight.shape[:2]
        svd = channel_svd(weight, rank)
        factors = svd
        row = {"name": name, "kind": "linear" if isinstance(module, nn.Linear) else "conv", "shape": [n, c],
               "rank": rank, "max_rank": channel_max_rank(weight.shape)}
        if name in stats:
            covariance = stats[name].covariance
            if fit == "data":
                factors = channel_data_fit(weight, covariance, rank)
            row["output_error_weights"] = channel_output_error(weight, channel_weight(svd), covariance)
            row["output_error"] = channel_output_error(weight, channel_weight(factors), covariance)
        row["weight_error"] = _relative(weight, channel_weight(factors))
        row["rel_error"] = row.get("output_error", row["weight_error"])
        row["positions"] = positions[name]
        row["macs_before"] = channel_macs(c, n, None, positions[name])
        row["macs_after"] = channel_macs(c, n, rank, positions[name])
        if row["macs_after"] > row["macs_before"]:
            notes.append(f"layer {name}: rank {rank} costs {row['macs_after']} MACs, more than the dense layer's "
                         f"{row['macs_before']} (cheaper at ranks below {-(-c * n // (c + n))})")
        new.set_submodule(name, LowRankChannel.from_factors(module, *factors))
        rows.append(row)
    report = {"fit": fit, "images": next(iter(stats.values())).images if stats else 0,
              "macs_before": sum(row["macs_before"] for row in rows), "macs_after": sum(row["macs_after"] for row in rows),
              "spec": {"layers": names, "ranks": list(ranks)}, "notes": notes, "layers": rows}
    return new, report
