"""The low-rank expansion layers that replace an ``nn.Conv2d``.

Each layer holds only factors, as ordinary ``nn.Conv2d`` sub-modules (so ptflops, profilers and
``channels_last`` see plain convolutions), and is built from shapes alone: a saved expanded model is
rebuilt with the constructors and its state_dict loaded without re-running the decomposition.
``from_conv`` reads shape, stride, padding, dilation and bias off a conv, computes the factors
(:mod:`lrx.factor.decomposition`) and fills them in.

Stride, padding and dilation split along the two axes: a dh x 1 conv carries the vertical ones, a
1 x dw conv the horizontal ones, and their composition is exactly the dh x dw conv with the
product kernel.

Inference paths: ``layer.optimise_for(device)`` chooses once a faster exact way to run the layer on that
device (channels_last, prepacked weights, or one dense conv where that is faster; see :mod:`lrx.nn.inference`).
Until then, and wherever a path does not apply (autograd, CUDA, float64), ``forward`` runs the factors
as the plain convs they are.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from lrx.factor.decomposition import (BASES, METHODS, ORDERS, SCHEMES, Scheme1Factors, Scheme2Factors, check_choice,
                            check_rank, conv_macs, expanded_macs, max_rank, retained_energy, scheme1,
                            scheme2_svd, scheme2_weight, separable_rank1)
from lrx.base.errors import UserError
from lrx.nn.inference import Optimisable

__all__ = ["unsupported_reason", "check_convertible", "adds_macs", "factor_convs", "LowRankExpConvV1",
           "scheme2_factors", "choose_order", "LowRankExpConvV2"]


def _label(conv: nn.Module, name: str | None) -> str:
    """What error messages call a layer: its name, else the conv's repr."""
    return name if name else repr(conv)


def unsupported_reason(conv: nn.Module, scheme: str, decomposed: bool = False) -> str | None:
    """Why the expansion cannot replace ``conv`` usefully (one phrase), or None: the one rule behind
    :func:`check_convertible` (which refuses) and ``layers: auto`` / patterns (which skip with a note).

    Not replaceable: anything but an ``nn.Conv2d``; ``groups > 1`` (depthwise or grouped); ``padding_mode``
    other than zeros; string padding other than "same"/"valid"; a 1x1 kernel for the separable forms
    (scheme 2, scheme 1 decomposed), and for scheme 1 at all: its basis conv plus 1x1 combination cost
    C*M + C*M*N MACs per position against the conv's C*N, more at every rank.
    """
    check_choice(scheme, SCHEMES, "scheme")
    if not isinstance(conv, nn.Conv2d):
        return f"only nn.Conv2d can be expanded, got {type(conv).__name__}"
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        return f"groups={conv.groups} is not supported ({kind}; only groups=1 convs can be expanded)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')"
    if isinstance(conv.padding, str) and conv.padding not in ("same", "valid"):
        return f"padding={conv.padding!r} cannot be mapped (allowed: integers, 'same', 'valid')"
    if tuple(conv.kernel_size) == (1, 1):
        if scheme == "v2" or decomposed:
            form = "scheme v2" if scheme == "v2" else "scheme v1 with decomposed=True"
            return f"a 1x1 kernel has no spatial extent to split; {form} needs a kernel larger than 1x1"
        return ("a 1x1 conv: scheme v1 costs C*M + C*M*N MACs per position against its C*N, more at every rank "
                "(nothing to gain; scheme v1 needs a kernel larger than 1x1)")
    return None


def check_convertible(conv: nn.Module, scheme: str, decomposed: bool = False, name: str | None = None) -> None:
    """Refuse, with a UserError naming the layer, a conv the expansion cannot replace (:func:`unsupported_reason`)."""
    reason = unsupported_reason(conv, scheme, decomposed)
    if reason is not None:
        raise UserError(f"layer {_label(conv, name)}: {reason}")


def adds_macs(conv: nn.Conv2d, scheme: str, rank: int, decomposed: bool = False, order: str = "vh") -> bool:
    """Whether the expansion of ``conv`` at ``rank`` costs more MACs per output position than the conv itself
    (bias excluded: both add the same)."""
    shape = (conv.out_channels, conv.in_channels, *conv.kernel_size)
    dense = conv_macs(conv.in_channels, conv.out_channels, conv.kernel_size, (1, 1))
    return expanded_macs(shape, scheme, rank, _pair(conv.stride), (1, 1), decomposed, order, bias=False) > dense


def factor_convs(layer: nn.Module) -> list[nn.Conv2d]:
    """An expansion layer's factors, the plain ``nn.Conv2d`` modules it runs, in order (the last carries the
    bias): what :func:`lrx.output.export.to_plain` puts in an ``nn.Sequential`` in the layer's place."""
    return list(layer._factored_convs())


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


def _macs_per_position(layer: nn.Module, decomposed: bool = False, order: str = "vh") -> tuple[int, int]:
    """(dense conv, factors) MACs per output position of an expansion layer: for :meth:`Optimisable.optimise_for`.

    :func:`lrx.factor.decomposition.expanded_macs` on one output position (``out_hw=(1, 1)``) whose input is one
    stride step (``in_hw=stride``): the first 1-D conv strides along its own axis only, so it computes
    ``sw`` (vh, and scheme 1 decomposed) or ``sh`` (hv) positions per output position. No bias: both
    paths add the same N per position, and :data:`lrx.nn.inference.CPU_RATES` were fitted to counts without it.
    """
    shape = (layer.out_channels, layer.in_channels, *layer.kernel_size)
    dense = conv_macs(layer.in_channels, layer.out_channels, layer.kernel_size, (1, 1))
    return dense, expanded_macs(shape, layer.scheme, layer.rank, layer.stride, (1, 1), decomposed, order, bias=False)


class LowRankExpConvV1(Optimisable, nn.Module):
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

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, decomposed: bool = False, basis: str = "shared",
                 device=None, dtype=None):
        super().__init__()
        kernel_size = _pair(kernel_size)
        check_rank(rank, (out_channels, in_channels, *kernel_size), "v1", basis)
        if decomposed and kernel_size == (1, 1):
            raise UserError("LowRankExpConvV1 with decomposed=True needs a kernel larger than 1x1")
        padding = _same_as_ints(kernel_size, dilation, padding)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.rank, self.basis_kind, self.decomposed = rank, basis, decomposed
        full, vertical, horizontal = _split(stride, padding, dilation)
        self.stride, self.padding, self.dilation = full["stride"], full["padding"], full["dilation"]
        factory = dict(device=device, dtype=dtype)
        wide = in_channels * rank
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
    def from_conv(cls, conv: nn.Conv2d, rank: int, basis: str = "shared", method: str = "svd",
                  decomposed: bool = False, name: str | None = None, **method_options) -> "LowRankExpConvV1":
        """The scheme 1 layer that approximates ``conv`` with ``rank`` basis filters (per input channel).

        ``method``: "svd" (optimal filter reconstruction) or "alternating" (the paper's objective
        with a nuclear norm; ``method_options`` as :func:`lrx.factor.decomposition.scheme1_alternating`).
        ``name`` is used in error messages. The layer is on ``conv``'s device and dtype.
        """
        check_choice(basis, BASES, "basis")
        check_convertible(conv, "v1", decomposed, name)
        check_rank(rank, conv, "v1", basis, name=_label(conv, name))
        factors = scheme1(conv.weight.detach(), rank, basis, method, **method_options)
        return cls.from_factors(conv, factors, decomposed=decomposed, basis=basis)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: Scheme1Factors, decomposed: bool = False,
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
                vertical, horizontal = separable_rank1(bases)
                layer.spatial.vertical.weight.copy_(vertical.reshape(c * m, 1, dh, 1))
                layer.spatial.horizontal.weight.copy_(horizontal.reshape(c * m, 1, 1, dw))
            else:
                layer.spatial.weight.copy_(bases.reshape(c * m, 1, dh, dw))
            layer.combine.weight.copy_(coeff.reshape(n, c * m, 1, 1))
            if conv.bias is not None:
                layer.combine.bias.copy_(conv.bias)
        return layer

    def plain_forward(self, x: Tensor) -> Tensor:
        return self.combine(self.spatial(x))

    def _factored_convs(self) -> list:
        spatial = [self.spatial.vertical, self.spatial.horizontal] if self.decomposed else [self.spatial]
        return [*spatial, self.combine]

    def _macs_per_position(self) -> tuple[int, int]:
        return _macs_per_position(self, decomposed=self.decomposed)

    @torch.no_grad()
    def basis_filters(self) -> Tensor:
        """The layer's spatial basis filters, (K, dh, dw), for pictures.

        Shared basis: the M bases as stored for input channel 0 (every channel starts with the same M;
        fine-tuning may move each copy). Per-channel: the bases of channel 0, then channel 1, ...,
        the first 16 of the C*M. Decomposed: each is the outer product ``v h^T`` of its dh x 1 and
        1 x dw factors, i.e. the rank-1 filter the layer applies. Channel c's slice of the kernel is
        ``W[n, c] = sum_m a[n, c, m] * s_m^c`` with these ``s``.
        """
        count = self.rank if self.basis_kind == "shared" else min(16, self.in_channels * self.rank)
        if self.decomposed:
            v = self.spatial.vertical.weight[:count, 0, :, 0]  # (K, dh)
            h = self.spatial.horizontal.weight[:count, 0, 0, :]  # (K, dw)
            return v[:, :, None] * h[:, None, :]
        return self.spatial.weight[:count, 0].clone()

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
                f"padding={self.padding}, dilation={self.dilation}, bias={self.combine.bias is not None}"
                + self._path_repr())


def scheme2_factors(weight: Tensor, rank: int, order: str = "vh") -> Scheme2Factors:
    """Scheme 2 factors of ``weight`` (N, C, dh, dw) at ``rank``, in the layer's own weight shapes.

    ``order="vh"`` (vertical first): Tai et al.'s closed form on W as the (C*dh) x (N*dw) matrix;
    vertical (K, C, dh, 1), horizontal (N, K, 1, dw), as :func:`lrx.factor.decomposition.scheme2_svd`.
    ``order="hv"`` (horizontal first): the same closed form on W as the (C*dw) x (N*dh) matrix
    (the kernel transposed); horizontal (K, C, 1, dw) runs first, vertical (N, K, dh, 1) second.
    The two orders approximate W differently, so at the same rank their errors differ.
    """
    check_choice(order, ORDERS[:2], "order")
    if order == "vh":
        return scheme2_svd(weight, rank)
    first, second = scheme2_svd(weight.transpose(2, 3), rank)  # (K, C, dw, 1), (N, K, 1, dh)
    return Scheme2Factors(vertical=second.transpose(2, 3).contiguous(), horizontal=first.transpose(2, 3).contiguous())


def choose_order(weight: Tensor, rank: int, stride) -> str:
    """"auto": the order with fewer MACs per output position; on a tie the smaller reconstruction error; then "vh"."""
    shape = tuple(weight.shape)
    valid = [o for o in ORDERS[:2] if rank <= max_rank(shape, "v2", order=o)]
    if len(valid) == 1:
        return valid[0]
    # Per output position, as the layer's path choice counts them (the bias is the same in both orders).
    macs = {o: expanded_macs(shape, "v2", rank, _pair(stride), (1, 1), order=o, bias=False) for o in valid}
    if macs["vh"] != macs["hv"]:
        return min(macs, key=macs.get)
    kept = {"vh": retained_energy(weight, "v2")[rank - 1].item(),
            "hv": retained_energy(weight.transpose(2, 3), "v2")[rank - 1].item()}
    return "hv" if kept["hv"] > kept["vh"] * (1 + 1e-9) else "vh"


class LowRankExpConvV2(Optimisable, nn.Module):
    """Scheme 2: a dh x 1 conv C -> K, then a 1 x dw conv K -> N carrying the bias (``order="vh"``).

    With ``order="hv"`` the 1 x dw conv runs first (``horizontal``: C -> K) and the dh x 1 conv second
    (``vertical``: K -> N, carrying the bias): the kernel is factored transposed (see
    :func:`scheme2_factors`). ``vertical`` is always the dh x 1 conv and ``horizontal`` the 1 x dw one.

    Shapes: input (B, C, H, W) -> output (B, N, H', W'), H', W' as for the replaced conv.
    Cost per output position (vh): K*dw*N, plus K*C*dh on the H' x W rows of the intermediate;
    (hv): K*dh*N, plus K*C*dw on the H x W' columns of the intermediate.
    """

    scheme = "v2"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, device=None, dtype=None, order: str = "vh"):
        super().__init__()
        check_choice(order, ORDERS[:2], "order")
        kernel_size = _pair(kernel_size)
        check_rank(rank, (out_channels, in_channels, *kernel_size), "v2", order=order)
        if kernel_size == (1, 1):
            raise UserError("LowRankExpConvV2 needs a kernel larger than 1x1")
        padding = _same_as_ints(kernel_size, dilation, padding)
        self.in_channels, self.out_channels, self.kernel_size, self.rank = in_channels, out_channels, kernel_size, rank
        self.order = order
        full, vertical, horizontal = _split(stride, padding, dilation)
        self.stride, self.padding, self.dilation = full["stride"], full["padding"], full["dilation"]
        factory = dict(device=device, dtype=dtype)
        (dh, dw) = kernel_size
        if order == "vh":
            self.vertical = nn.Conv2d(in_channels, rank, (dh, 1), bias=False, **vertical, **factory)
            self.horizontal = nn.Conv2d(rank, out_channels, (1, dw), bias=bias, **horizontal, **factory)
        else:
            self.horizontal = nn.Conv2d(in_channels, rank, (1, dw), bias=False, **horizontal, **factory)
            self.vertical = nn.Conv2d(rank, out_channels, (dh, 1), bias=bias, **vertical, **factory)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, method: str = "svd", name: str | None = None,
                  order: str = "vh") -> "LowRankExpConvV2":
        """The scheme 2 layer that approximates ``conv`` at ``rank`` (Tai et al.'s closed form).

        Only ``method="svd"``: it is the exact minimiser of the filter reconstruction error, so
        an iterative method has nothing to add. ``name`` is used in error messages.
        ``order``: "vh" (vertical first, the default), "hv" (horizontal first, the kernel factored
        transposed), or "auto": the order with fewer MACs per output position (they differ only for
        non-square kernels or strides), on a tie the one with the smaller reconstruction error at this
        rank. The choice is recorded in ``layer.order``; rebuild the structure with the same ``order``.
        """
        check_choice(method, METHODS, "method")
        if method != "svd":
            raise UserError(f"layer {_label(conv, name)}: method {method!r} applies to scheme v1 only; scheme v2's "
                            "SVD (method 'svd') is already the exact minimiser of the reconstruction error")
        check_choice(order, ORDERS, "order")
        check_convertible(conv, "v2", name=name)
        check_rank(rank, conv, "v2", order=order, name=_label(conv, name))  # "auto": the larger order's maximum
        weight = conv.weight.detach()
        if order == "auto":
            order = choose_order(weight, rank, conv.stride)
        return cls.from_factors(conv, scheme2_factors(weight, rank, order), order=order)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: Scheme2Factors, order: str = "vh") -> "LowRankExpConvV2":
        """A layer with ``conv``'s geometry and bias, filled with ``factors`` (as :func:`scheme2_factors` gives them)."""
        vertical, horizontal = factors
        rank = vertical.shape[0] if order == "vh" else horizontal.shape[0]
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, conv.stride,
                    conv.padding, conv.dilation, conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype, order=order)
        with torch.no_grad():
            layer.vertical.weight.copy_(vertical)
            layer.horizontal.weight.copy_(horizontal)
            if conv.bias is not None:
                layer._factored_convs()[-1].bias.copy_(conv.bias)
        return layer

    def plain_forward(self, x: Tensor) -> Tensor:
        if self.order == "vh":
            return self.horizontal(self.vertical(x))
        return self.vertical(self.horizontal(x))

    def _factored_convs(self) -> list:
        return [self.vertical, self.horizontal] if self.order == "vh" else [self.horizontal, self.vertical]

    def _macs_per_position(self) -> tuple[int, int]:
        return _macs_per_position(self, order=self.order)

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """The (N, C, dh, dw) kernel of the conv this layer computes (float64)."""
        if self.order == "vh":
            return scheme2_weight(Scheme2Factors(self.vertical.weight.double(), self.horizontal.weight.double()))
        first = self.horizontal.weight.double()[:, :, 0, :]  # (K, C, dw)
        second = self.vertical.weight.double()[:, :, :, 0]  # (N, K, dh)
        return torch.einsum("kcw,nkh->nchw", first, second)

    @torch.no_grad()
    def basis_filters(self) -> Tensor:
        """The K rank-1 filters that make up the kernel from input channel 0 to output channel 0, (K, dh, dw).

        Filter k is the outer product of the k-th vertical filter (its dh taps on input channel 0; in
        order "hv", its taps into output channel 0) and the k-th horizontal filter (its dw taps into
        output channel 0; in order "hv", on input channel 0). Their sum is the layer's kernel slice
        ``dense_weight()[0, 0]``. Other channel pairs use the same K filters' shapes with other weights,
        so this shows what the K intermediate channels look for, not a basis shared by every channel.
        """
        if self.order == "vh":
            v = self.vertical.weight[:, 0, :, 0]  # (K, dh)
            h = self.horizontal.weight[0, :, 0, :]  # (K, dw)
        else:
            v = self.vertical.weight[0, :, :, 0]  # (K, dh)
            h = self.horizontal.weight[:, 0, 0, :]  # (K, dw)
        return v[:, :, None] * h[:, None, :]

    def extra_repr(self) -> str:
        bias = self._factored_convs()[-1].bias is not None
        order = f", order={self.order}" if self.order != "vh" else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, scheme=v2, "
                f"rank={self.rank}{order}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={bias}" + self._path_repr())
