"""`lrx decompose`: the expanded model and per-layer report; --dry-run writes nothing; --show-bases draws."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from lrx.cli import app

runner = CliRunner()


def test_decompose_writes_model_and_report_and_prints_it(tiny_configs, tmp_path):
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["decompose", str(tiny_configs / "t02.yaml"), "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    assert (runs / "t02" / "expanded.pt").exists()
    report = json.loads((runs / "t02" / "metrics.json").read_text())["stages"]["decompose"]["report"]
    assert [layer["rank"] for layer in report] == [4, 4, 3]
    for layer in report:
        assert 0 <= layer["rel_error"] < 1 and layer["mac_ratio"] > 0 and len(layer["energy_first_sv"]) == layer["rank"]
    assert "rel.error" in result.output and "MACs ratio" in result.output, "the report is printed as a table"
    assert "profile" not in json.loads((runs / "t02" / "metrics.json").read_text())["stages"], "stops after decompose"


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_configs, tmp_path):
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["decompose", str(tiny_configs / "t02.yaml"), "--runs-dir", str(runs), "--dry-run",
                                 "--set", "decompose.scheme=v2", "--set", "decompose.bases=auto",
                                 "--set", "decompose.target={speedup: 2.0}"])
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and "retained energy" in result.output and "replaced layers" in result.output
    assert "rule" in result.output, "auto ranks state their rule"
    assert not runs.exists(), "--dry-run writes nothing"


def test_show_bases_writes_a_png(tiny_configs, tmp_path):
    runs, png = tmp_path / "runs", tmp_path / "bases.png"
    result = runner.invoke(app, ["decompose", str(tiny_configs / "t02.yaml"), "--runs-dir", str(runs), "--quiet",
                                 "--show-bases", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_plans_on_the_trained_baseline_of_the_runs_dir(tiny_configs, tmp_path):
    runs = tmp_path / "runs"
    assert runner.invoke(app, ["run", str(tiny_configs / "t01.yaml"), "--runs-dir", str(runs), "--quiet"]).exit_code == 0
    result = runner.invoke(app, ["decompose", str(tiny_configs / "t02.yaml"), "--runs-dir", str(runs), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "the trained baseline" in result.output and "t01" in result.output
    assert not (runs / "t02").exists(), "--dry-run writes nothing"
