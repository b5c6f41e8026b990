"""An attack on lrx's failure promises (docs/guarantees.md): every case runs the real `lrx` command in a
temp folder of its own and checks what the promise says.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attack/run_attack.py            # every case
    .venv/bin/python benchmarks/attack/run_attack.py --only config,export         # some categories
    .venv/bin/python benchmarks/attack/run_attack.py --keep --work /tmp/attack-x  # keep the folders

Categories: config (malformed configs, YAML oddities, extends loops), set (bad --set and option values),
files (damaged metrics.json, config.yaml, model files, locks, checkpoints), cache (hostile
latency-tables.json), export (bad outputs, atomicity, faults), data (image folders with symlink loops,
FIFOs), signals (kill -9 and SIGTERM during runs and exports, then a rerun), concurrency (two runs of one
config, a parent redone with --force while its child runs).

A refusal must be one line `lrx: error: ...` on stderr, exit code 2, no traceback, and leave the case's
files as they were. Runs use tiny configs on synthetic data (tests/conftest.py's TINY_BASE), one thread.
Prints a summary (cases, passed, each failure with its command and what went wrong); exits 1 on a failure.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Case, Workspace, build_fixture, run_case  # noqa: E402
import cases_config  # noqa: E402
import cases_files  # noqa: E402
import cases_runs  # noqa: E402

CATEGORIES = ("config", "set", "files", "cache", "export", "data", "signals", "concurrency")


def all_cases() -> list[Case]:
    return cases_config.cases() + cases_files.cases() + cases_runs.cases()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated categories (default: all)")
    parser.add_argument("--match", default="", help="only cases whose name contains this")
    parser.add_argument("--work", default=None, help="folder for the cases (default: a new /tmp/attack-*)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--list", action="store_true", help="list the cases and run none")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    chosen = set(filter(None, args.only.split(","))) or set(CATEGORIES)
    unknown = chosen - set(CATEGORIES)
    if unknown:
        parser.error(f"unknown categories {sorted(unknown)}; allowed: {', '.join(CATEGORIES)}")
    cases = [c for c in all_cases() if c.category in chosen and args.match in c.name]
    if args.list:
        for case in cases:
            print(f"{case.category:12s} {case.name}")
        print(f"{len(cases)} cases")
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="attack-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # the finished runs cases start from, and the uninterrupted runs that killed ones must equal
    fixture = build_fixture(work / "fixture") if any(c.needs_fixture or c.scenario for c in cases) else None
    failures, counts = [], {}
    for i, case in enumerate(cases):
        ws = Workspace(work / f"{i:03d}-{case.category}-{case.name}", fixture)
        problem, command = run_case(case, ws)
        total, passed = counts.get(case.category, (0, 0))
        counts[case.category] = (total + 1, passed + (problem is None))
        mark = "ok  " if problem is None else "FAIL"
        print(f"{mark} {case.category:12s} {case.name}", flush=True)
        if problem is not None:
            failures.append((case, command, problem))
        elif not args.keep:
            shutil.rmtree(ws.path, ignore_errors=True)
    print(f"\n{len(cases)} cases, {len(cases) - len(failures)} passed, {len(failures)} failed "
          f"({time.monotonic() - started:.0f} s; work folder {work})")
    for category, (total, passed) in sorted(counts.items()):
        print(f"  {category:12s} {passed}/{total}")
    for case, command, problem in failures:
        print(f"\nFAIL {case.category}/{case.name}\n  command: {command}\n  problem: {problem}")
    if not args.keep and not failures:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
