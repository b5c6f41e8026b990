"""Redoing a finished run: a stage command redoes an earlier stage only when told, a failed redo leaves the
finished result as it was, and a run does not record results built on a run that changed under it."""
from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from lrx.base.errors import UserError
from lrx.base.files import load_checkpoint, save_atomic
from lrx.cli import app
from lrx.pipeline import stages

runner = CliRunner()


def lrx(*args):
    return runner.invoke(app, [str(a) for a in args])


def metrics(runs, name):
    return json.loads((runs / name / "metrics.json").read_text())


@pytest.fixture(scope="module")
def finished_tree(tmp_path_factory):
    """t01 (baseline) and t02 (scheme 1 at ranks 4,4,3) finished once."""
    from conftest import make_tiny_configs

    root = tmp_path_factory.mktemp("redo")
    make_tiny_configs(root / "configs")
    result = lrx("run", root / "configs" / "t02.yaml", "--runs-dir", root / "runs", "--quiet")
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def tree(finished_tree, tmp_path):
    shutil.copytree(finished_tree, tmp_path / "t")
    return tmp_path / "t" / "configs", tmp_path / "t" / "runs"


def test_a_stage_command_does_not_redo_an_earlier_stage_made_with_other_settings_unless_told(tree):
    configs, runs = tree
    made = lrx("run", configs / "t02.yaml", "--runs-dir", runs, "--quiet", "--set", "decompose.bases=[3,3,2]")
    assert made.exit_code == 0, made.output
    assert metrics(runs, "t02")["replaced"][-1]["why"] == \
        "settings changed from stage decompose: decompose.bases: [4, 4, 3] -> [3, 3, 2]", \
        "lrx run says which setting changed, old and new"
    before = (runs / "t02" / "metrics.json").read_bytes()

    refused = lrx("profile", configs / "t02.yaml", "--runs-dir", runs, "--quiet")
    assert refused.exit_code == 2, refused.output
    line, = refused.output.strip().splitlines()
    assert "stage decompose" in line and "decompose.bases: [3, 3, 2] -> [4, 4, 3]" in line and "--force" in line, line
    assert (runs / "t02" / "metrics.json").read_bytes() == before, "the finished row is left as it was"

    forced = lrx("profile", configs / "t02.yaml", "--runs-dir", runs, "--quiet", "--force")
    assert forced.exit_code == 0, forced.output
    assert metrics(runs, "t02")["decompose"]["bases"] == [4, 4, 3], "told, it redoes the changed stage"


def test_a_redo_that_fails_leaves_the_finished_result_as_it_was(tree, monkeypatch):
    configs, runs = tree
    files = {name: (runs / "t02" / name).read_bytes() for name in ("metrics.json", "config.yaml", "expanded.pt")}

    def fails(ctx, name):
        raise UserError("the profile device is gone")

    monkeypatch.setattr(stages.Profile, "run", staticmethod(fails))
    result = lrx("run", configs / "t02.yaml", "--runs-dir", runs, "--quiet", "--set", "decompose.bases=[3,3,2]")
    assert result.exit_code == 2 and "the profile device is gone" in result.output, result.output
    after = metrics(runs, "t02")
    failed = after.pop("redo_failed")
    assert after == json.loads(files["metrics.json"]), "the finished metrics stay, the failure noted beside them"
    assert failed["error"] == "stage profile: the profile device is gone", failed
    for name in ("config.yaml", "expanded.pt"):
        assert (runs / "t02" / name).read_bytes() == files[name], f"{name} is the finished run's again"
    assert not [p.name for p in (runs / "t02").iterdir() if p.name.endswith(".tmp")], "no second names left"
    row = lrx("table", runs).output.splitlines()
    assert any(line.startswith("|2|2,3,4|4,4,3|") and "[failed" not in line for line in row), row
    monkeypatch.undo()
    again = lrx("run", configs / "t02.yaml", "--runs-dir", runs)
    assert again.exit_code == 0 and "nothing to do" in again.output, "the restored run is up to date"
    assert "redo_failed" not in metrics(runs, "t02"), "a later successful run drops the note"


def test_a_run_whose_parent_changes_under_it_records_nothing_built_on_two_states(tree, monkeypatch):
    configs, runs = tree
    parent_model = runs / "t02" / "expanded.pt"
    real = stages.Finetune.run

    def parent_redone_meanwhile(ctx, name):  # `lrx run t02.yaml --force` in another process, as t03 trains
        result = real(ctx, name)
        if name == "finetune.0":
            save_atomic(load_checkpoint(parent_model), parent_model)
        return result

    monkeypatch.setattr(stages.Finetune, "run", staticmethod(parent_redone_meanwhile))
    result = lrx("run", configs / "t03.yaml", "--runs-dir", runs, "--quiet")
    assert result.exit_code == 2, result.output
    line, = result.output.strip().splitlines()
    assert "run 't02'" in line and "changed" in line and str(parent_model) in line, line
    record = metrics(runs, "t03")
    assert record["status"] == "failed" and "finetune.0" not in record["stages"], \
        f"the stage built while the parent changed is not recorded: {record['stages'].keys()}"
