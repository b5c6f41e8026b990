"""Exported models load without lrx and compute what the expanded model computes; `lrx export` and `lrx.load_run`."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import lrx
from lrx.cli import app
from lrx.base.errors import UserError
from lrx.output.export import FORMATS, check_without_lrx, export_all, to_plain
from lrx.nn.layers import LowRankExpConvV1, LowRankExpConvV2
from lrx.expansion.model import expand
from lrx.pipeline.rundir import RunDir
from lrx.nn.inference import expansion_layers, optimise

# The original architecture as code, so that the subprocess (which cannot import lrx) can build it too.
BASE = ("nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), "
        "nn.Conv2d(8, 12, (5, 3), padding=(2, 1)), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1, bias=False), nn.ReLU(), "
        "nn.Conv2d(12, 10, (3, 5), stride=(1, 2), padding=(1, 2)), nn.AdaptiveAvgPool2d(1), nn.Flatten())")
# Every kind of final model the quick rows make, one kind per conv: scheme 1 shared (rows 2-5), per-channel
# (13), decomposed (6-9), scheme 2 vertical first (10-12) and horizontal first.
KINDS = {"0": dict(scheme="v1"), "2": dict(scheme="v1", basis="per-channel"), "4": dict(scheme="v1", decomposed=True),
         "6": dict(scheme="v2"), "8": dict(scheme="v2", order="hv")}
SIZE = (3, 12, 12)


def every_kind() -> nn.Module:
    torch.manual_seed(0)
    model = eval(BASE, {"nn": nn})
    for name, options in KINDS.items():
        model, _ = expand(model, [name], ranks=[2], input_size=SIZE, **options)
    return model.eval()


def test_every_kind_of_expansion_exports_to_every_format_and_runs_without_lrx(tmp_path):
    model = every_kind()
    kinds = [(type(layer).__name__, layer.rank) for _, layer in expansion_layers(model)]
    assert len(kinds) == 5, kinds
    optimise(model, "cpu", torch.randn(2, *SIZE))  # exporting must not capture the process's fast paths
    want = export_all(model, tmp_path, SIZE, original=BASE)  # batch 5: the exported batch axis (2) is dynamic
    x, saved = torch.load(tmp_path / "io.pt", weights_only=True)
    assert x.shape == (5, *SIZE) and torch.equal(saved, want), "io.pt: the inputs and the outputs returned"
    with torch.no_grad():  # the reference is the model's output (its fast paths may round differently with grad on)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6, msg="io.pt: the model's own outputs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["io.pt", "model.onnx", "model.pt", "model.pt2",
                                                          "model.ts", "recipe.py"]
    out = check_without_lrx(tmp_path, timeout=300)
    assert out["lrx_loaded"] == [] and out["state_dict_into"] == "recipe.py", out
    assert out["modules"] == ["torch.nn.modules.activation", "torch.nn.modules.container", "torch.nn.modules.conv",
                              "torch.nn.modules.flatten", "torch.nn.modules.pooling"], out
    for fmt in FORMATS:
        assert out["diff"][fmt] < 1e-4 * max(1.0, out["scale"]), f"{fmt}: outputs differ from PyTorch's: {out}"


def test_without_a_recipe_the_state_dict_is_checked_in_the_pt2_architecture_and_a_bad_file_fails(tmp_path):
    from lrx.nn.models import tiny_cnn

    torch.manual_seed(3)
    model, _ = expand(tiny_cnn().eval(), [2, 3], "v2", [3, 4], input_size=(3, 16, 16))
    export_all(model.eval(), tmp_path, (3, 16, 16), batch=3)
    out = check_without_lrx(tmp_path, timeout=300)
    assert out["state_dict_into"] == "the .pt2 architecture" and out["lrx_loaded"] == [], out
    assert all(out["diff"][fmt] < 1e-4 * max(1.0, out["scale"]) for fmt in FORMATS), out
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    state.pop(next(iter(state)))  # a weight missing: strict loading must refuse it, not run zeros
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        check_without_lrx(tmp_path, timeout=300)


def test_to_plain_is_plain_convs_with_the_same_outputs_and_leaves_the_model_alone():
    model = every_kind()
    plain = to_plain(model)
    assert not expansion_layers(plain) and len(expansion_layers(model)) == 5, "a copy; the model keeps its layers"
    kinds = {type(m) for m in plain.modules()}
    assert not any(issubclass(k, (LowRankExpConvV1, LowRankExpConvV2)) for k in kinds), kinds
    assert [len(plain[int(n)]) for n in KINDS] == [2, 2, 3, 2, 2], "factor convs: basis+combine, v+h+combine, 1-D pairs"
    assert plain[4][0].groups == 8 and plain[8][0].kernel_size == (1, 5), "scheme 1's grouped basis; hv runs 1 x dw first"
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x)), "the same convs run, so the outputs are identical"


def saved_run(tmp_path, model: nn.Module) -> RunDir:
    """A finished run folder holding ``model`` (tiny_cnn expanded) as its final model, as the pipeline writes it."""
    run = RunDir(tmp_path / "runs", "r1")
    run.path.mkdir(parents=True)
    expanded, report = expand(model, [2, 3], "v2", [3, 4], input_size=(3, 16, 16))
    run.save_model("decompose", expanded, "tiny_cnn", 10, report.spec, report.spec["layers"])
    run.file("config.yaml").write_text("# resolved\ndata: {image_size: 16}\nprofile: {input_size: [3, 64, 64]}\n")
    run.write_metrics({"name": "r1", "status": "done", "stages": {"decompose": {"hash": "h"}, "profile": {"hash": "p"}}})
    return run, expanded.eval()


def test_load_run_and_lrx_export_give_the_run_final_model(tmp_path):
    from lrx.nn.models import tiny_cnn

    torch.manual_seed(1)
    run, expanded = saved_run(tmp_path, tiny_cnn())
    loaded = lrx.load_run(run.path)
    assert not loaded.training and len(expansion_layers(loaded)) == 2, "eval mode, the expansion rebuilt"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), expanded(x)), "load_run returns the final model's weights"
    out = tmp_path / "r1.pt"
    result = CliRunner().invoke(app, ["export", str(run.path), "--format", "state-dict", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "final model of run r1: " in result.output and "expanded.pt" in result.output, result.output
    assert "model.set_submodule('3', nn.Sequential(" in result.output, "the recipe is printed"
    assert "checked: largest |difference| from PyTorch" in result.output and "at 3x16x16" in result.output, \
        "the run's own image size (data.image_size), not profile.input_size"
    assert set(torch.load(out, weights_only=True)) == set(to_plain(expanded).state_dict()), "the plain model's keys"


@pytest.mark.parametrize("args, words", [
    (["--format", "tflite"], "allowed: onnx, pt2, torchscript, state-dict"),
    (["--format", "pt2", "--input-size", "3,16"], "C,H,W"),
    (["--format", "pt2", "--runs-dir", "elsewhere", "--input-size", "x"], "C,H,W"),
])
def test_lrx_export_refuses_bad_input_in_one_line(tmp_path, args, words):
    from lrx.nn.models import tiny_cnn

    run, _ = saved_run(tmp_path, tiny_cnn())
    result = CliRunner().invoke(app, ["export", str(run.path), "-o", str(tmp_path / "x.out"), *args])
    assert result.exit_code == 2 and words in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x.out").exists(), result.output


PLANTED = "open('planted-ran', 'w').write('x')\ndef build(num_classes=10):\n    raise SystemExit(0)\n"


@pytest.mark.parametrize("config, arch", [
    ("model: {name: tiny_cnn, num_classes: 10}\n", "python:lrx_planted:build"),  # not the run's model
    ("data: {image_size: 16}\n", "python:lrx_planted:build"),  # config.yaml names no model: code is never built
    ("model: {name: tiny_cnn, num_classes: 10}\n", 5),
    ("data: {image_size: 16}\n", ["tiny_cnn"]),
    ("model: {name: tiny_cnn, num_classes: 10}\n", "alexnet_cifar10"),
])
def test_a_model_file_is_built_only_as_its_run_names_it(tmp_path, monkeypatch, config, arch):
    from lrx.nn.models import tiny_cnn

    (tmp_path / "lrx_planted.py").write_text(PLANTED)  # what importing the module would do: leave a file
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    run, _ = saved_run(tmp_path, tiny_cnn())
    run.config_path().write_text(config)
    path = run.model_path("decompose")
    blob = torch.load(path, weights_only=True)
    torch.save({**blob, "arch": arch}, path)
    result = CliRunner().invoke(app, ["export", str(run.path), "--format", "state-dict", "-o", "x.pt"])
    assert result.exit_code == 2 and str(path) in result.output, f"{arch!r}: refused naming the file: {result.output}"
    assert len(result.output.strip().splitlines()) == 1, f"one line: {result.output}"
    assert not (tmp_path / "planted-ran").exists(), f"{arch!r}: the module a model file names was not imported"
    assert not (tmp_path / "x.pt").exists(), "nothing written"


@pytest.mark.parametrize("config", ["data: {image_size: big}\n", "data: {image_size: [16]}\n",
                                    "profile: {input_size: [x, 16, 16]}\n", "data: {image_size: 0}\n"])
def test_a_config_yaml_without_sizes_is_refused_naming_it(tmp_path, config):
    from lrx.nn.models import tiny_cnn

    run, _ = saved_run(tmp_path, tiny_cnn())
    run.config_path().write_text(config)
    result = CliRunner().invoke(app, ["export", str(run.path), "--format", "state-dict", "-o", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and str(run.config_path()) in result.output and "--input-size" in result.output, \
        f"{config!r}: refused naming config.yaml and the way out: {result.output}"
    assert not (tmp_path / "x.pt").exists(), "nothing written"


@pytest.mark.parametrize("size", ["1,16,16", "3,2,2"])
def test_an_input_size_the_model_does_not_take_is_one_line(tmp_path, size):
    from lrx.nn.models import tiny_cnn

    run, _ = saved_run(tmp_path, tiny_cnn())
    out = tmp_path / "x.pt2"
    result = CliRunner().invoke(app, ["export", str(run.path), "--format", "pt2", "-o", str(out), "--input-size", size])
    assert result.exit_code == 2 and f"--input-size {size}" in result.output, f"{size}: one line: {result.output}"
    assert len(result.output.strip().splitlines()) == 1 and not out.exists(), f"{size}: nothing written: {result.output}"


def test_a_folder_that_is_no_run_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no finished model"):
        lrx.load_run(tmp_path / "empty")
    with pytest.raises(UserError, match="neither a run folder"):
        lrx.load_run(tmp_path / "missing")


def test_profile_onnx_times_the_original_and_the_final_model_in_onnx_runtime(tiny_configs, tmp_path, monkeypatch):
    from onnx import TensorProto, helper, save

    from lrx.output import export
    from lrx.config.settings import load_config
    from lrx.nn.models import tiny_cnn

    exported = {}

    def small_onnx(model, path, fmt, input_size, *args):  # the export itself is tested above; here the timing
        exported[Path(path).stem] = len(expansion_layers(model))
        node = helper.make_node("ReduceMean", ["images"], ["logits"], keepdims=0, axes=[2, 3])
        graph = helper.make_graph([node], "mean", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", *input_size])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", input_size[0]])])
        save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))

    monkeypatch.setattr(export, "export_model", small_onnx)
    torch.manual_seed(2)
    baseline = RunDir(tmp_path / "runs", "t01")
    baseline.path.mkdir(parents=True)
    baseline.save_model("train", tiny_cnn(), "tiny_cnn", 10)
    baseline.write_metrics({"name": "t01", "status": "done", "stages": {"train": {"hash": "t"}}})
    saved_run(tmp_path, tiny_cnn())[0].path.rename(tmp_path / "runs" / "t02")
    line = export.profile_onnx(load_config(tiny_configs / "t02.yaml", ["profile.threads=1"]), tmp_path / "runs")
    assert exported == {"original": 0, "t02": 2}, f"the baseline's model and this run's final (expanded) one: {exported}"
    assert line.startswith("ONNX Runtime (CPU, 1 threads, batch 4 at 3x16x16, medians of 5 interleaved runs): "), line
    assert re.search(r"original [\d.]+ ms.*, t02 [\d.]+ ms.*, speedup [\d.]+x$", line), line


MYMODELS = '''
from torch import nn


def small_cnn(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def fixed_cnn():
    return small_cnn(5)
'''


@pytest.mark.parametrize("arch", ["tiny_cnn", "torchvision:squeezenet1_1", "python:lrx_recipe_models:small_cnn",
                                  "python:lrx_recipe_models:fixed_cnn"])
def test_every_recipe_builds_its_architecture_and_loads_the_state_dict(tmp_path, monkeypatch, arch):
    import sys

    from lrx.nn.models import build_model, conv_layers

    (tmp_path / "lrx_recipe_models.py").write_text(MYMODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lrx_recipe_models", raising=False)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(4)
    model = build_model(arch, 5).eval()  # 5 classes: a recipe that builds the default 10 cannot load it
    second = [name for name, conv in conv_layers(model) if conv.kernel_size == (3, 3)][1]
    expanded, report = expand(model, [second], "v2", [2], input_size=(3, 32, 32))
    run = RunDir(tmp_path / "runs", "r1")
    run.path.mkdir(parents=True)
    run.save_model("decompose", expanded, arch, 5, report.spec, report.spec["layers"])
    run.config_path().write_text(f"model: {{name: '{arch}', num_classes: 5}}\n")  # a python: model is built as the run names it
    run.write_metrics({"name": "r1", "status": "done", "stages": {"decompose": {"hash": "h"}}})
    result = CliRunner().invoke(app, ["export", str(run.path), "--format", "state-dict", "-o", "plain.pt", "--no-check"])
    assert result.exit_code == 0, result.output
    code = result.output.split("build and load it with:\n\n", 1)[1]
    scope: dict = {}
    exec(code, scope)  # what a user runs: it builds the architecture and loads plain.pt strictly
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scope["model"](x), expanded.eval()(x), atol=1e-5), f"{arch}: the recipe's model computes the run's"
    assert not scope["model"].training, "the recipe leaves the model in eval mode"
