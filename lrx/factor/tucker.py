"""Tucker-2 of a KxK conv weight: W (N, C, kh, kw) ~ core (R2, R1, kh, kw) x_out U_out (N x R2) x_in U_in (C x R1).

As a network (:class:`lrx.nn.tucker.LowRankTucker2`): a 1x1 conv C -> R1 (``U_in^T``), a KxK conv R1 -> R2 (the
core, with the replaced conv's stride, padding and dilation), a 1x1 conv R2 -> N (``U_out``, with the bias)
(Kim et al., "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile
Applications", ICLR 2016). The factors here are the truncated higher-order SVD: ``U_out`` the leading R2 left
singular vectors of W unfolded along its output channels, ``U_in`` the leading R1 along its input channels,
the core W projected on both. It is exact at R1 = C and R2 = N, and within sqrt(2) of the best Tucker-2 of
those ranks in the Frobenius norm (De Lathauwer et al. 2000); no refinement (HOOI) is done.

One rank r per layer, as lrx's other schemes have: r in 1..max(C, N) stands for (R1, R2) =
(ceil(r C / M), ceil(r N / M)), M = max(C, N) (:func:`tucker2_ranks`), the ray from (1, 1) to the full (C, N),
where the layer is exact. Its retained filter energy at every r (:func:`tucker2_energy`) comes from one pair of
full SVDs: the projections onto the leading singular vectors nest, so the energy kept at (R1, R2) is the
leading R2 x R1 block of the fully rotated weight. :func:`lrx.factor.datafit.fit_tucker2` refits the core and the output factor
to a layer's outputs on calibration images (alternating exact least-squares steps from the HOSVD start).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lrx.base.errors import UserError

__all__ = ["Tucker2Factors", "tucker2_hosvd", "tucker2_weight", "check_tucker2_ranks", "tucker2_max_rank",
           "tucker2_ranks", "check_tucker2_rank", "tucker2_energy", "tucker2_macs"]


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


def tucker2_max_rank(shape) -> int:
    """The largest rank of a conv weight of ``shape`` (N, C, kh, kw): max(C, N), where (R1, R2) = (C, N) is exact."""
    return max(int(shape[0]), int(shape[1]))


def tucker2_ranks(rank: int, shape) -> tuple[int, int]:
    """(R1, R2) of rank ``rank`` (1..:func:`tucker2_max_rank`) for a weight of ``shape``: the share rank / max(C, N)
    of the input and of the output channels, rounded up."""
    n, c = int(shape[0]), int(shape[1])
    top = max(n, c)
    return max(1, math.ceil(rank * c / top)), max(1, math.ceil(rank * n / top))


def check_tucker2_rank(rank, shape, name: str | None = None) -> None:
    """Refuse, with a UserError naming the layer and the allowed ranks, a Tucker-2 rank out of 1..max(C, N)."""
    top = tucker2_max_rank(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        where = f" of layer {name}" if name else ""
        raise UserError(f"rank {rank!r}{where} is out of range for Tucker-2: 1..{top} (max(C, N) of a weight of "
                        f"shape {tuple(shape)}; rank r keeps ceil(r C / {top}) input and ceil(r N / {top}) output "
                        "channels)")


@torch.no_grad()
def tucker2_energy(weight: Tensor) -> Tensor:
    """The share of ``weight``'s energy the truncated HOSVD keeps at each rank r = 1..max(C, N) (float64, (M,))."""
    w = weight.detach().double()
    n, c = w.shape[:2]
    u_out = torch.linalg.svd(w.reshape(n, -1), full_matrices=True)[0]                  # (N, N)
    u_in = torch.linalg.svd(w.transpose(0, 1).reshape(c, -1), full_matrices=True)[0]   # (C, C)
    block = torch.einsum("nchw,nr,cs->rshw", w, u_out, u_in).square().sum((2, 3))       # (N, C): energy per pair
    kept = block.cumsum(0).cumsum(1)
    total = kept[-1, -1].clamp_min(1e-300)
    shares = [kept[r2 - 1, r1 - 1] / total for r1, r2 in (tucker2_ranks(r, w.shape) for r in range(1, max(n, c) + 1))]
    return torch.stack(shares).clamp(max=1.0)


def tucker2_macs(shape, rank: int, in_hw, out_hw, bias: bool = False) -> int:
    """MACs of the Tucker-2 layer of rank ``rank`` on one image, as ptflops counts its three convs: the first 1x1
    at the input's (H, W), the core and the last 1x1 (with the bias) at the output's."""
    n, c, kh, kw = (int(v) for v in shape)
    r1, r2 = tucker2_ranks(rank, shape)
    into, out = in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]
    return c * r1 * into + r1 * r2 * kh * kw * out + r2 * n * out + (n * out if bias else 0)
