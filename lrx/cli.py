"""The ``lrx`` command line: thin commands that parse, then call the library.

A user's mistake prints one line (file, key, what is wrong, what is allowed) and exits with code 2, before
torch is imported when the mistake is in a config.
"""
from __future__ import annotations

import functools
import importlib.metadata
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from lrx import __version__
from lrx.base.errors import EXIT_INTERRUPTED, TrainingDiverged, UserError, interrupt
from lrx.config.settings import load_config, one_run, parse_input_size, parse_seeds, seed_runs, size_text

# The library behind each command is imported inside the command ("# local: start-up"): torch takes seconds to
# import, and a config's mistake is reported before it is loaded.

__all__ = ["fail", "user_errors", "run", "train", "decompose", "finetune_l2", "finetune_ce", "profile", "table",
           "plot", "clean", "export"]

app = typer.Typer(
    help="lrx: speed up CNNs with low-rank expansions (Jaderberg et al. 2014) and measure what it buys.",
    epilog="Examples:\n\n\b\n"  # \b: click keeps the lines below as they are
           "  lrx run configs/exp04.yaml                   # runs the baseline and expansion it builds on first\n"
           "  lrx run configs/quick/exp1*.yaml --runs-dir runs/quick\n"
           "  lrx decompose configs/exp11.yaml --dry-run   # ranks, MACs, retained energy; writes no run\n"
           "  lrx profile configs/exp11.yaml --force       # redo the profile stage only\n"
           "  lrx table runs/ > RESULTS.md",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: flags show as flags, not "<bool>"
)

def _version(show: bool) -> None:
    if show:
        typer.echo(f"lrx {__version__}, torch {importlib.metadata.version('torch')}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print lrx's and torch's versions and exit.")) -> None:
    """lrx: speed up CNNs with low-rank expansions (Jaderberg et al. 2014) and measure what it buys."""


ConfigArg = typer.Argument(..., help="Experiment YAML, e.g. configs/exp04.yaml.", show_default=False,
                           metavar="CONFIG")
RunsDir = typer.Option("runs", "--runs-dir", help="Folder holding one run directory per experiment.", metavar="DIR")
DataRoot = typer.Option(None, "--data-root", help="Dataset folder (overrides data.root and LRX_DATA).", metavar="DIR")
Overrides = typer.Option(None, "--set", help="Dotted override, repeatable: --set finetune.0.epochs=2.",
                         metavar="KEY=VALUE")
Force = typer.Option(False, "--force", help="Redo this command's stage even if it is up to date, and earlier "
                                            "stages whose settings changed (without --force those are refused).")
ForceAll = typer.Option(False, "--force", help="Redo every stage of the run, even those that are up to date "
                                               "(never the runs it builds on).")
NoDeps = typer.Option(False, "--no-deps", help="Fail instead of first running the runs this one builds on.")
Quiet = typer.Option(False, "--quiet", "-q", help="No progress bars or messages; the log file still gets them.")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"lrx: error: {message}", err=True)
    raise typer.Exit(code)


# Exit codes: 0 done, 1 training diverged (or an unexpected failure, with its traceback),
# 2 a user's mistake or the filesystem's refusal (one line), 130 interrupted (Ctrl-C or SIGTERM).
EXIT_DIVERGED, EXIT_USER_ERROR = 1, 2


def user_errors(command):
    """Turn a UserError into one line on stderr and exit code 2 (1 for a diverged training, 130 for Ctrl-C
    or SIGTERM, after the run recorded itself as interrupted)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, interrupt) if main_thread else None
        try:
            return command(*args, **kwargs)
        except TrainingDiverged as err:  # a UserError too: caught first, it has its own code
            fail(str(err), EXIT_DIVERGED)
        except UserError as err:
            fail(str(err), EXIT_USER_ERROR)
        except OSError as err:  # disk full, no permission, a file where a folder goes: the OS's own words
            fail(f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err), EXIT_USER_ERROR)
        except KeyboardInterrupt:
            fail("interrupted; run the same command again to continue from the last finished epoch", EXIT_INTERRUPTED)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _echo(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(message, markup=False)  # never wrap mid-phrase


def _run_until(config: Path, until: str | None, runs_dir: Path, data_root, overrides, force, no_deps, quiet,
               checked: set[str] | None = None):
    """Run ``config`` up to stage ``until``; ``force`` redoes that stage (every stage when ``until`` is None)."""
    cfg = one_run(load_config(config, overrides or ()))
    from lrx.pipeline.runner import run_with_dependencies  # local: start-up
    return run_with_dependencies(cfg, runs_dir, until, data_root=data_root, quiet=quiet, force=force and until is None,
                                 redo=until if force else None, no_deps=no_deps, echo=_echo, checked=checked)


@app.command()
@user_errors
def run(configs: List[Path] = typer.Argument(..., help="Experiment YAMLs, e.g. configs/exp04.yaml; run in order.",
                                             metavar="CONFIG...",
                                             show_default=False),
        runs_dir: Path = RunsDir, data_root: Optional[str] = DataRoot,
        set_: Optional[List[str]] = Overrides, force: bool = ForceAll, no_deps: bool = NoDeps, quiet: bool = Quiet,
        seeds: Optional[str] = typer.Option(None, "--seeds", metavar="S1,S2,...",
                                            help="Run each row once per seed, into <name>-s<seed> (replaces seed:).")):
    """Run every stage of experiment rows: baseline, decompose, fine-tune, profile (skipping what is up to date)."""
    chosen = parse_seeds(seeds) if seeds is not None else None
    # every config read before torch loads; a row with several seeds is one run per seed
    loaded = [run for config in configs for run in seed_runs(load_config(config, set_ or ()), chosen)]
    from lrx.pipeline.runner import configs_to_run, run_with_dependencies  # local: start-up
    checked: set[str] = set()  # each config (a shared baseline too) is checked against its model once
    # every config is validated once, before the first one starts
    involved = [configs_to_run(cfg, checked=checked) for cfg in loaded]
    for configs_of_row in involved:
        _summary(run_with_dependencies(configs_of_row[-1], runs_dir, data_root=data_root, quiet=quiet, force=force,
                                       no_deps=no_deps, echo=_echo, involved=configs_of_row), quiet)


@app.command()
@user_errors
def train(config: Path = ConfigArg, runs_dir: Path = RunsDir, data_root: Optional[str] = DataRoot,
          set_: Optional[List[str]] = Overrides, force: bool = Force, quiet: bool = Quiet):
    """Train the baseline model of a config that has no `baseline:` (the seed's row 1) and report acc@1."""
    cfg = one_run(load_config(config, set_ or ()))
    if cfg.baseline is not None:
        raise UserError(f"this run builds on baseline {cfg.baseline!r}; train that config instead", file=str(config),
                        key="baseline")
    _summary(_run_until(config, "train", runs_dir, data_root, set_, force, False, quiet), quiet)


@app.command()
@user_errors
def decompose(config: Path = ConfigArg, runs_dir: Path = RunsDir, data_root: Optional[str] = DataRoot,
              set_: Optional[List[str]] = Overrides, force: bool = Force, no_deps: bool = NoDeps, quiet: bool = Quiet,
              dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-layer ranks, MACs and retained energy; write nothing to the runs folder (a latency target's measured times go to the machine's cache)."),
              show_bases: Optional[Path] = typer.Option(None, "--show-bases", help="Save a PNG of each layer's basis filters."),
              compare_fits: bool = typer.Option(False, "--compare-fits", help="With fit: data, print per layer both fits' "
                                                "output errors on the calibration and on held-out (test) images.")):
    """Replace the config's conv layers with low-rank expansions and print the per-layer report."""
    cfg = one_run(load_config(config, set_ or ()))
    from lrx.output.preview import fit_comparison, print_preview, save_bases_picture  # local: start-up
    from lrx.pipeline.rundir import RunDir  # local: start-up
    from lrx.pipeline.runner import configs_to_run  # local: start-up
    if cfg.decompose is None:
        raise UserError("has no decompose: block", file=str(config), key="decompose")
    if dry_run:
        involved = configs_to_run(cfg)  # the checks a real run makes first: a dry run passes only what would start
        print_preview(cfg, runs_dir, data_root, involved)
        return
    if show_bases is not None:
        from lrx.output.plot import check_picture  # local: start-up
        check_picture(show_bases)  # before the stage runs: a picture that cannot be written stops it now
    if compare_fits and cfg.decompose.fit != "data":
        raise UserError(f"--compare-fits compares the data fit with the weights fit: needs fit: data, got "
                        f"{cfg.decompose.fit!r}", file=str(config), key="decompose.fit")
    metrics = _run_until(config, "decompose", runs_dir, data_root, set_, force, no_deps, quiet)
    if compare_fits:
        typer.echo(fit_comparison(metrics["stages"]["decompose"]["report"]))
    if show_bases is not None:
        save_bases_picture(RunDir(runs_dir, cfg.name).model_path("decompose"), cfg, show_bases)
        typer.echo(f"wrote {show_bases}")
    _summary(metrics, quiet)


def _finetune(config: Path, loss: str, runs_dir, data_root, set_, force, no_deps, quiet) -> None:
    """Run ``config`` up to its last fine-tuning stage with ``loss`` (earlier stages first)."""
    cfg = one_run(load_config(config, set_ or ()))
    from lrx.pipeline.stages import last_finetune_stage  # local: start-up
    _summary(_run_until(config, last_finetune_stage(cfg, loss), runs_dir, data_root, set_, force, no_deps, quiet), quiet)


@app.command("finetune-l2")
@user_errors
def finetune_l2(config: Path = ConfigArg, runs_dir: Path = RunsDir, data_root: Optional[str] = DataRoot,
                set_: Optional[List[str]] = Overrides, force: bool = Force, no_deps: bool = NoDeps, quiet: bool = Quiet):
    """Fine-tune by data reconstruction (L2 to the original's layer outputs), up to the config's last L2 stage."""
    _finetune(config, "l2", runs_dir, data_root, set_, force, no_deps, quiet)


@app.command("finetune-ce")
@user_errors
def finetune_ce(config: Path = ConfigArg, runs_dir: Path = RunsDir, data_root: Optional[str] = DataRoot,
                set_: Optional[List[str]] = Overrides, force: bool = Force, no_deps: bool = NoDeps, quiet: bool = Quiet):
    """Fine-tune with cross-entropy on labels, up to the config's last CE stage (earlier stages first)."""
    _finetune(config, "ce", runs_dir, data_root, set_, force, no_deps, quiet)


@app.command()
@user_errors
def profile(config: Path = ConfigArg, runs_dir: Path = RunsDir, data_root: Optional[str] = DataRoot,
            set_: Optional[List[str]] = Overrides, force: bool = Force, no_deps: bool = NoDeps, quiet: bool = Quiet,
            threads: Optional[int] = typer.Option(None, help="torch threads for timing (profile.threads)."),
            batch: Optional[int] = typer.Option(None, help="Batch size for timing (profile.batch)."),
            device: Optional[str] = typer.Option(None, help="auto, cpu or cuda (profile.device)."),
            onnx: bool = typer.Option(False, "--onnx", help="Also time the original and this run's final model in "
                                                            "ONNX Runtime on the CPU (needs lrx[export])."),
            input_size: Optional[str] = typer.Option(None, "--input-size", metavar="C,H,W",
                                                     help="Profile the finished run at this size instead, into "
                                                          "profile-CxHxW.json in its folder; its results stay as they are.")):
    """MACs, params, CPU/CUDA time (medians of interleaved repeats), speedup over the original's fastest layout,
    per-layer times and where the time goes."""
    extra = [f"profile.{k}={v}" for k, v in (("threads", threads), ("batch", batch), ("device", device)) if v is not None]
    if input_size is not None:
        _profile_at_size(config, runs_dir, set_ or [], extra, input_size, force, quiet, onnx)
        return
    metrics = _run_until(config, "profile", runs_dir, data_root, (set_ or []) + extra, force, no_deps, quiet)
    from lrx.output.export import profile_onnx  # local: start-up
    from lrx.output.profiles import print_profile  # local: start-up
    _summary(metrics, quiet)
    if not quiet:
        print_profile(metrics)
    if onnx:
        typer.echo(profile_onnx(one_run(load_config(config, (set_ or []) + extra)), runs_dir))


def _profile_at_size(config: Path, runs_dir: Path, set_: list, extra: list, input_size: str, force: bool,
                     quiet: bool, onnx: bool) -> None:
    """``lrx profile --input-size``: the finished run profiled at that size into a file of its own."""
    size = parse_input_size(input_size)
    if force:
        raise UserError("--force redoes the run's profile stage; --input-size profiles the finished run at another "
                        "size and changes none of its results: give one of them")
    cfg = one_run(load_config(config, set_))  # the run as made: its stages' settings
    sized = one_run(load_config(config, set_ + extra + [f"profile.input_size=[{','.join(map(str, size))}]"]))
    from lrx.output.export import profile_onnx  # local: start-up
    from lrx.output.profiles import print_profile  # local: start-up
    from lrx.pipeline.reprofile import profile_at_size  # local: start-up
    record, path = profile_at_size(cfg, sized.profile, runs_dir, say=(lambda message: None) if quiet else _echo)
    _echo(f"wrote {path} (metrics.json and the table's row unchanged)")
    if not quiet:
        _summary({"name": cfg.name, "status": f"profiled at {size_text(size)}", **record}, quiet)
        print_profile(record)
    if onnx:
        typer.echo(profile_onnx(sized, runs_dir))


@app.command()
@user_errors
def table(runs_dir: Path = typer.Argument(..., help="Folder of run directories, e.g. runs/."),
          format: str = typer.Option("markdown", "--format", help="markdown, csv or json."),
          versus: Optional[str] = typer.Option(None, "--versus", metavar="RUN",
                                               help="Add a footnote: every other row's acc@1 minus this run's, paired "
                                                    "on the same test images (markdown).")):
    """Print the seed's results table for the runs under RUNS_DIR (e.g. `lrx table runs/ > RESULTS.md`)."""
    from lrx.output.table import collect_rows, render  # local: start-up
    if format not in ("markdown", "csv", "json"):
        raise UserError(f"--format {format!r}; allowed: markdown, csv, json")
    if not Path(runs_dir).is_dir():
        raise UserError(f"{runs_dir} is not a folder")
    rows = collect_rows(runs_dir)
    if not rows:
        typer.echo(f"lrx: note: no runs under {runs_dir}", err=True)
    typer.echo(render(rows, format, versus), nl=False)


@app.command()
@user_errors
def plot(runs_dir: Path = typer.Argument(..., help="Folder of run directories."),
         output: Path = typer.Option(Path("pareto.png"), "-o", "--output", help="PNG to write.")):
    """Plot acc@1 against MACs and against measured CPU time, one point per run, with the Pareto front."""
    from lrx.output.plot import plot_pareto, skipped  # local: start-up
    from lrx.output.table import collect_rows  # local: start-up
    rows = collect_rows(runs_dir)
    plot_pareto(rows, output)
    for line in skipped(rows):
        typer.echo(f"not drawn: {line}", err=True)
    typer.echo(f"wrote {output}")


@app.command()
@user_errors
def clean(runs_dir: Path = typer.Argument(..., help="Folder of run directories (or one run directory).",
                                          metavar="RUNS_DIR", show_default=False),
          dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
          keep_final: bool = typer.Option(False, "--keep-final", help="In finished runs, also remove the model files "
                                          "of stages before the final model (a rerun that needs one makes it again).")):
    """Remove what neither resuming, a rerun's skipping nor the table needs: checkpoints of finished stages,
    model files of stages redone anyway, temporary files of killed writes. Runs in use are not touched."""
    from lrx.pipeline.rundir import clean_runs, finished_needs, format_size  # local: start-up
    removed, not_touched = clean_runs(runs_dir, dry_run, keep_final)
    verb = "would remove" if dry_run else "removed"
    for path, size, why in removed:
        typer.echo(f"{verb} {path} ({format_size(size)}): {why}")
    for line in not_touched:
        typer.echo(f"lrx: note: {line}", err=True)
    typer.echo(f"{'would free' if dry_run else 'freed'} {format_size(sum(s for _, s, _ in removed))} "
               f"in {len(removed)} file(s)")
    if keep_final and not dry_run:
        count, size = finished_needs(runs_dir)
        typer.echo(f"{count} finished run(s) keep {format_size(size)}: each one's final model, metrics.json, "
                   f"config.yaml and log.txt, what the table, lrx export, the runs built on it and a rerun's skip need")


@app.command()
@user_errors
def export(run: Path = typer.Argument(..., help="A run folder (runs/exp11) or the config YAML of a run in --runs-dir.",
                                      metavar="RUN_OR_CONFIG", show_default=False),
           format: str = typer.Option(..., "--format", help="onnx, pt2, torchscript or state-dict.", show_default=False),
           output: Path = typer.Option(..., "-o", "--output", help="File to write.", show_default=False),
           runs_dir: Path = RunsDir,
           input_size: Optional[str] = typer.Option(None, "--input-size", metavar="C,H,W",
                                                    help="One image's size (default: the run's data.image_size)."),
           check: bool = typer.Option(True, "--check/--no-check", help="Load the file back and compare with PyTorch.")):
    """Write a run's final model in a form that loads without lrx: ONNX, torch.export (.pt2), TorchScript, or a
    state dict of plain nn.Conv2d/nn.Sequential modules with the recipe that builds them."""
    from lrx.output.export import export_run  # local: start-up
    size = parse_input_size(input_size) if input_size is not None else None
    typer.echo(export_run(run, output, format, runs_dir, size, check))


def _summary(metrics: dict, quiet: bool) -> None:
    if quiet or not metrics:
        return
    parts = [f"run {metrics.get('name')}: {metrics.get('status')}"]
    for key, fmt in (("acc1", "acc@1 {:.2f}%"), ("macs", "MACs {:.2f}M"), ("params", "params {:.2f}M")):
        value = metrics.get(key)
        if value is not None:
            parts.append(fmt.format(value / 1e6 if key != "acc1" else value))
    latency = metrics.get("latency") or {}
    speed = latency.get("speedup")
    if speed:
        missed = f" (latency target {latency['target']:g}x missed)" if latency.get("target_missed") is True else ""
        parts.append(f"measured speedup {speed:.2f}x{missed}")
    else:
        plan = (metrics.get("decompose") or {}).get("plan") or {}
        if plan.get("target_met") is False:
            parts.append(f"latency target {plan['target']['latency']:g}x out of reach: planned "
                         f"{plan['measured_speedup']:.2f}x")
    _echo(", ".join(parts))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
