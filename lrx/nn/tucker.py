"""Tucker-2 of a KxK conv as three plain convs: 1x1 C -> R1, KxK R1 -> R2, 1x1 R2 -> N (:mod:`lrx.factor.tucker`).

The layer is an ``nn.Sequential`` of plain ``nn.Conv2d`` (``first``, ``core``, ``last``): ptflops counts it,
profilers see it, and every export traces it as it is. The 1x1 ``first`` has no bias and commutes with the
core's padding (a linear map of zeros is zeros), so the three compute what one conv of
:func:`lrx.factor.tucker.tucker2_weight` computes.

``decompose.scheme: tucker2`` replaces KxK convs by it (one rank r per layer, :func:`lrx.factor.tucker.tucker2_ranks`),
and a latency plan of ``scheme: auto`` weighs it against scheme 2 per conv on measured time
(``benchmarks/tucker_speed.py`` times the two per layer at equal weight error).
"""
from __future__ import annotations

import copy
from collections import OrderedDict

from torch import Tensor, nn

from lrx.base.errors import UserError
from lrx.factor.tucker import Tucker2Factors, tucker2_hosvd, tucker2_ranks, tucker2_weight

__all__ = ["LowRankTucker2", "tucker2_unsupported_reason", "check_tucker2_layer"]


def tucker2_unsupported_reason(module: nn.Module) -> str | None:
    """Why Tucker-2 cannot replace ``module`` usefully (one phrase), or None: an ``nn.Conv2d`` with groups 1 and a
    kernel larger than 1x1 (a 1x1 conv is the channel scheme's). Any padding is the core's: the first 1x1 conv
    has no bias, so it commutes with padding of every mode."""
    if not isinstance(module, nn.Conv2d):
        return f"only nn.Conv2d can be replaced by Tucker-2, got {type(module).__name__}"
    if module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"groups={module.groups} is not supported ({kind}; only groups=1 convs can be expanded)"
    if tuple(module.kernel_size) == (1, 1):
        return "a 1x1 conv: Tucker-2 needs a kernel larger than 1x1 (the channel scheme replaces 1x1 convs)"
    return None


def check_tucker2_layer(module: nn.Module, name: str | None = None) -> None:
    """Refuse, with a UserError naming the layer, a module Tucker-2 cannot replace."""
    reason = tucker2_unsupported_reason(module)
    if reason is not None:
        where = f"layer {name}: " if name else ""
        raise UserError(f"{where}{reason}")


class LowRankTucker2(nn.Sequential):
    """``first`` (1x1, C -> R1, no bias), ``core`` (the conv's kernel, stride, padding, dilation and padding
    mode; R1 -> R2, no bias), ``last`` (1x1, R2 -> N, the conv's bias)."""

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: int) -> "LowRankTucker2":
        """A default-initialised layer of ``conv``'s geometry at rank ``rank`` (:func:`tucker2_ranks`), on its
        device and dtype; its values are to be loaded or fitted."""
        return cls._shaped(conv, *tucker2_ranks(rank, conv.weight.shape))

    @classmethod
    def _shaped(cls, conv: nn.Conv2d, r1: int, r2: int) -> "LowRankTucker2":
        """The three default-initialised convs of ranks (``r1``, ``r2``) in ``conv``'s geometry, device and dtype."""
        kw = dict(device=conv.weight.device, dtype=conv.weight.dtype)
        return cls(OrderedDict(
            first=nn.Conv2d(conv.in_channels, r1, 1, bias=False, **kw),
            core=nn.Conv2d(r1, r2, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False,
                           padding_mode=conv.padding_mode, **kw),
            last=nn.Conv2d(r2, conv.out_channels, 1, bias=conv.bias is not None, **kw)))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks) -> "LowRankTucker2":
        """The truncated HOSVD of ``conv``'s weight at ``ranks`` (R1, R2) as a layer; ``conv`` is not changed."""
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise ValueError(f"Tucker-2 replaces an nn.Conv2d with groups=1, got {conv!r}")
        return cls.from_factors(conv, tucker2_hosvd(conv.weight, ranks))

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: Tucker2Factors) -> "LowRankTucker2":
        first_w, core_w, last_w = factors
        layer = cls._shaped(conv, first_w.shape[0], core_w.shape[0])
        layer.first.weight.data.copy_(first_w)
        layer.core.weight.data.copy_(core_w)
        layer.last.weight.data.copy_(last_w)
        if conv.bias is not None:
            layer.last.bias.data.copy_(conv.bias.detach())
        return layer

    def plain(self) -> nn.Sequential:
        """``nn.Sequential(first, core, last)`` (copies): the same function and state-dict keys, the class an
        export puts in this layer's place so that the model loads without lrx."""
        return nn.Sequential(OrderedDict((part, copy.deepcopy(getattr(self, part))) for part in ("first", "core", "last")))

    @property
    def ranks(self) -> tuple[int, int]:
        return self.first.out_channels, self.core.out_channels

    def dense_weight(self) -> Tensor:
        """The (N, C, kh, kw) weight of the one conv these three stand for."""
        return tucker2_weight(Tucker2Factors(self.first.weight, self.core.weight, self.last.weight))
