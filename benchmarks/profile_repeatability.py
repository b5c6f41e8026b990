"""How far apart profiles of the same model pair land, each as ``lrx profile`` takes it.

    .venv/bin/python benchmarks/profile_repeatability.py [--trials 10] [--batch 16] [--size 224] [--threads 2]
        [--rounds 3] [--busy-trials 4,8] [--model resnet18] [--glibc-defaults-trials 2,4,6]

alexnet_cifar10 (random weights, seed 0) and scheme 2 on conv2-5 at row 11's ranks (23, 213, 160, 228), or with
``--model resnet18`` torchvision's resnet18 (random weights, seed 0) and scheme 2 on every 3x3 conv and conv1 at
the ranks of a 2x MAC target, profiled ``--trials`` times in this one process with :func:`lrx.measure.profiling.profile_pair` (whole model
only): each profile is ``--rounds`` rounds on fresh copies of both models, each model in its fastest layout,
the speedup the median of the rounds'. Per trial: the speedup, each round's, both layouts, whether the profile
is flagged (noisy: its rounds disagree by more than 10% or its repeats spread; busy: other processes used the
cores), and the machine's readings.

``--glibc-defaults-trials`` times those trials with glibc's malloc as it is by default, not as lrx times
(:func:`lrx.measure.timing.steady_memory`: freed memory kept in the process): the page faults each trial took
are printed, and the two kinds of trial are summarised apart.

``--busy-trials`` runs those trials beside a busy loop (one Python process spinning on one core), the state a
2-core machine is in when anything else runs: such a trial must be flagged, not reported as a figure.

The verdict: every unflagged trial's speedup within 10% of the median of the unflagged trials. Absolute times
only hold on the machine that made them.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.config.settings import ProfileConfig  # noqa: E402
from lrx.expansion.model import expand  # noqa: E402
from lrx.measure.profiling import profile_pair  # noqa: E402
from lrx.nn.models import build_model  # noqa: E402
from lrx.measure.machine import cpu_name  # noqa: E402
from lrx.measure import timing  # noqa: E402

RANKS = [23, 213, 160, 228]  # row 11: scheme 2, the 3x MAC plan
TOLERANCE = 0.10  # an unflagged trial's speedup must be within this share of the median


def busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy-trials", default="", help="comma-separated trial numbers run beside a busy loop")
    parser.add_argument("--glibc-defaults-trials", default="",
                        help="comma-separated trial numbers timed with glibc's malloc defaults")
    parser.add_argument("--model", choices=["alexnet_cifar10", "resnet18"], default="alexnet_cifar10")
    args = parser.parse_args()
    busy_trials = {int(t) for t in args.busy_trials.split(",") if t.strip()}
    glibc_trials = {int(t) for t in args.glibc_defaults_trials.split(",") if t.strip()}
    torch.manual_seed(0)
    if args.model == "resnet18":
        original = build_model("torchvision:resnet18", num_classes=1000).eval()
        expanded, report = expand(original, "auto", "v2", "auto", target={"speedup": 2.0},
                                  input_size=(3, args.size, args.size))
    else:
        original = build_model("alexnet_cifar10").eval()
        expanded, report = expand(original, [2, 3, 4, 5], "v2", RANKS)
    cfg = ProfileConfig(input_size=[3, args.size, args.size], batch=args.batch, threads=args.threads,
                        warmup=args.warmup, repeats=args.repeats, rounds=args.rounds, device="cpu")
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"3x{args.size}x{args.size}, {args.rounds} rounds of {args.repeats} repeats; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    kept, flagged, defaults = [], [], []
    for trial in range(1, args.trials + 1):
        hog = busy_loop() if trial in busy_trials else None
        timing.KEEP_MEMORY = trial not in glibc_trials  # glibc as it is, or as lrx times
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        try:
            out = profile_pair(original, expanded, [], cfg, "cpu", per_layer=False, breakdown=False)
        finally:
            timing.KEEP_MEMORY = True
            if hog is not None:
                hog.kill()
                hog.wait()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        lat = out["latency"]
        machine = lat["machine"]
        flags = [name for name, on in (("noisy", lat["noisy"]), ("busy", lat["busy"])) if on]
        (defaults if trial in glibc_trials else flagged if flags else kept).append(lat["speedup"])
        rounds = ", ".join(f"{s:.2f}" for s in lat["round_speedups"])
        glibc = " (glibc's malloc defaults)" if trial in glibc_trials else ""
        print(f"trial {trial:2d}{' (beside a busy loop)' if hog else ''}{glibc}: {faults} page faults; speedup {lat['speedup']:.2f}x "
              f"(rounds {rounds}); original {lat['original_ms']:.1f} ms in {lat['original_layout']}, expansion "
              f"{lat['expanded_ms']:.1f} ms in {lat['expanded_layout']}; {lat['speedup_default']:.2f}x against "
              f"default; other processes {machine['other_share'] or 0:.0%}, steal {machine['steal_share'] or 0:.0%}"
              f"{'; FLAGGED ' + ', '.join(flags) if flags else ''}", flush=True)
    if kept:
        median = statistics.median(kept)
        outside = [s for s in kept if abs(s / median - 1) > TOLERANCE]
        print(f"unflagged trials: {len(kept)} of {args.trials}, speedup min {min(kept):.2f} median {median:.2f} "
              f"max {max(kept):.2f} (max/min {max(kept) / min(kept):.2f})")
        print(f"unflagged trials outside +-{TOLERANCE:.0%} of their median: {len(outside)}"
              f"{' (' + ', '.join(f'{s:.2f}' for s in outside) + ')' if outside else ''}")
    print(f"flagged trials: {len(flagged)}{' (' + ', '.join(f'{s:.2f}' for s in flagged) + ')' if flagged else ''}")
    if defaults:
        print(f"trials with glibc's malloc defaults: {len(defaults)}, speedup min {min(defaults):.2f} median "
              f"{statistics.median(defaults):.2f} max {max(defaults):.2f} (max/min {max(defaults) / min(defaults):.2f})")


if __name__ == "__main__":
    main()
