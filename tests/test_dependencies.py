"""What a run builds on, checked before anything runs: the settings it must share with its baseline and
parent, the name a dependency is referred by, loops, and the devices asked for."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_yaml
from lrx.cli import app

runner = CliRunner()


def lrx(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result) -> str:
    assert result.exit_code == 2, f"refused with exit 2: {result.exit_code}: {result.output}"
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, f"one line: {result.output}"
    return lines[0]


@pytest.mark.parametrize("override, key", [("data.root=other", "data.root"), ("data.test_subset=64", "data.test_subset"),
                                           ("data.synthetic_size=24", "data.synthetic_size")])
def test_a_set_that_changes_which_images_a_run_reads_is_refused_against_its_baseline(tiny_configs, tmp_path,
                                                                                    override, key):
    """--set reaches the named config only: an expansion that would read other images than its baseline was
    measured on is refused, naming both files and the key."""
    runs = tmp_path / "runs"
    line = one_line(lrx("run", tiny_configs / "t02.yaml", "--runs-dir", runs, "--set", override))
    assert "t02.yaml" in line and "t01.yaml" in line and key in line, line
    assert not runs.exists(), "nothing written"


def test_the_training_subset_may_differ_from_the_baselines(tiny_configs, tmp_path):
    from lrx.config.settings import load_config
    from lrx.pipeline.runner import configs_to_run

    configs = configs_to_run(load_config(tiny_configs / "t02.yaml", ["data.train_subset=64"]))
    assert [c.name for c in configs] == ["t01", "t02"], "a fine-tune may train on fewer images than its baseline"


def test_a_dependency_whose_name_differs_from_its_file_is_refused(tiny_configs, tmp_path):
    """bb.yaml says name: other, so its run is runs/other; case.yaml refers to it as bb and would read runs/bb."""
    write_yaml(tiny_configs / "bb.yaml", {"extends": "base.yaml", "name": "other"})
    write_yaml(tiny_configs / "case.yaml", {"extends": "base.yaml", "baseline": "bb",
                                            "decompose": {"layers": [2], "bases": [2]}})
    runs = tmp_path / "runs"
    line = one_line(lrx("run", tiny_configs / "case.yaml", "--runs-dir", runs))
    assert "bb.yaml" in line and "'other'" in line and "'bb'" in line and "case.yaml" in line, line
    assert not runs.exists(), "nothing trained or written"


def test_a_parent_loop_of_three_configs_is_refused_before_anything_runs(tiny_configs, tmp_path):
    for name, parent in (("pa", "pb"), ("pb", "pc"), ("pc", "pa")):
        write_yaml(tiny_configs / f"{name}.yaml", {"extends": "base.yaml", "baseline": "t01", "parent": parent,
                                                   "finetune": [{"ce": 1.0, "epochs": 1}]})
    runs = tmp_path / "runs"
    line = one_line(lrx("run", tiny_configs / "pa.yaml", "--runs-dir", runs))
    assert "loop" in line and all(f"{n}.yaml" in line for n in ("pa", "pb", "pc")), line
    assert not runs.exists(), "t01 is not trained first"


def test_a_baseline_loop_of_two_configs_says_it_is_a_loop(tiny_configs, tmp_path):
    write_yaml(tiny_configs / "case.yaml", {"extends": "base.yaml", "baseline": "bb",
                                            "decompose": {"layers": [2], "bases": [2]}})
    write_yaml(tiny_configs / "bb.yaml", {"extends": "base.yaml", "baseline": "case",
                                          "decompose": {"layers": [2], "bases": [2]}})
    runs = tmp_path / "runs"
    line = one_line(lrx("run", tiny_configs / "case.yaml", "--runs-dir", runs))
    assert "loop" in line and "case.yaml" in line and "bb.yaml" in line and "first" not in line, line
    assert not runs.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("key", ["profile.device", "runtime.device"])
def test_a_gpu_asked_for_on_a_machine_without_one_is_refused_before_training(tiny_configs, tmp_path, key):
    runs = tmp_path / "runs"
    line = one_line(lrx("run", tiny_configs / "t02.yaml", "--runs-dir", runs, "--set", f"{key}=cuda"))
    assert key in line and "t02.yaml" in line and "CUDA" in line, line
    assert not runs.exists(), "the baseline is not trained first"
