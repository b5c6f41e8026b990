"""`decompose.scheme: channel` and `scheme: auto` from a config, through the CLI: decompose (also sequential data
fits), dry run, fine-tuning, profile, table, export; and the bad inputs refused in one line with exit code 2
before anything is written. A small python: model with a 3x3 conv, a 1x1 conv, a grouped 1x1 conv and two
linear layers, on synthetic images."""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_BASE, write_yaml
from lrx.cli import app
from lrx.measure.profiling import count
from lrx.nn.channel import LowRankChannel
from lrx.output.export import load_run

runner = CliRunner()

FACTORY = '''
import torch.nn as nn

def build(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 1), nn.ReLU(),
                         nn.Conv2d(24, 24, 1, groups=2), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(96, 32), nn.ReLU(),
                         nn.Linear(32, num_classes))
'''
CHANNEL_LAYERS = ["2", "10", "12"]  # what `layers: auto` gives the channel scheme: the 1x1 conv and the linear layers
FULL = [16, 32, 10]  # their min(C, N)


@pytest.fixture
def configs(tmp_path, monkeypatch, one_thread):
    """A folder with the model's module, base.yaml and its baseline c01 (trained one epoch)."""
    folder = tmp_path / "configs"
    folder.mkdir()
    module = f"chan_net_{uuid.uuid4().hex[:8]}"
    (folder / f"{module}.py").write_text(FACTORY)
    monkeypatch.setattr(sys, "path", list(sys.path))
    base = {**TINY_BASE, "model": {"name": f"python:{module}:build", "num_classes": 10},
            "train": {**TINY_BASE["train"], "epochs": 1}}
    write_yaml(folder / "base.yaml", base)
    write_yaml(folder / "c01.yaml", {"extends": "base.yaml", "no": 1})
    yield folder
    sys.modules.pop(module, None)


def config(folder: Path, name: str, decompose: dict, **rest) -> Path:
    return write_yaml(folder / f"{name}.yaml", {"extends": "base.yaml", "no": 2, "baseline": "c01",
                                                "decompose": decompose, **rest})


def metrics(runs: Path, name: str) -> dict:
    return json.loads((runs / name / "metrics.json").read_text())


def test_channel_scheme_at_full_rank_runs_end_to_end_and_is_exact(configs, tmp_path):
    """decompose (data fit, sequential), fine-tune L2 on the channel layers' outputs, profile, table, export: at full
    rank the expansion gives the original's outputs, ptflops counts the thin layers, and every export loads."""
    runs = tmp_path / "runs"
    config(configs, "c02", {"layers": "auto", "scheme": "channel", "bases": FULL, "fit": "data",
                            "calibration": {"images": 64}},
           finetune=[{"l2": 1.0, "epochs": 1, "lr": 1e-6}])
    result = runner.invoke(app, ["run", str(configs / "c02.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 0, result.output
    m = metrics(runs, "c02")
    decompose = m["stages"]["decompose"]
    assert decompose["names"] == CHANNEL_LAYERS and decompose["scheme"] == "channel", decompose["names"]
    assert [row["kind"] for row in decompose["report"]] == ["conv", "linear", "linear"], "a 1x1 conv and linear layers"
    assert decompose["acc1"] == decompose["acc1_original"], "full rank gives the original's predictions"
    assert decompose["l2"] < 1e-2, f"full rank: the layers' outputs are the original's (L2 {decompose['l2']})"
    for row in decompose["report"]:
        # Exact up to the float32 statistics (the sequential error is a difference of sums of squares).
        assert row["fit"] == "data" and row["output_error"] < 1e-3 and row["rel_error"] < 1e-3, \
            f"{row['name']}: exact at full rank: {row}"
    assert decompose["fit_data"]["sequential"] is True, "sequential by default, as the other schemes"
    assert m["stages"]["finetune.0"]["l2_before"] < 1e-2, "fine-tuning compares the channel layers' outputs"

    original = metrics(runs, "c01")
    added = sum(row["macs_after"] - row["macs_before"] for row in decompose["report"])
    assert m["macs"] - original["macs"] == added, \
        f"ptflops counts the thin layers: {m['macs']} - {original['macs']} is not the report's {added}"
    model = load_run(runs / "c02")
    assert [type(model.get_submodule(n)) for n in CHANNEL_LAYERS] == [LowRankChannel] * 3
    assert count(model, (3, 16, 16))[0] == m["macs"], "the recorded MACs are the final model's"

    table = runner.invoke(app, ["table", str(runs)])
    assert table.exit_code == 0 and "|2|auto|16,32,10|" in table.output, table.output

    for fmt, suffix in (("onnx", ".onnx"), ("pt2", ".pt2"), ("torchscript", ".ts")):
        out = tmp_path / f"c02{suffix}"
        result = runner.invoke(app, ["export", str(runs / "c02"), "--format", fmt, "-o", str(out)])
        assert result.exit_code == 0 and out.exists(), f"{fmt}: {result.output}"
    result = runner.invoke(app, ["export", str(runs / "c02"), "--format", "state-dict", "-o", str(tmp_path / "p.pt"),
                                 "--no-check"])
    assert result.exit_code == 0, result.output
    code = result.output.split("build and load it with:\n\n", 1)[1].replace("'p.pt'", repr(str(tmp_path / "p.pt")))
    assert "LowRankChannel" in code and "lrx" not in code.replace("was LowRankChannel", "").split("model = ")[0]
    scope: dict = {}
    exec(code, scope)  # builds the original architecture, puts plain first/second layers in, loads strictly
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(scope["model"](x), model(x), atol=1e-5), "the recipe's model computes the run's"
    assert not any(isinstance(m, LowRankChannel) for m in scope["model"].modules()), "plain modules only"


def test_scheme_auto_replaces_each_layer_by_its_scheme_and_a_mac_target_plans_them(configs, tmp_path):
    runs = tmp_path / "runs"
    config(configs, "c03", {"layers": "auto", "scheme": "auto", "bases": [9, 16, 72, 32, 10]},
           profile={"enabled": False})
    result = runner.invoke(app, ["decompose", str(configs / "c03.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 0, result.output
    decompose = metrics(runs, "c03")["stages"]["decompose"]
    assert decompose["names"] == ["0", "2", "6", "10", "12"], "the grouped conv is skipped, the rest chosen"
    assert [row["scheme"] for row in decompose["report"]] == ["v2", "channel", "v2", "channel", "channel"]
    assert decompose["acc1"] == decompose["acc1_original"], "full rank everywhere: the original's predictions"

    config(configs, "c04", {"layers": "auto", "scheme": "auto", "bases": "auto", "target": {"speedup": 2.0},
                            "fit": "data", "calibration": {"images": 64}}, profile={"enabled": False})
    result = runner.invoke(app, ["decompose", str(configs / "c04.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 0, result.output
    plan = metrics(runs, "c04")["stages"]["decompose"]["plan"]
    assert plan["proxy"] == "output energy on the calibration images", plan["proxy"]
    assert plan["predicted_speedup"] >= 2.0, f"the MAC target is met: {plan['predicted_speedup']}"
    assert {row["scheme"] for row in plan["layers"]} == {"v2", "channel"}, "both schemes planned in one greedy choice"
    for row in plan["layers"]:
        assert row["macs_after"] < row["macs_before"] and 1 <= row["rank"] <= row["max_rank"], row


def test_dry_run_of_a_channel_plan_prints_it_and_writes_nothing(configs, tmp_path):
    runs = tmp_path / "runs"
    config(configs, "c05", {"layers": "auto", "scheme": "channel", "bases": "auto", "target": {"speedup": 1.5}})
    result = runner.invoke(app, ["decompose", str(configs / "c05.yaml"), "--runs-dir", str(runs), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "scheme channel" in result.output and "retained energy" in result.output, result.output
    for name in ("10", "12"):
        assert f"'{name}'" in result.output, f"layer {name} listed: {result.output}"
    assert not runs.exists(), "--dry-run writes nothing"


@pytest.mark.parametrize("decompose,key,words", [
    ({"layers": ["0"], "scheme": "channel", "bases": [4]}, "decompose.layers.0", "kernel_size=(3, 3)"),
    ({"layers": ["4"], "scheme": "channel", "bases": [4]}, "decompose.layers.0", "groups=2"),
    ({"layers": ["4"], "scheme": "auto", "bases": [4]}, "decompose.layers.0", "groups=2"),
    ({"layers": "auto", "scheme": "channel", "bases": [17, 32, 10]}, "decompose.bases.0", "ranks 1..16"),
    ({"layers": ["10"], "scheme": "channel", "bases": [33]}, "decompose.bases.0", "ranks 1..32"),
    ({"layers": "auto", "scheme": "auto", "bases": [4, 4]}, "decompose.bases", "selects 5 layers"),
    ({"layers": [1, "2"], "scheme": "auto", "bases": [4]}, "decompose.bases", "has 1 entries"),
    ({"layers": [9], "scheme": "channel", "bases": [4]}, "decompose.layers.0", "linear layers are chosen by name"),
    ({"layers": "auto", "scheme": "channel", "bases": [4, 4, 4], "basis": "per-channel"}, "decompose.basis",
     "scheme channel takes shared"),
    ({"layers": "auto", "scheme": "auto", "bases": "auto", "target": {"latency": 2.0}, "method": "alternating"},
     "decompose.method", "scheme auto takes svd"),
])
def test_what_a_scheme_cannot_do_is_one_line_exit_2_and_nothing_written(configs, tmp_path, decompose, key, words):
    runs = tmp_path / "runs"
    path = config(configs, "bad", decompose)
    for command in (["run"], ["decompose", "--dry-run"]):
        result = runner.invoke(app, [command[0], str(path), "--runs-dir", str(runs), *command[1:]])
        assert result.exit_code == 2, f"{command}: {result.output}"
        line = result.output.strip()
        assert "\n" not in line, f"one line: {result.output}"
        assert "bad.yaml" in line and key in line and words in line, f"names the file, {key} and {words!r}: {line}"
        assert not runs.exists(), f"{command}: nothing written"


# ------------------------------------------------------------------------------- a latency target, faked times


class NamedTiming:
    """Made-up times per layer of the model (no clock): ``dense[name]`` ms, ``rank_ms[name](rank)`` ms, ``rest`` ms
    for everything else; ``whole`` adds up what each candidate is in the model it is given."""

    def __init__(self, dense, rank_ms, rest=2.0, batch=4, input_size=(3, 16, 16)):
        self.dense, self.rank_ms, self.rest, self.batch, self.input_size = dense, rank_ms, rest, batch, input_size
        self.calls: list[tuple] = []

    def key(self):
        return {"device": "fake cpu"}

    def layer(self, module, input_shape, ranks, scheme="v2"):
        name = _name_of(module)
        self.calls.append((scheme, tuple(input_shape)))
        return {"dense": self.dense[name], **{str(r): self.rank_ms[name](r) for r in ranks}}

    def _ms(self, model):
        total = self.rest
        for name in self.dense:
            layer = model.get_submodule(name)
            total += self.rank_ms[name](layer.rank) if hasattr(layer, "rank") else self.dense[name]
        return total

    def in_model(self, original, names):
        return {"total_ms": self._ms(original), "ms": {name: self.dense.get(name, 0.01) for name in names}}

    def whole(self, original, expanded):
        base = self._ms(original)
        return {"original_ms": base, "layout": "channels_last", "layouts": {"default": base, "channels_last": base},
                "expanded_ms": self._ms(expanded) if expanded is not None else None, "expanded_layout": "lrx"}


def fake_times() -> NamedTiming:
    """The linear layers and the 1x1 conv gain much from a low rank; the 3x3 convs' ranks are all slower than dense."""
    dense = {"0": 1.0, "2": 4.0, "6": 2.0, "10": 6.0, "12": 0.5}
    fast = lambda top: (lambda r: 0.1 + 3.0 * r / top)  # noqa: E731
    slow = lambda r: 5.0 + r  # noqa: E731
    return NamedTiming(dense, {"0": slow, "2": fast(16), "6": slow, "10": fast(32), "12": lambda r: 0.6})


def test_a_latency_target_with_scheme_auto_plans_channel_layers_beside_dense_ones(configs, tmp_path, monkeypatch,
                                                                                 own_latency_cache):
    from lrx.plan import latency

    made = []

    def timing_for(cls, cfg):
        made.append(fake_times())
        return made[-1]

    monkeypatch.setattr(latency.DeviceTiming, "from_config", classmethod(timing_for))
    runs = tmp_path / "runs"
    config(configs, "c06", {"layers": "auto", "scheme": "auto", "bases": "auto", "target": {"latency": 1.5}},
           profile={"enabled": False})
    result = runner.invoke(app, ["decompose", str(configs / "c06.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 0, result.output
    stage = metrics(runs, "c06")["stages"]["decompose"]
    plan = stage["plan"]
    by_name = {row["name"]: row for row in plan["table"]}
    assert set(by_name) == {"0", "2", "6", "10", "12"}, "every layer auto can replace is a candidate"
    assert {n: r["scheme"] for n, r in by_name.items()} == {"0": "v2", "2": "channel", "6": "v2", "10": "channel",
                                                            "12": "channel"}
    assert by_name["0"]["choice"] == by_name["6"]["choice"] == "dense", "ranks slower than dense are never taken"
    assert by_name["12"]["choice"] == "dense", "a layer whose ranks gain nothing stays dense"
    assert set(plan["names"]) <= {"2", "10"} and "10" in plan["names"], f"the fast channel layers chosen: {plan['names']}"
    assert plan["measured_speedup"] >= 1.5 and plan["target_met"], plan["measured_speedup"]
    assert stage["names"] == plan["names"] and stage["bases"] == plan["ranks"], "the plan is what was expanded"
    assert stage["layers"] == [2 if n == "2" else n for n in plan["names"]], "convs by index, linear layers by name"
    shapes = dict((s[1][1:], s[0]) for s in made[0].calls)
    assert shapes[(96,)] == "channel" and shapes[(32,)] == "channel", f"linear layers timed on (batch, C): {shapes}"
    assert shapes[(16, 16, 16)] == "channel", f"the 1x1 conv as channel: {shapes}"
    assert {s[0] for s in made[0].calls if s[1][1:] == (3, 16, 16)} == {"v2", "tucker2"}, "a KxK conv as both"
    model = load_run(runs / "c06")
    assert all(isinstance(model.get_submodule(n), LowRankChannel) for n in plan["names"]), "rebuilt from the spec"
    cache = json.loads((own_latency_cache / "latency-tables.json").read_text())["tables"]
    assert sum('"kind": "linear"' in key for key in cache) == 2, "linear layers' tables cached under their own keys"
    again = runner.invoke(app, ["decompose", str(configs / "c06.yaml"), "--runs-dir", str(runs), "--quiet", "--force"])
    assert again.exit_code == 0 and made[-1].calls == [], "a later plan reuses the cached layer tables"


def _name_of(module) -> str:
    """The candidate a module is, by its shape (the planner hands the fake modules of its own copies)."""
    if isinstance(module, torch.nn.Linear):
        return {96: "10", 32: "12"}[module.in_features]
    return {(3, 16): "0", (16, 24): "2", (24, 24): "6"}[(module.in_channels, module.out_channels)]
