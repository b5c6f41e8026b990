"""Profiling: ptflops counts against the seed's numbers, interleaved latency, profiler times."""
import contextlib
import copy
import statistics
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrx.measure import timing
from lrx.measure.machine import cpu_name
from lrx.base.errors import UserError
from lrx.config.settings import ProfileConfig, load_config
from lrx.expansion.model import expand
from lrx.nn.models import alexnet_cifar10, build_model, conv_layers
from lrx.measure.profiling import count, layer_latency, profile_pair, profiler_times
from lrx.measure.layouts import ROUNDS_DISAGREE, combine_rounds, original_layouts, time_pair, time_rounds
from lrx.measure.timing import NOISY_SPREAD, latency, module_times, summarise, timed_units

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
    monkeypatch.setattr(timing, "_clock", lambda: CLOCK["s"])


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


def test_profile_pair_fields(one_thread):
    original, expanded = tiny_pair()
    cfg = ProfileConfig(input_size=[3, 12, 12], batch=2, warmup=0, repeats=5, min_time_s=0.0, device="cpu")
    out = profile_pair(original, expanded, ["2"], cfg, "cpu")
    assert (out["macs"], out["params"]) == count(expanded, (3, 12, 12)), "counts are of the expanded model"
    lat = out["latency"]
    assert lat["mac_ratio"] == pytest.approx(count(original, (3, 12, 12))[0] / out["macs"]), f"MAC ratio: {lat}"
    assert lat["speedup"] == pytest.approx(statistics.median(lat["round_speedups"])), \
        f"the speedup is the median of the rounds' own: {lat}"
    assert lat["realised"] == pytest.approx(lat["speedup"] / lat["mac_ratio"]), f"realised = speedup / MAC ratio: {lat}"
    assert [layer["layer"] for layer in lat["layers"]] == ["2"], f"one entry per replaced layer: {lat['layers']}"
    assert out["cuda_time_ms"] is None and out["device"] == "cpu", f"CPU run: {out}"
    assert out["device_name"] == f"{cpu_name()}, {os.cpu_count()} CPUs, {lat['threads']} threads" \
        and out["torch"] == torch.__version__, f"what the times were taken on: {out['device_name']}, {out['torch']}"

    base = profile_pair(original, None, [], cfg, "cpu")
    assert base["params"] == count(original, (3, 12, 12))[1], "a baseline counts the original"
    assert base["latency"]["expanded_ms"] is None and base["latency"]["speedup"] is None and not base["latency"]["layers"], \
        f"a baseline measures the original only: {base['latency']}"


# ---------------------------------------------------------------- numbers a user can trust (issue 14)


@pytest.mark.parametrize("runs, noisy", [
    ([10, 10, 10, 10, 10], False),
    ([8, 10, 12, 14, 10], False),  # quartiles 10 and 12: (p75 - p25) / median = 0.2, the limit itself
    ([8, 10, 13, 14, 10], True),   # quartiles 10 and 13: 0.3 > NOISY_SPREAD
    ([10, 10], True),              # too few repeats to know
])
def test_noise_rule(runs, noisy):
    stats = summarise(runs)
    assert NOISY_SPREAD == 0.2, "the documented rule: the middle half of the repeats within 20% of the median"
    assert stats["noisy"] is noisy, f"{runs}: {stats}"
    assert stats["repeats"] == len(runs) and stats["p25_ms"] <= stats["median_ms"] <= stats["p75_ms"], stats


class LayoutCost(nn.Module):
    """Costs (ms on the fake clock) by layout: NCHW 10, channels_last weights 6, oneDNN off 8."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 3, 2, 2))

    def forward(self, x):
        last = self.weight.is_contiguous(memory_format=torch.channels_last)
        CALLS.append("channels_last" if last else "nnpack" if not torch.backends.mkldnn.enabled else "default")
        CLOCK["s"] += (6 if last else 10 if torch.backends.mkldnn.enabled else 8) / 1000.0
        return x


class Costly(FakeCost):
    """A FakeCost with a parameter (a model ptflops counts and lrx.nn.inference optimises)."""

    def __init__(self, name, costs_ms):
        super().__init__(name, costs_ms)
        self.weight = nn.Parameter(torch.zeros(1))


def test_time_pair_compares_with_the_fastest_plain_layout_and_reports_the_default(fake_clock):
    cpu = torch.device("cpu")
    timed = time_pair(LayoutCost(), FakeCost("expanded", [3]), (3, 2, 2), 1, cpu, warmup=0, repeats=4)
    assert set(timed["layouts"]) >= {"default", "channels_last"}, f"layouts tried: {list(timed['layouts'])}"
    assert timed["original_layout"] == "channels_last" and timed["original"]["median_ms"] == pytest.approx(6), timed
    assert timed["speedup"] == pytest.approx(6 / 3), "speedup against the fastest layout of the original"
    assert timed["speedup_default"] == pytest.approx(10 / 3), "PyTorch's default layout beside it"
    assert CALLS[:len(timed["layouts"]) + 1] != CALLS[len(timed["layouts"]) + 1:2 * (len(timed["layouts"]) + 1)], \
        f"original layouts and expansion alternate in a rotating order: {CALLS}"
    plain = time_pair(LayoutCost(), None, (3, 2, 2), 1, cpu, warmup=0, repeats=3, plain_only=True)
    assert list(plain["layouts"]) == ["default"] and plain["expanded"] is None and plain["speedup"] is None, plain


def test_time_pair_gives_the_expansion_its_fastest_plain_layout_too(fake_clock):
    """An expansion whose lrx paths (9 ms) are slower than its plain channels_last layout (6 ms) is timed at
    6 ms: both models in their own fastest layout, and both layouts named."""
    cpu = torch.device("cpu")
    timed = time_pair(LayoutCost(), FakeCost("lrx", [9]), (3, 2, 2), 1, cpu, warmup=0, repeats=3,
                      expanded_plain=LayoutCost())
    assert set(timed["expanded_layouts"]) >= {"lrx", "default", "channels_last"}, timed["expanded_layouts"].keys()
    assert timed["expanded_layout"] == "channels_last" and timed["expanded"]["median_ms"] == pytest.approx(6), timed
    assert timed["speedup"] == pytest.approx(1.0), "fastest original against fastest expansion"
    assert timed["speedup_default"] == pytest.approx(10 / 6), "the original's default layout against the expansion's best"
    alone = time_pair(LayoutCost(), FakeCost("lrx", [9]), (3, 2, 2), 1, cpu, warmup=0, repeats=3)
    assert list(alone["expanded_layouts"]) == ["lrx"] and alone["speedup"] == pytest.approx(6 / 9), \
        "without a plain copy the expansion runs on its paths alone"
    plain = time_pair(LayoutCost(), FakeCost("e", [9]), (3, 2, 2), 1, cpu, warmup=0, repeats=3, plain_only=True,
                      expanded_plain=LayoutCost())
    assert list(plain["expanded_layouts"]) == ["default"], "profile.optimise: false times the plain expansion alone"


def _round(original_ms: float, expanded_ms: float) -> dict:
    stats = {name: summarise([ms] * 3) for name, ms in (("original", original_ms), ("expanded", expanded_ms))}
    return {"layouts": {"default": stats["original"]}, "expanded_layouts": {"lrx": stats["expanded"]},
            "expanded": stats["expanded"], "speedup": original_ms / expanded_ms,
            "speedup_default": original_ms / expanded_ms}


def test_the_speedup_of_rounds_is_the_median_of_their_own_speedups():
    """The machine runs faster in round 1 than in rounds 2 and 3: each round's ratio is 1.79x-2.14x, the
    ratio of the medians of the models' times (250 / 140) would be 1.79x, below two of the three rounds."""
    drift = combine_rounds([_round(200, 100), _round(300, 140), _round(250, 140)])
    assert drift["speedup"] == pytest.approx(2.0) and drift["speedup_default"] == pytest.approx(2.0), drift
    assert min(drift["round_speedups"]) <= drift["speedup"] <= max(drift["round_speedups"])


def test_rounds_take_the_median_of_medians_and_flag_a_round_that_disagrees():
    slow = combine_rounds([_round(200, 100), _round(200, 200), _round(200, 100)])
    assert slow["expanded"]["median_ms"] == pytest.approx(100) and slow["speedup"] == pytest.approx(2.0), \
        "one slow round moves neither the median of medians nor the speedup"
    assert slow["expanded"]["round_medians_ms"] == [100, 200, 100], slow["expanded"]
    assert slow["round_speedups"] == [2.0, 1.0, 2.0] and slow["rounds"] == 3, slow
    assert slow["rounds_disagree"] and slow["expanded"]["noisy"], "a 2x slow round is flagged"
    close = combine_rounds([_round(200, 100), _round(204, 100), _round(200, 97)])
    assert not close["rounds_disagree"] and not close["expanded"]["noisy"], \
        f"rounds within {ROUNDS_DISAGREE:.0%} of each other are not flagged: {close['round_speedups']}"
    base = combine_rounds([{**_round(200, 100), "expanded": None, "expanded_layouts": {}, "speedup": None}] * 2)
    assert base["expanded"] is None and base["round_speedups"] is None and not base["rounds_disagree"], base


def test_time_rounds_builds_fresh_models_each_round(fake_clock):
    made = []

    def make():
        made.append(LayoutCost())
        return made[-1], FakeCost("lrx", [3]), None

    timed = time_rounds(make, (3, 2, 2), 1, torch.device("cpu"), warmup=0, repeats=3, rounds=4)
    assert len(made) == 4 and len({id(m) for m in made}) == 4, "each round times new copies"
    assert timed["rounds"] == 4 and len(timed["expanded"]["round_medians_ms"]) == 4, timed
    with pytest.raises(UserError, match="rounds"):
        time_rounds(make, (3, 2, 2), 1, torch.device("cpu"), warmup=0, repeats=3, rounds=0)


def test_profile_pair_records_rounds_and_flags_a_slow_round(fake_clock):
    """Three rounds; the expansion's fresh copy in round two runs 2x slow: the figure is the other rounds',
    and the profile says its rounds disagree."""
    cfg = ProfileConfig(input_size=[3, 2, 2], batch=1, warmup=0, repeats=3, rounds=3, min_time_s=0.0, device="cpu",
                        optimise=False)
    copies = []

    class Slow(Costly):
        def __deepcopy__(self, memo):
            copies.append(1)
            return Slow("expanded", [6] if len(copies) == 3 else [3])  # copies: ptflops, round 1, round 2, ...

    out = profile_pair(LayoutCost(), Slow("expanded", [3]), [], cfg, "cpu", per_layer=False, breakdown=False)
    lat = out["latency"]
    assert lat["rounds"] == 3 and lat["round_speedups"] == pytest.approx([10 / 3, 10 / 6, 10 / 3]), lat["round_speedups"]
    assert lat["speedup"] == pytest.approx(10 / 3) and lat["expanded_ms"] == pytest.approx(3), lat
    assert lat["rounds_disagree"] and lat["noisy"], "a round at half speed marks the profile noisy"
    assert lat["spread"]["expanded"]["round_medians_ms"] == pytest.approx([3, 6, 3]), lat["spread"]["expanded"]


def test_original_layouts_on_cpu():
    model = nn.Conv2d(3, 4, 3).eval()
    layouts = original_layouts(model, torch.device("cpu"))
    assert layouts["default"][0] is model, "the default layout is the model as given"
    assert layouts["channels_last"][0].weight.is_contiguous(memory_format=torch.channels_last), "a channels_last copy"
    assert model.weight.is_contiguous(), "the caller's model keeps its layout"
    if torch._nnpack_available():
        with layouts["nnpack"][1]():
            assert not torch.backends.mkldnn.enabled, "the NNPACK layout runs with oneDNN off"
        assert torch.backends.mkldnn.enabled, "and restores it"
    assert list(original_layouts(model, torch.device("cpu"), plain_only=True)) == ["default"]


def test_profile_pair_time_columns_are_the_interleaved_medians(fake_clock):
    cfg = ProfileConfig(input_size=[3, 2, 2], batch=1, warmup=0, repeats=5, rounds=1, min_time_s=0.0, device="cpu")
    # The expansion's five repeats: 5, 5, 9, 5, 9 ms -> median 5, quartiles 5 and 9: noisy.
    out = profile_pair(LayoutCost(), Costly("expanded", [5, 5, 9, 5, 9]), [], cfg, "cpu", per_layer=False,
                       breakdown=False)
    lat = out["latency"]
    assert out["cpu_time_ms"] == pytest.approx(5) and out["cpu_time"]["median_ms"] == lat["expanded_ms"], \
        f"the CPU time column is the expansion's interleaved median: {out['cpu_time']}"
    assert (out["cpu_time"]["p25_ms"], out["cpu_time"]["p75_ms"], out["cpu_time"]["repeats"]) == pytest.approx((5, 9, 5)), \
        out["cpu_time"]
    assert out["cpu_time"]["noisy"] and lat["noisy"], "a spread of 80% of the median is marked noisy"
    assert out["cpu_time"]["batch"] == 1, "the column records the batch it was timed at"
    assert lat["original_layout"] == "channels_last" and lat["original_ms"] == pytest.approx(6), lat
    assert lat["speedup"] == pytest.approx(6 / 5) and lat["speedup_default"] == pytest.approx(10 / 5), \
        "the remark's speedup comes from the same medians as the column"
    assert set(lat["spread"]["layouts"]) >= {"default", "channels_last"} and lat["spread"]["expanded"]["runs_ms"] == \
        pytest.approx([5, 5, 9, 5, 9]), lat["spread"]

    base = profile_pair(LayoutCost(), None, [], cfg, "cpu", per_layer=False, breakdown=False)
    assert base["cpu_time_ms"] == pytest.approx(6) and base["cpu_time"]["layout"] == "channels_last", \
        f"a baseline's column is the original in its fastest layout: {base['cpu_time']}"
    assert not base["cpu_time"]["noisy"], base["cpu_time"]


def tiny_expansion(scheme="v2"):
    original = build_model("tiny_cnn")
    expanded, report = expand(build_model("tiny_cnn"), [2, 3], scheme, [4, 4])
    return original, expanded, [layer["name"] for layer in report.layers]


@pytest.mark.parametrize("scheme", ["v1", "v2"])
def test_optimised_profile_fills_per_layer_macs(one_thread, scheme):
    original, expanded, names = tiny_expansion(scheme)
    cfg = ProfileConfig(input_size=[3, 16, 16], batch=2, warmup=0, repeats=3, min_time_s=0.0, device="cpu", optimise=True)
    out = profile_pair(original, expanded, names, cfg, "cpu", breakdown=False)
    assert out["paths"] and all(p != "default" for p in out["paths"].values()), f"optimised paths: {out['paths']}"
    layers = out["latency"]["layers"]
    assert [entry["layer"] for entry in layers] == names, layers
    for entry in layers:
        shape = tuple(entry["input_shape"][1:])
        want = count(dict(expanded.named_modules())[entry["layer"]], shape)[0]
        assert entry["macs_expanded"] == want > 0, f"MACs of the plain layer, not of its oneDNN path: {entry}"
        assert entry["mac_ratio"] == pytest.approx(entry["macs_original"] / want), entry
        assert entry["realised"] == pytest.approx(entry["speedup"] / entry["mac_ratio"]), entry
        assert isinstance(entry["noisy"], bool) and entry["spread"]["repeats"] == 3, entry


def test_module_times_add_up_per_module(fake_clock):
    model = nn.Sequential(FakeCost("a", [2]), FakeCost("b", [3]))
    out = module_times({"m": (model, contextlib.nullcontext)}, ["1"], torch.zeros(1), torch.device("cpu"),
                       warmup=1, repeats=3)["m"]
    assert [(m["name"], m["type"]) for m in out["modules"]] == [("0", "FakeCost"), ("1", "FakeCost")], out
    assert [m["ms"] for m in out["modules"]] == pytest.approx([2, 3]) and out["total_ms"] == pytest.approx(5), out
    assert out["outside_ms"] == pytest.approx(0), "no time outside the modules on the fake clock"
    assert out["replaced_ms"] == pytest.approx(3) and out["replaced_share"] == pytest.approx(0.6), out
    assert [m["share"] for m in out["modules"]] == pytest.approx([0.4, 0.6]), out
    assert not model._forward_pre_hooks and not model[0]._forward_hooks, "hooks removed afterwards"


def test_breakdown_times_expansion_layers_whole(one_thread):
    original, expanded, names = tiny_expansion()
    units = dict(timed_units(expanded))
    assert all(type(units[n]).__name__ == "LowRankExpConvV2" for n in names), f"expansion layers are units: {units}"
    assert not any(u.startswith(f"{n}.") for u in units for n in names), "their children are not timed apart"
    cfg = ProfileConfig(input_size=[3, 16, 16], batch=2, warmup=0, repeats=3, min_time_s=0.0, device="cpu")
    modules = profile_pair(original, expanded, names, cfg, "cpu", per_layer=False)["latency"]["modules"]
    for which in ("original", "expanded"):
        part = modules[which]
        assert 0 < part["replaced_share"] < 1, f"{which}: the replaced layers' share of the forward: {part}"
        assert sum(m["ms"] for m in part["modules"]) <= part["total_ms"], f"{which}: units within the forward"
        assert {m["name"] for m in part["modules"]} >= set(names), part


def test_lrx_profile_prints_per_layer_figures_and_the_breakdown(tiny_configs, tmp_path, one_thread):
    import json

    from typer.testing import CliRunner

    from lrx.cli import app

    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["profile", str(tiny_configs / "t02.yaml"), "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((runs / "t02" / "metrics.json").read_text())
    lat = metrics["latency"]
    assert metrics["cpu_time"]["median_ms"] == metrics["cpu_time_ms"] == lat["expanded_ms"], \
        "metrics.json holds the time column's stats beside it"
    out = result.output
    assert "replaced layers alone" in out and "where the time goes" in out and "whole model" in out, out
    for entry in lat["layers"]:
        assert entry["macs_expanded"] > 0 and entry["mac_ratio"] > 1, f"per-layer MACs filled: {entry}"
        assert f"{entry['mac_ratio']:.2f}x" in out, f"layer {entry['layer']}'s MAC ratio is printed: {out}"
    share = lat["modules"]["expanded"]["replaced_share"]
    assert f"({share:.0%})" in out and "LowRankExpConvV1" in out, f"the replaced layers' share is printed: {out}"
    assert f"original, {lat['original_layout']} (fastest: the reference)" in out, out


def test_a_wrapped_profile_keeps_the_models_layer_names(one_thread):
    """profile.dtype bfloat16 runs both models in lrx.nn.inference's InferenceModel; names stay the model's own."""
    original, expanded, names = tiny_expansion()
    cfg = ProfileConfig(input_size=[3, 16, 16], batch=2, warmup=0, repeats=3, min_time_s=0.0, device="cpu",
                        dtype="bfloat16")
    out = profile_pair(original, expanded, names, cfg, "cpu")
    lat = out["latency"]
    assert sorted(out["paths"]) == sorted(names), f"paths by the model's layer names: {out['paths']}"
    assert [entry["layer"] for entry in lat["layers"]] == names and all(e["macs_expanded"] > 0 for e in lat["layers"])
    assert {m["name"] for m in lat["modules"]["expanded"]["modules"]} >= set(names), lat["modules"]["expanded"]
    assert lat["modules"]["original"]["replaced_share"] > 0, lat["modules"]["original"]


def test_interleaved_adds_repeats_until_each_call_has_run_its_least_time(fake_clock):
    """Calls of 10 and 40 ms, 3 repeats asked, 0.1 s each at least: the faster one needs 10 runs, and both get them."""
    fast, slow = FakeCost("fast", [10]), FakeCost("slow", [40])
    calls = {"fast": lambda: fast(None), "slow": lambda: slow(None)}
    stats = timing.interleaved(calls, torch.device("cpu"), warmup=0, repeats=3, min_time_s=0.1)
    assert stats["fast"]["repeats"] == 10 and stats["slow"]["repeats"] == 10, \
        {name: s["repeats"] for name, s in stats.items()}
    assert timing.interleaved(calls, torch.device("cpu"), warmup=0, repeats=3)["fast"]["repeats"] == 3, \
        "without a least time, repeats is the count"
    zero = FakeCost("free", [0])
    free = {"free": lambda: zero(None)}
    assert timing.interleaved(free, torch.device("cpu"), warmup=0, repeats=3, min_time_s=1.0)["free"]["repeats"] \
        == timing.MAX_REPEATS, "a call that takes no time stops at MAX_REPEATS"


@pytest.mark.parametrize("override, key", [("profile.rounds=0", "profile.rounds"),
                                           ("profile.min_time_s=-1", "profile.min_time_s"),
                                           ("profile.min_time_s=100", "profile.min_time_s")])
def test_profile_rounds_and_least_time_are_checked(override, key):
    with pytest.raises(UserError) as err:
        load_config(Path(__file__).parents[1] / "configs" / "quick" / "exp11.yaml", [override])
    assert err.value.key == key, f"{override}: {err.value}"


_FAULTS_SCRIPT = """
import resource, torch
from torch import nn
from lrx.measure import timing

def faults(call):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    call()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                    nn.Conv2d(32, 8, 1)).eval()
x = torch.randn(8, 3, 128, 128)  # 16 MiB outputs

def forward():
    with torch.inference_mode():
        net(x)

for _ in range(3):
    forward()
before = min(faults(forward) for _ in range(3))
with timing.steady_memory() as kept:
    for _ in range(3):  # a warm-up, as before every timing
        forward()
    steady = max(faults(forward) for _ in range(3))
after = min(faults(forward) for _ in range(3))
print(kept, before, steady, after)
"""


@pytest.mark.skipif(not timing.memory_kept(), reason="keeps memory through glibc's mallopt only")
def test_while_lrx_times_a_forward_reuses_its_memory_without_page_faults():
    """glibc gives a forward's large freed blocks back to the OS, and the next forward faults their pages in
    again (about 20,000 page faults a forward here): a cost that moves with the machine. Inside steady_memory,
    after a warm-up, a forward reuses the pages it has; after the block glibc's defaults are back. In a fresh
    process: what glibc does depends on what the process allocated before."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    kept, before, steady, after = out.stdout.split()
    assert int(before) > 2000, f"the premise: glibc's defaults fault a forward's pages in again ({before})"
    assert kept == "True" and int(steady) < 200, f"page faults of a forward inside steady_memory: {steady}"
    assert int(after) > 2000, f"after it, glibc's defaults again: {after} page faults a forward"


def test_nested_steady_memory_sets_glibc_once_and_restores_it_once(monkeypatch):
    calls = []
    monkeypatch.setattr(timing, "_mallopt", lambda: lambda option, value: calls.append((option, value)))
    with timing.steady_memory(), timing.steady_memory():
        inside = list(calls)
    assert inside == list(timing._STEADY), inside
    assert calls[len(inside):] == list(timing._GLIBC_DEFAULTS), calls
    monkeypatch.setattr(timing, "KEEP_MEMORY", False)
    with timing.steady_memory() as kept:
        assert kept is False
    assert len(calls) == len(timing._STEADY) + len(timing._GLIBC_DEFAULTS), "with KEEP_MEMORY off, glibc is left alone"


def test_interleaved_times_inside_steady_memory(monkeypatch):
    inside = []

    @contextlib.contextmanager
    def watched():
        inside.append(True)
        yield True
        inside.append(False)

    monkeypatch.setattr(timing, "steady_memory", watched)
    seen = []
    timing.interleaved({"a": lambda: seen.append(inside[-1])}, torch.device("cpu"), warmup=1, repeats=2)
    assert seen == [True, True, True] and inside[-1] is False, (seen, inside)
