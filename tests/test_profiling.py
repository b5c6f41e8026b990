"""Profiling: ptflops counts against the seed's numbers, interleaved latency, profiler times."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrx import profiling
from lrx.config import ProfileConfig
from lrx.models import alexnet_cifar10, conv_layers
from lrx.profiling import count, latency, layer_latency, profile_pair, profiler_times

SEED_BASES = [8, 8, 6, 4]  # the seed's #bases for layers 2,3,4,5


def seed_expansion(model: nn.Module, separable: bool) -> nn.Module:
    """Plain-``nn.Conv2d`` stand-ins with the structure of the seed's scheme-1 layers.

    Row 2: a grouped d x d conv (C -> C*M, groups C, with bias) then a 1x1 conv (C*M -> N).
    Row 6: the grouped conv split into d x 1 then 1 x d (no biases), then the same 1x1 conv.
    """
    out = copy.deepcopy(model)
    for (name, conv), m in zip(conv_layers(model)[1:5], SEED_BASES):
        c, n, d, p = conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.padding[0]
        if separable:
            basis = nn.Sequential(nn.Conv2d(c, c * m, (d, 1), padding=(p, 0), groups=c, bias=False),
                                  nn.Conv2d(c * m, c * m, (1, d), padding=(0, p), groups=c * m, bias=False))
        else:
            basis = nn.Conv2d(c, c * m, d, padding=p, groups=c)
        out.set_submodule(name, nn.Sequential(basis, nn.Conv2d(c * m, n, 1)))
    return out


@pytest.fixture(scope="module")
def alexnet():
    return alexnet_cifar10()


def test_count_reproduces_seed_row_1(alexnet, capsys):
    macs, params = count(alexnet)
    assert macs == pytest.approx(698.89e6, rel=3e-3), f"seed row 1 MACs 698.89M, got {macs / 1e6:.2f}M"
    assert params == pytest.approx(44.43e6, rel=3e-3), f"seed row 1 params 44.43M, got {params / 1e6:.2f}M"
    assert capsys.readouterr() == ("", ""), "count prints nothing"


@pytest.mark.parametrize("separable, seed_macs, seed_params", [(False, 446.85e6, 43.58e6), (True, 437.59e6, 43.56e6)])
def test_count_convention_reproduces_seed_expansions(alexnet, separable, seed_macs, seed_params):
    macs, params = count(seed_expansion(alexnet, separable))
    row = 6 if separable else 2
    assert macs == pytest.approx(seed_macs, rel=3e-3), f"seed row {row} MACs {seed_macs / 1e6}M, got {macs / 1e6:.2f}M"
    assert params == pytest.approx(seed_params, rel=3e-3), f"seed row {row} params {seed_params / 1e6}M, got {params / 1e6:.2f}M"


def test_count_includes_frozen_parameters_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model.train()
    model[0].requires_grad_(False)
    _, params = count(model, (3, 8, 8))
    assert params == (4 * 3 * 9 + 4) + (2 * 4 + 2), f"frozen parameters still count, got {params}"
    assert model.training and not model[0].weight.requires_grad, "count works on a copy: mode and freezing unchanged"


class FunctionalConv(nn.Module):
    """A layer that keeps its weight as a Parameter and calls F.conv2d: unknown to ptflops."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 4, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1)


def test_count_covers_layers_unknown_to_ptflops():
    macs, params = count(nn.Sequential(FunctionalConv(), nn.ReLU()), (4, 10, 10))
    conv_macs, relu_ops = 8 * 4 * 9 * 10 * 10, 8 * 10 * 10
    assert macs == conv_macs + relu_ops, f"F.conv2d inside a custom layer is counted: {macs} != {conv_macs + relu_ops}"
    assert params == 8 * 4 * 9, f"its parameters are counted: {params}"


# ---------------------------------------------------------------- interleaved latency

CALLS: list[str] = []  # module-level: the timed models are deep copies, a list attribute would be copied too
CLOCK = {"s": 0.0}


class FakeCost(nn.Module):
    """Advances the fake clock by the next cost (ms) of its list, and logs its call."""

    def __init__(self, name, costs_ms):
        super().__init__()
        self.name, self.costs_ms, self.calls = name, costs_ms, 0

    def forward(self, x):
        CALLS.append(self.name)
        CLOCK["s"] += self.costs_ms[self.calls % len(self.costs_ms)] / 1000.0
        self.calls += 1
        return x


@pytest.fixture
def fake_clock(monkeypatch):
    CALLS.clear()
    CLOCK["s"] = 0.0
    monkeypatch.setattr(profiling, "_clock", lambda: CLOCK["s"])


def test_latency_interleaves_models_and_uses_medians(fake_clock):
    warmup, repeats = 1, 5
    # After one warm-up call each, the outliers (100, 50, 90 ms) would move a mean but not a median.
    models = {"a": FakeCost("a", [0, 10, 10, 100, 10, 10]),
              "b": FakeCost("b", [0, 5, 5, 5, 50, 5]),
              "c": FakeCost("c", [0, 20, 90, 20, 20, 20])}
    result = latency(models, batch=1, input_size=(1, 2, 2), warmup=warmup, repeats=repeats)
    timed = CALLS[warmup * 3:]
    assert len(timed) == 3 * repeats, f"each model timed once per repeat: {timed}"
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds), f"every repeat visits every model first: {rounds}"
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b"], f"the order rotates by one per repeat: {rounds}"
    stats = result["models"]
    assert stats["a"]["runs_ms"] == pytest.approx([10, 10, 100, 10, 10]), f"per-run times: {stats['a']['runs_ms']}"
    assert (stats["a"]["median_ms"], stats["a"]["min_ms"], stats["a"]["max_ms"]) == pytest.approx((10, 10, 100)), \
        f"median/min/max of a: {stats['a']}"
    assert stats["b"]["speedup"] == pytest.approx(2.0), f"speedup = median(a) / median(b) = 10 / 5, got {stats['b']}"
    assert stats["c"]["speedup"] == pytest.approx(0.5), f"speedup = median(a) / median(c) = 10 / 20, got {stats['c']}"
    assert "speedup" not in stats["a"], "the first model is the reference"


def test_latency_sets_and_restores_threads(fake_clock):
    before = torch.get_num_threads()
    result = latency({"a": FakeCost("a", [1])}, batch=1, input_size=(1, 2, 2), threads=1, warmup=0, repeats=5)
    assert result["threads"] == 1, f"the thread count used is reported: {result['threads']}"
    assert torch.get_num_threads() == before, "torch's thread count is restored afterwards"


# ---------------------------------------------------------------- real timing (tiny models)


def tiny_pair():
    original = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
    expanded = copy.deepcopy(original)
    expanded[2] = nn.Sequential(nn.Conv2d(8, 2, 3, padding=1), nn.Conv2d(2, 16, 1))
    return original, expanded


def test_profiler_times_without_gpu_has_no_cuda_time():
    original, _ = tiny_pair()
    times = profiler_times(original, batch=2, input_size=(3, 16, 16), device="cpu", warmup=1)
    assert times["cuda_time_ms"] is None, f"no CUDA time on the CPU: {times}"
    assert times["cpu_time_ms"] > 0, f"a positive self CPU time: {times}"


def test_layer_latency_times_layers_on_their_real_input():
    original, expanded = tiny_pair()
    (layer,) = layer_latency(original, expanded, ["2"], batch=2, input_size=(3, 12, 12), warmup=0, repeats=5)
    assert layer["input_shape"] == [2, 8, 12, 12], f"the layer's own input shape is used: {layer['input_shape']}"
    assert layer["mac_ratio"] == pytest.approx((8 * 16 * 9 + 16) / (8 * 2 * 9 + 2 + 2 * 16 + 16)), \
        f"MAC ratio of the layer alone: {layer}"
    assert layer["speedup"] == pytest.approx(layer["original_ms"] / layer["expanded_ms"]), "speedup from the medians"


def test_profile_pair_fields():
    original, expanded = tiny_pair()
    cfg = ProfileConfig(input_size=[3, 12, 12], batch=2, warmup=0, repeats=5, device="cpu")
    out = profile_pair(original, expanded, ["2"], cfg, "cpu")
    assert (out["macs"], out["params"]) == count(expanded, (3, 12, 12)), "counts are of the expanded model"
    lat = out["latency"]
    assert lat["mac_ratio"] == pytest.approx(count(original, (3, 12, 12))[0] / out["macs"]), f"MAC ratio: {lat}"
    assert lat["speedup"] == pytest.approx(lat["original_ms"] / lat["expanded_ms"]), f"speedup from medians: {lat}"
    assert lat["realised"] == pytest.approx(lat["speedup"] / lat["mac_ratio"]), f"realised = speedup / MAC ratio: {lat}"
    assert [layer["layer"] for layer in lat["layers"]] == ["2"], f"one entry per replaced layer: {lat['layers']}"
    assert out["cuda_time_ms"] is None and out["device"] == "cpu", f"CPU run: {out}"

    base = profile_pair(original, None, [], cfg, "cpu")
    assert base["params"] == count(original, (3, 12, 12))[1], "a baseline counts the original"
    assert base["latency"]["expanded_ms"] is None and base["latency"]["speedup"] is None and not base["latency"]["layers"], \
        f"a baseline measures the original only: {base['latency']}"
