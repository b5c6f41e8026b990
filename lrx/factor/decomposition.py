"""Filter reconstruction for low-rank expansions: plain functions on conv weight tensors.

(This module is long because the rank and MAC rules that every module uses sit with the math they describe.)

A conv weight ``W`` is ``(N, C, dh, dw)``: N output channels, C input channels, a dh x dw kernel;
``W_n^c`` is the dh x dw slice of filter n on input channel c.

Scheme 1 (Jaderberg et al. 2014) approximates every slice by M basis filters:
``W_n^c ~ sum_m a[n, c, m] s_m`` (``basis="shared"``) or ``sum_m a[n, c, m] s_m^c`` (``"per-channel"``).
Scheme 2 (same paper; closed form of Tai et al. 2016) writes
``W[n, c, i, j] ~ sum_k v[k, c, i] h[n, k, j]``: a dh x 1 conv C -> K, then a 1 x dw conv K -> N.

Every factorisation runs under ``torch.no_grad`` in float64 (small singular values matter for the
error and for the rank plans) and is cast back to the weight's dtype and device.
The MAC formulas at the end count what ptflops counts for the ``nn.Conv2d`` modules of each layer.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, NamedTuple

import torch
from torch import Tensor, nn

from lrx.base.errors import UserError
from lrx.factor.choices import (ALTERNATING_DEFAULTS, BASES, MAX_ITERATIONS, METHOD_OPTIONS, METHODS, ORDERS,
                                SCHEMES, check_choice, check_method_options)

__all__ = ["SCHEMES", "BASES", "METHODS", "ORDERS", "ALTERNATING_DEFAULTS", "Scheme1Factors", "Scheme2Factors",
           "METHOD_OPTIONS", "MAX_ITERATIONS", "check_method_options", "check_choice", "max_rank", "check_rank",
           "scheme1_svd", "scheme1_alternating", "scheme1", "scheme1_weight", "separable_rank1", "energy_first_sv",
           "scheme2_svd", "scheme2_weight", "retained_energy", "conv_macs", "original_macs", "expanded_macs"]

class Scheme1Factors(NamedTuple):
    """Scheme 1 factors: ``W_hat[n, c] = sum_m coefficients[n, c, m] * bases[(c,) m]``."""

    bases: Tensor  # (M, dh, dw) shared, or (C, M, dh, dw) per-channel
    coefficients: Tensor  # (N, C, M)


class Scheme2Factors(NamedTuple):
    """Scheme 2 factors: ``W_hat[n, c, i, j] = sum_k vertical[k, c, i, 0] * horizontal[n, k, 0, j]``."""

    vertical: Tensor  # (K, C, dh, 1)
    horizontal: Tensor  # (N, K, 1, dw)


# ----------------------------------------------------------------------------------------- checks


def _check_weight(weight: Tensor) -> None:
    assert weight.dim() == 4, f"a conv weight is (N, C, dh, dw), got shape {tuple(weight.shape)}"


def _shape(conv_or_shape) -> tuple[int, int, int, int]:
    """(N, C, dh, dw) of an ``nn.Conv2d`` or of a weight shape."""
    n, c, dh, dw = conv_or_shape.weight.shape if isinstance(conv_or_shape, nn.Module) else conv_or_shape
    return n, c, dh, dw


def max_rank(conv_or_shape, scheme: str, basis: str = "shared", order: str = "vh") -> int:
    """The largest useful rank of a conv (an ``nn.Conv2d`` or a weight shape (N, C, dh, dw)).

    Scheme 1 (``order`` unused): shared basis min(N*C, dh*dw), per-channel min(N, dh*dw).
    Scheme 2 (``basis`` unused): vertical first (``order="vh"``) min(C*dh, N*dw), horizontal first
    (``"hv"``) min(C*dw, N*dh), ``"auto"`` (the order chosen per layer) the larger of the two.
    At this rank the expansion reproduces the conv exactly.
    """
    check_choice(scheme, SCHEMES, "scheme")
    n, c, dh, dw = _shape(conv_or_shape)
    if scheme == "v2":
        check_choice(order, ORDERS, "order")
        tops = {"vh": min(c * dh, n * dw), "hv": min(c * dw, n * dh)}
        return max(tops.values()) if order == "auto" else tops[order]
    check_choice(basis, BASES, "basis")
    return min(n * c, dh * dw) if basis == "shared" else min(n, dh * dw)


def check_rank(rank, conv_or_shape, scheme: str, basis: str = "shared", order: str = "vh",
               name: str | None = None) -> None:
    """Refuse, with a UserError, a rank that is not an integer in 1..:func:`max_rank` (bools are refused).

    The one rank check of lrx: e.g. ``layer conv2: rank 99 is out of range; allowed 1..48 (the maximum
    for scheme v2, order vh)``; without ``name`` the message has no "layer ...: " prefix.
    """
    top = max_rank(conv_or_shape, scheme, basis, order)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        where = f"layer {name}: " if name else ""
        option = f"basis {basis}" if scheme == "v1" else f"order {order}"
        raise UserError(f"{where}rank {rank!r} is out of range; allowed 1..{top} "
                        f"(the maximum for scheme {scheme}, {option})")


# ---------------------------------------------------------------------------------------- threads


@contextlib.contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    """Run CPU work on one intra-op thread, restoring the caller's count afterwards.

    The matrices here are small (at most a few hundred rows wide) and the alternating loop is
    thousands of tiny ops, where thread hand-offs cost more than the work, and far more when
    other processes share the cores. Measured on a busy 2-core machine: a 320 x 960 float64
    SVD took 8.4 s on two threads and 0.15 s on one; AlexNet conv2-5 alternating per-channel
    took 71 s on two threads and 5.8 s on one. A side benefit: the factors are then the same
    bit for bit whatever thread count the caller runs with. (torch's thread count is
    process-wide; it is restored on exit.)
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _one_thread(fn):
    """Decorator: run ``fn(tensor, ...)`` under :func:`_single_thread` for the tensor's device."""

    @functools.wraps(fn)
    def wrapper(tensor, *args, **kwargs):
        with _single_thread(tensor.device):
            return fn(tensor, *args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------- scheme 1


def _slices(weight: Tensor, basis: str) -> Tensor:
    """Filter slices as a batch of matrices (B, P, dh*dw): B=1, P=N*C (shared) or B=C, P=N (per-channel)."""
    n, c, dh, dw = weight.shape
    if basis == "shared":
        return weight.reshape(1, n * c, dh * dw)
    return weight.permute(1, 0, 2, 3).reshape(c, n, dh * dw)


def _to_factors(coeff: Tensor, bases: Tensor, weight: Tensor, basis: str) -> Scheme1Factors:
    """(B, P, M) coefficients and (B, M, dh*dw) bases back to the public shapes, in weight's dtype."""
    n, c, dh, dw = weight.shape
    m = bases.shape[1]
    if basis == "shared":
        bases_out, coeff_out = bases[0].reshape(m, dh, dw), coeff[0].reshape(n, c, m)
    else:
        bases_out, coeff_out = bases.reshape(c, m, dh, dw), coeff.permute(1, 0, 2)
    return Scheme1Factors(bases_out.to(weight.dtype).contiguous(), coeff_out.to(weight.dtype).contiguous())


@torch.no_grad()
@_one_thread
def scheme1_svd(weight: Tensor, rank: int, basis: str = "shared") -> Scheme1Factors:
    """Scheme 1 by truncated SVD: the optimum of the filter reconstruction error (Eckart-Young).

    Parameters
    ----------
    weight : (N, C, dh, dw) conv weight.
    rank : M, the number of basis filters (per input channel for ``basis="per-channel"``).
    basis : ``"shared"``: rank-M SVD of the (N*C) x (dh*dw) matrix of all filter slices;
        ``"per-channel"``: for each input channel c, rank-M SVD of its N x (dh*dw) matrix.

    Returns
    -------
    Scheme1Factors with bases (M, dh, dw) or (C, M, dh, dw), each of unit Frobenius norm, and
    coefficients (N, C, M).
    """
    _check_weight(weight)
    check_rank(rank, tuple(weight.shape), "v1", basis)  # checks the basis too
    u, s, vh = torch.linalg.svd(_slices(weight.double(), basis), full_matrices=False)
    return _to_factors(u[..., :rank] * s[..., None, :rank], vh[..., :rank, :], weight, basis)


def _svt(z: Tensor, threshold: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Singular value thresholding of each filter: the proximal map of ``threshold * ||.||_*``.

    z (B, dh*dw), threshold (B,) -> (filters (B, dh*dw), their singular values (B, min(dh, dw))).
    Computed from the eigendecomposition of the smaller Gram matrix of each filter, about three
    times faster than a batched SVD for 3x3 filters.
    """
    dh, dw = shape
    f = z.reshape(-1, dh, dw)
    if dh > dw:
        f = f.mT
    evals, evecs = torch.linalg.eigh(f @ f.mT)  # f = U diag(sigma) V^T, f f^T = U diag(sigma^2) U^T
    sigma = evals.clamp_min(0).sqrt()
    shrunk = (sigma - threshold[:, None]).clamp_min(0)
    factor = torch.where(sigma > 0, shrunk / sigma.clamp_min(1e-300), torch.zeros_like(sigma))
    out = (evecs * factor[:, None, :]) @ evecs.mT @ f  # U diag(shrunk) V^T
    if dh > dw:
        out = out.mT
    return out.reshape(z.shape), shrunk


@torch.no_grad()
def scheme1_alternating(
    weight: Tensor,
    rank: int,
    basis: str = "shared",
    lam: float = ALTERNATING_DEFAULTS["lam"],
    lam_start: float | None = ALTERNATING_DEFAULTS["lam_start"],
    lam_growth: float = ALTERNATING_DEFAULTS["lam_growth"],
    iterations: int = ALTERNATING_DEFAULTS["iterations"],
    tol: float = ALTERNATING_DEFAULTS["tol"],
) -> Scheme1Factors:
    """Scheme 1 by the paper's objective, with a nuclear-norm push towards separable bases.

    For each set of basis filters (one set shared by all of W, or one per input channel c
    serving W[:, c]) with T the matrix of the slices it serves, minimises

        ||T - sum_m a_m s_m^T||_F^2 / ||T||_F^2  +  lam * sum_m ||a_m||_2 ||s_m||_*

    over the coefficient vectors a_m and basis filters s_m. This is the paper's objective with
    each coefficient vector normalised to unit length (the penalty is then lam * sum ||s_m||_*).
    As written in the paper the penalty is not scale invariant: shrinking s_m and growing a_m
    drives it to zero without changing W_hat. Dividing by ||T||^2 makes ``lam`` mean the same
    for every layer and both bases. The penalty also stops bases from cancelling each other
    with large coefficients, and it may switch a weak basis filter off (zero).

    Starts from the SVD solution, then block coordinate descent, each step exact:
      - basis s_m (others fixed): singular value thresholding of its least-squares target
        ``z = R_m^T a_m / ||a_m||^2`` (R_m = T minus the other terms) by ``lam / (2 ||a_m||)``;
      - coefficients a_m (others fixed): the least-squares ``R_m s_m / ||s_m||^2``, shrunk
        towards zero by the group soft threshold of the penalty.
    So at a fixed ``lam`` the objective never rises. The coefficients are kept as A = T Phi
    (true of the SVD start and kept by both updates), so a step touches only the (dh*dw) x
    (dh*dw) Gram matrix T^T T, never the N*C rows of T. With ``lam=0`` the steps are
    alternating least squares and the SVD start is a fixed point.

    Parameters
    ----------
    weight : (N, C, dh, dw) conv weight.
    rank : M, the number of basis filters.
    basis : "shared" or "per-channel", as in :func:`scheme1_svd`.
    lam : weight of the nuclear norm (dimensionless, see above).
    lam_start : the weight of the first iteration; it grows by ``lam_growth`` per iteration
        until it reaches ``lam`` (a continuation that moves the bases gradually away from the
        SVD solution). None: ``lam / 100``. Set it to ``lam`` for a constant weight.
    lam_growth : factor (>= 1) by which the weight grows per iteration while below ``lam``.
    iterations : maximum number of sweeps over the M bases and coefficients.
    tol : stop once the weight has reached ``lam`` and the objective changes by less than
        ``tol`` (relative) between sweeps.

    Returns
    -------
    Scheme1Factors, shapes as in :func:`scheme1_svd`; each basis filter has unit Frobenius
    norm, or is zero where the penalty switched it off.
    """
    _check_weight(weight)
    check_rank(rank, tuple(weight.shape), "v1", basis)  # checks the basis too
    check_method_options("alternating", dict(lam=lam, lam_start=lam_start, lam_growth=lam_growth,
                                             iterations=iterations, tol=tol))
    return _block_descent(weight, rank, basis, lam, lam_start, lam_growth, iterations, tol)


@_one_thread
def _block_descent(weight, rank, basis, lam, lam_start, lam_growth, iterations, tol) -> Scheme1Factors:
    """The loop of :func:`scheme1_alternating` (arguments checked there)."""
    shape = tuple(weight.shape[2:])
    target = _slices(weight.double(), basis)  # (B, P, D)
    scale = target.square().sum((-1, -2)).clamp_min(1e-300)  # ||T_b||^2, (B,)
    gram = target.mT @ target / scale[:, None, None]  # Q = T'^T T' for T' = T / ||T||, (B, D, D)
    vh = torch.linalg.svd(target, full_matrices=False)[2][..., :rank, :]
    bases = vh.clone()  # S (B, M, D), unit rows
    phi = vh.mT.clone()  # A' = T' Phi; at the SVD solution A' = U diag(s) / ||T|| = T' V
    nuclear = torch.linalg.svdvals(bases.reshape(*bases.shape[:2], *shape)).sum(-1)  # ||s_m||_*, (B, M)

    def products(phi):
        q_phi = gram @ phi  # (B, D, M)
        return q_phi.mT, phi.mT @ q_phi  # A'^T T' (B, M, D), A'^T A' (B, M, M)

    def objective(lam_now):
        a_t, a_a = products(phi)
        error = 1 - 2 * (a_t * bases).sum((-1, -2)) + (a_a * (bases @ bases.mT)).sum((-1, -2))
        amplitude = a_a.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # ||a_m||
        return (error + lam_now * (amplitude * nuclear).sum(-1)).sum().item()

    lam_now = lam / 100 if lam_start is None else min(lam_start, lam)
    previous = math.inf
    for _ in range(iterations):
        for m in range(rank):
            # basis s_m: prox of the penalty at the least-squares target, then unit norm (scale into a_m).
            a_t, a_a = products(phi)
            norm2 = a_a[:, m, m]  # ||a_m||^2
            live = norm2 > 1e-24
            safe = norm2.clamp_min(1e-24)
            z = bases[:, m] + (a_t[:, m] - (a_a[:, m, :, None] * bases).sum(1)) / safe[:, None]
            new, sigma = _svt(z, lam_now / (2 * safe.sqrt()), shape)
            rho = sigma.norm(dim=-1)  # = ||new||_F
            keep = live & (rho > 0)
            bases[:, m] = torch.where(keep[:, None], new / rho.clamp_min(1e-300)[:, None], torch.zeros_like(new))
            nuclear[:, m] = torch.where(keep, sigma.sum(-1) / rho.clamp_min(1e-300), torch.zeros_like(rho))
            phi[:, :, m] = torch.where(keep[:, None], phi[:, :, m] * rho[:, None], torch.zeros_like(phi[:, :, m]))
            # coefficients a_m: least squares R_m s_m (s_m has unit norm), then the group soft threshold.
            cross = (bases @ bases[:, m, :, None])[..., 0]  # s_j . s_m, (B, M)
            cross[:, m] = 0
            direction = bases[:, m] - (phi * cross[:, None, :]).sum(-1)  # y = T' direction, (B, D)
            y_norm = (direction[:, None, :] @ gram @ direction[:, :, None])[:, 0, 0].clamp_min(0).sqrt()
            shrink = (1 - lam_now * nuclear[:, m] / (2 * y_norm.clamp_min(1e-300))).clamp_min(0)
            phi[:, :, m] = torch.where(keep[:, None], direction * shrink[:, None], phi[:, :, m])
        value = objective(lam_now)
        if lam_now >= lam and abs(previous - value) <= tol * max(abs(value), 1e-30):
            break
        previous = value
        lam_now = min(lam, lam_now * lam_growth) if lam_growth > 1 else lam
    return _to_factors(target @ phi, bases, weight, basis)


def scheme1(weight: Tensor, rank: int, basis: str = "shared", method: str = "svd", **options) -> Scheme1Factors:
    """Scheme 1 factors by ``method`` ("svd" or "alternating"); ``options`` go to the alternating method."""
    check_choice(method, METHODS, "method")
    check_method_options(method, options)
    if method == "svd":
        return scheme1_svd(weight, rank, basis)
    return scheme1_alternating(weight, rank, basis, **options)


def scheme1_weight(factors: Scheme1Factors) -> Tensor:
    """The dense (N, C, dh, dw) weight that scheme 1 factors stand for."""
    bases, coeff = factors
    if bases.dim() == 3:
        return torch.einsum("ncm,mhw->nchw", coeff, bases)
    return torch.einsum("ncm,cmhw->nchw", coeff, bases)


@torch.no_grad()
@_one_thread
def separable_rank1(bases: Tensor) -> tuple[Tensor, Tensor]:
    """Split each basis filter into its best rank-1 (separable) approximation.

    Parameters
    ----------
    bases : (..., dh, dw) basis filters.

    Returns
    -------
    (vertical (..., dh), horizontal (..., dw)) with ``s ~ outer(vertical, horizontal)``; the first
    singular value is shared equally (square root to each side).
    """
    u, s, vh = torch.linalg.svd(bases.double(), full_matrices=False)
    root = s[..., :1].sqrt()
    return (u[..., :, 0] * root).to(bases.dtype), (vh[..., 0, :] * root).to(bases.dtype)


@torch.no_grad()
@_one_thread
def energy_first_sv(bases: Tensor) -> Tensor:
    """Share of each basis filter's energy in its first singular value: sigma_1^2 / sum sigma_i^2.

    (..., dh, dw) -> (...,). 1.0 means the filter is separable and ``decomposed=True`` loses nothing
    on it. A zero filter gives 1.0.
    """
    s = torch.linalg.svdvals(bases.double()).square()
    total = s.sum(-1)
    return torch.where(total > 0, s[..., 0] / total.clamp_min(1e-300), torch.ones_like(total))


# ------------------------------------------------------------------------------------- scheme 2


def _scheme2_matrix(weight: Tensor) -> Tensor:
    """W (N, C, dh, dw) as the (C*dh) x (N*dw) matrix indexed (c, kernel row) x (n, kernel column)."""
    n, c, dh, dw = weight.shape
    return weight.permute(1, 2, 0, 3).reshape(c * dh, n * dw)


@torch.no_grad()
@_one_thread
def scheme2_svd(weight: Tensor, rank: int) -> Scheme2Factors:
    """Scheme 2 by the closed form of Tai et al. 2016: the optimum of the filter reconstruction error.

    Parameters
    ----------
    weight : (N, C, dh, dw) conv weight.
    rank : K, the number of intermediate channels, 1..min(C*dh, N*dw).

    Returns
    -------
    Scheme2Factors: vertical (K, C, dh, 1), horizontal (N, K, 1, dw); the square root of each
    singular value goes to each side.
    """
    _check_weight(weight)
    n, c, dh, dw = weight.shape
    check_rank(rank, tuple(weight.shape), "v2")
    u, s, vh = torch.linalg.svd(_scheme2_matrix(weight.double()), full_matrices=False)
    root = s[:rank].sqrt()
    vertical = (u[:, :rank] * root).reshape(c, dh, rank).permute(2, 0, 1)[..., None]
    horizontal = (root[:, None] * vh[:rank]).reshape(rank, n, dw).permute(1, 0, 2)[:, :, None, :]
    return Scheme2Factors(vertical.to(weight.dtype).contiguous(), horizontal.to(weight.dtype).contiguous())


def scheme2_weight(factors: Scheme2Factors) -> Tensor:
    """The dense (N, C, dh, dw) weight that scheme 2 factors stand for."""
    vertical, horizontal = factors
    return torch.einsum("kch,nkw->nchw", vertical[..., 0], horizontal[:, :, 0, :])


# ------------------------------------------------------------------------------------- spectra


@torch.no_grad()
@_one_thread
def retained_energy(weight: Tensor, scheme: str, basis: str = "shared") -> Tensor:
    """Share of ||W||_F^2 that the best rank-r expansion keeps, for r = 1..max_rank (float64).

    ``out[r - 1]`` = sum of the r largest squared singular values / ||W||_F^2 (for per-channel, the
    r largest of every input channel). The truncated SVD is optimal, so ``1 - out[r - 1]`` is the
    squared relative reconstruction error of :func:`scheme1_svd` / :func:`scheme2_svd` at rank r.
    """
    _check_weight(weight)
    check_choice(scheme, SCHEMES, "scheme")
    w = weight.detach().double()
    if scheme == "v2":
        s2 = torch.linalg.svdvals(_scheme2_matrix(w)).square()
    else:
        check_choice(basis, BASES, "basis")
        s2 = torch.linalg.svdvals(_slices(w, basis)).square().sum(0)  # summed over channels
    total = w.square().sum().clamp_min(1e-300)
    return (s2.cumsum(0) / total).clamp(max=1.0)


# ------------------------------------------------------------------------------------------ MACs


def conv_macs(in_channels: int, out_channels: int, kernel_size, out_hw, groups: int = 1, bias: bool = False) -> int:
    """MACs of one ``nn.Conv2d`` on one image, as ptflops counts them.

    ``out_h * out_w * out_channels * (in_channels / groups) * kh * kw``, plus
    ``out_h * out_w * out_channels`` additions for the bias.
    """
    kh, kw = kernel_size
    positions = out_hw[0] * out_hw[1] * out_channels
    return positions * (in_channels // groups) * kh * kw + (positions if bias else 0)


def original_macs(conv: nn.Conv2d, out_hw) -> int:
    """MACs of ``conv`` itself on one image with output size ``out_hw``."""
    return conv_macs(conv.in_channels, conv.out_channels, conv.kernel_size, out_hw, conv.groups, conv.bias is not None)


def expanded_macs(conv_or_shape, scheme: str, rank: int, in_hw, out_hw, decomposed: bool = False,
                  order: str = "vh", bias: bool | None = None) -> int:
    """MACs of the layer that replaces a conv (an ``nn.Conv2d`` or a weight shape) at ``rank``, on one image.

    With C, N the conv's channels, H'W' its output size and W its input width (the vertical 1-D
    convs pad and stride only along H, so their output is H' x W):

    - scheme 1: ``C M dh dw H'W'`` (grouped basis conv) + ``C M N H'W'`` (1x1 combination)
    - scheme 1, decomposed: ``C M dh H'W + C M dw H'W' + C M N H'W'``
    - scheme 2: ``K C dh H'W + N K dw H'W'``; with ``order="hv"`` (horizontal first) ``K C dw HW' + N K dh H'W'``
    plus ``N H'W'`` for the bias if ``bias`` (None: if the conv has one; a shape has none).

    With ``out_hw=(1, 1)`` and ``in_hw`` = the stride (sh, sw) this is the cost per output position,
    the intermediate counted at the stride it runs at (the layers choose their inference path with it).
    """
    check_choice(scheme, SCHEMES, "scheme")
    n, c, dh, dw = _shape(conv_or_shape)
    if bias is None:
        bias = isinstance(conv_or_shape, nn.Module) and conv_or_shape.bias is not None
    mid_hw = (out_hw[0], in_hw[1])
    if scheme == "v2":
        check_choice(order, ORDERS[:2], "order")
        if order == "hv":
            return conv_macs(c, rank, (1, dw), (in_hw[0], out_hw[1])) + conv_macs(rank, n, (dh, 1), out_hw, bias=bias)
        return conv_macs(c, rank, (dh, 1), mid_hw) + conv_macs(rank, n, (1, dw), out_hw, bias=bias)
    cm = c * rank
    combine = conv_macs(cm, n, (1, 1), out_hw, bias=bias)
    if decomposed:
        return conv_macs(c, cm, (dh, 1), mid_hw, groups=c) + conv_macs(cm, cm, (1, dw), out_hw, groups=cm) + combine
    return conv_macs(c, cm, (dh, dw), out_hw, groups=c) + combine
