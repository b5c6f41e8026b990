"""The low-rank expansion layers that replace an ``nn.Conv2d``.

Each layer holds only factors, as ordinary ``nn.Conv2d`` sub-modules (so ptflops, profilers and
``channels_last`` see plain convolutions), and is built from shapes alone: a saved expanded model is
rebuilt with the constructors and its state_dict loaded without re-running the decomposition.
``from_conv`` reads shape, stride, padding, dilation and bias off a conv, computes the factors
(:mod:`lrx.decomposition`) and fills them in.

Stride, padding and dilation split along the two axes: a dh x 1 conv carries the vertical ones, a
1 x dw conv the horizontal ones, and their composition is exactly the dh x dw conv with the
product kernel.

Inference paths: ``layer.optimise_for(device)`` chooses once a faster exact way to run the layer on that
device (channels_last, prepacked weights, or one dense conv where that is faster; see :mod:`lrx.speed`).
Until then, and wherever a path does not apply (autograd, CUDA, float64), ``forward`` runs the factors
as the plain convs they are.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from . import decomposition as dec
from . import speed
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


def _out_shape(conv: nn.Conv2d, shape):
    """(B, N, H', W') that ``conv`` produces from an input of ``shape``; None if unknown."""
    if shape is None or isinstance(conv.padding, str):
        return None
    b, _, h, w = shape
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip((h, w), conv.padding, conv.dilation, conv.kernel_size, conv.stride)]
    return (b, conv.out_channels, *size)


def _stages(convs, input_shape, prepack: bool) -> list:
    """One CPU stage per conv, in order (the intermediate shapes passed on as layout hints)."""
    stages, shape = [], input_shape
    for conv in convs:
        stages.append(speed.conv_stage(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                       conv.groups, shape, prepack))
        shape = _out_shape(conv, shape)
    return stages


class _Optimisable:
    """What both expansion layers share: choosing an inference path once, and running it where it applies."""

    _fast: "speed.FastPath | None" = None

    def _factored_convs(self) -> list:
        raise NotImplementedError

    def _macs_per_position(self) -> tuple[float, float]:
        """(dense conv, factors) MACs per output position, the intermediate counted at the stride it runs at."""
        raise NotImplementedError

    @property
    def inference_path(self) -> str:
        """The path chosen by :meth:`optimise_for`: "default", "factored" or "dense"."""
        return self._fast.kind if self._fast is not None else "default"

    def optimise_for(self, device=None, input_shape=None, path: str = "auto", prepack: bool = True):
        """Choose, once, how this layer runs inference on ``device``; returns the layer.

        Parameters
        ----------
        device : "cpu", "cuda", a torch.device, or None for the device of the layer's weights. Only the
            CPU has fast paths (see :mod:`lrx.speed`); elsewhere the default forward is kept.
        input_shape : optional (B, C, H, W) the layer will see: a layout hint for prepacked weights, and
            the batch size that decides whether NNPACK may run a dense conv (from batch 16). Any input
            shape gives the right result.
        path : "auto" (the factors, or one dense conv where :func:`lrx.speed.prefer_dense` predicts it
            faster), "factored" (the factors, NHWC, prepacked), "dense" (one conv with
            :meth:`dense_weight`), or "default" (no path: plain forward).
        prepack : allow oneDNN prepacked weights (else plain F.conv2d in channels_last).

        Every path computes the default forward's function to float32 rounding. The path is a
        snapshot rebuilt whenever the weights change; it is used only under no autograd
        (``torch.no_grad``/``inference_mode``) on CPU float32 inputs, and is not in the state_dict.
        """
        speed.check_path(path)
        if device is None:
            device = next(self.parameters()).device
        if path == "default" or not speed.cpu_device(device):
            self._fast = None
            return self
        if path == "auto":
            dense, factored = self._macs_per_position()
            nnpack = speed.nnpack_for(stride=self.stride, padding=self.padding, dilation=self.dilation,
                                      kernel_size=self.kernel_size) and speed.nnpack_batch(input_shape)
            path = "dense" if speed.prefer_dense(dense, factored, self.scheme, nnpack) else "factored"
        self._fast = speed.FastPath(path, tuple(input_shape) if input_shape is not None else None, prepack)
        return self

    def _fast_stages(self, kind: str, input_shape, prepack: bool) -> list:
        """The CPU stages of path ``kind``, from the current weights (called by :class:`lrx.speed.FastPath`)."""
        if kind == "dense":
            bias = self._factored_convs()[-1].bias
            return [speed.conv_stage(self.dense_weight().float(), bias, self.stride, self.padding, self.dilation,
                                     1, input_shape, prepack, nnpack=True)]
        return _stages(self._factored_convs(), input_shape, prepack)

    def _run(self, x: Tensor):
        """The chosen path's output, or None where no path applies."""
        fast = self._fast
        if fast is not None and fast.applies(self, x):
            return fast(self, x)
        return None

    def _path_repr(self) -> str:
        return f", path={self.inference_path}" if self._fast is not None else ""


class LowRankExpConvV1(_Optimisable, nn.Module):
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
        fast = self._run(x)
        return fast if fast is not None else self.combine(self.spatial(x))

    def _factored_convs(self) -> list:
        spatial = [self.spatial.vertical, self.spatial.horizontal] if self.decomposed else [self.spatial]
        return [*spatial, self.combine]

    def _macs_per_position(self) -> tuple[float, float]:
        c, n, m, (dh, dw) = self.in_channels, self.out_channels, self.rank, self.kernel_size
        # The vertical part of a decomposed basis runs on H' x W: W / W' ~ the horizontal stride.
        spatial = c * m * (dh * self.stride[1] + dw) if self.decomposed else c * m * dh * dw
        return n * c * dh * dw, spatial + c * m * n

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


ORDERS = ("vh", "hv", "auto")


def scheme2_max_rank(weight_shape, order: str = "vh") -> int:
    """The largest rank of scheme 2 in ``order``: min(C*dh, N*dw) vertical first, min(C*dw, N*dh) horizontal
    first; for "auto" the larger of the two (the order is chosen per rank)."""
    n, c, dh, dw = weight_shape
    ranks = {"vh": min(c * dh, n * dw), "hv": min(c * dw, n * dh)}
    return max(ranks.values()) if order == "auto" else ranks[order]


def scheme2_factors(weight: Tensor, rank: int, order: str = "vh") -> dec.Scheme2Factors:
    """Scheme 2 factors of ``weight`` (N, C, dh, dw) at ``rank``, in the layer's own weight shapes.

    ``order="vh"`` (vertical first): Tai et al.'s closed form on W as the (C*dh) x (N*dw) matrix;
    vertical (K, C, dh, 1), horizontal (N, K, 1, dw), as :func:`lrx.decomposition.scheme2_svd`.
    ``order="hv"`` (horizontal first): the same closed form on W as the (C*dw) x (N*dh) matrix
    (the kernel transposed); horizontal (K, C, 1, dw) runs first, vertical (N, K, dh, 1) second.
    The two orders approximate W differently, so at the same rank their errors differ.
    """
    dec.check_choice(order, ORDERS[:2], "order")
    if order == "vh":
        return dec.scheme2_svd(weight, rank)
    first, second = dec.scheme2_svd(weight.transpose(2, 3), rank)  # (K, C, dw, 1), (N, K, 1, dh)
    return dec.Scheme2Factors(vertical=second.transpose(2, 3).contiguous(), horizontal=first.transpose(2, 3).contiguous())


def _check_v2_rank(conv: nn.Conv2d, rank, order: str, name: str | None) -> None:
    top = scheme2_max_rank(conv.weight.shape, order)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        raise UserError(f"{_describe(conv, name)}: rank {rank!r} is out of range; allowed 1..{top} "
                        f"(the maximum rank for scheme v2" + (", order hv)" if order == "hv" else ")"))


def choose_order(weight: Tensor, rank: int, stride) -> str:
    """"auto": the order with fewer MACs per output position; on a tie the smaller reconstruction error; then "vh"."""
    n, c, dh, dw = weight.shape
    sh, sw = stride
    valid = [o for o in ORDERS[:2] if rank <= scheme2_max_rank(weight.shape, o)]
    if len(valid) == 1:
        return valid[0]
    macs = {"vh": rank * (c * dh * sw + n * dw), "hv": rank * (c * dw * sh + n * dh)}
    if macs["vh"] != macs["hv"]:
        return min(macs, key=macs.get)
    kept = {"vh": dec.retained_energy(weight, "v2")[rank - 1].item(),
            "hv": dec.retained_energy(weight.transpose(2, 3), "v2")[rank - 1].item()}
    return "hv" if kept["hv"] > kept["vh"] * (1 + 1e-9) else "vh"


class LowRankExpConvV2(_Optimisable, nn.Module):
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
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise UserError(f"rank must be an integer >= 1, got {rank!r}")
        dec.check_choice(order, ORDERS[:2], "order")
        kernel_size = _pair(kernel_size)
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
        dec.check_choice(method, dec.METHODS, "method")
        if method != "svd":
            raise UserError(f"{_describe(conv, name)}: method {method!r} applies to scheme v1 only; scheme v2's "
                            "SVD (method 'svd') is already the exact minimiser of the reconstruction error")
        dec.check_choice(order, ORDERS, "order")
        check_convertible(conv, "v2", name=name)
        weight = conv.weight.detach()
        if order == "auto":
            _check_v2_rank(conv, rank, max(ORDERS[:2], key=lambda o: scheme2_max_rank(weight.shape, o)), name)
            order = choose_order(weight, rank, _pair(conv.stride))
        _check_v2_rank(conv, rank, order, name)
        return cls.from_factors(conv, scheme2_factors(weight, rank, order), order=order)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: dec.Scheme2Factors, order: str = "vh") -> "LowRankExpConvV2":
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

    def forward(self, x: Tensor) -> Tensor:
        fast = self._run(x)
        if fast is not None:
            return fast
        if self.order == "vh":
            return self.horizontal(self.vertical(x))
        return self.vertical(self.horizontal(x))

    def _factored_convs(self) -> list:
        return [self.vertical, self.horizontal] if self.order == "vh" else [self.horizontal, self.vertical]

    def _macs_per_position(self) -> tuple[float, float]:
        c, n, k, (dh, dw), (sh, sw) = self.in_channels, self.out_channels, self.rank, self.kernel_size, self.stride
        factored = k * (c * dh * sw + n * dw) if self.order == "vh" else k * (c * dw * sh + n * dh)
        return n * c * dh * dw, factored

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """The (N, C, dh, dw) kernel of the conv this layer computes (float64)."""
        if self.order == "vh":
            return dec.scheme2_weight(dec.Scheme2Factors(self.vertical.weight.double(), self.horizontal.weight.double()))
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
