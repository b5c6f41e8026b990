"""Tucker-2 of a KxK conv weight: W (N, C, kh, kw) ~ core (R2, R1, kh, kw) x_out U_out (N x R2) x_in U_in (C x R1).

As a network (:class:`lrx.nn.tucker.LowRankTucker2`): a 1x1 conv C -> R1 (``U_in^T``), a KxK conv R1 -> R2 (the
core, with the replaced conv's stride, padding and dilation), a 1x1 conv R2 -> N (``U_out``, with the bias)
(Kim et al., "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile
Applications", ICLR 2016). The factors here are the truncated higher-order SVD: ``U_out`` the leading R2 left
singular vectors of W unfolded along its output channels, ``U_in`` the leading R1 along its input channels,
the core W projected on both. It is exact at R1 = C and R2 = N, and within sqrt(2) of the best Tucker-2 of
those ranks in the Frobenius norm (De Lathauwer et al. 2000); no refinement (HOOI) is done.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Tucker2Factors", "tucker2_hosvd", "tucker2_weight", "check_tucker2_ranks"]


class Tucker2Factors(NamedTuple):
    first: Tensor   # (R1, C, 1, 1): U_in^T
    core: Tensor    # (R2, R1, kh, kw)
    last: Tensor    # (N, R2, 1, 1): U_out


def check_tucker2_ranks(ranks, shape) -> tuple[int, int]:
    """(R1, R2) as ints, each in 1..C and 1..N for a weight of ``shape`` (N, C, kh, kw); ValueError if not."""
    n, c = int(shape[0]), int(shape[1])
    try:
        r1, r2 = (int(r) for r in ranks)
    except (TypeError, ValueError):
        raise ValueError(f"Tucker-2 ranks are two integers (R1, R2), got {ranks!r}") from None
    if not (1 <= r1 <= c and 1 <= r2 <= n):
        raise ValueError(f"Tucker-2 ranks ({r1}, {r2}) are out of range for a weight of shape {tuple(shape)}: "
                         f"R1 is 1..{c} (input channels), R2 is 1..{n} (output channels)")
    return r1, r2


def _leading(unfolded: Tensor, rank: int) -> Tensor:
    u, _, _ = torch.linalg.svd(unfolded, full_matrices=False)
    return u[:, :rank]


@torch.no_grad()
def tucker2_hosvd(weight: Tensor, ranks) -> Tucker2Factors:
    """The truncated HOSVD of ``weight`` (N, C, kh, kw) at ``ranks`` (R1, R2), in float64, returned in the
    weight's dtype and device."""
    if weight.dim() != 4:
        raise ValueError(f"a conv weight is (N, C, kh, kw), got shape {tuple(weight.shape)}")
    r1, r2 = check_tucker2_ranks(ranks, weight.shape)
    w = weight.detach().double()
    n, c = w.shape[:2]
    u_out = _leading(w.reshape(n, -1), r2)                      # (N, R2)
    u_in = _leading(w.transpose(0, 1).reshape(c, -1), r1)       # (C, R1)
    core = torch.einsum("nchw,nr,cs->rshw", w, u_out, u_in)     # (R2, R1, kh, kw)
    return Tucker2Factors(u_in.t()[..., None, None].to(weight.dtype).contiguous(), core.to(weight.dtype).contiguous(),
                          u_out[..., None, None].to(weight.dtype).contiguous())


def tucker2_weight(factors: Tucker2Factors) -> Tensor:
    """The dense (N, C, kh, kw) weight that Tucker-2 factors stand for."""
    first, core, last = factors
    return torch.einsum("rshw,nr,sc->nchw", core, last[:, :, 0, 0], first[:, :, 0, 0])
