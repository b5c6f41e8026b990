"""lrx profile CONFIG --input-size: a finished run profiled at another size into a file of its own, its
results (metrics.json, config.yaml, model files, the table's row) untouched; bad input refused in one line."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lrx.cli import app
from lrx.output.table import collect_rows, render

runner = CliRunner()


def lrx(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(runs):
    """Every file under ``runs`` with its bytes and modification time."""
    return {str(p.relative_to(runs)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(runs.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """t02 (an expansion of the baseline t01) run once, profiled at its own size, 3x16x16."""
    from conftest import make_tiny_configs

    root = tmp_path_factory.mktemp("reprofile")
    configs = make_tiny_configs(root / "configs")
    runs = root / "runs"
    result = lrx("run", configs / "t02.yaml", "--runs-dir", runs, "--quiet")
    assert result.exit_code == 0, result.output
    return configs, runs


def test_a_run_is_profiled_at_another_size_into_its_own_file_and_its_results_stay(finished):
    configs, runs = finished
    before, table = snapshot(runs), render(collect_rows(runs))
    result = lrx("profile", configs / "t02.yaml", "--runs-dir", runs, "--input-size", "3,32,32")
    assert result.exit_code == 0, result.output
    written = runs / "t02" / "profile-3x32x32.json"
    assert f"wrote {written}" in result.output, result.output
    after = snapshot(runs)
    assert set(after) - set(before) == {"t02/profile-3x32x32.json"}, f"one new file: {set(after) - set(before)}"
    assert all(after[name] == before[name] for name in before), \
        "metrics.json, config.yaml, log.txt and the model files are byte-identical and not rewritten"
    assert render(collect_rows(runs)) == table, "the table's rows are the runs' own profiles, unchanged"
    own = json.loads((runs / "t02" / "metrics.json").read_text())
    sized = json.loads(written.read_text())
    assert own["stages"]["profile"]["input_size"] == [3, 16, 16] and sized["input_size"] == [3, 32, 32], \
        "the run's profile is at its own size, the new one at the size asked for"
    assert sized["macs"] == pytest.approx(4 * own["macs"], rel=0.05), \
        f"MACs counted at 32x32: about 4x those at 16x16 ({sized['macs']} vs {own['macs']})"
    assert sized["final_model"] == "expanded.pt" and sized["final_hash"] == own["stages"]["decompose"]["hash"], \
        "the file says which model (and which state of it) it timed"
    assert sized["latency"]["speedup"] is not None and sized["cpu_time_ms"] > 0, "both models timed"


@pytest.mark.parametrize("size", ["3,abc", "3,32", "3,99999,32", "2000,32,32", "0,32,32", "3,-1,32"])
def test_a_bad_input_size_is_refused_in_one_line_and_nothing_is_written(finished, size):
    configs, runs = finished
    before = snapshot(runs)
    result = lrx("profile", configs / "t02.yaml", "--runs-dir", runs, "--input-size", size)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--input-size" in lines[0] and "1 <= C <= 1024" in lines[0] \
        and "H, W <= 4096" in lines[0], result.output
    assert snapshot(runs) == before, "nothing written"


@pytest.mark.parametrize("args, words", [
    (["--input-size", "3,2,2"], "--input-size 3x2x2: tiny_cnn needs an input of at least 8x8"),
    (["--input-size", "3,32,32", "--force"], "give one of them"),
    (["--input-size", "3,32,32", "--set", "decompose.bases=[3, 3, 3]"],
     "stage decompose was made with other settings than the config gives now"),
])
def test_what_cannot_be_profiled_at_a_size_is_refused_naming_why_and_nothing_is_written(finished, args, words):
    configs, runs = finished
    before = snapshot(runs)
    result = lrx("profile", configs / "t02.yaml", "--runs-dir", runs, *args)
    assert result.exit_code == 2 and words in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert snapshot(runs) == before, "nothing written"


def test_a_run_not_finished_is_refused_and_no_run_folder_is_made(finished):
    configs, runs = finished
    result = lrx("profile", configs / "t03.yaml", "--runs-dir", runs, "--input-size", "3,32,32")
    assert result.exit_code == 2 and "is not run" in result.output and "lrx run" in result.output, result.output
    assert not (runs / "t03").exists(), "nothing made for a run that is not there"
