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
           "channel_data_fit", "channel_weight", "channel_output_error", "channel_energy", "channel_samples",
           "collect_channel_stats"]


class ChannelFactors(NamedTuple):
    """``W_hat = second @ first``: ``first`` (R, C) maps the C inputs to R channels, ``second`` (N, R) those to N outputs."""

    first: Tensor
    second: Tensor


@dataclass
class ChannelStats:
    """Sums over calibration samples of one layer's inputs: ``xx`` = sum x x^T (C, C) float64, ``count`` samples
    (images x output positions, or input rows), ``images`` images."""

    xx: Tensor
    count: int
    images: int = 0

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
    """(B, right_inverse) with ``B B^T = covariance + shift I`` (C, C) and ``right_inverse(X) = X B^{-1}``.

    Cholesky where it factors. A covariance summed from float32 products of inputs confined to a subspace
    (identical channels, dead units) has eigenvalues a little below 0 where they are 0, which a small shift
    need not cover: then its eigenvalues are floored at 0 first and B is the symmetric square root.
    """
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    chol, info = torch.linalg.cholesky_ex(covariance + shift * eye)
    if info.item() == 0:
        return chol, lambda x: torch.linalg.solve_triangular(chol, x, upper=False, left=False)
    values, vectors = torch.linalg.eigh(covariance)
    root = (values.clamp_min(0) + shift).sqrt()
    return (vectors * root) @ vectors.T, lambda x: ((x @ vectors) / root) @ vectors.T


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
def channel_data_fit(weight: Tensor, covariance: Tensor, rank: int, damp: float = DAMP) -> ChannelFactors:
    """The rank-``rank`` factors that minimise ``E||W x - W_hat x||^2 + delta ||W - W_hat||_F^2`` exactly.

    Parameters
    ----------
    weight : (N, C) or (N, C, 1, 1), the layer's W.
    covariance : (C, C) ``E[x x^T]`` of its inputs (:attr:`ChannelStats.covariance`).
    rank : R in 1..min(C, N).
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
    root, right_inverse = _whitener(sigma, _shift(sigma, damp))
    u, s, vh = torch.linalg.svd(w @ root, full_matrices=False)
    first, second = _balanced(u, s, vh, rank)
    return ChannelFactors(right_inverse(first).to(weight.dtype), second.to(weight.dtype))


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
def collect_channel_stats(model: nn.Module, names: Sequence[str], batches: Iterable,
                          images: int = 512) -> dict[str, ChannelStats]:
    """``sum x x^T`` of the named layers' input samples (:func:`channel_samples`) over the first ``images`` images.

    Parameters
    ----------
    model : the model; it runs in eval mode (every module's mode is put back as it was), with forward pre-hooks
        on ``names``.
    names : qualified names of 1x1 ``nn.Conv2d`` (groups 1) or ``nn.Linear`` modules.
    batches : any iterable of ``(x, ...)`` batches with x on the model's device; the rest of a batch is ignored.
    images : stop after this many images (the last batch is cut).

    Returns
    -------
    ``{name: ChannelStats}``, float64 on the data's device.
    """
    names = list(names)
    modules = {name: model.get_submodule(name) for name in names}
    for name, module in modules.items():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise UserError(f"layer {name}: channel statistics need a 1x1 nn.Conv2d or an nn.Linear, "
                            f"got {type(module).__name__}")
    seen: dict[str, Tensor] = {}

    def hook(module, inputs, name):
        seen[name] = channel_samples(module, inputs[0])
        if len(seen) == len(names):
            raise _Enough

    stats: dict[str, ChannelStats] = {}
    modes = [(m, m.training) for m in model.modules()]
    handles = [module.register_forward_pre_hook(lambda m, inputs, name=name: hook(m, inputs, name))
               for name, module in modules.items()]
    try:
        model.eval()
        for x in calibration_images(batches, images):
            seen.clear()
            try:
                model(x)
            except _Enough:
                pass
            missing = [name for name in names if name not in seen]
            if missing:
                raise UserError(f"layer(s) {', '.join(missing)} are not used in the model's forward pass")
            for name in names:
                v = seen[name]
                if name not in stats:
                    stats[name] = ChannelStats(torch.zeros(v.shape[0], v.shape[0], dtype=torch.float64,
                                                           device=v.device), 0)
                s = stats[name]
                s.xx += _gram(v)
                s.count += v.shape[1]
                s.images += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    if not stats:
        raise UserError("no calibration images: the batches were empty")
    return stats
