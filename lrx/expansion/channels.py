"""The channel scheme's part of :func:`lrx.expand`: a 1x1 conv or a linear layer, W (N x C), replaced by C -> R -> N
(:class:`lrx.nn.channel.LowRankChannel`), fitted to the weight or to calibration data, and its report row::

    fast, report = lrx.expand(model, ["features.*.conv1x1", "classifier.1"], "channel", [64, 512], fit="data",
                              calibration=loader)          # loader: re-iterable (images, labels) batches
    torch.save({"model": fast.state_dict(), "spec": report.spec}, "channels.pt")
    again = lrx.build_expanded(original, saved["spec"]); again.load_state_dict(saved["model"])

The fits (:mod:`lrx.factor.channel`): the weight fit is the truncated SVD of W (the least ||W - W_hat||_F); the
data fit the whitened closed form, the least output error on the calibration inputs (1% damped), in sequential
mode on the inputs the model with the earlier layers replaced gives the layer.
"""
from __future__ import annotations

import torch
from torch import nn

from lrx.factor.channel import (ChannelStats, channel_energy, channel_fit, channel_macs, channel_max_rank,
                                channel_stats_error, channel_svd)
from lrx.nn.channel import LowRankChannel, channel_shape

__all__ = ["channel_layer", "channel_refit", "channel_proxy"]


def _relative(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F, float64."""
    w = weight.detach().double().reshape(approx.shape)
    return ((w - approx).norm() / w.norm().clamp_min(1e-300)).item()


def channel_layer(module: nn.Module, rank: int, positions: int) -> tuple[LowRankChannel, dict]:
    """``module`` (a 1x1 conv or a linear layer, checked by the caller) at ``rank`` fitted to its weight (truncated
    SVD), and its report row: scheme, kind ("conv"/"linear"), shape [N, C], rank, max_rank, rel_error
    ||W - W_hat||_F / ||W||_F, positions (output positions per image: a conv's H'W', a linear layer's input rows),
    macs_before C N and macs_after R (C + N) per position times ``positions`` (bias adds left out: the same
    before and after), mac_ratio, energy_first_sv and order (None: the scheme has neither)."""
    weight = module.weight.detach()
    n, c = channel_shape(module)
    layer = LowRankChannel.from_factors(module, *channel_svd(weight, rank))
    before, after = channel_macs(c, n, None, positions), channel_macs(c, n, rank, positions)
    return layer, {"scheme": "channel", "kind": "linear" if isinstance(module, nn.Linear) else "conv",
                   "shape": [n, c], "rank": rank, "max_rank": channel_max_rank((n, c)),
                   "rel_error": _relative(weight, layer.dense_weight()), "positions": positions,
                   "macs_before": before, "macs_after": after, "mac_ratio": before / after,
                   "energy_first_sv": None, "order": None}


def channel_refit(module: nn.Module, before: LowRankChannel, row: dict, stats: ChannelStats) -> LowRankChannel:
    """The layer refitted to its outputs on ``stats`` (:func:`lrx.factor.channel.channel_fit`); ``row`` gains
    fit, output_error_weights (the weight fit ``before``'s relative output error on the statistics),
    output_error (the data fit's), sweeps (0: the fit is closed form) and the data fit's rel_error."""
    weight = module.weight.detach()
    layer = LowRankChannel.from_factors(module, *channel_fit(weight, row["rank"], stats))
    layer.train(before.training)
    dense = layer.dense_weight()
    row.update(fit="data", output_error_weights=channel_stats_error(weight, before.dense_weight(), stats),
               output_error=channel_stats_error(weight, dense, stats), sweeps=0, rel_error=_relative(weight, dense))
    return layer


def channel_proxy(module: nn.Module, stats: ChannelStats | None = None) -> list[float]:
    """The share of the energy each rank r = 1..min(C, N) keeps (:func:`lrx.factor.channel.channel_energy`): of
    the filter energy, or with ``stats`` of the output energy on the calibration inputs."""
    return channel_energy(module.weight, None if stats is None else stats.covariance).tolist()
