"""Does every finished run's final model export to all four formats and run the same without lrx?

    .venv/bin/python benchmarks/export_check.py [--runs-dir runs/quick] [--runs exp02 ...] [--tol 1e-4] [--out FILE.md]
    make export-check                           # the same on runs/quick, table in results/export-check.md

For each run folder under --runs-dir whose metrics.json says ``done`` (in name order): its final model
(:func:`lrx.load_run`'s) is written with ``lrx export``'s code as ONNX, torch.export .pt2, TorchScript and a
plain state dict into a temporary folder, with a random batch of 5 at the run's input size
(:func:`lrx.output.export.run_input_size`) and the model's PyTorch outputs on it (:func:`lrx.output.export.export_all`).
Then ONE ``python -I`` subprocess per run, in which ``import lrx`` fails and the repository is not on
sys.path, loads every file (ONNX Runtime's CPU provider, ``torch.export.load``, ``torch.jit.load``, and the
state dict loaded strictly into recipe.py's plain modules for torchvision: models, else into the .pt2 file's
architecture with its weights zeroed first) and compares with those outputs (:func:`lrx.output.export.check_without_lrx`,
the same check tests/test_export.py runs on a tiny model with every kind of expansion).

Prints per run and format the largest absolute difference from PyTorch and PASS (<= --tol, float32) or FAIL;
exit code 1 on any failure, a run that does not export or load included. The seconds per run (export,
check) are reported too; they are not benchmarks of anything but this script's cost.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lrx.output.export import FORMATS, final_model, check_without_lrx, export_all, original_code, run_input_size  # noqa: E402
from lrx.base.errors import UserError  # noqa: E402
from lrx.pipeline.rundir import RunDir  # noqa: E402


def finished_runs(runs_dir: Path) -> tuple[list[RunDir], list[str]]:
    """(the runs whose metrics.json says done, one note per other folder)."""
    runs, notes = [], []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        run = RunDir(runs_dir, folder.name)
        try:
            status = run.read_metrics().get("status") if run.metrics_path.exists() else None
        except UserError as err:
            notes.append(f"{folder.name}: skipped, {err.message}")
            continue
        if status == "done":
            runs.append(run)
        else:
            notes.append(f"{folder.name}: skipped, {'no metrics.json' if status is None else f'status {status!r}'}")
    return runs, notes


def check_run(run: RunDir) -> dict:
    """One run: export, check without lrx. Returns {diff: {fmt: float}, scale, into, export_s, check_s, file}."""
    model, path, arch = final_model(run)
    size = run_input_size(run)
    # Only torchvision: architectures have an lrx-free expression (a registry name is built by lrx).
    original = original_code(arch["arch"], arch["num_classes"]) if (arch["arch"] or "").startswith("torchvision:") else None
    with tempfile.TemporaryDirectory(prefix=f"export-check-{run.name}-") as folder:
        start = time.perf_counter()
        export_all(model, folder, size, original)
        exported = time.perf_counter()
        out = check_without_lrx(folder)
        checked = time.perf_counter()
    if out["lrx_loaded"]:
        raise RuntimeError(f"lrx was loaded in the subprocess: {out['lrx_loaded']}")
    return {"diff": out["diff"], "scale": out["scale"], "into": out["state_dict_into"], "size": size,
            "export_s": exported - start, "check_s": checked - exported, "file": path.name}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs/quick")
    parser.add_argument("--runs", nargs="+", help="only these run names (default: every finished run)")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest absolute difference that passes (float32)")
    parser.add_argument("--out", help="write the markdown table here too")
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        print(f"{runs_dir} is not a folder", file=sys.stderr)
        return 2
    runs, notes = finished_runs(runs_dir)
    if args.runs:
        missing = sorted(set(args.runs) - {run.name for run in runs})
        if missing:
            print(f"not finished runs in {runs_dir}: {', '.join(missing)}", file=sys.stderr)
            return 2
        runs, notes = [run for run in runs if run.name in args.runs], []
    for note in notes:
        print(note)
    if not runs:
        print(f"no finished runs in {runs_dir}", file=sys.stderr)
        return 1
    rows, failures = [], []
    for run in runs:
        try:
            result = check_run(run)
        except Exception as err:  # a run that does not export or load is a failure to report, not a crash
            failures.append(f"{run.name}: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}")
            print(failures[-1])
            rows.append(f"| {run.name} | | {' | '.join('FAIL' for _ in FORMATS)} | | | | {type(err).__name__} |")
            continue
        cells = []
        for fmt in FORMATS:
            diff = result["diff"][fmt]
            verdict = "PASS" if diff <= args.tol else "FAIL"
            if verdict == "FAIL":
                failures.append(f"{run.name} {fmt}: {diff:.2e} > {args.tol:g}")
            print(f"{run.name:8} {fmt:12} max |diff| {diff:.2e}  {verdict}")
            cells.append(f"{diff:.1e} {verdict}")
        print(f"{run.name:8} {result['file']}, outputs up to {result['scale']:.3g}, state dict into "
              f"{result['into']}; export {result['export_s']:.1f} s, check {result['check_s']:.1f} s")
        rows.append(f"| {run.name} | {result['file']} | {' | '.join(cells)} | {result['scale']:.3g} | "
                    f"{result['export_s']:.1f} | {result['check_s']:.1f} | {result['into']} |")
    table = [
        f"Exports of the final models in {runs_dir} loaded without lrx (benchmarks/export_check.py): largest "
        f"|difference| from PyTorch on a random batch of 5, float32, PASS at <= {args.tol:g}. torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, {platform.machine()}, {time.strftime('%Y-%m-%d')}.",
        "",
        f"| run | final model | {' | '.join(FORMATS)} | max \\|output\\| | export s | check s | state dict loaded into |",
        "|---|---|" + "---|" * len(FORMATS) + "---|---|---|---|",
        *rows,
    ]
    if notes:
        table += ["", *(f"- {note}" for note in notes)]
    table += ["", f"{len(runs) - len({f.split()[0].rstrip(':') for f in failures})} of {len(runs)} runs pass every format."]
    print("\n".join(table))
    if args.out:
        Path(args.out).write_text("\n".join(table) + "\n")
    if failures:
        print(f"FAILED ({len(failures)}):\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
