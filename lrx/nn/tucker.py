"""Tucker-2 of a KxK conv as three plain convs: 1x1 C -> R1, KxK R1 -> R2, 1x1 R2 -> N (:mod:`lrx.factor.tucker`).

The layer is an ``nn.Sequential`` of plain ``nn.Conv2d`` (``first``, ``core``, ``last``): ptflops counts it,
profilers see it, and every export traces it as it is. The 1x1 ``first`` has no bias and commutes with the
core's padding (a linear map of zeros is zeros), so the three compute what one conv of
:func:`lrx.factor.tucker.tucker2_weight` computes.

It is a library layer for comparing structures (``benchmarks/tucker_speed.py`` times it against scheme 2 at
equal weight error); the planners and configs do not offer it.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from lrx.factor.tucker import Tucker2Factors, tucker2_hosvd, tucker2_weight

__all__ = ["LowRankTucker2"]


class LowRankTucker2(nn.Sequential):
    """``first`` (1x1, C -> R1, no bias), ``core`` (the conv's kernel, stride, padding, dilation and padding
    mode; R1 -> R2, no bias), ``last`` (1x1, R2 -> N, the conv's bias)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks) -> "LowRankTucker2":
        """The truncated HOSVD of ``conv``'s weight at ``ranks`` (R1, R2) as a layer; ``conv`` is not changed."""
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise ValueError(f"Tucker-2 replaces an nn.Conv2d with groups=1, got {conv!r}")
        return cls.from_factors(conv, tucker2_hosvd(conv.weight, ranks))

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: Tucker2Factors) -> "LowRankTucker2":
        first_w, core_w, last_w = factors
        r1, r2 = first_w.shape[0], core_w.shape[0]
        kw = dict(device=conv.weight.device, dtype=conv.weight.dtype)
        first = nn.Conv2d(conv.in_channels, r1, 1, bias=False, **kw)
        core = nn.Conv2d(r1, r2, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False,
                         padding_mode=conv.padding_mode, **kw)
        last = nn.Conv2d(r2, conv.out_channels, 1, bias=conv.bias is not None, **kw)
        first.weight.data.copy_(first_w)
        core.weight.data.copy_(core_w)
        last.weight.data.copy_(last_w)
        if conv.bias is not None:
            last.bias.data.copy_(conv.bias.detach())
        return cls(OrderedDict(first=first, core=core, last=last))

    @property
    def ranks(self) -> tuple[int, int]:
        return self.first.out_channels, self.core.out_channels

    def dense_weight(self) -> Tensor:
        """The (N, C, kh, kw) weight of the one conv these three stand for."""
        return tucker2_weight(Tucker2Factors(self.first.weight, self.core.weight, self.last.weight))
