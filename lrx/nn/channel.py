"""The channel low-rank layer for 1x1 convs and linear layers, and which of a model's layers it can replace.

A 1x1 conv or an ``nn.Linear`` with weight W (N x C) becomes two thin layers, C -> R -> N
(:class:`LowRankChannel`): ``first`` (R x C, no bias) and ``second`` (N x R, the original bias). For a conv both
are plain 1x1 ``nn.Conv2d`` (the first carries the stride, padding, dilation and padding mode, so the pair
computes exactly what a 1x1 conv of weight ``second @ first`` computes); for a linear layer both are plain
``nn.Linear``. ptflops counts them, profilers see them, and exports (ONNX, TorchScript, ``torch.export``) trace
them as the plain modules they are. The state dict holds ``first.*`` and ``second.*``: :meth:`LowRankChannel.plain`
gives an ``nn.Sequential`` with the same keys, a model file that loads without lrx.

Which layers it replaces is :func:`lrx.nn.surgery.select_layers`' rule (``scheme="channel"``, or ``"auto"``); the
factors come from :mod:`lrx.factor.channel`; :func:`lrx.expand` puts it together for a model::

    fast, report = lrx.expand(model, ["classifier.*"], "channel", [512, 256], fit="data", calibration=loader)
    again = lrx.build_expanded(model, report.spec)   # the structure alone; then load fast's state dict
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn

from lrx.base.errors import UserError
from lrx.factor.choices import CHANNEL
from lrx.factor.channel import ChannelFactors, channel_svd, check_channel_rank

__all__ = ["SCHEME", "LowRankChannel", "channel_unsupported_reason", "check_channel_layer", "channel_shape",
           "channel_positions"]

SCHEME = CHANNEL


def channel_unsupported_reason(module: nn.Module) -> str | None:
    """Why :class:`LowRankChannel` cannot replace ``module`` (one phrase), or None: the one rule behind
    :func:`check_channel_layer` (which refuses) and patterns (which skip with a note)."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"only a 1x1 nn.Conv2d or an nn.Linear can be expanded by the channel scheme, got {type(module).__name__}"
    if tuple(module.kernel_size) != (1, 1):
        return (f"kernel_size={tuple(module.kernel_size)}: the channel scheme replaces 1x1 convs only "
                "(schemes v1 and v2 expand larger kernels)")
    if module.groups != 1:
        return f"groups={module.groups} is not supported (only groups=1 convs can be expanded)"
    return None


def check_channel_layer(module: nn.Module, name: str | None = None) -> None:
    """Refuse, with a UserError naming the layer, a module :class:`LowRankChannel` cannot replace."""
    reason = channel_unsupported_reason(module)
    if reason is not None:
        raise UserError(f"layer {name if name else repr(module)}: {reason}")


def channel_shape(module: nn.Module) -> tuple[int, int]:
    """(N, C) of a 1x1 conv or a linear layer: its weight as the N x C matrix the scheme factors."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.out_channels, module.in_channels


class LowRankChannel(nn.Module):
    """Channel low-rank expansion of a 1x1 conv or a linear layer: ``W (N x C) ~ second @ first``, C -> R -> N.

    ``kind="conv"``: input (B, C, H, W) -> (B, N, H', W'); ``first`` is a 1x1 ``nn.Conv2d`` C -> R with the
    replaced conv's stride, padding, dilation and padding mode and no bias, ``second`` a 1x1 ``nn.Conv2d`` R -> N
    with its bias. ``kind="linear"``: input (B, *, C) -> (B, *, N); ``first`` is ``nn.Linear(C, R, bias=False)``,
    ``second`` ``nn.Linear(R, N)`` with the bias. Cost per output position (or input row): R (C + N) MACs against
    C N for the dense layer; exact at R = min(C, N).
    """

    scheme = SCHEME

    def __init__(self, in_features: int, out_features: int, rank: int, kind: str = "linear", bias: bool = True,
                 stride=1, padding=0, dilation=1, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        if kind not in ("conv", "linear"):
            raise UserError(f"kind {kind!r} is not one of 'conv', 'linear'")
        check_channel_rank(rank, (out_features, in_features))
        self.in_features, self.out_features, self.rank, self.kind = in_features, out_features, rank, kind
        factory = dict(device=device, dtype=dtype)
        if kind == "conv":
            self.first = nn.Conv2d(in_features, rank, 1, stride=stride, padding=padding, dilation=dilation,
                                   padding_mode=padding_mode, bias=False, **factory)
            self.second = nn.Conv2d(rank, out_features, 1, bias=bias, **factory)
        else:
            self.first = nn.Linear(in_features, rank, bias=False, **factory)
            self.second = nn.Linear(rank, out_features, bias=bias, **factory)

    @classmethod
    def like(cls, module: nn.Module, rank: int, name: str | None = None) -> "LowRankChannel":
        """A default-initialised layer with ``module``'s geometry and bias at ``rank``, on its device and dtype."""
        check_channel_layer(module, name)
        n, c = channel_shape(module)
        check_channel_rank(rank, (n, c), name=name)
        factory = dict(bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)
        if isinstance(module, nn.Linear):
            return cls(c, n, rank, "linear", **factory)
        return cls(c, n, rank, "conv", stride=module.stride, padding=module.padding, dilation=module.dilation,
                   padding_mode=module.padding_mode, **factory)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, name: str | None = None) -> "LowRankChannel":
        """The rank-``rank`` layer of a 1x1 conv (groups 1) fitted to its weight (truncated SVD)."""
        if not isinstance(conv, nn.Conv2d):
            raise UserError(f"layer {name if name else repr(conv)}: from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        return cls.from_module(conv, rank, name)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, name: str | None = None) -> "LowRankChannel":
        """The rank-``rank`` layer of an ``nn.Linear`` fitted to its weight (truncated SVD)."""
        if not isinstance(linear, nn.Linear):
            raise UserError(f"layer {name if name else repr(linear)}: from_linear needs an nn.Linear, "
                            f"got {type(linear).__name__}")
        return cls.from_module(linear, rank, name)

    @classmethod
    def from_module(cls, module: nn.Module, rank: int, name: str | None = None) -> "LowRankChannel":
        """:meth:`from_conv` or :meth:`from_linear`, whichever ``module`` is."""
        check_channel_layer(module, name)
        check_channel_rank(rank, channel_shape(module), name=name)
        return cls.from_factors(module, *channel_svd(module.weight.detach(), rank))

    @classmethod
    def from_factors(cls, module: nn.Module, first: Tensor, second: Tensor) -> "LowRankChannel":
        """A layer with ``module``'s geometry and bias, filled with ``first`` (R, C) and ``second`` (N, R)
        (:class:`lrx.factor.channel.ChannelFactors`)."""
        n, c = channel_shape(module)
        if first.dim() != 2 or second.dim() != 2 or first.shape[1] != c or second.shape[0] != n \
                or first.shape[0] != second.shape[1]:
            raise UserError(f"factors of shapes {tuple(first.shape)} and {tuple(second.shape)} do not fit a weight "
                            f"of shape ({n}, {c}): they must be (R, {c}) and ({n}, R)")
        layer = cls.like(module, first.shape[0])
        with torch.no_grad():
            layer.first.weight.copy_(first.reshape(layer.first.weight.shape))
            layer.second.weight.copy_(second.reshape(layer.second.weight.shape))
            if module.bias is not None:
                layer.second.bias.copy_(module.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def factors(self) -> ChannelFactors:
        """The layer's (first (R, C), second (N, R)) as they are now (views of its weights)."""
        return ChannelFactors(self.first.weight.reshape(self.rank, self.in_features),
                              self.second.weight.reshape(self.out_features, self.rank))

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """The weight of the layer this one computes (float64): (N, C, 1, 1) for a conv, (N, C) for a linear layer."""
        first, second = self.factors()
        weight = second.double() @ first.double()
        return weight[:, :, None, None] if self.kind == "conv" else weight

    def plain(self) -> nn.Sequential:
        """``nn.Sequential(first, second)`` (copies), the same function and the same state-dict keys: what an
        export puts in this layer's place so that the model loads without lrx."""
        return nn.Sequential(OrderedDict(first=copy.deepcopy(self.first), second=copy.deepcopy(self.second)))

    def extra_repr(self) -> str:
        text = (f"{self.in_features}, {self.out_features}, scheme={self.scheme}, rank={self.rank}, kind={self.kind}, "
                f"bias={self.second.bias is not None}")
        if self.kind == "conv":
            text += f", stride={tuple(self.first.stride)}"
            if self.first.padding not in ((0, 0), "valid"):
                text += f", padding={self.first.padding}"
        return text


# ------------------------------------------------------------------------------------- positions


@torch.no_grad()
def channel_positions(model: nn.Module, names: Sequence[str], input_size=(3, 224, 224)) -> dict[str, int]:
    """Output positions per image of the named layers, for one input of ``input_size`` (without the batch):
    H' W' for a 1x1 conv, the number of input rows for a linear layer (1 for a (B, C) input).

    One forward in eval mode with hooks; every module's mode is put back as it was.
    """
    counts: dict[str, int] = {}

    def hook(module, inputs, output, name):
        counts[name] = output.numel() // (output.shape[0] * channel_shape(module)[0])

    hooks = [model.get_submodule(name).register_forward_hook(
        lambda m, inputs, output, name=name: hook(m, inputs, output, name)) for name in names]
    modes = [(m, m.training) for m in model.modules()]
    first = next(model.parameters(), None)
    x = torch.zeros(1, *input_size, device=first.device if first is not None else None,
                    dtype=first.dtype if first is not None and first.is_floating_point() else None)
    try:
        model.eval()
        model(x)
    except RuntimeError as err:
        line = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"the model does not run on an input of size {tuple(input_size)}: {line}") from None
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes:
            m.training = training
    missing = [name for name in names if name not in counts]
    if missing:
        raise UserError(f"layer(s) {', '.join(missing)} are not used in the model's forward pass")
    return counts
