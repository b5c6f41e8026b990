"""The channel low-rank scheme's math: a 1x1 conv's or a linear layer's weight ``W`` (N x C) as ``second @ first``
with ``first`` (R x C) and ``second`` (N x R), i.e. C -> R -> N channels.

- :func:`channel_svd`: the weight fit, W's rank-R truncated SVD (Eckart-Young: the least ||W - W_hat||_F);
- :func:`channel_data_fit`: the data fit, the whitened closed form. With ``B B^T = Sigma + delta I``
  (``Sigma = E[x x^T]`` the input covariance over channels, ``delta`` a damping relative to its mean
  eigenvalue), ``E||W x - W_hat x||^2 + delta ||W - W_hat||_F^2 = ||(W - W_hat) B||_F^2``, so the
  rank-R ``W_hat = [W B]_R B^{-1}`` (``[.]_R`` the truncated SVD) is its exact minimiser;
- :func:`channel_energy`: the share of the filter energy (no covariance) or of the output energy (with one)
  that rank r keeps, r = 1..min(C, N), for rank planners;
- :func:`collect_channel_stats`: ``E[x x^T]`` of the named layers' inputs streamed from calibration batches
  (each spatial position of a 1x1 conv's input is a sample, each row of a linear layer's input is one);
- the rank rule (:func:`channel_max_rank`, :func:`check_channel_rank`) and the MAC cost (:func:`channel_macs`).

Every fit runs under ``torch.no_grad`` in float64 and returns factors in the weight's dtype and device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrx.base.errors import UserError
from lrx.factor.datafit import DAMP, RIDGE, calibration_images

__all__ = ["ChannelFactors", "ChannelStats", "channel_max_rank", "check_channel_rank", "channel_macs", "channel_svd",
           "channel_data_fit", "channel_fit", "channel_stats_error", "channel_weight", "channel_output_error", "channel_energy", "channel_samples",
           "collect_channel_stats"]


class ChannelFactors(NamedTuple):
    """``W_hat = second @ first``: ``first`` (R, C) maps the C inputs to R channels, ``second`` (N, R) those to N outputs."""

    first: Tensor
    second: Tensor


@dataclass
class ChannelStats:
    """Sums over calibration samples of one layer's inputs: ``xx`` = sum x x^T (C, C) float64, ``count`` samples
    (images x output positions, or input rows), ``images`` images.

    Sequential mode (:func:`collect_channel_stats` with a ``reference``): x is the input in the model whose earlier
    layers are already replaced, and the target is the original layer's output on its own input u, ``y = W u``
    (bias left out); then ``yx`` = sum y x^T (N, C) and ``yy`` = sum ||y||^2 are kept too (None otherwise: the
    target is ``W x``)."""

    xx: Tensor
    count: int
    images: int = 0
    yx: Tensor | None = None
    yy: float | None = None

    @property
    def covariance(self) -> Tensor:
        """``E[x x^T]`` (C, C) float64 (uncentred: the bias is kept exactly, so only the second moment matters)."""
        if self.count <= 0:
            raise UserError("channel statistics of zero samples: collect them on at least one image")
        return self.xx / self.count


# ------------------------------------------------------------------------------------------ rules


def _matrix(weight: Tensor) -> Tensor:
    """A 1x1 conv's (N, C, 1, 1) or a linear layer's (N, C) weight as the (N, C) matrix, float64, detached."""
    assert weight.dim() == 2 or (weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1)), \
        f"a channel weight is (N, C) or (N, C, 1, 1), got shape {tuple(weight.shape)}"
    return weight.detach().reshape(weight.shape[0], weight.shape[1]).double()


def channel_max_rank(shape: Sequence[int]) -> int:
    """min(C, N) for a weight of shape (N, C) or (N, C, 1, 1): the rank at which the scheme is exact."""
    return int(min(shape[0], shape[1]))


def check_channel_rank(rank, shape: Sequence[int], name: str | None = None) -> None:
    """Refuse, with a UserError naming the layer, a rank that is not an integer in 1..min(C, N)."""
    top = channel_max_rank(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        where = f"layer {name}: " if name else ""
        raise UserError(f"{where}rank {rank!r} is out of range: the channel scheme on a weight of shape "
                        f"{tuple(shape)} takes ranks 1..{top} (min(C, N))")


def channel_macs(in_features: int, out_features: int, rank: int | None, positions: int = 1) -> int:
    """MACs of ``positions`` output positions (a 1x1 conv's H' W', a linear layer's input rows): C N each for the
    dense layer (``rank`` None), R (C + N) for its expansion. Bias adds excluded (both add the same N per position)."""
    per_position = in_features * out_features if rank is None else rank * (in_features + out_features)
    return int(per_position) * int(positions)


# ------------------------------------------------------------------------------------------- fits


def _balanced(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(first, second) = (sqrt(S_R) V_R^T, U_R sqrt(S_R)) of a thin SVD: each factor takes half of each singular value."""
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


@torch.no_grad()
def channel_svd(weight: Tensor, rank: int) -> ChannelFactors:
    """The rank-``rank`` truncated SVD of ``weight`` (N, C) or (N, C, 1, 1): the least ||W - second @ first||_F.

    Returns :class:`ChannelFactors` with ``first`` (R, C) and ``second`` (N, R), in the weight's dtype and device.
    """
    check_channel_rank(rank, weight.shape)
    u, s, vh = torch.linalg.svd(_matrix(weight), full_matrices=False)
    first, second = _balanced(u, s, vh, rank)
    return ChannelFactors(first.to(weight.dtype), second.to(weight.dtype))


def _whitener(covariance: Tensor, shift: float):
    """(B, right_inverse, right_inverse_t) with ``B B^T = covariance + shift I`` (C, C), ``right_inverse(X) = X B^{-1}``
    and ``right_inverse_t(X) = X B^{-T}``.

    Cholesky where it factors. A covariance summed from float32 products of inputs confined to a subspace
    (identical channels, dead units) has eigenvalues a little below 0 where they are 0, which a small shift
    need not cover: then its eigenvalues are floored at 0 first and B is the symmetric square root.
    """
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    chol, info = torch.linalg.cholesky_ex(covariance + shift * eye)
    if info.item() == 0:
        return (chol, lambda x: torch.linalg.solve_triangular(chol, x, upper=False, left=False),
                lambda x: torch.linalg.solve_triangular(chol.T, x, upper=True, left=False))
    values, vectors = torch.linalg.eigh(covariance)
    root = (values.clamp_min(0) + shift).sqrt()
    inverse = lambda x: ((x @ vectors) / root) @ vectors.T  # noqa: E731  B is symmetric: B^{-T} = B^{-1}
    return (vectors * root) @ vectors.T, inverse, inverse


def _shift(covariance: Tensor, damp: float) -> float:
    """The damping ``delta``: ``damp`` (at least RIDGE) times the covariance's mean eigenvalue (trace / C)."""
    return max(damp, RIDGE) * max(covariance.diagonal().mean().item(), 1e-300)


def _covariance(covariance: Tensor, columns: int) -> Tensor:
    if covariance.dim() != 2 or tuple(covariance.shape) != (columns, columns):
        raise UserError(f"a covariance of shape {tuple(covariance.shape)} does not fit a weight with {columns} inputs "
                        f"(it must be ({columns}, {columns}))")
    sigma = covariance.detach().double()
    return (sigma + sigma.T) / 2


@torch.no_grad()
def channel_data_fit(weight: Tensor, covariance: Tensor, rank: int, damp: float = DAMP,
                     cross: Tensor | None = None) -> ChannelFactors:
    """The rank-``rank`` factors that minimise ``E||W x - W_hat x||^2 + delta ||W - W_hat||_F^2`` exactly.

    Parameters
    ----------
    weight : (N, C) or (N, C, 1, 1), the layer's W.
    covariance : (C, C) ``E[x x^T]`` of its inputs (:attr:`ChannelStats.covariance`).
    rank : R in 1..min(C, N).
    cross : sequential mode: (N, C) ``E[y x^T]`` with ``y = W u`` the original layer's output on its own input
        (:attr:`ChannelStats.cross`). The objective is then ``E||y - W_hat x||^2 + delta ||W - W_hat||_F^2``,
        whose minimiser is ``[T B]_R B^{-1}`` for ``T = (E[y x^T] + delta W)(Sigma + delta I)^{-1}``; with
        ``y = W x`` this is the fit above (T = W).
    damp : ``delta`` relative to the covariance's mean eigenvalue (:data:`lrx.factor.datafit.DAMP`, 1%, as the
        other data fits: it keeps W_hat near W along directions the calibration inputs barely excite; at least
        :data:`lrx.factor.datafit.RIDGE`). Since the weight SVD minimises the damping term alone, the fit's
        output error on these statistics is never above the SVD's; for white inputs (covariance a multiple of I)
        the two fits are the same.

    Returns
    -------
    :class:`ChannelFactors` ``first`` (R, C), ``second`` (N, R): the truncated SVD ``U S V^T`` of ``W B`` gives
    ``first = sqrt(S) V^T B^{-1}`` and ``second = U sqrt(S)``, in the weight's dtype and device.
    """
    check_channel_rank(rank, weight.shape)
    w = _matrix(weight)
    sigma = _covariance(covariance, w.shape[1]).to(w.device)
    shift = _shift(sigma, damp)
    root, right_inverse, right_inverse_t = _whitener(sigma, shift)
    if cross is None:
        target = w @ root  # W B
    else:  # T B = (E[y x^T] + delta W) B^{-T}, since (Sigma + delta I)^{-1} B = B^{-T}
        target = right_inverse_t(_cross(cross, w) + shift * w)
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    first, second = _balanced(u, s, vh, rank)
    return ChannelFactors(right_inverse(first).to(weight.dtype), second.to(weight.dtype))


def _cross(cross: Tensor, w: Tensor) -> Tensor:
    if tuple(cross.shape) != tuple(w.shape):
        raise UserError(f"a cross moment of shape {tuple(cross.shape)} does not fit a weight of shape {tuple(w.shape)}")
    return cross.detach().double().to(w.device)


def channel_fit(weight: Tensor, rank: int, stats: ChannelStats, damp: float = DAMP) -> ChannelFactors:
    """:func:`channel_data_fit` on a layer's statistics: to ``W x`` on the original model's inputs, or in sequential
    mode (statistics with ``yx``) to the original layer's outputs from the inputs the replaced model gives it."""
    cross = None if stats.yx is None else stats.yx / stats.count
    return channel_data_fit(weight, stats.covariance, rank, damp, cross)


@torch.no_grad()
def channel_stats_error(weight: Tensor, approx: Tensor, stats: ChannelStats) -> float:
    """Relative output error of ``approx`` on a layer's statistics: :func:`channel_output_error` without a target of
    its own, else ``sqrt(E||y - W_hat x||^2 / E||y||^2)`` (sequential mode)."""
    if stats.yx is None:
        return channel_output_error(weight, approx, stats.covariance)
    w = _matrix(weight)
    a = _matrix(approx).to(w.device)
    sigma = _covariance(stats.covariance, w.shape[1]).to(w.device)
    energy = stats.yy / stats.count
    err = energy - 2 * (a * _cross(stats.yx / stats.count, w)).sum().item() + ((a @ sigma) * a).sum().item()
    return (max(err, 0.0) / max(energy, 1e-300)) ** 0.5


def channel_weight(factors: ChannelFactors) -> Tensor:
    """``second @ first`` (N, C) float64: the weight the factors compute."""
    return factors.second.double() @ factors.first.double()


@torch.no_grad()
def channel_output_error(weight: Tensor, approx: Tensor, covariance: Tensor) -> float:
    """Relative output error ``sqrt(E||(W - W_hat) x||^2 / E||W x||^2)`` for inputs of second moment ``covariance``.

    ``weight``, ``approx``: (N, C) or (N, C, 1, 1); ``covariance``: (C, C). Undamped: the error on the data itself.
    """
    w = _matrix(weight)
    sigma = _covariance(covariance, w.shape[1]).to(w.device)
    diff = w - _matrix(approx).to(w.device)
    err = ((diff @ sigma) * diff).sum().item()
    energy = ((w @ sigma) * w).sum().item()
    return (max(err, 0.0) / max(energy, 1e-300)) ** 0.5


@torch.no_grad()
def channel_energy(weight: Tensor, covariance: Tensor | None = None) -> Tensor:
    """Share of the energy that the best rank-r expansion keeps, r = 1..min(C, N): ``out[r - 1]``.

    Without ``covariance``: the filter energy, the cumulative share of W's squared singular values (what the
    weight fit keeps of ||W||_F^2). With it: the output energy ``E||W_hat x||^2 / E||W x||^2`` of the data
    fit, from the squared singular values of ``W B`` (B B^T = covariance, ridge :data:`lrx.factor.datafit.RIDGE`
    only: plans compare layers by their data alone). For white inputs the two are the same.

    Returns (min(C, N),) float64, non-decreasing, last entry 1.
    """
    w = _matrix(weight)
    if covariance is not None:
        sigma = _covariance(covariance, w.shape[1]).to(w.device)
        w = w @ _whitener(sigma, _shift(sigma, 0.0))[0]
    s2 = torch.linalg.svdvals(w).square()
    return (s2.cumsum(0) / s2.sum().clamp_min(1e-300)).clamp(max=1.0)


# ------------------------------------------------------------------------------------- statistics


def channel_samples(module: nn.Module, x: Tensor) -> Tensor:
    """The samples a 1x1 conv or linear layer applies its weight to, as a (C, samples) matrix in x's dtype.

    A 1x1 conv (B, C, H, W): one sample per output position, i.e. the input padded as the conv pads it
    (``padding_mode`` included) and taken at the conv's stride: B H' W' samples. A linear layer (B, *, C):
    one sample per row.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T
    if not isinstance(module, nn.Conv2d) or tuple(module.kernel_size) != (1, 1) or module.groups != 1:
        raise UserError(f"channel statistics need a 1x1 nn.Conv2d (groups=1) or an nn.Linear, got {module!r}")
    if not isinstance(module.padding, str) and any(module.padding):
        ph, pw = module.padding
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, (pw, pw, ph, ph), mode=mode)
    sh, sw = module.stride
    x = x[:, :, ::sh, ::sw]
    return x.transpose(0, 1).reshape(x.shape[1], -1)


class _Enough(Exception):
    """Raised once every hooked layer has seen the batch: the rest of the forward is not needed."""


def _gram(x: Tensor) -> Tensor:
    """``x @ x.T`` in x's dtype (float32 for float32 models: one batch's rounding ~1e-6), summed in float64."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return (x @ x.T).double()


@torch.no_grad()
def collect_channel_stats(model: nn.Module, names: Sequence[str], batches: Iterable, images: int = 512,
                          reference: nn.Module | None = None) -> dict[str, ChannelStats]:
    """``sum x x^T`` of the named layers' input samples (:func:`channel_samples`) over the first ``images`` images.

    Parameters
    ----------
    model : the model; it runs in eval mode (every module's mode is put back as it was), with forward pre-hooks
        on ``names``.
    names : qualified names of 1x1 ``nn.Conv2d`` (groups 1) or ``nn.Linear`` modules (with ``reference``: of the
        reference's; in ``model`` they may be replaced already).
    batches : any iterable of ``(x, ...)`` batches with x on the model's device; the rest of a batch is ignored.
    images : stop after this many images (the last batch is cut).
    reference : sequential mode: the original model. Each batch runs through both; ``x`` comes from ``model``
        (its earlier layers replaced), the target ``y = W u`` from the reference layer on its own input u, and
        ``yx``, ``yy`` are kept too (:class:`ChannelStats`).

    Returns
    -------
    ``{name: ChannelStats}``, float64 on the data's device.
    """
    names = list(names)
    originals = {name: (reference if reference is not None else model).get_submodule(name) for name in names}
    for name, module in originals.items():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise UserError(f"layer {name}: channel statistics need a 1x1 nn.Conv2d or an nn.Linear, "
                            f"got {type(module).__name__}")
    stats: dict[str, ChannelStats] = {}
    nets = [model] if reference is None else [model, reference]
    modes = [(m, m.training) for net in nets for m in net.modules()]
    try:
        for net in nets:
            net.eval()
        for x in calibration_images(batches, images):
            inputs = _layer_samples(model, originals, x)
            targets = _layer_samples(reference, originals, x) if reference is not None else {}
            for name in names:
                v = inputs[name]
                if name not in stats:
                    stats[name] = ChannelStats(torch.zeros(v.shape[0], v.shape[0], dtype=torch.float64,
                                                           device=v.device), 0)
                s = stats[name]
                s.xx += _gram(v)
                s.count += v.shape[1]
                s.images += x.shape[0]
                if reference is not None:
                    weight = originals[name].weight
                    y = weight.reshape(weight.shape[0], -1).to(v.dtype) @ targets[name]  # W u, (N, samples)
                    if s.yx is None:
                        s.yx, s.yy = torch.zeros(y.shape[0], v.shape[0], dtype=torch.float64, device=v.device), 0.0
                    s.yx += (y @ v.T).double()
                    s.yy += y.double().square().sum().item()
    finally:
        for m, training in modes:
            m.training = training
    if not stats:
        raise UserError("no calibration images: the batches were empty")
    return stats


def _layer_samples(model: nn.Module, originals: dict[str, nn.Module], x: Tensor) -> dict[str, Tensor]:
    """One forward of ``model`` on ``x``, as far as the last named layer: each named layer's input samples, taken
    with the geometry of the original layer ``originals[name]`` (the module in ``model`` may be its replacement)."""
    seen: dict[str, Tensor] = {}

    def hook(inputs, name):
        seen[name] = channel_samples(originals[name], inputs[0])
        if len(seen) == len(originals):
            raise _Enough

    handles = [model.get_submodule(name).register_forward_pre_hook(lambda m, inputs, name=name: hook(inputs, name))
               for name in originals]
    try:
        model(x)
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in originals if name not in seen]
    if missing:
        raise UserError(f"layer(s) {', '.join(missing)} are not used in the model's forward pass")
    return seen
