"""Data-aware fits: output error from patch statistics, scheme 1 and 2 fits, the decomposed refit, lrx.expand(fit="data")."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from lrx.expansion.model import expand, output_energy
from lrx.factor import datafit
from lrx.cli import app
from lrx.factor.decomposition import Scheme1Factors, max_rank, retained_energy, scheme1_svd
from lrx.nn.layers import LowRankExpConvV1, LowRankExpConvV2, scheme2_factors
from lrx.plan.macs import plan_ranks

from conftest import write_yaml

# (C, N, kernel, stride, padding, dilation): square and non-square kernels, stride 2, dilation 2, "same".
GEOMETRIES = [
    (3, 4, (3, 3), 1, 1, 1),
    (2, 5, (3, 5), 2, 1, 1),
    (3, 3, (3, 3), 1, "same", 2),
    (2, 3, (5, 3), 1, 0, 1),
]


@pytest.fixture(autouse=True)
def _undamped(request, monkeypatch):
    """The exactness tests (best iterate, brute force, monotone ALS) are of the plain objective: no damping,
    unless a test is marked ``damped``."""
    if request.node.get_closest_marker("damped") is None:
        monkeypatch.setattr(datafit, "DAMP", 0.0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny float64 problems: two threads on the shared cores only spin against each other."""


def correlated(batch: int, c: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth, low-rank-mixed noise (B, c, size, size): neighbouring pixels and channels are correlated."""
    z = torch.randn(batch, c, size, size, generator=gen, dtype=torch.float64)
    z = F.avg_pool2d(F.pad(z, (1, 1, 1, 1), mode="reflect"), 3, 1)
    mix = torch.randn(c, c, generator=gen, dtype=torch.float64) * torch.linspace(1, 0.05, c, dtype=torch.float64)
    return torch.einsum("dc,bchw->bdhw", mix, z)


def make_conv(c, n, kernel, stride, padding, dilation, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(c, n, kernel, stride=stride, padding=padding, dilation=dilation).double()


def batches_of(c, count=3, batch=4, size=11, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(correlated(batch, c, size, gen), None) for _ in range(count)]


def stats_of(conv, batches):
    return datafit.collect_stats(nn.Sequential(conv), ["0"], batches)["0"]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_output_error_matches_the_conv_outputs(geometry):
    conv = make_conv(*geometry)
    batches = batches_of(geometry[0])
    stats = stats_of(conv, batches)
    x = torch.cat([b[0] for b in batches])
    approx = conv.weight.detach() + 0.1 * torch.randn_like(conv.weight)
    y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation)
    y_hat = F.conv2d(x, approx, None, conv.stride, conv.padding, conv.dilation)
    direct = ((y - y_hat).norm() / y.norm()).item()
    assert datafit.output_error(conv.weight, approx, stats) == pytest.approx(direct, rel=1e-8), \
        "output error from the patch moments equals the error of the conv outputs (stride, padding, dilation)"
    assert stats.count == y.shape[0] * y.shape[2] * y.shape[3], "count = images x output positions"


def test_streamed_stats_equal_one_batch():
    conv = make_conv(3, 4, (3, 3), 2, 1, 1)
    batches = batches_of(3, count=3, batch=5)
    streamed = stats_of(conv, batches)
    whole = stats_of(conv, [(torch.cat([b[0] for b in batches]), None)])
    assert streamed.count == whole.count and streamed.images == whole.images == 15, "same patch and image counts"
    torch.testing.assert_close(streamed.vv, whole.vv, rtol=1e-10, atol=1e-10,
                               msg="moments streamed over 3 batches equal those of one batch")
    cut = datafit.collect_stats(nn.Sequential(conv), ["0"], batches, images=7)["0"]
    assert cut.images == 7, f"collection stops after `images` images, got {cut.images}"


@pytest.mark.parametrize("order", ["vh", "hv"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_scheme2_beats_filter_svd_at_every_rank(geometry, order):
    conv = make_conv(*geometry)
    stats = stats_of(conv, batches_of(geometry[0]))
    w = conv.weight.detach()
    top = max_rank(w.shape, "v2", order=order)
    for rank in range(1, top + 1):
        history = []
        factors = datafit.fit_scheme2(w, rank, stats, order, history=history)
        fitted = LowRankExpConvV2.from_factors(conv, factors, order=order).dense_weight()
        svd = LowRankExpConvV2.from_factors(conv, scheme2_factors(w, rank, order), order=order).dense_weight()
        err = beats_svd_monotonically(w, fitted, svd, stats, history, rank)
        assert err ** 2 == pytest.approx(min(history) / stats_energy(w, stats), rel=1e-6, abs=1e-12), \
            "the returned factors are the best iterate"
    assert err < 1e-6, f"full rank {top} reproduces the outputs, got relative error {err}"


def beats_svd_monotonically(w, fitted, svd, stats, history, rank) -> float:
    """Assert the data fit's output error is <= the filter SVD's and its ALS objective never rose; return it."""
    err, err_svd = datafit.output_error(w, fitted, stats), datafit.output_error(w, svd, stats)
    # squared errors are differences of O(energy) terms: rounding ~1e-14 of the energy (1e-7 in err) at full rank
    assert err ** 2 <= err_svd ** 2 * (1 + 1e-9) + 1e-13, f"rank {rank}: data fit {err} <= filter SVD {err_svd}"
    scale = stats_energy(w, stats)  # rounding is relative to the target's energy
    assert all(b <= a + 1e-10 * scale for a, b in zip(history, history[1:])), \
        f"rank {rank}: ALS objective never increases: {history}"
    return err


def stats_energy(w, stats):
    flat = w.double().reshape(w.shape[0], -1)
    return ((flat @ stats.uu) * flat).sum().item() / stats.count


@pytest.mark.parametrize("basis", ["shared", "per-channel"])
@pytest.mark.parametrize("geometry", GEOMETRIES[:2])
def test_scheme1_beats_filter_svd_at_every_rank(geometry, basis):
    conv = make_conv(*geometry)
    stats = stats_of(conv, batches_of(geometry[0]))
    w = conv.weight.detach()
    top = max_rank(w.shape, "v1", basis=basis)
    for rank in range(1, top + 1):
        history = []
        factors = datafit.fit_scheme1(w, rank, stats, basis, history=history)
        fitted = LowRankExpConvV1.from_factors(conv, factors, basis=basis).dense_weight()
        svd = LowRankExpConvV1.from_factors(conv, scheme1_svd(w, rank, basis), basis=basis).dense_weight()
        err = beats_svd_monotonically(w, fitted, svd, stats, history, rank)
    assert err < 1e-6, f"full rank {top} reproduces the outputs, got relative error {err}"


def test_scheme1_fit_improves_on_svd_somewhere():
    conv = make_conv(3, 4, (3, 3), 1, 1, 1)
    stats = stats_of(conv, batches_of(3))
    w = conv.weight.detach()
    history = []
    datafit.fit_scheme1(w, 2, stats, "per-channel", history=history)
    assert history[-1] < 0.9 * history[0], f"on correlated inputs ALS lowers the SVD start's error: {history}"


@pytest.mark.parametrize("basis", ["shared", "per-channel"])
@pytest.mark.parametrize("geometry", GEOMETRIES[:2])
def test_decomposed_refit(geometry, basis):
    conv = make_conv(*geometry)
    stats = stats_of(conv, batches_of(geometry[0]))
    w = conv.weight.detach()
    factors = scheme1_svd(w, 2, basis)
    before = LowRankExpConvV1.from_factors(conv, factors, decomposed=True, basis=basis)
    coeff = datafit.refit_coefficients(w, factors.bases, stats)
    after = LowRankExpConvV1.from_factors(conv, Scheme1Factors(factors.bases, coeff), decomposed=True, basis=basis)
    err_before = datafit.output_error(w, before.dense_weight(), stats)
    err_after = datafit.output_error(w, after.dense_weight(), stats)
    assert err_after < err_before, f"refitting the coefficients after the split lowers the error: {err_after} vs {err_before}"
    split = datafit.split_bases(factors.bases)
    kernel = torch.einsum("ncm,cmhw->nchw", coeff, split.expand(w.shape[1], *split.shape[-3:]))
    torch.testing.assert_close(after.dense_weight(), kernel, rtol=1e-10, atol=1e-12,
                               msg="the decomposed layer applies exactly the split filters the refit used")
    # any other coefficients for these split filters do no better (a least-squares optimum)
    for _ in range(3):
        other = coeff + 0.01 * torch.randn_like(coeff)
        moved = LowRankExpConvV1.from_factors(conv, Scheme1Factors(factors.bases, other), decomposed=True, basis=basis)
        assert datafit.output_error(w, moved.dense_weight(), stats) >= err_after, "refit coefficients are optimal"


def _brute_force(w, stats, rank, restarts=2, steps=200):
    """Best scheme-2 (vh) output error found by L-BFGS on the factors from random starts."""
    n, c, dh, dw = w.shape
    svv, target = stats.vv / stats.count, (w.reshape(n, -1) @ stats.vu.T) / stats.count
    energy = stats_energy(w, stats)
    best = float("inf")
    gen = torch.Generator().manual_seed(5)
    for _ in range(restarts):
        v = torch.randn(rank, c, dh, generator=gen, dtype=torch.float64).requires_grad_()
        h = torch.randn(n, rank, dw, generator=gen, dtype=torch.float64).requires_grad_()
        opt = torch.optim.LBFGS([v, h], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                                history_size=50, line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            w_hat = torch.einsum("kci,nkj->ncij", v, h).reshape(n, -1)
            value = (energy - 2 * (w_hat * target).sum() + ((w_hat @ svv) * w_hat).sum()) / energy
            value.backward()
            return value

        for _ in range(2):
            opt.step(loss)
        best = min(best, loss().item())
    return best


def test_scheme2_als_matches_brute_force():
    conv = make_conv(2, 3, (3, 3), 1, 1, 1, seed=3)
    stats = stats_of(conv, batches_of(2, seed=4))
    w = conv.weight.detach()
    history = []
    datafit.fit_scheme2(w, 2, stats, "vh", iterations=300, tol=0.0, history=history)
    als = min(history) / stats_energy(w, stats)
    brute = _brute_force(w, stats, 2)
    assert als == pytest.approx(brute, rel=1e-4, abs=1e-8), f"ALS optimum {als} equals the brute-force optimum {brute}"
    assert history[0] / stats_energy(w, stats) >= brute * (1 - 1e-6), "the closed-form start is no better than the optimum"


def separable(n, c, dh, dw, seed):
    """(weight, stats) for patches whose kernel columns are uncorrelated with one covariance: S = I_dw (x) Sigma."""
    gen = torch.Generator().manual_seed(seed)
    root = torch.randn(c * dh, c * dh, generator=gen, dtype=torch.float64)
    sigma = root @ root.T + 0.1 * torch.eye(c * dh, dtype=torch.float64)
    s = torch.einsum("ab,jJ->ajbJ", sigma, torch.eye(dw, dtype=torch.float64)).reshape(c * dh * dw, -1)
    return torch.randn(n, c, dh, dw, generator=gen, dtype=torch.float64), datafit.PatchStats(s, s, s, 1)


def test_scheme2_closed_form_is_optimal_for_uncorrelated_columns():
    rank = 2
    w, stats = separable(3, 2, 3, 3, seed=7)
    history = []
    datafit.fit_scheme2(w, rank, stats, "vh", iterations=0, history=history)
    closed = history[0] / stats_energy(w, stats)
    brute = _brute_force(w, stats, rank)
    assert closed == pytest.approx(brute, rel=1e-5, abs=1e-9), \
        f"for separable inputs the whitened closed form {closed} is the optimum {brute}"


@pytest.mark.parametrize("scheme, kwargs", [("v2", {"order": "vh"}), ("v2", {"order": "auto"}),
                                            ("v1", {"basis": "per-channel"}),
                                            ("v1", {"basis": "shared", "decomposed": True})])
@pytest.mark.parametrize("sequential", [True, False])
def test_expand_fitted_to_data(scheme, kwargs, sequential):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1, stride=2),
                          nn.ReLU(), nn.Conv2d(8, 8, (3, 5), padding=(1, 2)), nn.AdaptiveAvgPool2d(1))
    gen = torch.Generator().manual_seed(2)
    batches = [(correlated(4, 3, 12, gen).float(), None) for _ in range(3)]
    ranks = [3, 2] if scheme == "v2" else [2, 2]
    expanded, report = expand(model, [2, 3], scheme, ranks, fit="data", calibration=batches, images=10,
                                              sequential=sequential, input_size=(3, 12, 12), iterations=10,
                                              **kwargs)
    x = batches[0][0]
    assert expanded(x).shape == model(x).shape, "the expanded model keeps the output shape"
    assert report.fit_data["images"] == 10 and report.fit_data["sequential"] == sequential, "report.fit_data records the run"
    last = report.layers[-1]
    assert last["fit"] == "data", "rows are marked as data fits"
    assert last["output_error"] < last["output_error_weights"], \
        f"the data fit beats the weights fit on the last layer: {last['output_error']} vs {last['output_error_weights']}"
    # the reported error is the error of the layer in the model, measured on its outputs
    names = [row["name"] for row in report.layers]
    stats = datafit.collect_stats(expanded, [names[-1]], batches, 10, reference=model)[names[-1]]
    layer = expanded.get_submodule(names[-1])
    if sequential:
        assert datafit.output_error(model.get_submodule(names[-1]).weight, layer.dense_weight(), stats) == \
            pytest.approx(last["output_error"], rel=1e-5), "sequential output_error is measured on the expanded model's inputs"
    if scheme == "v2":
        assert layer.order == last["order"], "the refitted layer keeps the order expand chose"


@pytest.mark.parametrize("kind", ["v2-vh", "v2-hv", "v1-per-channel"])
def test_conjugate_gradient_steps_never_raise_the_objective(kind, monkeypatch):
    monkeypatch.setattr(datafit, "DENSE_LIMIT", 0)  # the path large layers take
    conv = make_conv(3, 4, (3, 3), 2, 1, 1)
    stats = stats_of(conv, batches_of(3))
    w = conv.weight.detach()
    history, exact = [], []
    if kind.startswith("v2"):
        order = kind[3:]
        datafit.fit_scheme2(w, 3, stats, order, history=history, tol=0.0)
        monkeypatch.setattr(datafit, "DENSE_LIMIT", 10 ** 9)
        datafit.fit_scheme2(w, 3, stats, order, history=exact, tol=0.0)
    else:
        datafit.fit_scheme1(w, 2, stats, "per-channel", history=history, tol=0.0)
        monkeypatch.setattr(datafit, "DENSE_LIMIT", 10 ** 9)
        datafit.fit_scheme1(w, 2, stats, "per-channel", history=exact, tol=0.0)
    scale = stats_energy(w, stats)
    assert all(b <= a + 1e-10 * scale for a, b in zip(history, history[1:])), f"PCG ALS never increases: {history}"
    assert history[-1] < history[0], "PCG steps make progress"
    assert min(history) <= min(exact) * 1.05 + 1e-12 * scale, \
        f"20 sweeps of PCG get within 5% of the exact solves: {min(history)} vs {min(exact)}"


def _sparse_stats(c, n, kernel, seed=3):
    """Statistics of few patches in many dimensions: S_vv nearly singular, as AlexNet's conv3-5 at 64 px."""
    conv = make_conv(c, n, kernel, 1, 0, 1, seed)
    stats = datafit.collect_stats(nn.Sequential(conv), ["0"], batches_of(c, count=1, batch=2, size=kernel[0] + 1))
    return conv, stats["0"]


@pytest.mark.damped
@pytest.mark.parametrize("scheme", ["v2", "v1-decomposed"])
def test_damping_keeps_the_weights_near_the_filters_where_the_data_say_nothing(scheme):
    conv, stats = _sparse_stats(8, 6, (3, 3))
    w = conv.weight.detach().double()
    rank = 2

    def fit(damp):
        datafit.DAMP = damp
        if scheme == "v2":
            factors = datafit.fit_scheme2(conv.weight.detach(), rank, stats, "vh", iterations=10)
            return LowRankExpConvV2.from_factors(conv, factors).dense_weight()
        bases = scheme1_svd(conv.weight.detach(), rank).bases
        coefficients = datafit.refit_coefficients(conv.weight.detach(), bases, stats)
        return LowRankExpConvV1.from_factors(conv, Scheme1Factors(bases, coefficients), decomposed=True).dense_weight()

    try:
        plain, damped = fit(0.0), fit(0.01)
    finally:
        datafit.DAMP = 0.01
    drift = {name: ((approx - w).norm() / w.norm()).item() for name, approx in (("plain", plain), ("damped", damped))}
    assert drift["damped"] < drift["plain"], f"{scheme}: damping keeps the kernel nearer the filters: {drift}"
    if scheme == "v2":
        svd = LowRankExpConvV2.from_factors(conv, scheme2_factors(conv.weight.detach(), rank)).dense_weight()
        assert datafit.output_error(w, damped, stats) <= datafit.output_error(w, svd, stats) + 1e-9, \
            "the damped data fit is still no worse than the filter SVD on the calibration outputs"


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_patches_are_unfolds_columns(geometry):
    conv = make_conv(*geometry)
    x = batches_of(geometry[0], count=1)[0][0]
    padded, padding = x, conv.padding
    if padding == "same":  # as PyTorch: the odd extra on the right / bottom
        total = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        padded = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        padding = 0
    cols = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    assert torch.equal(datafit._patches(conv, x), cols.transpose(0, 1).reshape(cols.shape[1], -1)), \
        "the strided-slice patches are F.unfold's columns, in its order"


def test_reference_statistics_give_the_same_objective():
    conv = make_conv(3, 4, (3, 5), 2, 1, 1)
    model = nn.Sequential(conv)
    batches = batches_of(3)
    plain = stats_of(conv, batches)
    with_reference = datafit.collect_stats(copy.deepcopy(model), ["0"], batches, reference=model)["0"]
    assert with_reference.vu is None and with_reference.yv.shape == (4, 3 * 3 * 5), \
        "with a reference only W S_vu^T (N x P) is kept, not S_vu (P x P)"
    approx = conv.weight.detach() + 0.1 * torch.randn_like(conv.weight)
    assert datafit.output_error(conv.weight, approx, with_reference) == pytest.approx(
        datafit.output_error(conv.weight, approx, plain), rel=1e-9), "both forms of the statistics give the same error"


@pytest.mark.parametrize("scheme, basis", [("v2", "shared"), ("v1", "shared"), ("v1", "per-channel")])
def test_retained_output_energy_is_filter_energy_for_white_patches(scheme, basis):
    w = make_conv(3, 5, (3, 3), 1, 1, 1).weight.detach()
    eye = torch.eye(27, dtype=torch.float64)
    stats = datafit.PatchStats(eye, eye, eye, 1)
    torch.testing.assert_close(datafit.retained_output_energy(w, stats, scheme, basis),
                               retained_energy(w, scheme, basis), rtol=1e-5, atol=1e-5,
                               msg="for white patches the output energy kept is the filter energy kept")


def test_retained_output_energy_is_the_closed_forms_error():
    # Separable patches (S = I_dw (x) Sigma): the whitened closed form is optimal and its error is the spectrum's tail
    # (up to the whitening's 1e-6 ridge).
    w, stats = separable(4, 2, 3, 3, seed=8)
    kept = datafit.retained_output_energy(w, stats, "v2")
    assert kept[-1] == pytest.approx(1.0) and bool((kept[1:] >= kept[:-1]).all()), "shares rise to 1 at full rank"
    for rank in range(1, len(kept) + 1):
        history = []
        datafit.fit_scheme2(w, rank, stats, "vh", iterations=0, history=history)
        assert history[0] / stats_energy(w, stats) == pytest.approx(1 - kept[rank - 1].item(), rel=1e-4, abs=1e-9), \
            f"rank {rank}: 1 - share kept is the closed form's relative squared output error"


class _TwoBranches(nn.Module):
    """Two same-shaped convs on separate input channels: their MACs per rank are equal, their data are not."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x[:, :4]), self.b(x[:, 4:])], 1)


def test_plan_ranks_by_output_energy_beats_filter_energy():
    torch.manual_seed(0)
    model = _TwoBranches().double()
    with torch.no_grad():  # b's filters have a fast-decaying spectrum, a's a flat one
        u, _, vh = torch.linalg.svd(model.b.weight.permute(1, 2, 0, 3).reshape(12, 24), full_matrices=False)
        spectrum = 0.5 ** torch.arange(12, dtype=torch.float64)
        model.b.weight.copy_(((u * spectrum) @ vh).reshape(4, 3, 8, 3).permute(2, 0, 1, 3))
    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):  # a sees one channel pattern (nearly rank 1 across channels), b white noise
        shared = torch.randn(8, 1, 10, 10, generator=gen, dtype=torch.float64)
        x_a = shared * torch.tensor([1.0, -0.5, 0.8, 0.3], dtype=torch.float64)[:, None, None]
        x_a = x_a + 0.01 * torch.randn(8, 4, 10, 10, generator=gen, dtype=torch.float64)
        batches.append((torch.cat([x_a, torch.randn(8, 4, 10, 10, generator=gen, dtype=torch.float64)], 1), None))
    layers, target = ["a", "b"], {"speedup": 2.0}
    retained = output_energy(model, layers, "v2", batches, images=24)
    by_filters = plan_ranks(model, layers, "v2", target, input_size=(8, 10, 10))
    by_data = plan_ranks(model, layers, "v2", target, input_size=(8, 10, 10), retained=retained)
    assert by_filters["proxy"] == "filter energy" and by_data["proxy"] == "given", "the plan records its proxy"
    assert by_data["ranks"] != by_filters["ranks"], f"the proxies disagree here: {by_data['ranks']} vs {by_filters['ranks']}"
    assert by_data["predicted_macs"] <= by_filters["predicted_macs"], "the data plan costs no more MACs"

    def squared_errors(ranks):
        _, report = expand(model, layers, "v2", ranks, fit="data", calibration=batches, images=24, sequential=False,
                                           input_size=(8, 10, 10), iterations=5)
        return sum(row["output_error"] ** 2 for row in report.layers)

    assert squared_errors(by_data["ranks"]) < squared_errors(by_filters["ranks"]), \
        "ranked by output energy, the fitted layers lose less of their outputs at the same MAC target"


def test_decompose_with_auto_ranks_and_fit_data_records_the_proxy_and_the_fit(tiny_configs, tmp_path):
    write_yaml(tiny_configs / "t07.yaml", {"extends": "base.yaml", "baseline": "t01", "profile": {"enabled": False},
                                           "decompose": {"layers": [2, 3], "scheme": "v2", "bases": "auto",
                                                         "target": {"speedup": 2.0}, "fit": "data",
                                                         "calibration": {"images": 32, "iterations": 2}}})
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["decompose", str(tiny_configs / "t07.yaml"), "--runs-dir", str(runs), "--quiet",
                                      "--compare-fits"])
    assert result.exit_code == 0, result.output
    stage = json.loads((runs / "t07" / "metrics.json").read_text())["stages"]["decompose"]
    assert stage["plan"]["proxy"] == "output energy on the calibration images", stage["plan"].get("proxy")
    assert stage["plan"]["predicted_speedup"] >= 2.0, "the data-ranked plan meets the target"
    fit = stage["fit_data"]
    assert fit["images"] == 32 and fit["seconds"] >= fit["seconds_stats"] > 0, f"the fit and its time: {fit}"
    for row in stage["report"]:
        assert row["fit"] == "data" and 0 <= row["output_error"] <= row["output_error_weights"] + 1e-9, \
            f"{row['name']}: both fits' output errors recorded, the data fit no worse"
        assert row["held_out_error"] >= 0 and row["held_out_error_weights"] >= 0, "and on held-out images"
        assert f"{row['held_out_error_weights']:.4f} -> {row['held_out_error']:.4f}" in result.output, \
            f"--compare-fits prints {row['name']}'s held-out errors: {result.output}"
    weights = CliRunner().invoke(app, ["decompose", str(tiny_configs / "t07.yaml"), "--runs-dir", str(runs),
                                       "--compare-fits", "--set", "decompose.fit=weights"])
    assert weights.exit_code == 2 and "decompose.fit" in weights.output and "'weights'" in weights.output, \
        f"--compare-fits without fit: data is refused on one line: {weights.output}"
