"""Fine-tuning recipes for the quick rows beyond the seed's nine, compared on the same expansions.

    .venv/bin/python benchmarks/kd_recipes.py [--runs-dir /tmp/study-runs] [--rows exp17 exp11]
        [--recipes l2-ce kd-ce ce l2-kd kd-ce-lr3e-4 kd-ce-2ep] [--out results/cpu/kd-recipes.md]

For each row, the expansion is made once (the row's own decompose settings, no fine-tuning: run
``<row>-expanded``) on the quick baseline trained with seed 0 (``exp01-s0``, as ``benchmarks/seed_spread.py``
makes it; shared when both use one runs folder), then fine-tuned by each recipe from that same expansion
(``<row>-<recipe>``, built on it with ``parent:``). Every kept epoch is chosen on the 2,000 validation images;
acc@1 is measured on all 10,000 test images. The report gives per recipe acc@1 (95% Wilson), its paired
difference from the baseline and from the row's recipe of today (``l2-ce``) on the same test images (exact 95%
interval, McNemar's p), and the fine-tuning's wall time on this machine. Profiles are off (accuracy only).
Finished runs are skipped, so a stopped study continues where it was. The configs it runs are written into
``<runs dir>/kd-configs/``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lrx.config.settings import load_config
from lrx.measure.accuracy import paired_difference, unpack
from seed_spread import commit, cpu_model

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "configs" / "quick"
LRX = [sys.executable, "-m", "lrx"]

# name -> (what it is, its fine-tune stages)
RECIPES = {
    "l2-ce": ("L2 1 epoch, then CE 1 epoch (rows 10-22 before this study)",
              [{"l2": 1.0, "epochs": 1}, {"ce": 1.0, "epochs": 1}]),
    "ce": ("CE 1 epoch", [{"ce": 1.0, "epochs": 1}]),
    "l2-kd": ("L2 1 epoch, then KD 1 epoch", [{"l2": 1.0, "epochs": 1}, {"kd": 1.0, "epochs": 1}]),
    "kd-ce": ("KD + CE 1 epoch", [{"kd": 1.0, "ce": 1.0, "epochs": 1}]),
    "kd-ce-lr3e-4": ("KD + CE 1 epoch, lr 3e-4", [{"kd": 1.0, "ce": 1.0, "epochs": 1, "lr": 3.0e-4}]),
    "kd-ce-lr3e-5": ("KD + CE 1 epoch, lr 3e-5", [{"kd": 1.0, "ce": 1.0, "epochs": 1, "lr": 3.0e-5}]),
    "kd-ce-2ep": ("KD + CE 2 epochs", [{"kd": 1.0, "ce": 1.0, "epochs": 2}]),
    "kd": ("KD 1 epoch", [{"kd": 1.0, "epochs": 1}]),
}
OFF = {"profile": {"enabled": False}}


def write_configs(folder: Path, rows: list[str], recipes: list[str]) -> list[Path]:
    """The study's configs: the baseline, each row's expansion without fine-tuning, each recipe on it."""
    folder.mkdir(parents=True, exist_ok=True)

    def put(name: str, data: dict) -> Path:
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    put("exp01", {"extends": str(QUICK / "exp01.yaml"), **OFF})
    paths = {}
    for row in rows:
        no = load_config(QUICK / f"{row}.yaml").no
        put(f"{row}-expanded", {"extends": str(QUICK / f"{row}.yaml"), "remark": f"row {no}'s expansion",
                                "finetune": [], **OFF})
        for recipe in recipes:
            paths[row, recipe] = put(f"{row}-{recipe}", {
                "extends": str(QUICK / "beyond.yaml"), "no": no, "remark": f"row {no}: {RECIPES[recipe][0]}",
                "parent": f"{row}-expanded", "decompose": None, "finetune": RECIPES[recipe][1], **OFF})
    # the first two recipes on every row first (today's and the first new one), then the rest row by row
    first = [paths[row, recipe] for recipe in recipes[:2] for row in rows]
    return first + [paths[row, recipe] for row in rows for recipe in recipes[2:]]


def read(runs_dir: Path, name: str) -> dict | None:
    """The finished run of config ``name`` (run with seed 0: folder ``<name>-s0``), else None."""
    path = runs_dir / f"{name}-s0" / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics.get("status") == "done" else None


def _diff(a, b) -> str:
    d = paired_difference(a, b)
    return f"{100 * d.diff:+.2f} ({100 * d.low:+.2f} to {100 * d.high:+.2f}, p {d.p:.2g})"


def report(rows: list[str], recipes: list[str], runs_dir: Path, command: str) -> str:
    lines = ["# Fine-tuning recipes for the quick rows beyond the seed's nine", "",
             f"Machine: {cpu_model()}; commit {commit()}.", f"Command: `{command}`.", "",
             "Each row's expansion is made once on the quick baseline (seed 0, its epoch chosen on 2,000 validation "
             "images) and fine-tuned from it by each recipe on the row's 2,000 training images (AdamW, lr 1e-4 unless "
             "said, KD at temperature 4); every kept epoch is chosen on the 2,000 validation images, and a stage keeps "
             "its input when no epoch beats it there. Validation acc@1: the last stage's kept model on those 2,000 "
             "images, the figure to choose a recipe by. acc@1 on all 10,000 test images. Differences are in points on "
             "the same test images: exact 95% interval of the paired difference and McNemar's exact p. Fine-tune time: "
             "wall seconds of the fine-tune stages on this machine while other jobs shared its 2 cores (a rough guide).",
             ""]
    for row in rows:
        expanded = read(runs_dir, f"{row}-expanded")
        lines += [f"## {row}", ""]
        if expanded is None:
            lines += ["not finished", ""]
            continue
        decompose = expanded["stages"]["decompose"]
        base_bits = unpack(decompose["original_test_correct"])
        lines += [f"Baseline {decompose['acc1_original']:.2f}%; the expansion before fine-tuning "
                  f"{decompose['acc1']:.2f}% (ranks {', '.join(map(str, decompose['bases']))}).", "",
                  "| recipe | stages | validation acc@1 | acc@1 (95% Wilson) | minus the baseline's | minus l2-ce's | kept input "
                  "| fine-tune s |",
                  "|---|---|---|---|---|---|---|---|"]
        today = read(runs_dir, f"{row}-l2-ce")
        today_bits = unpack(today["test_correct"]) if today else None
        for recipe in recipes:
            m = read(runs_dir, f"{row}-{recipe}")
            if m is None:
                lines.append(f"| {recipe} | {RECIPES[recipe][0]} | not finished | | | | | |")
                continue
            bits = unpack(m["test_correct"])
            ci = m["acc1_ci"]
            own = [s for name, s in m["stages"].items() if name.startswith("finetune.")]
            kept = ", ".join(str(i + 1) for i, s in enumerate(own) if s.get("kept_input")) or "-"
            seconds = sum(s["wall_s"] for s in own)
            vs_today = _diff(today_bits, bits) if today_bits is not None and recipe != "l2-ce" else "-"
            validation = own[-1].get("validation", {}).get("acc1_after")  # what the recipe is chosen on
            lines.append(f"| {recipe} | {RECIPES[recipe][0]} | "
                         f"{'-' if validation is None else format(validation, '.2f')} | {m['acc1']:.2f} ({ci[0]:.2f}-{ci[1]:.2f}) | "
                         f"{_diff(base_bits, bits)} | {vs_today} | {kept} | {seconds:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/study-runs"))
    parser.add_argument("--rows", nargs="+", default=["exp17", "exp11"])
    parser.add_argument("--recipes", nargs="+", default=["l2-ce", "kd-ce", "ce", "l2-kd", "kd-ce-lr3e-4", "kd-ce-2ep"],
                        choices=sorted(RECIPES))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "cpu" / "kd-recipes.md")
    parser.add_argument("--report-only", action="store_true", help="Write the report from the runs there are.")
    args = parser.parse_args()
    paths = write_configs(args.runs_dir / "kd-configs", args.rows, args.recipes)
    if not args.report_only:
        for path in paths:  # one process per run: a failed recipe does not stop the others
            start = time.perf_counter()
            done = subprocess.run(LRX + ["run", str(path), "--runs-dir", str(args.runs_dir), "--seeds", "0", "--quiet"],
                                  cwd=ROOT)
            print(f"{path.stem}: {'done' if done.returncode == 0 else 'FAILED'} in {time.perf_counter() - start:.0f} s",
                  flush=True)
    command = "python benchmarks/kd_recipes.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    args.out.write_text(report(args.rows, args.recipes, args.runs_dir, command))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
