"""The pipeline's contracts: exit codes, early checks that use the same rules as the math, the library API."""
from __future__ import annotations

import json

import pytest
from torch import nn
from typer.testing import CliRunner

from conftest import write_yaml
from lrx.nn import models
from lrx.cli import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USER_ERROR, app
from lrx.config.settings import load_config
from lrx.base.errors import UserError
from lrx.pipeline.runner import Runner, check_against_model, run_with_dependencies

runner = CliRunner()


def test_exit_codes_are_the_documented_ones():
    assert (EXIT_DIVERGED, EXIT_USER_ERROR, EXIT_INTERRUPTED) == (1, 2, 130), "README's Failure behaviour lists these"


def test_user_error_exits_2(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "missing.yaml"), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "no such file" in result.output, result.output


def test_diverged_training_exits_1_and_keeps_the_run_marked_failed(tiny_configs, tmp_path):
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(tiny_configs / "t01.yaml"), "--runs-dir", str(runs), "--quiet",
                                 "--set", "train.lr=1e30"])
    assert result.exit_code == 1, f"a diverged training exits 1, got {result.exit_code}: {result.output}"
    assert "the loss became" in result.output and "Traceback" not in result.output, result.output
    metrics = json.loads((runs / "t01" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "stage train" in metrics["error"], metrics.get("error")
    assert not (runs / "t01" / "model.pt").exists(), "no model file from a diverged training"


def test_interrupt_exits_130_and_marks_the_run_interrupted(tiny_configs, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lrx.pipeline.stages.train_baseline", interrupted)
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(tiny_configs / "t01.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 130, f"Ctrl-C exits 130, got {result.exit_code}: {result.output}"
    assert "interrupted" in result.output
    assert json.loads((runs / "t01" / "metrics.json").read_text())["status"] == "interrupted"


def _odd_kernel_model(num_classes: int = 10) -> nn.Module:
    """A conv with a 3x5 kernel, 2 -> 4 channels: scheme 2's maximum rank is 6 vertical first, 10 horizontal first."""
    return nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(2, 4, (3, 5), padding=(1, 2)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


@pytest.mark.parametrize("order,rank,ok", [("vh", 6, True), ("vh", 7, False), ("hv", 8, True), ("hv", 11, False),
                                           ("auto", 10, True)])
def test_early_rank_check_follows_the_order(tiny_configs, monkeypatch, order, rank, ok):
    monkeypatch.setitem(models.MODELS, "odd", _odd_kernel_model)
    monkeypatch.setitem(models.MIN_IMAGE_SIZE, "odd", 8)
    path = write_yaml(tiny_configs / "odd.yaml", {"extends": "base.yaml", "baseline": "t01", "model": {"name": "odd"},
                                                  "decompose": {"layers": [2], "scheme": "v2", "bases": [rank],
                                                                "order": order}})
    cfg = load_config(path)
    if ok:
        check_against_model(cfg)
        return
    with pytest.raises(UserError) as err:
        check_against_model(cfg)
    assert err.value.key == "decompose.bases.0" and "out of range" in err.value.message, str(err.value)
    assert f"order {order}" in err.value.message, f"the message names the order: {err.value}"


def test_early_check_refuses_a_1x1_conv_for_scheme_2(tiny_configs, monkeypatch):
    monkeypatch.setitem(models.MODELS, "pointwise",
                        lambda num_classes=10: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.LazyLinear(num_classes)))
    monkeypatch.setitem(models.MIN_IMAGE_SIZE, "pointwise", 8)
    path = write_yaml(tiny_configs / "pw.yaml", {"extends": "base.yaml", "baseline": "t01",
                                                 "model": {"name": "pointwise"},
                                                 "decompose": {"layers": [1], "scheme": "v2", "bases": [1]}})
    with pytest.raises(UserError, match="1x1 kernel") as err:
        check_against_model(load_config(path))
    assert err.value.key == "decompose.layers.0"


def test_library_runs_dependencies_as_the_cli_does(tiny_configs, tmp_path):
    said = []
    metrics = run_with_dependencies(load_config(tiny_configs / "t02.yaml"), tmp_path / "runs", until="decompose",
                                    quiet=False, echo=said.append)
    assert metrics["status"] == "partial" and "decompose" in metrics["stages"], metrics["status"]
    assert any("needs run t01" in line for line in said), said
    assert (tmp_path / "runs" / "t01" / "model.pt").exists(), "the baseline was made first"


def test_runner_alone_refuses_an_unfinished_dependency(tiny_configs, tmp_path):
    with pytest.raises(UserError, match="is not finished"):
        Runner(load_config(tiny_configs / "t02.yaml"), tmp_path / "runs").run()
    assert not (tmp_path / "runs" / "t02").exists(), "nothing written for a run that could not start"


def test_dry_run_header_names_scheme_2_by_its_order(tiny_configs, tmp_path):
    path = write_yaml(tiny_configs / "v2.yaml", {"extends": "base.yaml", "baseline": "t01",
                                                 "decompose": {"layers": [2, 3], "scheme": "v2", "bases": [4, 4]}})
    result = runner.invoke(app, ["decompose", str(path), "--dry-run", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "scheme v2, order vh" in result.output and "basis" not in result.output, result.output
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def test_finetune_commands_run_up_to_their_last_stage(tiny_configs, tmp_path):
    from lrx.pipeline.stages import last_finetune_stage

    cfg = load_config(tiny_configs / "t03.yaml")  # stage 0: l2, stage 1: ce
    assert (last_finetune_stage(cfg, "l2"), last_finetune_stage(cfg, "ce")) == ("finetune.0", "finetune.1")
    result = runner.invoke(app, ["finetune-ce", str(tiny_configs / "t02.yaml"), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "no fine-tune stage has ce > 0" in result.output, result.output
    assert "t02.yaml" in result.output and not (tmp_path / "runs").exists(), result.output


@pytest.fixture
def expansion_run(tiny_configs, tmp_path):
    """t01 and t04 (scheme 2, ranks 4,6,6, then one L2 fine-tune) run; returns (configs, runs)."""
    write_yaml(tiny_configs / "t04.yaml", {"extends": "base.yaml", "baseline": "t01", "profile": {"enabled": False},
                                           "decompose": {"layers": [2, 3, 4], "scheme": "v2", "bases": [4, 6, 6]},
                                           "finetune": [{"l2": 1.0, "epochs": 1}]})
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(tiny_configs / "t04.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 0, result.output
    return tiny_configs, runs


def _swap_in_other_ranks(path, layers=(2, 3, 4)):
    from lrx.expansion.model import expand
    from lrx.pipeline.rundir import save_model

    other, report = expand(models.build_model("tiny_cnn"), layers=list(layers), scheme="v2", ranks=[1, 1, 1],
                           input_size=(3, 16, 16))
    save_model(path, other, "tiny_cnn", 10, report.spec, report.spec["layers"])


def test_a_model_file_of_other_ranks_is_refused_not_used(expansion_run):
    configs, runs = expansion_run
    _swap_in_other_ranks(runs / "t04" / "expanded.pt")
    result = runner.invoke(app, ["run", str(configs / "t04.yaml"), "--runs-dir", str(runs), "--quiet",
                                 "--set", "finetune.0.lr=0.002"])
    assert result.exit_code == 2, f"the swapped file must be refused: {result.output}"
    assert "expanded.pt" in result.output and "metrics.json" in result.output, result.output
    assert "ranks [1, 1, 1] (recorded: [4, 6, 6])" in result.output, result.output
    result = runner.invoke(app, ["run", str(configs / "t04.yaml"), "--runs-dir", str(runs), "--quiet", "--force"])
    assert result.exit_code == 0, f"the advice (--force) works: {result.output}"
    assert json.loads((runs / "t04" / "metrics.json").read_text())["decompose"]["bases"] == [4, 6, 6]


def test_a_parent_model_of_other_ranks_is_refused(expansion_run):
    configs, runs = expansion_run
    write_yaml(configs / "t05.yaml", {"extends": "base.yaml", "baseline": "t01", "parent": "t04",
                                      "profile": {"enabled": False}, "finetune": [{"ce": 1.0, "epochs": 1}]})
    _swap_in_other_ranks(runs / "t04" / "stage0.pt")
    result = runner.invoke(app, ["run", str(configs / "t05.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 2 and "stage0.pt" in result.output and "t04" in result.output, result.output
    assert "redo run 't04'" in result.output, f"the advice names the run to redo (--force on t05 would not): {result.output}"


class _LoadingCli:
    """Stands in for lrx.cli while it loads: the SIGTERM of `timeout` lands during the import."""

    def __getattr__(self, name):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the CLI's import")


def test_sigterm_while_the_cli_loads_exits_130_in_one_line(monkeypatch, capsys):
    """The lrx script installs its SIGTERM handler before importing the CLI (torch, typer, rich take seconds
    on a busy machine): a SIGTERM then is one line and exit code 130, not death by the signal."""
    import signal
    import sys

    import lrx.__main__ as entry

    monkeypatch.setitem(sys.modules, "lrx.cli", _LoadingCli())
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exited:
            entry.main()
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    err = capsys.readouterr().err
    assert exited.value.code == EXIT_INTERRUPTED == entry.EXIT_INTERRUPTED, exited.value.code
    assert err.count("\n") == 1 and err.startswith("lrx: error: interrupted"), err


class _FinishedCli:
    """Stands in for lrx.cli: a command that finishes (click then exits with the command's code)."""

    @staticmethod
    def app(prog_name):
        raise SystemExit(0)


def test_a_signal_after_the_command_finished_does_not_kill_lrx_while_python_shuts_down(monkeypatch):
    """After the command, Python restores the signals' default actions while it and torch shut down; a
    SIGTERM then killed a finished run's lrx with the signal (exit -15, the attack on a busy machine)."""
    import signal
    import sys

    import lrx.__main__ as entry

    monkeypatch.setitem(sys.modules, "lrx.cli", _FinishedCli())
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exited:
            entry.main()
        after = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert exited.value.code == 0, "the command's own exit code"
    assert after == (signal.SIG_IGN, signal.SIG_IGN), f"ignored from the command's end: {after}"


def test_sigterm_stops_a_run_as_ctrl_c_does(tiny_configs, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "lrx", "run", str(tiny_configs / "t01.yaml"), "--runs-dir", str(runs), "--quiet",
               "--set", "train.epochs=100000"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt, deadline = runs / "t01" / "train.ckpt", time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), "training started and wrote its first checkpoint"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, f"SIGTERM exits 130 as Ctrl-C does, got {process.returncode}: {err[-500:]}"
    assert "interrupted" in err and "Traceback" not in err, err[-500:]
    metrics = json.loads((runs / "t01" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted", f"metrics.json says {metrics['status']}"
    again = runner.invoke(app, ["run", str(tiny_configs / "t01.yaml"), "--runs-dir", str(runs), "--quiet",
                                "--set", "train.epochs=1"])
    assert again.exit_code == 0, f"the interrupted run's directory is free again: {again.output}"


def test_a_filesystem_refusal_is_one_line(tiny_configs, tmp_path):
    not_a_folder = tmp_path / "runs"
    not_a_folder.write_text("a file where the runs folder goes")
    result = runner.invoke(app, ["run", str(tiny_configs / "t01.yaml"), "--runs-dir", str(not_a_folder), "--quiet"])
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    assert len(result.output.strip().splitlines()) == 1 and "runs" in result.output, result.output


def test_force_on_a_stage_command_redoes_that_stage_only(tiny_configs, tmp_path):
    runs = tmp_path / "runs"
    assert runner.invoke(app, ["run", str(tiny_configs / "t01.yaml"), "--runs-dir", str(runs), "--quiet"]).exit_code == 0
    before = json.loads((runs / "t01" / "metrics.json").read_text())["stages"]
    result = runner.invoke(app, ["profile", str(tiny_configs / "t01.yaml"), "--runs-dir", str(runs), "--quiet", "--force"])
    assert result.exit_code == 0, result.output
    after = json.loads((runs / "t01" / "metrics.json").read_text())
    assert after["stages"]["train"] == before["train"], "profile --force must not retrain the baseline"
    assert after["stages"]["profile"]["wall_s"] != before["profile"]["wall_s"] or \
        after["replaced"][-1]["why"] == "--force", "the profile stage was redone"
    assert after["replaced"][-1]["metrics"]["stages"]["profile"] == before["profile"], "the old profile is kept"
    log = (runs / "t01" / "log.txt").read_text()
    assert log.count("stage train ...") == 1 and log.count("stage profile ...") == 2, log


def test_help_shows_flags_as_flags_and_version_exists():
    help_text = runner.invoke(app, ["run", "--help"]).output
    assert "<bool>" not in help_text and "--set KEY=VALUE" in help_text and "CONFIG..." in help_text, help_text
    assert "Examples:" in runner.invoke(app, ["--help"]).output
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("lrx "), version.output


def test_the_summary_is_one_line_when_piped(tiny_configs, tmp_path):
    long_name = "a_run_whose_name_pushes_the_summary_past_eighty_columns"
    (tiny_configs / f"{long_name}.yaml").write_text((tiny_configs / "t02.yaml").read_text())
    result = runner.invoke(app, ["run", str(tiny_configs / f"{long_name}.yaml"), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    summary = [line for line in result.output.splitlines() if line.startswith(f"run {long_name}:")]
    assert len(summary) == 1 and "measured speedup" in summary[0] and len(summary[0]) > 80, result.output[-800:]


@pytest.mark.parametrize("patch,key", [({"model": {"num_classes": 100}}, "model.num_classes"),
                                       ({"data": {"image_size": 32}}, "data.image_size"),
                                       ({"model": {"name": "vgg11"}, "data": {"image_size": 32},
                                         "profile": {"input_size": [3, 32, 32]}}, "model.name")])
def test_a_run_that_differs_from_its_baseline_is_refused_before_anything_is_written(tiny_configs, tmp_path,
                                                                                      patch, key):
    path = write_yaml(tiny_configs / "child.yaml", {"extends": "base.yaml", "baseline": "t01",
                                                    "decompose": {"layers": [2], "bases": [2]}, **patch})
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 2, result.output
    line, = result.output.strip().splitlines()
    assert str(path) in line and key in line and "t01.yaml" in line, f"names both files and the key: {line}"
    assert not runs.exists(), "nothing written"


def test_a_finished_stage_leaves_no_per_epoch_checkpoint(expansion_run):
    _, runs = expansion_run
    left = sorted(p.name for p in runs.rglob("*.ckpt"))
    assert not left, f"per-epoch checkpoints of finished stages are disk nobody needs: {left}"
    assert (runs / "t01" / "model.pt").exists() and (runs / "t04" / "stage0.pt").exists(), "the models stay"


def test_fit_data_runs_as_a_stage_and_beats_the_weights_fit_on_outputs(tiny_configs, tmp_path):
    write_yaml(tiny_configs / "t06.yaml", {"extends": "base.yaml", "baseline": "t01", "profile": {"enabled": False},
                                           "decompose": {"layers": [2, 3], "scheme": "v2", "bases": [2, 3],
                                                         "fit": "data", "calibration": {"images": 64,
                                                                                        "iterations": 3}}})
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(tiny_configs / "t06.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 0, result.output
    stage = json.loads((runs / "t06" / "metrics.json").read_text())["stages"]["decompose"]
    assert stage["fit"] == "data" and stage["fit_data"]["images"] == 64, stage.get("fit_data")
    for row in stage["report"]:
        assert row["output_error"] <= row["output_error_weights"] + 1e-9, f"{row['name']}: data fit is no worse"
    weights = load_config(tiny_configs / "t06.yaml", ["decompose.fit=weights"])
    assert weights.decompose.fit == "weights"


def test_fit_data_with_the_alternating_method_is_refused(tiny_configs, tmp_path):
    path = write_yaml(tiny_configs / "bad.yaml", {"extends": "base.yaml", "baseline": "t01",
                                                  "decompose": {"layers": [2], "bases": [2], "fit": "data",
                                                                "method": "alternating"}})
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert result.exit_code == 2 and "decompose.method" in result.output, result.output


def test_an_interrupt_between_stages_is_recorded_too(tiny_configs, tmp_path, monkeypatch):
    from lrx.pipeline import runner as runs_module

    real_say = runs_module.Runner.say

    def say(self, message):  # SIGTERM arriving right after a stage finished, as the attack found
        real_say(self, message)
        if message.startswith("stage train done"):
            raise KeyboardInterrupt

    monkeypatch.setattr(runs_module.Runner, "say", say)
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(tiny_configs / "t01.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 130, result.output
    metrics = json.loads((runs / "t01" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted", f"not left 'running': {metrics['status']}"
    assert metrics["error"] == "stage train: interrupted (Ctrl-C or SIGTERM)", f"says where and why: {metrics['error']}"
    assert "train" in metrics["stages"], "the finished stage stays recorded: the same command resumes after it"


def test_each_config_is_checked_against_its_model_once_per_command(tiny_configs, tmp_path, monkeypatch):
    from lrx.pipeline import runner as runs_module

    calls = []
    real = runs_module.check_against_model
    monkeypatch.setattr(runs_module, "check_against_model", lambda cfg: calls.append(cfg.name) or real(cfg))
    result = runner.invoke(app, ["run", str(tiny_configs / "t02.yaml"), str(tiny_configs / "t03.yaml"),
                                 "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(calls) == ["t01", "t02", "t03"], f"a check builds the model (and plans ranks): once each, got {calls}"
