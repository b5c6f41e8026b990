"""Data fits on rank-deficient patch statistics: grayscale images saved as RGB (three identical channels).

The first conv's input patches then span at most two of every three channel directions, so their covariance
is singular, and summed from float32 products it is slightly indefinite: a plain Cholesky factorisation
fails. The fits and the output-energy proxy must still give finite factors, and the data fit must stay no
worse than the filter fit on the calibration images.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrx.data.datasets import Batches
from lrx.expansion.model import expand, output_energy
from lrx.factor import datafit
from lrx.nn.layers import LowRankExpConvV1, LowRankExpConvV2

SIZE = 16


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny problems: two threads on the shared cores only spin against each other."""


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def grayscale_as_rgb(count: int = 64) -> Batches:
    """Smooth grayscale photos with a saturated (white) sky, saved as RGB: R = G = B in every pixel."""
    gen = torch.Generator().manual_seed(1)
    gray = F.interpolate(torch.rand(count, 1, 4, 4, generator=gen) * 255, size=SIZE, mode="bilinear")
    gray = gray.round().to(torch.uint8)
    gray[:, :, : SIZE // 3] = 255
    images = gray.expand(-1, 3, -1, -1).contiguous()
    return Batches(images, torch.zeros(count, dtype=torch.int64), 16, SIZE)


def test_the_first_convs_patch_covariance_is_singular_and_not_positive_definite_in_float32():
    """The premise of this file: without care, the whitening of the first conv cannot be factored."""
    model, batches = tiny_model(), grayscale_as_rgb()
    stats = datafit.collect_stats(model, ["0"], batches)["0"]
    sigma = (stats.vv / stats.count).view(3, 3, 3, 3, 3, 3).diagonal(dim1=2, dim2=5).mean(-1).reshape(9, 9)
    values = torch.linalg.eigvalsh(sigma)
    ridge = datafit.RIDGE * values.mean()
    assert values[0] < -ridge, f"float32 sums make the singular covariance indefinite beyond the ridge: {values[:3]}"
    chol = datafit._psd_cholesky(sigma)
    assert torch.isfinite(chol).all() and bool((chol.diagonal() > 0).all()) and torch.equal(chol, chol.tril())
    vals, vecs = torch.linalg.eigh(sigma)
    floored = vecs @ torch.diag(vals.clamp_min(0) + ridge) @ vecs.T
    assert torch.allclose(chol @ chol.T, floored, rtol=0, atol=1e-12 * values.abs().max().item()), \
        "the factor is that of the covariance with negative eigenvalues set to zero, plus the ridge"


def test_a_full_rank_covariance_is_factored_as_before():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 40, generator=gen, dtype=torch.float64)
    sigma = x @ x.T / 40
    eye = torch.eye(9, dtype=torch.float64)
    expected = torch.linalg.cholesky(sigma + datafit.RIDGE * sigma.diagonal().mean() * eye)
    assert torch.equal(datafit._psd_cholesky(sigma), expected), "full-rank statistics: the plain Cholesky factor"


@pytest.mark.parametrize("scheme", ["v1", "v2"])
def test_output_energy_on_grayscale_images_saved_as_rgb(scheme):
    energy = output_energy(tiny_model(), [1, 2], scheme, grayscale_as_rgb())
    for name, shares in energy.items():
        shares = torch.tensor(shares)
        assert torch.isfinite(shares).all(), f"layer {name}: finite shares {shares}"
        assert bool((shares[1:] >= shares[:-1] - 1e-12).all()) and shares[-1] == pytest.approx(1.0), \
            f"layer {name}: shares kept grow with the rank to 1: {shares}"


def finite_factors(model: nn.Module) -> None:
    layers = [m for m in model.modules() if isinstance(m, (LowRankExpConvV1, LowRankExpConvV2))]
    assert len(layers) == 2, "both convs replaced"
    for layer in layers:
        for name, value in layer.named_parameters():
            assert torch.isfinite(value).all(), f"{type(layer).__name__}.{name} is finite"


@pytest.mark.parametrize("scheme, kwargs", [("v1", {}), ("v1", {"basis": "per-channel"}), ("v2", {})])
@pytest.mark.parametrize("ranks", [[2, 4], "auto"])
def test_expand_fit_data_on_grayscale_images_saved_as_rgb(scheme, kwargs, ranks):
    model, batches = tiny_model(), grayscale_as_rgb()
    target = {"speedup": 2.0} if ranks == "auto" else None
    expanded, report = expand(model, [1, 2], scheme, ranks, target=target, fit="data", calibration=batches,
                              input_size=(3, SIZE, SIZE), **kwargs)
    finite_factors(expanded)
    for row in report.layers:
        assert row["output_error"] <= row["output_error_weights"] * (1 + 1e-9) + 1e-12, \
            f"layer {row['name']}: the data fit's output error {row['output_error']} is no worse than the " \
            f"filter fit's {row['output_error_weights']}"
    x = torch.cat([images for images, _ in batches])
    with torch.no_grad():
        y, y_hat = model(x), expanded(x)
    assert torch.isfinite(y_hat).all(), "the expanded model's outputs are finite"
    weights, _ = expand(model, [1, 2], scheme, report.ranks, fit="weights", input_size=(3, SIZE, SIZE), **kwargs)
    first = lambda m: m[0](x)  # noqa: E731  the first conv's output: the layer that sees identical channels
    with torch.no_grad():
        err_data = (first(expanded) - first(model)).norm() / first(model).norm()
        err_weights = (first(weights) - first(model)).norm() / first(model).norm()
    assert err_data <= err_weights * (1 + 1e-4), \
        f"first conv on the calibration images: data fit {err_data:.4f}, filter fit {err_weights:.4f}"
