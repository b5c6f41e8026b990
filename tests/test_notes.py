"""What lrx tells about the convs it skips and how it prints module names: one line per reason, names that
do not read as numbers."""
from __future__ import annotations

import pytest
import torch
from rich.console import Console
from torch import nn

from lrx.expansion.model import expand
from lrx.nn.surgery import shown_name, summarise_notes
from lrx.output.profiles import layers_table


def mobile_like() -> nn.Module:
    """A 3x3 conv, then blocks of a 1x1 conv, a depthwise 3x3 conv of several group counts and a 1x1 conv (as
    mobilenets), inside an nn.Sequential of nn.Sequentials (module names '1.0', '1.1', ...)."""
    torch.manual_seed(0)
    blocks = []
    for channels in (16, 24, 24, 40, 48):
        blocks += [nn.Conv2d(16, channels, 1), nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
                   nn.Conv2d(channels, 16, 1)]
    return nn.Sequential(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1)), nn.Sequential(*blocks),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)))


@pytest.mark.filterwarnings("ignore::lrx.expansion.model.ExpansionNote")
def test_skipped_convs_are_told_one_line_per_reason_with_a_count():
    said = []
    _, report = expand(mobile_like(), "auto", "v2", 2, input_size=(3, 8, 8), log=said.append)
    skipped = [n for n in report.notes if "skipped" in n]
    assert len(skipped) == 15, f"report.notes keeps one line per skipped conv: {report.notes}"
    lines = [line for line in said if "skipped" in line]
    assert len(lines) == 2, f"one line per reason, not one per conv: {said}"
    depthwise = next(line for line in lines if "depthwise" in line)
    assert depthwise.startswith("note: 5 convs skipped: groups=16..48 is not supported (depthwise"), depthwise
    assert depthwise.endswith(": '1.1', '1.4', '1.7' and 2 more (each in report.notes)"), depthwise
    assert next(line for line in lines if "1x1" in line).startswith("note: 10 convs skipped: a 1x1 kernel"), lines


def test_a_reason_of_one_conv_keeps_its_note_as_it_was():
    note = "layer 2 ('features.1') skipped: groups=16 is not supported (depthwise; only groups=1 convs can be expanded)"
    assert summarise_notes([note, "layer 1 ('0'): rank 9 costs 1.09x the conv's MACs"]) == \
        [note, "layer 1 ('0'): rank 9 costs 1.09x the conv's MACs"]


def test_module_names_of_a_sequential_do_not_read_as_numbers():
    assert shown_name("0.0") == "'0.0'" and shown_name("3") == "'3'", "nn.Sequential's names are quoted"
    assert shown_name("features.0.0") == "features.0.0" and shown_name("layer1.0.conv1") == "layer1.0.conv1"
    console = Console(record=True, width=120)
    console.print(layers_table([{"layer": "1.3", "input_shape": [4, 16, 8, 8], "original_ms": 1.0, "expanded_ms": 0.5,
                                 "speedup": 2.0, "mac_ratio": 3.0, "realised": 0.66}]))
    row = next(line for line in console.export_text().splitlines() if "4x16x8x8" in line)
    assert "'1.3'" in row, f"the profile's layer table names the module, quoted: {row}"


def test_a_run_says_one_line_per_reason_and_logs_each_skipped_conv(tiny_configs, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from conftest import write_yaml
    from lrx.cli import app
    from lrx.nn import models

    monkeypatch.setitem(models.MODELS, "mobile_like", lambda num_classes=10: mobile_like())
    monkeypatch.setitem(models.MIN_IMAGE_SIZE, "mobile_like", 8)
    model = {"name": "mobile_like", "num_classes": 5}
    write_yaml(tiny_configs / "m01.yaml", {"extends": "base.yaml", "model": model, "train": {"epochs": 1},
                                           "profile": {"enabled": False}})
    write_yaml(tiny_configs / "m02.yaml", {"extends": "base.yaml", "model": model, "baseline": "m01",
                                           "profile": {"enabled": False},
                                           "decompose": {"layers": "auto", "scheme": "v2", "bases": [2]}})
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", str(tiny_configs / "m02.yaml"), "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "skipped" in line]
    log = runs / "m02" / "log.txt"
    assert len(said) == 2 and all(f"(each in {log})" in line for line in said), said
    logged = [line for line in log.read_text().splitlines() if "') skipped: " in line]
    assert len(logged) == 15, f"the log names every skipped conv: {logged}"
