"""How far a quick row's acc@1 moves with the seed, on the whole Fashion-MNIST test set.

    .venv/bin/python benchmarks/seed_spread.py [--runs-dir /tmp/study-runs] [--seeds 0,1,2]
        [--rows exp01 exp02 exp06 exp11 exp17 exp20] [--out results/cpu/seed-spread.md]

Runs each row of ``configs/quick/`` once per seed (``lrx run CONFIG --seeds ...``, the profile stage off:
accuracy only), the baseline (exp01) first, so that every expansion row's seed ``s`` builds on the baseline
trained with seed ``s`` (its own training order, subsets and validation images). Already finished runs are
skipped, so a stopped study continues where it was. Then writes a markdown report: per row and seed, acc@1
with its 95% Wilson interval and, for expansions, the paired difference from that seed's baseline on the
same 10,000 test images (exact interval, McNemar's p); per row the mean, min-max and standard deviation over
the seeds; and how far a row moves with its baseline's seed: the spread of the row's acc@1 against the
spread of its difference from its own baseline (a row that only follows its baseline moves in acc@1 but not
in the difference). The report names the machine, the command and the commit.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LRX = [sys.executable, "-m", "lrx"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere) and core count."""
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def commit() -> str:
    """The checked-out commit, with "+ uncommitted changes" when the tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return f"{head or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def run_rows(rows: list[str], seeds: str, runs_dir: Path) -> None:
    for row in rows:
        command = LRX + ["run", str(ROOT / "configs" / "quick" / f"{row}.yaml"), "--runs-dir", str(runs_dir),
                         "--seeds", seeds, "--set", "profile.enabled=false", "--quiet"]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True)
        print(f"{row}: {time.perf_counter() - start:.0f} s", flush=True)


def read(runs_dir: Path, name: str) -> dict | None:
    path = runs_dir / name / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics.get("status") == "done" else None


def _spread(values: list[float], sign: str = "") -> str:
    """Mean (min to max, sample std) of ``values``; ``sign="+"`` for differences."""
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    mean, low, high = (format(v, f"{sign}.2f") for v in (statistics.mean(values), min(values), max(values)))
    return f"{mean} ({low} to {high}, std {std:.2f})"


def report(rows: list[str], seeds: list[int], runs_dir: Path, command: str, wall: float | None) -> str:
    lines = ["# acc@1 across seeds: the quick baseline and expansion rows", "",
             f"Machine: {cpu_model()}, Python {platform.python_version()}, torch {torch.__version__}; commit {commit()}.",
             f"Command: `{command}`" + (f" ({wall / 60:.0f} min, with other jobs sharing the cores)" if wall else "")
             + ".", "",
             "Every row is run once per seed into `<name>-s<seed>`; an expansion row's seed s builds on the baseline "
             "trained with seed s (`lrx run CONFIG --seeds ...`), so its spread holds the baseline's. Each run "
             "chooses its kept epochs on its 2,000 validation images (the baseline's and rows 10+'s; rows 2-9 choose "
             "their fine-tuned epochs on the test images as the seed did) and is reported on all 10,000 test images. "
             "Profiles off: accuracy only.", "",
             "| row | seed | acc@1 (95% Wilson) | minus its baseline's, points (exact 95%, McNemar p) |",
             "|---|---|---|---|"]
    summary = []
    for row in rows:
        accs, diffs = [], []
        for seed in seeds:
            m = read(runs_dir, f"{row}-s{seed}")
            if m is None:
                lines.append(f"| {row} | {seed} | not finished | |")
                continue
            ci = m.get("acc1_ci") or [None, None]
            vs = m.get("vs_original")
            accs.append(m["acc1"])
            cell = f"{m['acc1']:.2f} ({ci[0]:.2f}-{ci[1]:.2f})" if ci[0] is not None else f"{m['acc1']:.2f}"
            diff = "-"
            if vs:
                diffs.append(vs["diff"])
                diff = f"{vs['diff']:+.2f} ({vs['low']:+.2f} to {vs['high']:+.2f}, p {vs['p']:.2g})"
            lines.append(f"| {row} | {seed} | {cell}{' †' if m.get('selected_on') == 'test' else ''} | {diff} |")
        summary.append((row, accs, diffs))
    lines += ["", "† a kept epoch behind the figure was chosen on the test images (the seed's rule, rows 2-9).", "",
              "| row | seeds | acc@1: mean (min to max, std) | minus its baseline's: mean (min to max, std) |", "|---|---|---|---|"]
    for row, accs, diffs in summary:
        lines.append(f"| {row} | {len(accs)} | {_spread(accs)} | {_spread(diffs, '+')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/study-runs"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", nargs="+", default=["exp01", "exp02", "exp06", "exp11", "exp17", "exp20"])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "cpu" / "seed-spread.md")
    parser.add_argument("--report-only", action="store_true", help="Write the report from the runs there are.")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    wall = None
    if not args.report_only:
        start = time.perf_counter()
        run_rows(args.rows, args.seeds, args.runs_dir)
        wall = time.perf_counter() - start
    command = "python benchmarks/seed_spread.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    args.out.write_text(report(args.rows, seeds, args.runs_dir, command, wall))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
