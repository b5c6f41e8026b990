"""Data-aware expansions: factors fitted to a layer's output on real inputs, not to its weights.

A conv with weight ``W`` (N, C, dh, dw) maps an input patch ``u`` (a column of ``F.unfold``, length
P = C*dh*dw, c-major then kernel rows then kernel columns) to ``W_flat @ u`` (``W_flat`` = W as (N, P);
the bias aside). An approximation ``W_hat`` of the same support, fed patches ``v`` (in sequential mode
the input from the partly expanded model, else ``v = u``), has the mean squared output error

    E||W u - W_hat v||^2 = tr(W S_uu W^T) - 2 tr(W_hat S_vu W^T) + tr(W_hat S_vv W_hat^T)

with the second moments ``S_xy = E[x y^T]`` (P x P). Only these moments are kept (:class:`PatchStats`,
streamed over batches; in sequential mode ``W S_vu^T`` (N x P) and ``tr(W S_uu W^T)`` in place of the
last two), so memory is bounded by P x P per layer, not by the number of images.

Fits (Zhang et al. 2015's asymmetric objective; Tai et al. 2016's closed form, whitened as in SVD-LLM):

- scheme 2 (:func:`fit_scheme2`): the closed form for inputs whose dh x 1 (vh) column patches are
  uncorrelated across kernel columns, then alternating least squares on the exact objective;
- scheme 1 (:func:`fit_scheme1`): the filter SVD, then alternating least squares over coefficients
  and bases; :func:`refit_coefficients` refits the coefficients after the rank-1 split (decomposed);
- Tucker-2 (:func:`fit_tucker2`): the HOSVD, then the core and the output factor by exact least squares
  in turn (the input factor kept);
- :func:`expand_to_data`: :func:`lrx.nn.surgery.expand` for the structure, then every replaced layer refitted;
- rank plans (:func:`retained_output_energy`, :func:`tucker2_output_energy`): the share of a layer's output
  energy kept at each rank.

All math is float64 (each batch's patch products in the data's dtype, summed in float64) under ``torch.no_grad``; factors come back in the weight's dtype and device.
(This module is long because the statistics, both schemes' fits, the rank-plan spectra and the model-level
driver share the private objective and solver helpers; the statistics are the part to move out next.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrx.factor.decomposition import (BASES, ORDERS, SCHEMES, Scheme1Factors, Scheme2Factors, check_choice, check_rank,
                            scheme1_svd, scheme2_svd, separable_rank1)
from lrx.base.errors import UserError
from lrx.factor.tucker import Tucker2Factors, check_tucker2_rank, tucker2_hosvd, tucker2_ranks

__all__ = ["RIDGE", "DAMP", "DENSE_LIMIT", "TOL", "PatchStats", "collect_stats", "output_error", "fit_scheme2",
           "fit_scheme1", "fit_tucker2", "split_bases", "refit_coefficients", "retained_output_energy",
           "tucker2_output_energy", "calibration_images"]

# Ridge of the whitening covariance in the closed form, relative to its mean eigenvalue (trace / size).
RIDGE = 1e-6
# The fits minimise E||W u - W_hat v||^2 + DAMP * mean(diag S_vv) * ||W_hat - W||_F^2: with a few thousand
# patches for a few thousand input dimensions (AlexNet's conv3-5 at 64 px) S_vv is nearly singular, and the
# undamped optimum moves the weights far along directions the calibration images barely excite (filter
# errors of 1000x, L2 norms on test images of 1800 against 100 for the filter fit). The damping keeps them
# near W there (as GPTQ's 1% dampening does). The data fit stays no worse than the filter SVD on the
# undamped calibration error, since the SVD minimises the damping term alone.
DAMP = 0.01
# Unknowns up to which an ALS step builds its system densely; above, preconditioned conjugate gradients.
DENSE_LIMIT = 3000
# ALS stops once a sweep lowers the objective by less than this fraction of it. On AlexNet conv2-5 (scheme 2,
# row 11's ranks) the sweeps after that point (10 of the 20 at most) lower it by under 0.5% in all (0.25%
# in relative output error), and each costs as much as the statistics of a layer.
TOL = 1e-3


@dataclass
class PatchStats:
    """Sums of patch outer products of one conv, streamed over calibration batches.

    ``vv`` = sum v v^T, (P, P) float64, with ``v`` the patches the approximated layer sees. The target
    ``W u`` (``u`` the patches the original layer sees on the original model) enters the objective only
    through ``sum (W u) v^T`` and ``sum ||W u||^2``; these are kept in one of two forms:

    - ``vu`` = sum v u^T and ``uu`` = sum u u^T (P, P), for any weight W; without a reference model
      ``v = u`` and the three are one tensor;
    - ``yv`` = sum (W u) v^T (N, P) and ``yy`` = sum ||W u||^2 for the reference conv's own weight W
      (``vu``, ``uu`` None): what :func:`collect_stats` keeps with a reference, N/P of the cost and
      memory of ``vu``, and ``uu`` not needed at all. Use these only with that conv's weight.

    ``count``: the number of patches summed (images x output positions); ``images``: of images.
    """

    vv: Tensor
    vu: Tensor | None
    uu: Tensor | None
    count: int
    images: int = 0
    yv: Tensor | None = None
    yy: float | None = None


# ------------------------------------------------------------------------------------------ stats


def _geometry(module: nn.Module, name: str) -> nn.Conv2d:
    if not isinstance(module, nn.Conv2d):
        raise UserError(f"layer {name}: data statistics need an nn.Conv2d, got {type(module).__name__}")
    return module


def _patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """The conv's input patches of ``x`` (B, C, H, W) as a (P, B*H'*W') matrix in x's dtype, unfold's order.

    Built from one strided slice per kernel tap written straight into the (C, dh, dw, B, H', W') layout:
    the same matrix as ``F.unfold(...).transpose(0, 1).reshape(P, -1)`` with one copy instead of two
    (1.4-2.7x faster for AlexNet's conv2-5).
    """
    (dh, dw), (sh, sw), (ah, aw) = conv.kernel_size, conv.stride, conv.dilation
    if isinstance(conv.padding, str):
        total = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)] if conv.padding == "same" else [0, 0]
        pads = (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)  # odd extra: right/bottom
    else:
        pads = (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0])
    x = F.pad(x, pads).transpose(0, 1)  # (C, B, H, W)
    c, b, h, w = x.shape
    oh, ow = (h - ah * (dh - 1) - 1) // sh + 1, (w - aw * (dw - 1) - 1) // sw + 1
    out = x.new_empty(c, dh, dw, b, oh, ow)
    for i in range(dh):
        for j in range(dw):
            out[:, i, j] = x[:, :, i * ah:i * ah + sh * (oh - 1) + 1:sh, j * aw:j * aw + sw * (ow - 1) + 1:sw]
    return out.view(c * dh * dw, b * oh * ow)


def _responses(conv: nn.Conv2d, output: Tensor) -> Tensor:
    """The conv's output without its bias, (B, N, H', W') -> (N, B*H'*W'): ``W u`` in :func:`_patches`' column order."""
    if conv.bias is not None:
        output = output - conv.bias[:, None, None]
    return output.transpose(0, 1).reshape(output.shape[1], -1)


class _Enough(Exception):
    """Raised by a hook once every hooked layer has seen the batch: the rest of the forward is not needed."""


def _capture(model: nn.Module, names: Sequence[str], geometry: dict, store: dict, responses: bool = False) -> list:
    """Hooks that put each named module's input patches (or, ``responses``: its output without bias,
    see :func:`_responses`) into ``store``, then stop the forward once every named module has reported."""
    def keep(name, value):
        store[name] = value
        if len(store) == len(names):
            raise _Enough

    if responses:
        return [model.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: keep(name, _responses(module, output))) for name in names]
    # A pre-hook sees the input before the module runs: no need to run the last hooked layer itself.
    return [model.get_submodule(name).register_forward_pre_hook(
        lambda module, inputs, name=name: keep(name, _patches(geometry[name], inputs[0]))) for name in names]


def _run(model: nn.Module, x: Tensor) -> None:
    try:
        model(x)
    except _Enough:
        pass


def _gram(x: Tensor, y: Tensor) -> Tensor:
    """``x @ y.T`` in the inputs' dtype (one batch: float32 for float32 models, 2x BLAS's float64 speed), as float64.

    Each batch's sum runs over a few thousand patches in float32 (relative rounding ~1e-6, far below the
    1% damping of the fits); the sums over batches accumulate in float64. Half precision is raised to float32.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x, y = x.float(), y.float()
    return (x @ y.T).double()


@torch.no_grad()
def calibration_images(batches: Iterable, images: int) -> Iterator[Tensor]:
    """The first ``images`` images of ``batches`` (``(images, labels)`` batches), batch by batch: what every
    statistic over calibration images streams."""
    done = 0
    for x, *_ in batches:
        if done >= images:
            break
        x = x[:images - done]
        done += x.shape[0]
        yield x


def collect_stats(model: nn.Module, names: Sequence[str], batches: Iterable, images: int = 512,
                  reference: nn.Module | None = None) -> dict[str, PatchStats]:
    """Second moments of the named convs' input patches over the first ``images`` calibration images.

    Parameters
    ----------
    model : the model whose layers ``names`` are approximated; ``v`` = the input patches of these
        modules (they may already be expansion layers; the patch geometry is then read from ``reference``).
    names : qualified module names.
    batches : iterable of (x, y) with x float (B, 3, H, W) on the model's device; y is ignored.
    images : stop after this many images (the last batch is cut).
    reference : the original model (sequential fits): the target is the output of its modules
        ``names`` (bias removed: ``W u``) on the same images, kept as ``yv``/``yy`` (see
        :class:`PatchStats`). None: ``u = v``.

    Returns
    -------
    ``{name: PatchStats}``, float64 on the device of the data. Both models run in eval mode (and are
    put back as they were).
    """
    names = list(names)
    source = reference if reference is not None else model
    geometry = {name: _geometry(source.get_submodule(name), name) for name in names}
    stats: dict[str, PatchStats] = {}
    modes = [(m, m.training) for m in ([model] if reference is None else [model, reference])]
    hooks = []
    try:
        for m, _ in modes:
            m.eval()
        seen_v, seen_y = {}, {}
        hooks += _capture(model, names, geometry, seen_v)
        if reference is not None:
            hooks += _capture(reference, names, geometry, seen_y, responses=True)
        for x in calibration_images(batches, images):
            seen_v.clear()
            seen_y.clear()
            _run(model, x)
            if reference is not None:
                _run(reference, x)
            for name in names:
                v = seen_v[name]
                if name not in stats:
                    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=v.device)  # noqa: E731
                    vv = zeros(v.shape[0], v.shape[0])
                    stats[name] = (PatchStats(vv, vv, vv, 0) if reference is None else
                                   PatchStats(vv, None, None, 0, yv=zeros(seen_y[name].shape[0], v.shape[0]), yy=0.0))
                s = stats[name]
                s.vv += _gram(v, v)
                if reference is not None:
                    y = seen_y[name].to(v.dtype)
                    s.yv += _gram(y, v)
                    s.yy += y.double().square().sum().item()
                s.count += v.shape[1]
                s.images += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.train(training)
    if not stats:
        raise UserError("no calibration images: the batches were empty")
    return stats


# -------------------------------------------------------------------------------------- objective


@dataclass
class _Moments:
    """The objective's data for one conv: E||W u - W_hat v||^2 = energy - 2 <W_hat, target> + <W_hat, W_hat svv>."""

    svv: Tensor  # (P, P) E[v v^T]
    target: Tensor  # (N, P) E[(W u) v^T] = W S_vu^T
    energy: float  # E||W u||^2

    def error(self, w_hat: Tensor) -> float:
        """Mean squared output error of ``w_hat`` (N, P) float64."""
        return self.energy - 2 * (w_hat * self.target).sum().item() + ((w_hat @ self.svv) * w_hat).sum().item()

    def transposed(self, shape) -> "_Moments":
        """The moments of the conv with the kernel transposed (dh <-> dw): patches permuted (c, i, j) -> (c, j, i)."""
        _, c, dh, dw = shape
        idx = torch.arange(c * dh * dw, device=self.svv.device).view(c, dh, dw).transpose(1, 2).reshape(-1)
        return _Moments(self.svv[idx][:, idx].contiguous(), self.target[:, idx].contiguous(), self.energy)


def _moments(weight: Tensor, stats: PatchStats, damp: float = 0.0) -> _Moments:
    """The objective's moments; ``damp`` > 0 adds ``damp * mean(diag S_vv) * ||W_hat - W||^2`` to it (see DAMP)."""
    n = weight.shape[0]
    if stats.count <= 0:
        raise UserError("patch statistics of zero patches: collect them on at least one image")
    p = stats.vv.shape[0]
    if weight[0].numel() != p:
        raise UserError(f"patch statistics of size {p} do not fit a weight of shape {tuple(weight.shape)} "
                        f"(C*dh*dw = {weight[0].numel()})")
    w = weight.detach().to(stats.vv.device, torch.float64).reshape(n, p)
    scale = 1.0 / stats.count
    if stats.yv is not None:
        if stats.yv.shape[0] != n:
            raise UserError(f"patch statistics of {stats.yv.shape[0]} outputs do not fit a weight of shape "
                            f"{tuple(weight.shape)}")
        energy, cross = stats.yy * scale, stats.yv * scale
    else:
        energy, cross = ((w @ stats.uu) * w).sum().item() * scale, (w @ stats.vu.T) * scale
    svv = stats.vv * scale
    if damp > 0:
        ridge = damp * svv.diagonal().mean().item()
        svv = svv + ridge * torch.eye(p, dtype=svv.dtype, device=svv.device)
        cross, energy = cross + ridge * w, energy + ridge * w.square().sum().item()
    return _Moments(svv, cross, energy)


@torch.no_grad()
def output_error(weight: Tensor, approx: Tensor, stats: PatchStats) -> float:
    """Relative output error ``sqrt(E||W u - W_hat v||^2 / E||W u||^2)`` from the patch statistics.

    Parameters
    ----------
    weight : (N, C, dh, dw) the original conv's weight W.
    approx : (N, C, dh, dw) the approximation W_hat (e.g. a layer's ``dense_weight()``).
    stats : the conv's :class:`PatchStats`.
    """
    m = _moments(weight, stats)
    err = m.error(approx.detach().to(m.svv.device, torch.float64).reshape(weight.shape[0], -1))
    return (max(err, 0.0) / max(m.energy, 1e-300)) ** 0.5


# ------------------------------------------------------------------------------------ linear algebra


def _psd_solve(q: Tensor, b: Tensor) -> Tensor:
    """Solve ``q x = b`` for symmetric positive semi-definite ``q`` (n, n), ``b`` (n, r).

    Cholesky with the smallest of a few jitters (relative to the mean diagonal) that factors ``q``: for
    singular systems (rank-deficient inputs) this is the minimiser of the quadratic up to ~1e-12. Should
    none factor (``q`` indefinite beyond rounding), the minimum-norm minimiser from its eigendecomposition,
    with the eigenvalues below rounding (negative ones included) taken as zero.
    """
    scale = q.diagonal().mean().clamp_min(1e-300)
    eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
    for jitter in (1e-12, 1e-10, 1e-8, 1e-6, 1e-4):
        chol, info = torch.linalg.cholesky_ex(q + jitter * scale * eye)
        if info.item() == 0:
            return torch.cholesky_solve(b, chol)
    values, vectors = torch.linalg.eigh(q)
    floor = q.shape[0] * torch.finfo(q.dtype).eps * values.abs().max()
    inverse = torch.where(values > floor, 1.0 / values.clamp_min(1e-300), torch.zeros_like(values))
    return vectors @ (inverse[:, None] * (vectors.T @ b))


def _pcg(apply, rhs: Tensor, x: Tensor, precondition, steps: int, start=None) -> tuple[Tensor, Tensor | None]:
    """``steps`` of preconditioned conjugate gradients on ``A x = rhs``, from ``x``.

    ``apply(x)`` returns ``(A x, L x)`` with ``L`` a linear map whose value at the result the caller
    needs too (scheme 2: ``S x`` for the next Gram matrix) or ``(A x, None)``; ``L x`` is carried
    along the iterates, so it costs no product of its own. ``start``: ``apply(x)`` if the caller has it.
    Each step minimises the quadratic ``x.A x/2 - rhs.x`` over a larger subspace through the start,
    so the objective never rises (up to rounding). Returns ``(x, L x)``.
    """
    ax, lx = apply(x) if start is None else start
    r = rhs - ax
    z = precondition(r)
    p, rz = z, (r * z).sum()
    for _ in range(steps):
        if rz <= 1e-300:
            break
        q, lp = apply(p)
        pq = (p * q).sum()
        if pq <= 1e-300:
            break
        alpha = rz / pq
        x, r = x + alpha * p, r - alpha * q
        lx = None if lx is None else lx + alpha * lp
        z = precondition(r)
        rz_new = (r * z).sum()
        p, rz = z + (rz_new / rz) * p, rz_new
    return x, lx


def _psd_cholesky(a: Tensor) -> Tensor:
    """The Cholesky factor L (lower, positive diagonal) of ``a`` + RIDGE x its mean eigenvalue, ``a`` (..., n, n)
    symmetric positive semi-definite in exact arithmetic.

    A singular ``a`` (input patches confined to a subspace: identical colour channels of grayscale images
    saved as RGB, constant image regions) summed from float32 products has eigenvalues of about -1e-6 x its
    mean where they are 0, which the ridge need not cover. Where the plain factorisation fails, ``a``'s
    eigenvalues are floored at 0 first (the nearest positive semi-definite matrix), then the ridge is added:
    L is then the R^T of the QR factorisation of diag(sqrt(lambda + ridge)) Q^T. A matrix that factors is
    factored as it is, so full-rank statistics give the same L as always.
    """
    ridge = RIDGE * a.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    chol, info = torch.linalg.cholesky_ex(a + ridge[..., None, None] * eye)
    if not bool((info != 0).any()):
        return chol
    values, vectors = torch.linalg.eigh(a)
    root = (values.clamp_min(0) + ridge[..., None]).sqrt()
    r = torch.linalg.qr(root[..., :, None] * vectors.mT).R  # R^T R = Q diag(lambda + ridge) Q^T
    sign = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(r.dtype)
    return (sign[..., :, None] * r).mT


def _chol_inverse(a: Tensor):
    """A function applying ``(a + ridge)^{-1}`` (batched symmetric PSD ``a``; see :func:`_psd_cholesky`), for preconditioners."""
    chol = _psd_cholesky(a)
    return lambda b: torch.cholesky_solve(b, chol)


def _whitener(sigma: Tensor) -> Tensor:
    """The Cholesky factor of ``sigma`` (..., n, n) + RIDGE x its mean eigenvalue (:func:`_psd_cholesky`)."""
    return _psd_cholesky(sigma)


def _improved(history, value: float, tol: float) -> bool:
    """Append ``value``; False once the relative decrease from the previous value is below ``tol``."""
    previous = history[-1] if history else None
    history.append(value)
    return previous is None or previous - value > tol * max(abs(previous), 1e-300)


# --------------------------------------------------------------------------------------- scheme 2


class _Scheme2:
    """Scheme 2, vertical first, on moments in the vh layout: W_hat[n, (c, i), j] = sum_k A[(c, i), k] H[n, k, j]."""

    def __init__(self, m: _Moments, shape):
        self.m = m
        self.n, c, self.dh, self.dw = shape
        self.rows = c * self.dh  # (c, i)
        self.s4 = m.svv.view(self.rows, self.dw, self.rows, self.dw)
        # S as (a, j) x J x b: one matmul gives S @ A for every pair of kernel columns.
        self.s_perm = self.s4.permute(0, 1, 3, 2).reshape(self.rows * self.dw, self.dw, self.rows).contiguous()
        self.y3 = m.target.view(self.n, self.rows, self.dw)

    def times_s(self, a: Tensor) -> Tensor:
        """S A for every pair of kernel columns, (C dh dw, dw, K) [(a, j), J, l]: the one O(P^2 K) product."""
        return self.s_perm @ a

    def gram(self, a: Tensor, sa: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(g (K dw, K dw), r (N, K dw)): the objective in H is energy - 2 <h, r> + <h, h g>.
        ``sa``: ``times_s(a)`` if known."""
        k = a.shape[1]
        sa = (self.times_s(a) if sa is None else sa).view(self.rows, self.dw, self.dw, k)  # [a, j, J, l]
        g = (a.T @ sa.reshape(self.rows, -1)).view(k, self.dw, self.dw, k).permute(0, 1, 3, 2)
        r = torch.einsum("ak,naj->nkj", a, self.y3).reshape(self.n, k * self.dw)
        return g.reshape(k * self.dw, k * self.dw), r

    def error(self, h: Tensor, g: Tensor, r: Tensor) -> float:
        return self.m.energy - 2 * (h * r).sum().item() + ((h @ g) * h).sum().item()

    def whitened(self) -> tuple[Tensor, Tensor]:
        """(L, L^{-1} Y): Sigma = mean_j E[v_j v_j^T] + ridge = L L^T, Y the target as (C dh) x (N dw)."""
        chol = _whitener(self.s4.diagonal(dim1=1, dim2=3).mean(-1))
        y = self.y3.permute(1, 0, 2).reshape(self.rows, self.n * self.dw)
        return chol, torch.linalg.solve_triangular(chol, y, upper=False)

    def closed_form(self, rank: int) -> tuple[Tensor, Tensor]:
        """Whitened closed form, optimal if the kernel columns' dh x 1 patches are uncorrelated and alike.

        Sigma = mean_j E[v_j v_j^T] + ridge = L L^T; the rank-K SVD of ``L^{-1} Y`` (Y the target as the
        (C dh) x (N dw) matrix; = L^T W when v = u) gives ``A = L^{-T} U sqrt(S)``, ``H = sqrt(S) V^T``.
        """
        chol, z = self.whitened()
        u, s, vh = torch.linalg.svd(z, full_matrices=False)
        root = s[:rank].sqrt()
        a = torch.linalg.solve_triangular(chol.T, u[:, :rank] * root, upper=True)
        h = (root[:, None] * vh[:rank]).view(rank, self.n, self.dw).permute(1, 0, 2)
        return a, h.reshape(self.n, rank * self.dw)

    def solve_a(self, a: Tensor, h: Tensor, cg_steps: int, sa: Tensor) -> tuple[Tensor, Tensor]:
        """The vertical factor minimising the objective for fixed H (exact solve, or PCG from ``a``), and
        ``times_s`` of it; ``sa`` = ``times_s(a)``."""
        k = a.shape[1]
        h3 = h.view(self.n, k, self.dw)
        hg = h.T @ h  # [(l, J), (k, j)] = sum_n H[n, l, J] H[n, k, j]
        hg_p = hg.view(k, self.dw, k, self.dw).permute(1, 0, 2, 3).reshape(self.dw * k, k, self.dw)  # [(J, l), k, j]
        rhs = torch.einsum("naj,nkj->ak", self.y3, h3)

        if self.rows * k <= DENSE_LIMIT:
            hess = torch.einsum("ajbJ,lJkj->akbl", self.s4, hg.view(k, self.dw, k, self.dw))
            size = self.rows * k
            a = _psd_solve(hess.reshape(size, size), rhs.reshape(size, 1)).view(self.rows, k)
            return a, self.times_s(a)

        def apply(d, sd=None):
            sd = self.times_s(d) if sd is None else sd
            return torch.einsum("ajq,qkj->ak", sd.view(self.rows, self.dw, self.dw * k), hg_p), sd  # [a, j, (J, l)]

        # Preconditioner: the Hessian if kernel columns were uncorrelated and alike, Sigma (x) sum_j Hg_jj.
        left = _chol_inverse(self.s4.diagonal(dim1=1, dim2=3).mean(-1))
        right = _chol_inverse(hg.view(k, self.dw, k, self.dw).diagonal(dim1=1, dim2=3).sum(-1))
        return _pcg(apply, rhs, a, lambda r: right(left(r).T).T, cg_steps, start=apply(a, sa))


def _balance(a: Tensor, h: Tensor, dw: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rescale each rank-1 term so its vertical and horizontal parts have equal norms (W_hat unchanged);
    also returns the (K,) factors the columns of ``a`` were multiplied by."""
    k = a.shape[1]
    h3 = h.view(h.shape[0], k, dw)
    na, nh = a.norm(dim=0), h3.norm(dim=(0, 2))
    ok = (na > 0) & (nh > 0)
    scale = torch.where(ok, (nh / na.clamp_min(1e-300)).sqrt(), torch.ones_like(na))
    return a * scale, (h3 / scale[None, :, None]).reshape(h.shape), scale


@torch.no_grad()
def fit_scheme2(weight: Tensor, rank: int, stats: PatchStats, order: str = "vh", iterations: int = 20, *,
                tol: float = TOL, cg_steps: int = 4, history: list | None = None) -> Scheme2Factors:
    """Scheme 2 factors that minimise the layer's output error on the calibration statistics.

    Start: the better (on the exact objective) of the whitened closed form (see ``_Scheme2.closed_form``)
    and the filter SVD. Then alternating least squares on the exact objective: the horizontal factor in
    closed form (a (K dw)-square system shared by all outputs), then the vertical one (exactly if it has
    at most ``DENSE_LIMIT`` entries, else ``cg_steps`` of preconditioned conjugate gradients from the
    current value). Each step can only lower the objective; the best iterate is returned.

    Parameters
    ----------
    weight : (N, C, dh, dw) the conv's weight.
    rank : K, 1..``max_rank(weight.shape, "v2", order=order)``.
    stats : the conv's :class:`PatchStats`.
    order : "vh" (vertical first) or "hv" (horizontal first: the kernel fitted transposed).
    iterations : ALS sweeps (0: the start only).
    tol : stop once a sweep lowers the objective by less than this fraction.
    history : if given, the mean squared output error of the start and after every sweep is appended.

    Returns
    -------
    Scheme2Factors in the layer's shapes, as :func:`lrx.nn.layers.scheme2_factors` gives them: vh: vertical
    (K, C, dh, 1), horizontal (N, K, 1, dw); hv: vertical (N, K, dh, 1), horizontal (K, C, 1, dw).
    """
    check_choice(order, ORDERS[:2], "order")
    check_rank(rank, tuple(weight.shape), "v2", order=order)
    m = _moments(weight, stats, DAMP)
    w = weight.detach().to(m.svv.device, torch.float64)
    if order == "hv":
        m, w = m.transposed(weight.shape), w.transpose(2, 3)
    n, c, dh, dw = w.shape
    problem = _Scheme2(m, w.shape)
    history = [] if history is None else history

    svd_v, svd_h = scheme2_svd(w, rank)
    starts = [problem.closed_form(rank),
              (svd_v[..., 0].reshape(rank, c * dh).T, svd_h[:, :, 0, :].reshape(n, rank * dw))]
    best = None
    for a, h in starts:
        sa = problem.times_s(a)
        g, r = problem.gram(a, sa)
        value = problem.error(h, g, r)
        if best is None or value < best[0]:
            best = (value, a, h, sa, g, r)
    value, a, h, sa, g, r = best
    history.append(value)
    for _ in range(iterations):
        h = _psd_solve(g, r.T).T
        a, h, scale = _balance(a, h, dw)
        a, sa = problem.solve_a(a, h, cg_steps, sa * scale)
        g, r = problem.gram(a, sa)
        value = problem.error(h, g, r)
        if value < best[0]:
            best = (value, a, h, sa, g, r)
        if not _improved(history, value, tol):
            break
    a, h = best[1], best[2]
    vertical = a.T.reshape(rank, c, dh, 1)
    horizontal = h.view(n, rank, dw)[:, :, None, :]
    if order == "hv":  # as layers.scheme2_factors: the transposed kernel's factors, transposed back
        vertical, horizontal = horizontal.transpose(2, 3), vertical.transpose(2, 3)
    out = dict(dtype=weight.dtype, device=weight.device)
    return Scheme2Factors(vertical.to(**out).contiguous(), horizontal.to(**out).contiguous())


# --------------------------------------------------------------------------------------- scheme 1


class _Scheme1:
    """Scheme 1 on moments: W_hat[n, c, d] = sum_m a[n, c, m] s[c, m, d] (d = kernel position)."""

    def __init__(self, m: _Moments, shape):
        self.m = m
        self.n, self.c, dh, dw = shape
        self.d = dh * dw
        self.s4 = m.svv.view(self.c, self.d, self.c, self.d)
        self.y3 = m.target.view(self.n, self.c, self.d)

    def gram(self, bases: Tensor) -> tuple[Tensor, Tensor]:
        """(g (C M, C M), r (N, C M)) for per-channel bases (C, M, D): objective in a is energy - 2<a,r> + <a, a g>."""
        c, mm = bases.shape[:2]
        sb = torch.einsum("xCD,CMD->xCM", self.m.svv.view(c * self.d, c, self.d), bases).view(c, self.d, c, mm)
        g = torch.einsum("cmd,cdCM->cmCM", bases, sb).reshape(c * mm, c * mm)
        r = torch.einsum("ncd,cmd->ncm", self.y3, bases).reshape(self.n, c * mm)
        return g, r

    def error(self, a: Tensor, g: Tensor, r: Tensor) -> float:
        return self.m.energy - 2 * (a * r).sum().item() + ((a @ g) * a).sum().item()

    def solve_bases(self, a: Tensor, bases: Tensor, shared: bool, cg_steps: int) -> Tensor:
        """Bases (C, M, D) minimising the objective for fixed coefficients ``a`` (N, C M)."""
        c, mm = bases.shape[:2]
        ag = (a.T @ a).view(c, mm, c, mm)
        rhs = torch.einsum("ncm,ncd->cmd", a.view(self.n, c, mm), self.y3)
        if shared:  # one set for all channels: an (M D)-square system
            hess = torch.einsum("cmCM,cdCD->mdMD", ag, self.s4).reshape(mm * self.d, mm * self.d)
            s = _psd_solve(hess, rhs.sum(0).reshape(-1, 1)).view(mm, self.d)
            return s.expand(c, mm, self.d)
        size = c * mm * self.d
        if size <= DENSE_LIMIT:
            hess = torch.einsum("cmCM,cdCD->cmdCMD", ag, self.s4).reshape(size, size)
            return _psd_solve(hess, rhs.reshape(-1, 1)).view(c, mm, self.d)

        def apply(x):
            t = torch.einsum("cdCD,CMD->cdCM", self.s4, x)
            return torch.einsum("cmCM,cdCM->cmd", ag, t), None

        # Preconditioner: the exact inverse of each channel's diagonal block.
        idx = torch.arange(c, device=a.device)
        blocks = torch.einsum("cmM,cdD->cmdMD", ag[idx, :, idx, :], self.s4[idx, :, idx, :])
        inverse = _chol_inverse(blocks.reshape(c, mm * self.d, mm * self.d))
        return _pcg(apply, rhs, bases, lambda r: inverse(r.reshape(c, -1, 1)).view(c, mm, self.d), cg_steps)[0]


def _per_channel(bases: Tensor, c: int) -> Tensor:
    """Bases (M, dh, dw) or (C, M, dh, dw) as (C, M, dh*dw) float64."""
    b = bases.double()
    if b.dim() == 3:
        b = b.expand(c, *b.shape)
    return b.reshape(c, b.shape[1], -1)


@torch.no_grad()
def fit_scheme1(weight: Tensor, rank: int, stats: PatchStats, basis: str = "shared", iterations: int = 20, *,
                tol: float = TOL, cg_steps: int = 4, history: list | None = None) -> Scheme1Factors:
    """Scheme 1 factors that minimise the layer's output error on the calibration statistics.

    Starts from :func:`lrx.factor.decomposition.scheme1_svd`, then alternating least squares on the exact
    objective: the coefficients in closed form (a (C M)-square system shared by all outputs), then the
    bases (shared: an (M dh dw)-square system; per-channel: exact up to ``DENSE_LIMIT`` unknowns, else
    ``cg_steps`` of conjugate gradients preconditioned per channel). Each basis filter is then rescaled to
    unit norm (into its coefficients). The objective never rises; the best iterate is returned.

    Parameters
    ----------
    weight : (N, C, dh, dw); rank : M; stats : the conv's :class:`PatchStats`.
    basis : "shared" or "per-channel"; iterations, tol, cg_steps, history : as :func:`fit_scheme2`.

    Returns
    -------
    Scheme1Factors: bases (M, dh, dw) shared or (C, M, dh, dw) per-channel, coefficients (N, C, M).
    """
    check_rank(rank, tuple(weight.shape), "v1", basis)
    m = _moments(weight, stats, DAMP)
    n, c, dh, dw = weight.shape
    problem = _Scheme1(m, weight.shape)
    history = [] if history is None else history
    start = scheme1_svd(weight.detach().to(m.svv.device, torch.float64), rank, basis)
    bases = _per_channel(start.bases, c)
    a = start.coefficients.double().reshape(n, c * rank)
    g, r = problem.gram(bases)
    best = (problem.error(a, g, r), a, bases)
    history.append(best[0])
    for _ in range(iterations):
        a = _psd_solve(g, r.T).T
        bases = problem.solve_bases(a, bases, basis == "shared", cg_steps)
        norms = bases.norm(dim=-1)  # (C, M); a zero basis keeps scale 1
        scale = torch.where(norms > 0, norms, torch.ones_like(norms))
        bases, a = bases / scale[..., None], (a.view(n, c, rank) * scale).reshape(n, c * rank)
        g, r = problem.gram(bases)
        value = problem.error(a, g, r)
        if value < best[0]:
            best = (value, a, bases)
        if not _improved(history, value, tol):
            break
    _, a, bases = best
    out = dict(dtype=weight.dtype, device=weight.device)
    bases = bases.reshape(c, rank, dh, dw)
    if basis == "shared":
        bases = bases[0]
    return Scheme1Factors(bases.to(**out).contiguous(), a.view(n, c, rank).to(**out).contiguous())


def split_bases(bases: Tensor) -> Tensor:
    """Each basis filter (..., dh, dw) replaced by its rank-1 split ``v h^T`` (:func:`separable_rank1`).

    These are the filters :meth:`LowRankExpConvV1.from_factors` with ``decomposed=True`` applies; splitting
    them again changes nothing.
    """
    v, h = separable_rank1(bases)
    return v[..., :, None] * h[..., None, :]


@torch.no_grad()
def refit_coefficients(weight: Tensor, bases: Tensor, stats: PatchStats) -> Tensor:
    """Coefficients minimising the output error for the rank-1 split of ``bases`` (scheme 1 decomposed).

    Parameters
    ----------
    weight : (N, C, dh, dw); stats : the conv's :class:`PatchStats`.
    bases : (M, dh, dw) shared or (C, M, dh, dw) per-channel, before or after the split: the solve uses
        :func:`split_bases` of them, which is what ``LowRankExpConvV1.from_factors(conv,
        Scheme1Factors(bases, coefficients), decomposed=True)`` builds.

    Returns
    -------
    coefficients (N, C, M) in the weight's dtype and device.
    """
    n, c = weight.shape[:2]
    m = _moments(weight, stats, DAMP)
    split = _per_channel(split_bases(bases.detach().to(m.svv.device)), c)
    g, r = _Scheme1(m, weight.shape).gram(split)
    a = _psd_solve(g, r.T).T
    return a.view(n, c, split.shape[1]).to(dtype=weight.dtype, device=weight.device).contiguous()


# ------------------------------------------------------------------------------------- rank plans


@torch.no_grad()
def retained_output_energy(weight: Tensor, stats: PatchStats, scheme: str, basis: str = "shared") -> Tensor:
    """Share of the layer's output energy on the calibration data that the rank-r expansion keeps, r = 1..max_rank.

    The data-aware counterpart of :func:`lrx.factor.decomposition.retained_energy` (what ``bases: auto`` ranks
    layers by with ``fit: data``), from one SVD per layer: the whitened closed form's. With the patch
    covariance taken as uncorrelated and alike along the axis the factors do not split (scheme 2, vh:
    kernel columns, Sigma over (c, kernel row); scheme 1: input channels, Sigma over kernel positions,
    averaged over channels for shared bases, each channel's own for per-channel ones), the best rank-r
    expansion's output error is the energy beyond the r largest squared singular values of the whitened
    target ``L^{-1} Y`` (L L^T = Sigma, Y = E[(W u) v^T] arranged as the factored matrix). ``out[r - 1]`` =
    their cumulative share (1 at full rank). Undamped: the plan compares layers by their data alone.

    Parameters
    ----------
    weight : (N, C, dh, dw); stats : the conv's :class:`PatchStats`; scheme : "v1" or "v2" (vh, as plans
        assume); basis : scheme 1's "shared" or "per-channel".

    Returns
    -------
    (max_rank,) float64, non-decreasing, last entry 1.
    """
    check_choice(scheme, SCHEMES, "scheme")
    m = _moments(weight, stats)
    if scheme == "v2":
        s2 = torch.linalg.svdvals(_Scheme2(m, weight.shape).whitened()[1]).square()
    else:
        check_choice(basis, BASES, "basis")
        problem = _Scheme1(m, weight.shape)
        idx = torch.arange(problem.c, device=m.svv.device)
        sigma = problem.s4[idx, :, idx, :]  # (C, D, D): each channel's covariance of kernel positions
        y = problem.y3.transpose(0, 1)  # (C, N, D)
        if basis == "shared":
            sigma, y = sigma.mean(0, keepdim=True), y.reshape(1, -1, problem.d)
        # Z = Y L^{-T}: ||W_hat L - Z||^2 is the objective up to a constant
        z = torch.linalg.solve_triangular(_whitener(sigma), y.transpose(1, 2), upper=False).transpose(1, 2)
        s2 = torch.linalg.svdvals(z).square().sum(0)
    return (s2.cumsum(0) / s2.sum().clamp_min(1e-300)).clamp(max=1.0)


# --------------------------------------------------------------------------------------- Tucker-2


@torch.no_grad()
def fit_tucker2(weight: Tensor, rank: int, stats, iterations: int = 20, tol: float = 1e-4,
                history: list | None = None) -> Tucker2Factors:
    """Tucker-2 factors of ``weight`` at ``rank`` fitted to the conv's outputs: from the HOSVD, the input factor
    kept, the core and the output factor refitted in turn, each the exact least-squares minimiser of the damped
    output error (this module's damped objective, from the conv's :class:`PatchStats`)
    given the other, for at most ``iterations`` sweeps, until a sweep improves the error by less than ``tol``
    (relative). The error never rises above the HOSVD's. ``history`` receives the error before and after each
    sweep."""
    check_tucker2_rank(rank, weight.shape)
    start = tucker2_hosvd(weight.double(), tucker2_ranks(rank, weight.shape))
    m = _moments(weight, stats, DAMP)
    device = m.svv.device
    n, c, kh, kw = weight.shape
    first = start.first.to(device)[:, :, 0, 0]                                   # (R1, C)
    spread = torch.kron(first, torch.eye(kh * kw, dtype=torch.float64, device=device))  # (R1 k^2, C k^2)
    core = start.core.to(device).reshape(start.core.shape[0], -1)                # (R2, R1 k^2)
    last = start.last.to(device)[:, :, 0, 0]                                     # (N, R2)
    a_s_a = spread @ m.svv @ spread.T
    t_a = m.target @ spread.T                                                    # (N, R1 k^2)
    errors = history if history is not None else []
    _improved(errors, m.error(last @ core @ spread), tol)
    for _ in range(iterations):
        # the core, given the output factor: (L^T L) G (A S A^T) = L^T T A^T
        core = _psd_solve(a_s_a, _psd_solve(last.T @ last, last.T @ t_a).T).T
        # the output factor, given the core: L (M S M^T) = T M^T, M = G A
        mixed = core @ spread
        last = _psd_solve(mixed @ m.svv @ mixed.T, mixed @ m.target.T).T
        if not _improved(errors, m.error(last @ core @ spread), tol):
            break
    dtype = weight.dtype
    return Tucker2Factors(start.first.to(weight.device, dtype),
                         core.reshape(-1, first.shape[0], kh, kw).to(weight.device, dtype).contiguous(),
                         last[..., None, None].to(weight.device, dtype).contiguous())


@torch.no_grad()
def tucker2_output_energy(weight: Tensor, stats: PatchStats, ranks: Sequence[int] | None = None) -> list[float]:
    """Share of the conv's output energy on the calibration data that Tucker-2 can keep at each rank of ``ranks``
    (default every rank 1..max(C, N)): the data-aware counterpart of :func:`lrx.factor.tucker.tucker2_energy`,
    what plans rank Tucker-2 options by with ``fit: data``.

    With the HOSVD's input factor U_in (C x R1, what :func:`fit_tucker2` keeps), the input patches are projected
    by A = U_in^T (x) I (R1 dh dw x C dh dw), and the core and the output factor together are an N x R1 dh dw
    matrix of rank at most R2: a reduced-rank regression, whose least output error is the energy beyond the R2
    largest squared singular values of the whitened target Z = T A^T L^{-T} (L L^T = A S A^T + ridge, T = E[(W u)
    v^T]). :func:`fit_tucker2`'s alternating sweeps approach that optimum from the HOSVD. The projections nest (the
    leading R1 columns of one U_in), and so do the Cholesky factors of their leading blocks: one rotation of the
    moments, one Cholesky and one triangular solve give Z for every R1 as the leading R1 dh dw columns of one matrix.
    Shares are of ||Z||^2 at (C, N), so that the full rank keeps exactly 1; undamped, as
    :func:`retained_output_energy`."""
    m = _moments(weight, stats)
    n, c, kh, kw = weight.shape
    k2, top = kh * kw, max(n, c)
    ranks = list(range(1, top + 1)) if ranks is None else [int(r) for r in ranks]
    for rank in ranks:
        check_tucker2_rank(rank, weight.shape)
    w = weight.detach().to(m.svv.device, torch.float64)
    unfolded = w.transpose(0, 1).reshape(c, -1)  # HOSVD's input factor, every column of it (C, C)
    u_in = torch.linalg.svd(unfolded, full_matrices=unfolded.shape[1] < c)[0]
    s4 = m.svv.view(c, k2, c, k2)
    rotated = torch.einsum("cr,cpdq,ds->rpsq", u_in, s4, u_in).reshape(c * k2, c * k2)
    target = torch.einsum("ncp,cr->nrp", m.target.view(n, c, k2), u_in).reshape(n, c * k2)
    z = torch.linalg.solve_triangular(_whitener(rotated), target.T, upper=False).T  # T L^{-T}
    total = z.square().sum().clamp_min(1e-300)
    spectra: dict[int, Tensor] = {}
    out = []
    for rank in ranks:
        r1, r2 = tucker2_ranks(rank, weight.shape)
        if r1 not in spectra:
            spectra[r1] = torch.linalg.svdvals(z[:, :r1 * k2]).square().cumsum(0)
        kept = spectra[r1][min(r2, spectra[r1].numel()) - 1]
        out.append(1.0 if (r1, r2) == (c, n) else min(float(kept / total), 1.0))
    return out
