"""The GPU paths: the whole pipeline on CUDA (bf16 autocast, channels_last), CUDA time, layers on the GPU.

Skipped where there is no GPU (CI); benchmarks/gpu_check.sh runs them on a lent one.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import make_tiny_configs, write_yaml
from lrx.nn import inference as speed
from lrx.cli import app
from lrx.plan.latency import DeviceTiming
from lrx.nn.layers import LowRankExpConvV1, LowRankExpConvV2
from lrx.expansion.model import expand
from lrx.measure.profiling import profiler_times

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("bf16, channels_last", [(False, False), (True, True)])
def test_pipeline_runs_on_the_gpu_and_measures_cuda_time(tmp_path, bf16, channels_last):
    folder = make_tiny_configs(tmp_path / "configs")
    base = folder / "base.yaml"
    data = yaml.safe_load(base.read_text())
    data["runtime"] = {"device": "cuda", "bf16": bf16, "channels_last": channels_last}
    data["profile"]["device"] = "cuda"
    write_yaml(base, data)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", str(folder / "t03.yaml"), str(folder / "t02.yaml"), "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    base_m = json.loads((runs / "t01" / "metrics.json").read_text())
    expanded = json.loads((runs / "t02" / "metrics.json").read_text())
    tuned = json.loads((runs / "t03" / "metrics.json").read_text())
    assert base_m["device"] == "cuda" and base_m["acc1"] > 30, f"the tiny model learns on the GPU: {base_m['acc1']}"
    assert base_m["cuda_time_ms"] > 0 and expanded["cuda_time_ms"] > 0, "CUDA time measured on the GPU"
    l2_stage = tuned["stages"]["finetune.0"]
    assert l2_stage["l2_after"] < l2_stage["l2_before"], "L2 fine-tuning on the GPU lowers the reconstruction error"


def test_profile_on_the_gpu_times_the_cpu_column_on_the_cpu(monkeypatch):
    """As the seed's table: CPU time from an interleaved timing on the CPU, CUDA time from one on the GPU."""
    from lrx.measure import profiling
    from lrx.config.settings import ProfileConfig
    from lrx.expansion.model import expand
    from lrx.nn.models import build_model

    calls = []
    real = profiling.time_pair

    def recording(original, expanded, *args):
        out = real(original, expanded, *args)
        calls.append((args[2].type, next(original.parameters()).device.type, next(expanded.parameters()).device.type, out))
        return out

    monkeypatch.setattr(profiling, "time_pair", recording)
    original = build_model("tiny_cnn").cuda()
    expanded, report = expand(build_model("tiny_cnn"), [2, 3], "v1", [4, 4])
    names = [layer["name"] for layer in report.layers]
    cfg = ProfileConfig(input_size=[3, 16, 16], batch=4, warmup=1, repeats=5, min_time_s=0.0, device="cuda")
    out = profiling.profile_pair(original, expanded.cuda(), names, cfg, per_layer=False)
    assert [c[:3] for c in calls] == [("cuda", "cuda", "cuda"), ("cpu", "cpu", "cpu")], [c[:3] for c in calls]
    gpu, cpu = calls[0][3], calls[1][3]
    assert out["cuda_time_ms"] == gpu["expanded"]["median_ms"] == out["latency"]["expanded_ms"], out["cuda_time"]
    assert out["cpu_time_ms"] == cpu["expanded"]["median_ms"], out["cpu_time"]
    assert "cudnn_benchmark" in gpu["layouts"] and "nnpack" not in gpu["layouts"], list(gpu["layouts"])
    assert out["device"] == "cuda" and out["latency"]["speedup"] > 0
    modules = out["latency"]["modules"]["expanded"]
    assert all(m["ms"] >= 0 for m in modules["modules"]) and 0 < modules["replaced_share"] < 1, \
        f"per-module times with CUDA events: {modules}"


def test_profiler_times_on_the_gpu_count_kernel_time():
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).cuda()
    times = profiler_times(conv, batch=8, input_size=(16, 32, 32), device="cuda", warmup=1)
    assert times["cuda_time_ms"] is not None and times["cuda_time_ms"] > 0, times


@pytest.mark.parametrize("make", [lambda conv: LowRankExpConvV1.from_conv(conv, 6),
                                  lambda conv: LowRankExpConvV2.from_conv(conv, 12)])
def test_expansions_compute_the_same_on_the_gpu_as_on_the_cpu(make):
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False
    layer = make(torch.nn.Conv2d(16, 32, 3, padding=1)).eval()
    x = torch.randn(4, 16, 20, 20)
    with torch.no_grad():
        on_cpu = layer(x)
        on_gpu = layer.cuda()(x.cuda()).cpu()
    assert torch.allclose(on_cpu, on_gpu, rtol=1e-4, atol=1e-4), (on_cpu - on_gpu).abs().max()


# ---------------------------------------------------------------- the GPU inference path and the planner (issue 11)


def _small_expanded():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(128, 5)).eval()
    expanded, _ = expand(model, [2], "v2", [8], input_size=(3, 16, 16))
    return model, expanded.eval().cuda()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# fp32 bounds allow cuDNN's TF32 convs (on by default for convolutions).
@pytest.mark.parametrize("dtype, autocast, graph, compiled, bound", [
    ("float32", True, False, False, 5e-3), ("bfloat16", True, False, False, 3e-2), ("float16", True, False, False, 1e-2),
    ("bfloat16", False, False, False, 3e-2), ("float32", True, True, False, 5e-3), ("bfloat16", True, True, False, 3e-2),
    ("float32", True, False, True, 5e-3),
])
def test_every_gpu_path_agrees_with_the_default_forward(dtype, autocast, graph, compiled, bound):
    _, expanded = _small_expanded()
    net = speed.optimise(copy.deepcopy(expanded), "cuda", dtype=dtype, autocast=autocast, cuda_graph=graph,
                         compile=compiled)
    for batch in (4, 4, 6):  # the second call replays the graph with new input; a new shape captures another
        x = torch.randn(batch, 3, 16, 16, device="cuda")
        with torch.no_grad():
            want = expanded(x)
            got = net(x)
        assert got.dtype == torch.float32 and _rel(got, want) < bound, \
            f"{dtype} autocast={autocast} graph={graph} compile={compiled} batch {batch}: off by {_rel(got, want):.2e}"


def test_the_planner_measures_on_the_gpu():
    model, _ = _small_expanded()
    timing = DeviceTiming(torch.device("cuda"), batch=8, input_size=(3, 16, 16), dtype="bfloat16", warmup=1, repeats=5)
    times = timing.layer(model[2], (8, 16, 16, 16), [8, 16])
    assert set(times) == {"dense", "8", "16"} and all(t > 0 for t in times.values()), times
    inside = timing.in_model(model, ["2"])
    assert 0 < inside["ms"]["2"] < inside["total_ms"], f"the conv's time inside the model, CUDA events: {inside}"
    whole = timing.whole(model, None)
    assert "channels_last" in whole["layouts"] and whole["original_ms"] == min(whole["layouts"].values()), whole
    assert "NVIDIA" in timing.key()["device"] or "cuda" in timing.key()["device"], timing.key()
