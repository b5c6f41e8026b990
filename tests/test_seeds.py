"""Rows run with several seeds: one run folder per seed built on its baseline of the same seed, bad seeds
refused in one line before anything is written, and the table's mean and spread over a row's seeds."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_BASE, write_yaml
from lrx.cli import app
from lrx.config.settings import load_config, one_run, parse_seeds, seed_runs
from lrx.base.errors import UserError
from lrx.output.seeds import merge_seeds, spread
from lrx.output.table import render
from lrx.pipeline.runner import configs_to_run

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def seed_configs(folder: Path, seeds=None) -> Path:
    """s01 trains the tiny model one epoch; s02 expands it and fine-tunes one CE epoch; no profiles."""
    folder.mkdir(parents=True, exist_ok=True)
    write_yaml(folder / "base.yaml", {**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 1},
                                      "data": {**TINY_BASE["data"], "train_subset": 128, "test_subset": None,
                                               "val_subset": 64},
                                      "profile": {"enabled": False}})
    write_yaml(folder / "s01.yaml", {"extends": "base.yaml", "no": 1})
    row = {"extends": "base.yaml", "no": 2, "baseline": "s01", "remark": "expanded",
           "decompose": {"layers": [2, 3, 4], "scheme": "v1", "bases": [4, 4, 3]},
           "finetune": [{"ce": 1.0, "epochs": 1, "lr": 1e-3}]}
    if seeds is not None:
        row["seed"] = seeds
    write_yaml(folder / "s02.yaml", row)
    return folder


# ---------------------------------------------------------------- configs


def test_a_seed_list_is_one_run_per_seed_each_on_its_baseline_of_that_seed(tmp_path):
    folder = seed_configs(tmp_path / "configs", seeds=[0, 7])
    runs = seed_runs(load_config(folder / "s02.yaml"))
    assert [(r.name, r.seed, r.baseline, r.seed_of) for r in runs] == [
        ("s02-s0", 0, "s01-s0", "s02"), ("s02-s7", 7, "s01-s7", "s02")], "names, seeds and baselines of the runs"
    involved = configs_to_run(runs[1])
    assert [(c.name, c.seed) for c in involved] == [("s01-s7", 7), ("s02-s7", 7)], \
        "the baseline is loaded from s01.yaml and given the run's seed"
    assert "seed_of" not in runs[1].to_dict(), "seed_of is not a YAML key: config.yaml does not hold it"


def test_seeds_option_replaces_the_config_seed_and_one_seed_keeps_the_plain_name(tmp_path):
    folder = seed_configs(tmp_path / "configs")
    cfg = load_config(folder / "s02.yaml")
    assert seed_runs(cfg) == [cfg], "a config with one seed is one run under its own name"
    assert [r.name for r in seed_runs(cfg, [3, 1])] == ["s02-s3", "s02-s1"]
    assert one_run(load_config(folder / "s02.yaml", ["seed=[5]"])).name == "s02-s5", \
        "a stage command works on the run of seed: [N]"
    with pytest.raises(UserError, match="lists 2 seeds"):
        one_run(load_config(folder / "s02.yaml", ["seed=[1, 2]"]))


@pytest.mark.parametrize("text, words", [("a,b", "separated by commas"), ("-1", "separated by commas"),
                                          ("1,1", "seed 1 twice"), ("", "separated by commas"),
                                          ("4294967296", "integers 0..4294967295"), ("0, 2", None)])
def test_parse_seeds(text, words):
    if words is None:
        assert parse_seeds(text) == [0, 2]
        return
    with pytest.raises(UserError, match=words) as err:
        parse_seeds(text)
    assert err.value.key == "--seeds"


@pytest.mark.parametrize("value, words", [([], "1 to 100 seeds"), ([1, 1], "seed 1 twice"), ([-1], "integers 0.."),
                                          ([True], "expected an integer"), ("a", "expected an integer")])
def test_bad_seed_in_a_config_names_file_and_key(tmp_path, value, words):
    folder = seed_configs(tmp_path / "configs", seeds=value)
    with pytest.raises(UserError, match=words) as err:
        load_config(folder / "s02.yaml")
    assert err.value.file.endswith("s02.yaml") and err.value.key.split(".")[0] == "seed", str(err.value)


@pytest.mark.parametrize("option", ["a,b", "-1", "0,0", "1,,2"])
def test_bad_seeds_option_is_one_line_exit_2_and_nothing_written(tmp_path, option):
    folder = seed_configs(tmp_path / "configs")
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(folder / "s02.yaml"), "--runs-dir", str(runs), "--seeds", option])
    assert result.exit_code == 2, result.output
    assert "--seeds" in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not runs.exists(), "nothing is written for a bad --seeds"


def test_a_run_of_one_seed_on_a_baseline_listing_seeds_is_refused(tmp_path):
    folder = seed_configs(tmp_path / "configs")
    write_yaml(folder / "s01.yaml", {"extends": "base.yaml", "no": 1, "seed": [0, 1]})
    with pytest.raises(UserError, match="lists seeds") as err:
        configs_to_run(load_config(folder / "s02.yaml"))
    assert err.value.key == "baseline"


# ---------------------------------------------------------------- runs and table


def test_run_with_seeds_makes_a_folder_per_seed_and_the_table_shows_mean_and_spread(tmp_path):
    folder = seed_configs(tmp_path / "configs", seeds=[0, 1])
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(folder / "s02.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["s01-s0", "s01-s1", "s02-s0", "s02-s1"]
    metrics = {name: json.loads((runs / name / "metrics.json").read_text()) for name in ("s01-s0", "s01-s1",
                                                                                        "s02-s0", "s02-s1")}
    assert metrics["s02-s1"]["seed"] == 1 and metrics["s02-s1"]["seed_of"] == "s02"
    assert metrics["s02-s1"]["baseline"] == "s01-s1" and metrics["s01-s1"]["seed"] == 1
    trained = [metrics[name]["stages"]["train"]["test_correct"] for name in ("s01-s0", "s01-s1")]
    assert trained[0] != trained[1], "each seed trains its own baseline (other weights, other per-image results)"
    accs = [metrics["s02-s0"]["acc1"], metrics["s02-s1"]["acc1"]]

    table = runner.invoke(app, ["table", str(runs)])
    assert table.exit_code == 0, table.output
    row2 = [line for line in table.output.splitlines() if line.startswith("|2|")]
    assert len(row2) == 1, f"row 2 is shown once for its two seeds: {row2}"
    mean = sum(accs) / 2
    assert f"|{mean:.2f} ({min(accs):.2f}-{max(accs):.2f})|" in row2[0], row2[0]
    assert f"s0 {accs[0]:.2f}" in table.output and f"s1 {accs[1]:.2f}" in table.output, "each seed's figure"

    records = list(csv.DictReader(io.StringIO(runner.invoke(app, ["table", str(runs), "--format", "csv"]).output)))
    mine = {r["name"]: r for r in records if r["seed_of"] == "s02"}
    assert set(mine) == {"s02-s0", "s02-s1"}, "csv keeps one record per seed's run"
    assert [float(mine[n]["acc1"]) for n in ("s02-s0", "s02-s1")] == pytest.approx(accs)
    assert float(mine["s02-s1"]["acc1_mean"]) == pytest.approx(mean) and mine["s02-s1"]["seeds"] == "2"
    records = json.loads(runner.invoke(app, ["table", str(runs), "--format", "json"]).output)
    one = next(r for r in records if r["name"] == "s02-s0")
    assert one["seed"] == 0 and one["acc1_min"] == pytest.approx(min(accs))


def test_merge_seeds_averages_finished_seeds_and_keeps_other_rows():
    rows = [{"name": "a", "no": 1, "status": "done", "acc1": 90.0},
            {"name": "b-s0", "no": 2, "seed": 0, "seed_of": "b", "status": "done", "acc1": 80.0, "acc1_before": 70.0,
             "l2_before": 10.0, "l2_after": 5.0, "acc1_ci": [78.0, 82.0], "bases": [1]},
            {"name": "b-s1", "no": 2, "seed": 1, "seed_of": "b", "status": "done", "acc1": 84.0, "acc1_before": 74.0,
             "l2_before": 12.0, "l2_after": 7.0, "acc1_ci": [82.0, 86.0], "bases": [2]},
            {"name": "b-s2", "no": 2, "seed": 2, "seed_of": "b", "status": "failed", "acc1": None}]
    merged = merge_seeds(rows)
    assert [r["name"] for r in merged] == ["a", "b-s0"], "one row per seed set, where its lowest seed was"
    b = merged[1]
    assert (b["acc1"], b["acc1_before"], b["l2_after"]) == (82.0, 72.0, 6.0), "means over the finished seeds"
    assert b["acc1_spread"]["min"] == 80.0 and b["acc1_spread"]["max"] == 84.0
    assert b["status"] == "failed", "a seed that did not finish shows in the row's state"
    assert b["acc1_ci"] is None, "a single run's interval is not the mean's"
    assert b["bases"] == [1], "other columns are the lowest seed's run"
    assert rows[1]["acc1"] == 80.0, "the runs' own rows are not changed"
    assert "(80.00-84.00)" in render(rows).splitlines()[3]


def test_spread():
    s = spread([1.0, 2.0, 3.0])
    assert (s["mean"], s["min"], s["max"]) == (2.0, 1.0, 3.0) and s["std"] == pytest.approx(1.0)
    assert spread([4.0])["std"] == 0.0
