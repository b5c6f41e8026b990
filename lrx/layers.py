"""The low-rank expansion layers that replace an ``nn.Conv2d``.

Each layer holds only factors, as ordinary ``nn.Conv2d`` sub-modules (so ptflops, profilers and
``channels_last`` see plain convolutions), and is built from shapes alone: a saved expanded model is
rebuilt with the constructors and its state_dict loaded without re-running the decomposition.
``from_conv`` reads shape, stride, padding, dilation and bias off a conv, computes the factors
(:mod:`lrx.decomposition`) and fills them in.

Stride, padding and dilation split along the two axes: a dh x 1 conv carries the vertical ones, a
1 x dw conv the horizontal ones, and their composition is exactly the dh x dw conv with the
product kernel.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from . import decomposition as dec
from .errors import UserError


def _describe(conv: nn.Module, name: str | None) -> str:
    return f"layer {name}" if name else f"layer {conv!r}"


def check_convertible(conv: nn.Module, scheme: str, decomposed: bool = False, name: str | None = None) -> None:
    """Refuse, with a UserError naming the layer, a conv that the expansion cannot express exactly.

    Refused: anything but an ``nn.Conv2d``; ``groups > 1``; ``padding_mode`` other than zeros;
    a 1x1 kernel for the separable forms (scheme 2, scheme 1 decomposed); string padding other
    than "same"/"valid".
    """
    dec.check_choice(scheme, dec.SCHEMES, "scheme")
    where = _describe(conv, name)
    if not isinstance(conv, nn.Conv2d):
        raise UserError(f"{where}: only nn.Conv2d can be expanded, got {type(conv).__name__}")
    if conv.groups != 1:
        raise UserError(f"{where}: groups={conv.groups} is not supported (only groups=1 convs can be expanded)")
    if conv.padding_mode != "zeros":
        raise UserError(f"{where}: padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
    if isinstance(conv.padding, str) and conv.padding not in ("same", "valid"):
        raise UserError(f"{where}: padding={conv.padding!r} cannot be mapped (allowed: integers, 'same', 'valid')")
    separable = scheme == "v2" or decomposed
    if separable and tuple(conv.kernel_size) == (1, 1):
        form = "scheme v2" if scheme == "v2" else "scheme v1 with decomposed=True"
        raise UserError(f"{where}: a 1x1 kernel has no spatial extent to split; {form} needs a kernel larger than 1x1")


def _check_rank(conv: nn.Conv2d, scheme: str, basis: str, rank, name: str | None) -> None:
    top = dec.max_rank(conv, scheme, basis)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        what = "number of bases" if scheme == "v1" else "rank"
        raise UserError(f"{_describe(conv, name)}: {what} {rank!r} is out of range; allowed 1..{top} "
                        f"(the maximum rank for scheme {scheme}" + (f", basis {basis})" if scheme == "v1" else ")"))


def _split(stride, padding, dilation):
    """(full, vertical, horizontal) keyword sets for a dh x dw conv, its dh x 1 part and its 1 x dw part."""
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            ph = pw = 0
        elif padding == "same":
            # "same" (stride 1) keeps the size along each axis on its own, so each part keeps it too.
            full = dict(stride=(sh, sw), padding="same", dilation=(dh, dw))
            return full, dict(stride=(sh, 1), padding="same", dilation=(dh, 1)), \
                dict(stride=(1, sw), padding="same", dilation=(1, dw))
        else:
            raise UserError(f"padding={padding!r} cannot be mapped (allowed: integers, 'same', 'valid')")
    else:
        ph, pw = _pair(padding)
    return (dict(stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw)),
            dict(stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1)),
            dict(stride=(1, sw), padding=(0, pw), dilation=(1, dw)))


def _same_as_ints(kernel_size, dilation, padding):
    """'same' as integer padding where PyTorch would pad symmetrically; else unchanged."""
    if padding != "same":
        return padding
    totals = [d * (k - 1) for k, d in zip(_pair(kernel_size), _pair(dilation))]
    return tuple(t // 2 for t in totals) if all(t % 2 == 0 for t in totals) else padding


class LowRankExpConvV1(nn.Module):
    """Scheme 1: M basis filters per input channel, then a 1x1 combination into N outputs.

    ``basis`` (dh x dw, groups=C): C -> C*M, channel c*M + m = x_c * s_m^c;
    ``combine`` (1x1, carries the bias): C*M -> N with weight ``a[n, c, m]``.
    With ``decomposed=True`` the basis conv is ``spatial.vertical`` (dh x 1, groups=C) then
    ``spatial.horizontal`` (1 x dw, groups=C*M): each basis filter split into rank-1 factors.
    A shared basis is stored once per input channel so that fine-tuning can move each copy.

    Shapes: input (B, C, H, W) -> output (B, N, H', W'), H', W' as for the replaced conv.
    Cost per output position: C*M*dh*dw + C*M*N MACs (decomposed: C*M*(dh + dw) + C*M*N,
    the dh term counted on the H' x W rows of the intermediate).
    """

    scheme = "v1"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_bases: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, decomposed: bool = False, basis: str = "shared",
                 device=None, dtype=None):
        super().__init__()
        dec.check_choice(basis, dec.BASES, "basis")
        if isinstance(num_bases, bool) or not isinstance(num_bases, int) or num_bases < 1:
            raise UserError(f"num_bases must be an integer >= 1, got {num_bases!r}")
        kernel_size = _pair(kernel_size)
        if decomposed and kernel_size == (1, 1):
            raise UserError("LowRankExpConvV1 with decomposed=True needs a kernel larger than 1x1")
        padding = _same_as_ints(kernel_size, dilation, padding)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.rank, self.basis_kind, self.decomposed = num_bases, basis, decomposed
        full, vertical, horizontal = _split(stride, padding, dilation)
        self.stride, self.padding, self.dilation = full["stride"], full["padding"], full["dilation"]
        factory = dict(device=device, dtype=dtype)
        wide = in_channels * num_bases
        # The spatial part is chosen once here; forward is the same for both forms.
        if decomposed:
            self.spatial = nn.Sequential(OrderedDict(
                vertical=nn.Conv2d(in_channels, wide, (kernel_size[0], 1), groups=in_channels, bias=False,
                                   **vertical, **factory),
                horizontal=nn.Conv2d(wide, wide, (1, kernel_size[1]), groups=wide, bias=False, **horizontal, **factory),
            ))
        else:
            self.spatial = nn.Conv2d(in_channels, wide, kernel_size, groups=in_channels, bias=False, **full, **factory)
        self.combine = nn.Conv2d(wide, out_channels, 1, bias=bias, **factory)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, num_bases: int, basis: str = "shared", method: str = "svd",
                  decomposed: bool = False, name: str | None = None, **method_options) -> "LowRankExpConvV1":
        """The scheme 1 layer that approximates ``conv`` with ``num_bases`` basis filters.

        ``method``: "svd" (optimal filter reconstruction) or "alternating" (the paper's objective
        with a nuclear norm; ``method_options`` as :func:`lrx.decomposition.scheme1_alternating`).
        ``name`` is used in error messages. The layer is on ``conv``'s device and dtype.
        """
        dec.check_choice(basis, dec.BASES, "basis")
        check_convertible(conv, "v1", decomposed, name)
        _check_rank(conv, "v1", basis, num_bases, name)
        factors = dec.scheme1(conv.weight.detach(), num_bases, basis, method, **method_options)
        return cls.from_factors(conv, factors, decomposed=decomposed, basis=basis)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: dec.Scheme1Factors, decomposed: bool = False,
                     basis: str = "shared") -> "LowRankExpConvV1":
        """A layer with ``conv``'s geometry and bias, filled with ``factors`` (split if decomposed)."""
        bases, coeff = factors
        n, c, m = coeff.shape
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, m, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, decomposed, basis,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        if bases.dim() == 3:  # shared: one copy per input channel
            bases = bases.expand(c, *bases.shape)
        dh, dw = bases.shape[-2:]
        with torch.no_grad():
            if decomposed:
                vertical, horizontal = dec.separable_rank1(bases)
                layer.spatial.vertical.weight.copy_(vertical.reshape(c * m, 1, dh, 1))
                layer.spatial.horizontal.weight.copy_(horizontal.reshape(c * m, 1, 1, dw))
            else:
                layer.spatial.weight.copy_(bases.reshape(c * m, 1, dh, dw))
            layer.combine.weight.copy_(coeff.reshape(n, c * m, 1, 1))
            if conv.bias is not None:
                layer.combine.bias.copy_(conv.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.combine(self.spatial(x))

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """The (N, C, dh, dw) kernel of the conv this layer computes (float64)."""
        c, m = self.in_channels, self.rank
        if self.decomposed:
            v = self.spatial.vertical.weight.double()[:, 0, :, 0]  # (C*M, dh)
            h = self.spatial.horizontal.weight.double()[:, 0, 0, :]  # (C*M, dw)
            bases = v[:, :, None] * h[:, None, :]
        else:
            bases = self.spatial.weight.double()[:, 0]
        coeff = self.combine.weight.double().reshape(self.out_channels, c, m)
        return torch.einsum("ncm,cmhw->nchw", coeff, bases.reshape(c, m, *bases.shape[-2:]))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, scheme=v1, "
                f"rank={self.rank}, basis={self.basis_kind}, decomposed={self.decomposed}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.combine.bias is not None}")


class LowRankExpConvV2(nn.Module):
    """Scheme 2: a dh x 1 conv C -> K, then a 1 x dw conv K -> N carrying the bias.

    Shapes: input (B, C, H, W) -> output (B, N, H', W'), H', W' as for the replaced conv.
    Cost per output position: K*dw*N, plus K*C*dh on the H' x W rows of the intermediate.
    """

    scheme = "v2"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise UserError(f"rank must be an integer >= 1, got {rank!r}")
        kernel_size = _pair(kernel_size)
        if kernel_size == (1, 1):
            raise UserError("LowRankExpConvV2 needs a kernel larger than 1x1")
        padding = _same_as_ints(kernel_size, dilation, padding)
        self.in_channels, self.out_channels, self.kernel_size, self.rank = in_channels, out_channels, kernel_size, rank
        full, vertical, horizontal = _split(stride, padding, dilation)
        self.stride, self.padding, self.dilation = full["stride"], full["padding"], full["dilation"]
        factory = dict(device=device, dtype=dtype)
        self.vertical = nn.Conv2d(in_channels, rank, (kernel_size[0], 1), bias=False, **vertical, **factory)
        self.horizontal = nn.Conv2d(rank, out_channels, (1, kernel_size[1]), bias=bias, **horizontal, **factory)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, method: str = "svd", name: str | None = None) -> "LowRankExpConvV2":
        """The scheme 2 layer that approximates ``conv`` at ``rank`` (Tai et al.'s closed form).

        Only ``method="svd"``: it is the exact minimiser of the filter reconstruction error, so
        an iterative method has nothing to add. ``name`` is used in error messages.
        """
        dec.check_choice(method, dec.METHODS, "method")
        if method != "svd":
            raise UserError(f"{_describe(conv, name)}: method {method!r} applies to scheme v1 only; scheme v2's "
                            "SVD (method 'svd') is already the exact minimiser of the reconstruction error")
        check_convertible(conv, "v2", name=name)
        _check_rank(conv, "v2", "shared", rank, name)
        return cls.from_factors(conv, dec.scheme2_svd(conv.weight.detach(), rank))

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: dec.Scheme2Factors) -> "LowRankExpConvV2":
        """A layer with ``conv``'s geometry and bias, filled with ``factors``."""
        vertical, horizontal = factors
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, vertical.shape[0], conv.stride,
                    conv.padding, conv.dilation, conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.vertical.weight.copy_(vertical)
            layer.horizontal.weight.copy_(horizontal)
            if conv.bias is not None:
                layer.horizontal.bias.copy_(conv.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.horizontal(self.vertical(x))

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """The (N, C, dh, dw) kernel of the conv this layer computes (float64)."""
        return dec.scheme2_weight(dec.Scheme2Factors(self.vertical.weight.double(), self.horizontal.weight.double()))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, scheme=v2, "
                f"rank={self.rank}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.horizontal.bias is not None}")
