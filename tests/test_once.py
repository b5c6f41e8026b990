"""One plan, one load: the dry run plans what the run will plan, and one `lrx run` reads and builds each thing once."""
from __future__ import annotations

import collections
import traceback

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny_configs, write_yaml
from lrx.cli import app
from lrx.config.settings import load_config
from lrx.expansion import model as expansion_model
from lrx.nn import models
from lrx.output.preview import preview_decomposition
from lrx.pipeline import runner as runner_module
from lrx.pipeline.rundir import RunDir

runner = CliRunner()
DATA_FIT = {"layers": [2, 3, 4], "scheme": "v2", "bases": "auto", "target": {"speedup": 2.0}, "fit": "data",
            "calibration": {"images": 64}}


def lrx(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def checkpoint_configs(tmp_path, one_thread):
    """t01 evaluates a user's checkpoint (train.epochs: 0); t02 plans ranks from it with fit: data."""
    configs = make_tiny_configs(tmp_path / "configs")
    torch.manual_seed(3)
    weights = tmp_path / "mine.pt"
    torch.save(models.build_model("tiny_cnn", 10).state_dict(), weights)
    write_yaml(configs / "t01.yaml", {"extends": "base.yaml", "no": 1, "model": {"checkpoint": str(weights)},
                                      "train": {"epochs": 0}})
    write_yaml(configs / "t02.yaml", {"extends": "base.yaml", "no": 2, "baseline": "t01", "decompose": DATA_FIT,
                                      "profile": {"enabled": False}})
    return configs


def test_the_dry_run_plans_the_runs_ranks_before_the_baseline_exists(checkpoint_configs, tmp_path):
    """A checkpoint baseline not run yet, fit: data: the dry run plans on the checkpoint's weights and on the
    calibration images, so its ranks are the ones the run then chooses (and it writes nothing)."""
    runs = tmp_path / "runs"
    cfg = load_config(checkpoint_configs / "t02.yaml")
    _, source, plan, caveat = preview_decomposition(cfg, runs)
    assert caveat is None and "mine.pt" in source, (source, caveat)
    assert plan["proxy"] == expansion_model.DATA_PROXY, "the dry run ranks layers by output energy, as the run will"
    assert not runs.exists(), "a dry run writes nothing"
    shown = lrx("decompose", checkpoint_configs / "t02.yaml", "--runs-dir", runs, "--dry-run")
    assert shown.exit_code == 0 and not shown.output.startswith("note:"), shown.output

    assert lrx("run", checkpoint_configs / "t02.yaml", "--runs-dir", runs, "--quiet").exit_code == 0
    used = RunDir(runs, "t02").read_metrics()["stages"]["decompose"]["bases"]
    assert used == plan["ranks"], f"the dry run planned {plan['ranks']}, the run used {used}"
    _, _, again, _ = preview_decomposition(cfg, runs)  # from the finished baseline now: the same plan
    assert again["ranks"] == used


def test_a_dry_run_that_cannot_plan_the_runs_ranks_says_so_first(tiny_configs, tmp_path):
    """A baseline still to be trained: the plan is on fresh weights, and the first line says so and why."""
    write_yaml(tiny_configs / "t02.yaml", {"extends": "base.yaml", "no": 2, "baseline": "t01",
                                           "decompose": {**DATA_FIT, "fit": "weights"}})
    shown = lrx("decompose", tiny_configs / "t02.yaml", "--runs-dir", tmp_path / "runs", "--dry-run")
    assert shown.exit_code == 0, shown.output
    first = shown.output.splitlines()[0]
    assert first.startswith("note: this plan is on freshly initialised weights") and "'t01' is not finished" in first, first


def _counting(monkeypatch) -> collections.Counter:
    """Counts of what one command does: configs read, models built, plans, metrics.json reads and writes,
    calibration statistics per layer."""
    counts: collections.Counter = collections.Counter()

    def counted(owner, name, key, per=lambda *a, **k: 1):
        real = getattr(owner, name)

        def call(*args, **kwargs):
            counts[key] += per(*args, **kwargs)
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, call)

    tiny = models.MODELS["tiny_cnn"]

    def build(*args, **kwargs):
        counts["builds"] += 1
        counts["builds by " + next(f.name for f in reversed(traceback.extract_stack()[:-1])
                                   if f.name in ("check_against_model", "original", "previous_model", "initial_model",
                                                 "load_model"))] += 1
        return tiny(*args, **kwargs)

    monkeypatch.setitem(models.MODELS, "tiny_cnn", build)
    import lrx.config.settings as settings
    counted(settings, "read_yaml", "config files read")
    counted(RunDir, "read_metrics", "metrics reads")
    counted(RunDir, "write_metrics", "metrics writes")
    counted(expansion_model, "plan_ranks", "plans")
    counted(runner_module, "check_reachable", "reachability checks")
    counted(expansion_model, "collect_stats", "statistics (layers x passes)", per=lambda model, names, *a, **k: len(names))
    return counts


def test_one_run_reads_builds_and_plans_each_thing_once(checkpoint_configs, tmp_path, monkeypatch):
    """`lrx run` of a fit: data row whose baseline is finished: each config loaded and checked once, the model
    built once per role (each config's check, the baseline; the expansion starts from a copy of it), one plan, metrics.json
    read once per run involved and written once per stage (plus once when the run starts), the original
    model's calibration statistics collected once per layer."""
    runs = tmp_path / "runs"
    assert lrx("run", checkpoint_configs / "t01.yaml", "--runs-dir", runs, "--quiet").exit_code == 0
    counts = _counting(monkeypatch)
    result = lrx("run", checkpoint_configs / "t02.yaml", "--runs-dir", runs, "--quiet")
    assert result.exit_code == 0, result.output
    stages = 1  # decompose (profile is off)
    layers = len(DATA_FIT["layers"])
    assert counts["config files read"] == 2, f"t02 and t01 loaded once each (base.yaml comes by extends): {dict(counts)}"
    assert counts["plans"] == 1 and counts["reachability checks"] == 1, dict(counts)
    assert counts["builds by check_against_model"] == 2, f"each config checked against its model once: {dict(counts)}"
    assert counts["builds by load_model"] == 1, f"the baseline loaded once; the expansion starts from a copy: {dict(counts)}"
    assert counts["builds"] == 3, dict(counts)
    assert counts["metrics reads"] == 2, f"t01's once, t02's once: {dict(counts)}"
    assert counts["metrics writes"] == stages + 1, dict(counts)
    # the plan's pass over the original model, then the sequential fit's pass per layer, then the held-out comparison
    assert counts["statistics (layers x passes)"] == 3 * layers, dict(counts)
