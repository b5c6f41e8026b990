"""The channel low-rank scheme: 1x1 convs and linear layers as C -> R -> N (lrx.nn.channel.LowRankChannel), its
fits (lrx.factor.channel) and a model expanded with it (lrx.expand(..., scheme="channel"))."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrx.base.errors import UserError
from lrx.expansion.model import ExpansionNote, expand
from lrx.factor.channel import (ChannelFactors, channel_data_fit, channel_energy, channel_macs, channel_output_error,
                                channel_samples, channel_svd, channel_weight, check_channel_rank,
                                collect_channel_stats)
from lrx.measure.profiling import count
from lrx.nn.inference import expansion_layers, optimise
from lrx.nn.channel import LowRankChannel, channel_positions
from lrx.nn.surgery import build_expanded, select_layers


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small problems: two threads on the shared cores only spin against each other."""


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def correlated(samples: int, channels: int, seed: int = 0) -> torch.Tensor:
    """(samples, channels) inputs with a steep, rotated spectrum: a few directions carry most of the energy."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=gen) * torch.logspace(0, -2, channels)[:, None]
    return torch.randn(samples, channels, generator=gen) @ mix


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 24, 1, stride=2),
                         nn.ReLU(), nn.Conv2d(24, 8, 1, bias=False), nn.Flatten(), nn.Linear(8 * 4 * 4, 20),
                         nn.ReLU(), nn.Linear(20, 10))


def expand_channels(model, layers, ranks, **options):
    """lrx.expand with the channel scheme, its notes not warned (the tests read report.notes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExpansionNote)
        return expand(model, layers, "channel", ranks, **options)


def calibration(count_: int = 24, batch: int = 8, size: int = 8) -> list:
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(count_, 3, size, size, generator=gen)
    images = F.avg_pool2d(images, 3, 1, 1)  # neighbouring pixels alike: correlated channels after the first conv
    return [(images[i:i + batch], torch.zeros(batch)) for i in range(0, count_, batch)]


# ------------------------------------------------------------------------------------------ the layer

CONVS = [  # (C, N, stride, padding, padding_mode, bias, H, W)
    (8, 12, 1, 0, "zeros", True, 7, 7),
    (12, 8, 2, 0, "zeros", True, 9, 6),
    (6, 6, (2, 1), 1, "zeros", False, 5, 8),
    (5, 9, 2, 1, "reflect", True, 7, 7),
]


@pytest.mark.parametrize("c,n,stride,padding,mode,bias,h,w", CONVS)
def test_a_conv_at_full_rank_gives_the_convs_output(c, n, stride, padding, mode, bias, h, w):
    torch.manual_seed(0)
    conv = nn.Conv2d(c, n, 1, stride=stride, padding=padding, padding_mode=mode, bias=bias)
    layer = LowRankChannel.from_conv(conv, min(c, n))
    x = torch.randn(3, c, h, w)
    with torch.no_grad():
        want, got = conv(x), layer(x)
    assert got.shape == want.shape, f"output shape {tuple(got.shape)}, the conv's {tuple(want.shape)}"
    assert relative(got, want) < 1e-5, f"full rank differs from the conv by {relative(got, want):.2e}"
    assert relative(layer.dense_weight(), conv.weight.double()) < 1e-6, "dense_weight is the conv's weight at full rank"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(4,), (4, 3), (2, 3, 5)])
@pytest.mark.parametrize("c,n", [(16, 10), (7, 13)])
def test_a_linear_layer_at_full_rank_gives_its_output(c, n, bias, batch_shape):
    torch.manual_seed(0)
    linear = nn.Linear(c, n, bias=bias)
    layer = LowRankChannel.from_linear(linear, min(c, n))
    x = torch.randn(*batch_shape, c)
    with torch.no_grad():
        want, got = linear(x), layer(x)
    assert got.shape == want.shape, f"output shape {tuple(got.shape)}, the linear layer's {tuple(want.shape)}"
    assert relative(got, want) < 1e-5, f"full rank differs from the linear layer by {relative(got, want):.2e}"
    assert (layer.second.bias is not None) == bias, "the bias sits on the second layer, where the original had one"
    assert layer.first.bias is None, "the first layer has no bias"


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_the_layer_holds_plain_modules_shows_its_rank_and_loads_as_a_plain_sequential(kind):
    torch.manual_seed(0)
    module = nn.Conv2d(10, 14, 1, stride=2) if kind == "conv" else nn.Linear(10, 14)
    layer = LowRankChannel.from_module(module, 4)
    plain_type = nn.Conv2d if kind == "conv" else nn.Linear
    assert type(layer.first) is plain_type and type(layer.second) is plain_type, \
        f"the factors are plain {plain_type.__name__}, got {type(layer.first).__name__}, {type(layer.second).__name__}"
    text = repr(layer)
    assert "scheme=channel" in text and "rank=4" in text, f"extra_repr shows scheme and rank: {text}"
    plain = layer.plain()
    assert set(plain.state_dict()) == set(layer.state_dict()), "the plain Sequential has the layer's state-dict keys"
    x = torch.randn(2, 10, 6, 6) if kind == "conv" else torch.randn(2, 10)
    other = LowRankChannel.like(module, 4)
    other.load_state_dict(layer.state_dict())
    with torch.no_grad():
        want = layer(x)
        assert torch.equal(plain(x), want), "the plain Sequential computes the same"
        assert torch.equal(other(x), want), "a layer built from shapes loads the state dict and computes the same"
    assert layer.dense_weight().shape == ((14, 10, 1, 1) if kind == "conv" else (14, 10)), \
        "dense_weight has the replaced layer's weight shape"


@pytest.mark.parametrize("module,reason", [
    (nn.Conv2d(4, 4, 3), "kernel_size=(3, 3)"),
    (nn.Conv2d(4, 4, 1, groups=2), "groups=2"),
    (nn.ReLU(), "got ReLU"),
])
def test_the_layer_refuses_what_it_cannot_replace(module, reason):
    with pytest.raises(UserError, match=re.escape(reason)):
        LowRankChannel.from_module(module, 1, name="net.block")
    with pytest.raises(UserError, match="layer net.block"):
        LowRankChannel.from_module(module, 1, name="net.block")


def test_from_conv_and_from_linear_refuse_the_other_kind():
    with pytest.raises(UserError, match="from_conv needs an nn.Conv2d"):
        LowRankChannel.from_conv(nn.Linear(4, 4), 2)
    with pytest.raises(UserError, match="from_linear needs an nn.Linear"):
        LowRankChannel.from_linear(nn.Conv2d(4, 4, 1), 2)


@pytest.mark.parametrize("rank", [0, 7, -1, 2.0, True])
def test_ranks_outside_one_to_min_c_n_are_refused(rank):
    with pytest.raises(UserError, match=r"ranks 1\.\.6"):
        LowRankChannel.from_linear(nn.Linear(6, 9), rank, name="fc")


def test_factors_of_the_wrong_shape_are_refused():
    with pytest.raises(UserError, match=r"must be \(R, 6\) and \(9, R\)"):
        LowRankChannel.from_factors(nn.Linear(6, 9), torch.zeros(3, 5), torch.zeros(9, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit.(script|trace|trace_method)` is deprecated:FutureWarning")
def test_an_expanded_model_scripts_traces_and_exports_after_optimise():
    """lrx.nn.inference.optimise leaves the channel layers as they are (they are no expansion_layers); every
    capture sees plain convs and linear layers."""
    net, _ = expand_channels(tiny_model().eval(), "auto", 3, input_size=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = net(x)
        optimise(net, "cpu", x)
        program = torch.export.export(net, (x,))
        captured = {"optimised": net, "script": torch.jit.script(net), "trace": torch.jit.trace(net, x),
                    "export": program.module()}
        for how, module in captured.items():
            assert relative(module(x), want) < 1e-5, f"{how} gives other outputs"
    assert expansion_layers(net) == [], "channel layers have no inference path of their own"


# ------------------------------------------------------------------------------------------ the fits


@pytest.mark.parametrize("shape,rank", [((12, 20), 5), ((20, 12, 1, 1), 12), ((9, 9), 1)])
def test_the_weight_fit_is_the_truncated_svd(shape, rank):
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    first, second = channel_svd(weight, rank)
    assert first.shape == (rank, shape[1]) and second.shape == (shape[0], rank), "first (R, C), second (N, R)"
    s = torch.linalg.svdvals(weight.reshape(shape[0], shape[1]).double())
    want = (s[rank:].square().sum() / s.square().sum()).sqrt().item()
    got = relative(channel_weight(ChannelFactors(first, second)), weight.double().reshape(shape[0], shape[1]))
    assert got == pytest.approx(want, abs=1e-6), f"error {got} is Eckart-Young's {want}"
    energy = channel_energy(weight)
    assert energy[rank - 1].item() == pytest.approx(1 - want ** 2, abs=1e-6), "channel_energy is the kept share"


def test_the_data_fit_equals_the_weight_fit_for_white_inputs():
    torch.manual_seed(0)
    weight = torch.randn(10, 16)
    for rank in (1, 4, 10):
        svd = channel_weight(channel_svd(weight, rank))
        data = channel_weight(channel_data_fit(weight, 3.0 * torch.eye(16), rank))
        assert relative(data, svd) < 1e-5, f"rank {rank}: white inputs give the SVD, differ by {relative(data, svd):.2e}"
    assert torch.allclose(channel_energy(weight, 3.0 * torch.eye(16)), channel_energy(weight), atol=1e-6), \
        "output energy equals filter energy for white inputs"


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_the_data_fit_beats_the_weight_fit_on_correlated_inputs_and_is_the_optimum(rank):
    torch.manual_seed(0)
    weight = torch.randn(14, 20)
    x = correlated(2000, 20)
    covariance = x.double().T @ x.double() / x.shape[0]
    svd_error = channel_output_error(weight, channel_weight(channel_svd(weight, rank)), covariance)
    data_error = channel_output_error(weight, channel_weight(channel_data_fit(weight, covariance, rank)), covariance)
    assert data_error <= svd_error + 1e-9, f"data fit {data_error:.4f} above the SVD's {svd_error:.4f}"
    assert data_error < 0.9 * svd_error, f"on correlated inputs the data fit should gain: {data_error:.4f} vs {svd_error:.4f}"
    undamped = channel_output_error(weight, channel_weight(channel_data_fit(weight, covariance, rank, damp=0.0)),
                                    covariance)
    optimum = (1 - channel_energy(weight, covariance)[rank - 1].item()) ** 0.5
    assert undamped == pytest.approx(optimum, abs=1e-4), f"undamped fit {undamped:.5f} is the optimum {optimum:.5f}"
    measured = relative(x @ channel_weight(channel_data_fit(weight, covariance, rank, damp=0.0)).float().T, x @ weight.T)
    assert measured == pytest.approx(undamped, rel=1e-3), "channel_output_error is the error on the samples"


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_the_data_fit_survives_a_singular_slightly_indefinite_covariance(damp):
    torch.manual_seed(0)
    weight = torch.randn(8, 12)
    x = correlated(500, 6).repeat(1, 2)  # each channel twice: rank 6 of 12
    covariance = x.T @ x / x.shape[0]  # float32 sums: eigenvalues a little below 0 where they are 0
    covariance = covariance.double() - 1e-4 * covariance.diagonal().mean().item() * torch.eye(12, dtype=torch.float64)
    assert torch.linalg.eigvalsh(covariance).min() < 0, "premise: the covariance is indefinite"
    factors = channel_data_fit(weight, covariance, 3, damp=damp)
    assert all(torch.isfinite(f).all() for f in factors), "finite factors"
    clean = x.double().T @ x.double() / x.shape[0]
    data_error = channel_output_error(weight, channel_weight(factors), clean)
    svd_error = channel_output_error(weight, channel_weight(channel_svd(weight, 3)), clean)
    assert data_error <= svd_error + 1e-3, f"data fit {data_error:.4f} not above the SVD's {svd_error:.4f}"


def test_channel_energy_rises_to_one():
    torch.manual_seed(0)
    weight = torch.randn(6, 9)
    for covariance in (None, torch.eye(9) + 0.5):
        energy = channel_energy(weight, covariance)
        assert energy.shape == (6,), f"one entry per rank 1..min(C, N), got {tuple(energy.shape)}"
        assert bool((energy[1:] >= energy[:-1] - 1e-12).all()), "non-decreasing"
        assert energy[-1].item() == pytest.approx(1.0), "full rank keeps all"


def test_a_covariance_of_the_wrong_size_is_refused():
    with pytest.raises(UserError, match=r"must be \(6, 6\)"):
        channel_data_fit(torch.zeros(4, 6), torch.eye(5), 2)
    with pytest.raises(UserError, match=r"rank 5 is out of range"):
        check_channel_rank(5, (4, 6))


# ------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("stride,padding,mode", [(1, 0, "zeros"), (2, 1, "zeros"), ((1, 2), 1, "replicate")])
def test_conv_statistics_take_one_sample_per_output_position(stride, padding, mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 1, stride=stride, padding=padding, padding_mode=mode)
    x = torch.randn(3, 5, 7, 6)
    samples = channel_samples(conv, x)
    out = conv(x)
    assert samples.shape == (5, 3 * out.shape[2] * out.shape[3]), f"{tuple(samples.shape)}: C x (B H' W')"
    with torch.no_grad():
        y = (conv.weight[:, :, 0, 0] @ samples + conv.bias[:, None]).reshape(7, 3, *out.shape[2:]).transpose(0, 1)
    assert torch.allclose(y, out, atol=1e-5), "the conv's output is W times the samples, in order"


def test_statistics_stream_over_batches_and_stop_at_images():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, stride=2), nn.Flatten(2), LinearOnLast(4, 6)).train()
    batches = calibration(count_=24, batch=8, size=8)
    stats = collect_channel_stats(model, ["0", "2.linear"], batches, images=20)
    x = torch.cat([b[0] for b in batches])[:20]
    conv_samples = x[:, :, ::2, ::2].transpose(0, 1).reshape(3, -1).double()
    assert stats["0"].count == 20 * 16 and stats["0"].images == 20, "20 images x 4 x 4 positions"
    assert torch.allclose(stats["0"].xx, conv_samples @ conv_samples.T, rtol=1e-5), "conv sums of x x^T"
    rows = model[1](model[0](x)).transpose(1, 2).reshape(-1, 4).double()
    assert stats["2.linear"].count == 20 * 16, "one sample per row of the linear layer's (B, 16, 4) input"
    assert torch.allclose(stats["2.linear"].xx, rows.T @ rows, rtol=1e-4, atol=1e-6), "linear sums of x x^T"
    assert model.training and model[0].training, "the model's modes are put back"


class LinearOnLast(nn.Module):
    """A linear layer on the last dimension of a (B, C, T) map: a (B, T, C) input to nn.Linear."""

    def __init__(self, c: int, n: int):
        super().__init__()
        self.linear = nn.Linear(c, n)

    def forward(self, x):
        return self.linear(x.transpose(1, 2))


# ------------------------------------------------------------------------------------------ the model


def test_full_rank_expansion_of_a_model_gives_its_outputs_and_rebuilds_from_its_spec():
    model = tiny_model().eval()
    new, report = expand_channels(model, ["2", "4", "6", "8"], [12, 8, 20, 10], input_size=(3, 8, 8))
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert relative(new(x), model(x)) < 1e-5, "full rank everywhere reproduces the model"
    assert [type(new.get_submodule(n)) for n in report.spec["layers"]] == [LowRankChannel] * 4, "layers replaced"
    assert report.spec["scheme"] == "channel" and [row["kind"] for row in report.layers] == ["conv", "conv", "linear",
                                                                                             "linear"]
    assert type(model[2]) is nn.Conv2d, "the model passed in is not modified"
    again = build_expanded(model, report.spec)
    again.load_state_dict(new.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(x), new(x)), "build_expanded + the state dict give the same model"


def test_the_report_counts_macs_as_ptflops_does():
    model = tiny_model().eval()
    ranks = [5, 3, 6, 4]
    new, report = expand_channels(model, ["2", "4", "6", "8"], ranks, input_size=(3, 8, 8))
    before, _ = count(model, (3, 8, 8))
    after, _ = count(new, (3, 8, 8))
    saved = sum(row["macs_before"] - row["macs_after"] for row in report.layers)
    assert before - after == saved, f"ptflops saves {before - after} MACs, the report {saved}"
    by_name = {row["name"]: row for row in report.layers}
    assert by_name["2"]["positions"] == 16 and by_name["6"]["positions"] == 1, "H' W' of a conv, rows of a linear"
    assert by_name["4"]["macs_after"] == channel_macs(24, 8, 3, 16) == 3 * (24 + 8) * 16, "R (C + N) H' W'"
    # Layer alone, no bias: ptflops counts exactly the formula.
    conv = nn.Conv2d(24, 8, 1, bias=False)
    assert count(conv, (24, 4, 4))[0] == by_name["4"]["macs_before"], "C N H' W' of the dense conv"
    assert count(LowRankChannel.from_conv(conv, 3), (24, 4, 4))[0] == by_name["4"]["macs_after"], "of the expansion"
    linear = nn.Linear(7, 9, bias=False)
    assert count(LowRankChannel.from_linear(linear, 2), (5, 7))[0] == channel_macs(7, 9, 2, 5), "R (C + N) per row"


@pytest.mark.parametrize("sequential", [False, True])
def test_the_data_fit_lowers_the_output_error_on_the_calibration_images(sequential):
    model = tiny_model().eval()
    batches = calibration()
    _, data = expand_channels(model, ["2", "6"], [3, 4], fit="data", calibration=batches, sequential=sequential,
                              input_size=(3, 8, 8))
    assert data.fit_data["images"] == 24 and data.fit_data["sequential"] == sequential, "all 24 images used"
    _, weights = expand_channels(model, ["2", "6"], [3, 4], input_size=(3, 8, 8))
    for w_row, d_row in zip(weights.layers, data.layers):
        assert d_row["output_error"] <= d_row["output_error_weights"] + 1e-9, \
            f"{d_row['name']}: data fit {d_row['output_error']:.4f} above the weight fit's {d_row['output_error_weights']:.4f}"
        assert d_row["output_error"] < 1.0 and d_row["fit"] == "data" and d_row["sweeps"] == 0, "a closed form"
        assert d_row["rel_error"] >= w_row["rel_error"] - 1e-9, "the SVD has the least weight error"


def test_the_sequential_data_fit_targets_the_originals_outputs():
    """Sequential mode: each layer's inputs come from the model whose earlier layers are replaced, its target from
    the original. At full rank for the later layer, its fit corrects the earlier layer's error on these images:
    its output error on the sequential statistics is below the weight fit's (which copies W)."""
    model = tiny_model().eval()
    batches = calibration(count_=48)
    _, report = expand_channels(model, ["2", "4"], [2, 8], fit="data", calibration=batches, input_size=(3, 8, 8))
    second = report.layers[1]
    assert second["output_error_weights"] > 0.01, "the first layer's error reaches the second: W alone misses it"
    assert second["output_error"] < second["output_error_weights"], \
        f"the refit lowers it: {second['output_error']:.4f} vs {second['output_error_weights']:.4f}"


def test_sequential_statistics_of_an_untouched_model_are_the_plain_ones():
    """With nothing replaced before a layer, the sequential cross moment is W E[x x^T] and the sequential fit
    equals the plain data fit."""
    model = tiny_model().eval()
    batches = calibration()
    plain = collect_channel_stats(model, ["4"], batches)["4"]
    seq = collect_channel_stats(model, ["4"], batches, reference=model)["4"]
    w = model[4].weight.detach().double().reshape(8, 24)
    assert torch.allclose(seq.xx, plain.xx) and torch.allclose(seq.yx, w @ plain.xx, rtol=1e-4, atol=1e-6), \
        "cross moment = W sum x x^T"
    a = channel_weight(channel_data_fit(model[4].weight, plain.covariance, 3))
    b = channel_weight(channel_data_fit(model[4].weight, seq.covariance, 3, cross=seq.yx / seq.count))
    assert relative(b, a) < 1e-4, "the same fit from either form"


@pytest.mark.parametrize("layers,ranks,message", [
    (["0"], [2], r"layer 1 \('0'\): kernel_size=\(3, 3\)"),
    ([1], [2], r"layer 1 \('0'\): kernel_size=\(3, 3\)"),
    (["1"], [2], "no conv or linear layer named '1'"),
    (["fc"], [2], "no conv or linear layer named 'fc'"),
    (["2"], [13], r"layer 2 \('2'\): rank 13 is out of range.*ranks 1\.\.12"),
    (["8"], [11], r"layer '8': rank 11 is out of range.*ranks 1\.\.10"),
    (["2"], [0], r"rank 0 is out of range"),
    (["2", "6"], [3], "1 ranks given for 2 layers"),
    (["2", "2"], [3, 3], "given more than once"),
    (["conv*"], [3], "pattern 'conv\\*' matches no conv or linear layer"),
    ([], [], "no layers to expand"),
])
def test_bad_requests_are_refused_naming_the_layer(layers, ranks, message):
    with pytest.raises(UserError, match=message):
        expand_channels(tiny_model(), layers, ranks, input_size=(3, 8, 8))


def test_grouped_convs_and_bad_fits_are_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), nn.Linear(4, 4))
    with pytest.raises(UserError, match=r"layer 1 \('0'\): groups=2"):
        expand_channels(model, ["0"], 1, input_size=(4, 2, 4))
    with pytest.raises(UserError, match="fit 'data' needs calibration"):
        expand_channels(model, ["1"], 1, fit="data", input_size=(4, 2, 4))
    with pytest.raises(UserError, match="unknown fit 'filters'"):
        expand_channels(model, ["1"], 1, fit="filters", input_size=(4, 2, 4))


def test_patterns_skip_what_the_scheme_cannot_replace_with_a_note():
    notes: list[str] = []
    chosen = select_layers(tiny_model(), ["auto"], "channel", notes=notes)
    assert [(index, name) for index, name, _ in chosen] == [(2, "2"), (3, "4"), (None, "6"), (None, "8")], \
        f"1x1 convs (with their conv index) and linears (none) chosen: {chosen}"
    assert notes == ["layer 1 ('0') skipped: kernel_size=(3, 3): the channel scheme replaces 1x1 convs only "
                     "(schemes v1 and v2 expand larger kernels)"], f"the 3x3 conv is noted: {notes}"
    _, report = expand_channels(tiny_model(), "*", 2, input_size=(3, 8, 8))
    assert report.spec["ranks"] == [2, 2, 2, 2] and len(report.notes) == 1, "one rank for all; the note kept"
    assert channel_positions(tiny_model(), ["2", "8"], (3, 8, 8)) == {"2": 16, "8": 1}, "positions per image"


def test_a_rank_that_costs_more_than_the_dense_layer_is_noted():
    _, report = expand_channels(nn.Sequential(nn.Linear(4, 4)), ["0"], [4], input_size=(4,))
    assert report.notes == ["layer '0': rank 4 costs 2.00x the layer's MACs (MAC ratio 0.50); a lower rank saves "
                            "MACs"], f"note: {report.notes}"
