"""Where `baseline:` and `parent:` configs are found: beside the child, in the current directory, in configs/."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lrx.cli import app
from lrx.config.settings import load_config
from lrx.base.errors import UserError
from lrx.pipeline.runner import dependencies

from conftest import TINY_BASE, write_yaml

runner = CliRunner()
CHILD = {**TINY_BASE, "baseline": "t01", "decompose": {"layers": [2], "bases": [2]}}


def child_in(folder):
    folder.mkdir(parents=True, exist_ok=True)
    return write_yaml(folder / "child.yaml", CHILD)


def baseline_in(folder, no):
    folder.mkdir(parents=True, exist_ok=True)
    return write_yaml(folder / "t01.yaml", {**TINY_BASE, "no": no})


@pytest.mark.parametrize("where", ["configs", "."])
def test_baseline_is_found_in_the_current_directory_and_in_configs(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    baseline_in(tmp_path / where, no=7)
    child = child_in(tmp_path / "mine")
    (dep,) = dependencies(load_config(child))
    assert (dep.name, dep.no) == ("t01", 7), f"the baseline config in {where}/ was loaded"


def test_the_config_beside_the_child_comes_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    baseline_in(tmp_path / "configs", no=7)
    baseline_in(tmp_path, no=8)
    child = child_in(tmp_path / "mine")
    baseline_in(tmp_path / "mine", no=9)
    (dep,) = dependencies(load_config(child))
    assert dep.no == 9, f"beside the child wins over ./ and configs/, got row {dep.no}"
    (tmp_path / "mine" / "t01.yaml").unlink()
    (dep,) = dependencies(load_config(child))
    assert dep.no == 8, f"then the current directory, before configs/, got row {dep.no}"


def test_a_missing_baseline_names_every_place_looked_at(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    child = child_in(tmp_path / "mine")
    with pytest.raises(UserError) as err:
        dependencies(load_config(child))
    text = str(err.value)
    for place in ("mine/t01.yaml", "t01.yaml", "configs/t01.yaml"):
        assert place in text, f"the message names {place}: {text}"
    assert "child.yaml" in text and "baseline" in text, f"the message names the child file and key: {text}"
    result = runner.invoke(app, ["run", str(child), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert result.exit_code == 2 and "configs/t01.yaml" in result.output and "Traceback" not in result.output, \
        result.output
    assert len(result.output.strip().splitlines()) == 1, f"one line: {result.output!r}"
    assert not (tmp_path / "runs").exists(), "nothing was written"
