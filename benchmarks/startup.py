"""How long `lrx run` takes to report a mistake in a config: a misspelt key, reported on one line with exit
code 2 before torch is imported. Runs the installed `lrx` in fresh processes and prints each wall time and the
median; exits 1 if the median is 2 s or more.

    python benchmarks/startup.py [--repeats 5] [--out results/cpu/startup.txt]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lrx = shutil.which("lrx") or str(Path(sys.executable).parent / "lrx")
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "typo.yaml"
        config.write_text(f"extends: {ROOT / 'configs' / 'quick' / 'base.yaml'}\nno: 99\n"
                          "decompose: {layers: [2], scheme: v2, bases: [8], fitt: data}\n")
        times, lines = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            done = subprocess.run([lrx, "run", str(config), "--runs-dir", str(Path(folder) / "runs")],
                                  capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1 and "decompose.fitt" in lines[0], (done.returncode, done.stderr)
    median = statistics.median(times)
    report = [f"lrx run <config with a misspelt key>: {args.repeats} fresh processes on {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
              f"message: {lines[0]}",
              "wall times (s): " + ", ".join(f"{t:.2f}" for t in times),
              f"median {median:.2f} s ({'under' if median < LIMIT_S else 'NOT under'} {LIMIT_S:g} s)"]
    print("\n".join(report))
    if args.out is not None:
        args.out.write_text("\n".join(report) + "\n")
    return 0 if median < LIMIT_S else 1


if __name__ == "__main__":
    sys.exit(main())
