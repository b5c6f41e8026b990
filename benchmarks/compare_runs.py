"""Whether two runs of the same rows agree: acc@1, the per-image correctness on the test images, ranks, MACs
and params, row by row.

    .venv/bin/python benchmarks/compare_runs.py runs/quick /tmp/study-runs --suffix=-s0 \
        --rows exp01 exp02 exp06 exp11 exp17 exp20 [--out results/cpu/demo-reproduction.md]

    .venv/bin/python benchmarks/compare_runs.py OLD_TABLE.md NEW_TABLE.md   # two `lrx table` outputs

Each row ``NAME`` is read from ``FIRST/NAME/metrics.json`` and ``SECOND/NAME<suffix>/metrics.json`` (a seed
study names its runs ``<name>-s<seed>``). "identical" means every test image is classified alike (the kept
models agree image by image), not only the acc@1. Times are not compared: they are the machine's load.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lrx.measure.accuracy import unpack
from seed_spread import commit, cpu_model


def read(path: Path) -> dict | None:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("status") == "done" else None


def _bases(m: dict) -> str:
    bases = (m.get("decompose") or {}).get("bases")
    return ",".join(map(str, bases)) if bases else "-"


def compare(first: dict, second: dict) -> list[str]:
    """The cells of one row: acc@1 (both), per-image agreement, ranks, MACs and params."""
    a, b = first.get("test_correct"), second.get("test_correct")
    if a and b:
        bits_a, bits_b = unpack(a), unpack(b)
        differ = sum(x != y for x, y in zip(bits_a, bits_b)) + abs(len(bits_a) - len(bits_b))
        images = "identical" if differ == 0 else f"{differ} of {len(bits_a)} images differ"
    else:
        images = "not recorded"
    acc = (f"{first['acc1']:.2f}" if first.get("acc1") == second.get("acc1")
           else f"{first.get('acc1')} / {second.get('acc1')}")
    ranks = _bases(first) if _bases(first) == _bases(second) else f"{_bases(first)} / {_bases(second)}"
    same = ["same" if first.get(k) == second.get(k) else "not counted in one" if None in (first.get(k), second.get(k))
            else f"{first.get(k)} / {second.get(k)}" for k in ("macs", "params")]
    return [acc, images, ranks, *same]


TABLE_COLUMNS = ("#bases", "acc@1(%)", "macs(M)", "params(M)")


def table_rows(path: Path) -> dict[str, dict[str, str]]:
    """The rows of an ``lrx table`` markdown file: No. -> {column: cell}."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.startswith("|")]
    header = lines[0].strip("|").split("|")
    rows = {}
    for line in lines[2:]:
        cells = line.strip("|").split("|")
        if len(cells) == len(header):
            rows[cells[0]] = dict(zip(header, cells))
    return rows


def compare_tables(old: Path, new: Path) -> str:
    """Per row of two tables: "same" where ranks, acc@1, MACs and params all agree, else what changed."""
    a, b = table_rows(old), table_rows(new)
    lines = [f"Command: `python benchmarks/compare_runs.py {old} {new}`.", "",
             f"| row | {' / '.join(TABLE_COLUMNS)} |", "|---|---|"]
    for no in a:
        if no not in b:
            lines.append(f"| {no} | not in {new} |")
            continue
        changed = [f"{c} {a[no][c]} -> {b[no][c]}" for c in TABLE_COLUMNS if a[no][c] != b[no][c]]
        lines.append(f"| {no} | {'; '.join(changed) or 'same'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--rows", nargs="+", help="the runs to compare (two runs folders)")
    parser.add_argument("--suffix", default="", help="appended to each row's name in SECOND (e.g. -s0)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.first.is_file() and args.second.is_file():
        text = compare_tables(args.first, args.second)
        if args.out:
            args.out.write_text(text)
        print(text, end="")
        return
    if not args.rows:
        parser.error("--rows is needed to compare two runs folders")
    suffix = f" --suffix={args.suffix}" if args.suffix else ""
    lines = [f"Machine: {cpu_model()}; commit {commit()}.",
             f"Command: `python benchmarks/compare_runs.py {args.first} {args.second}{suffix} --rows {' '.join(args.rows)}`.",
             "",
             f"| row | acc@1 ({args.first} / {args.second}) | test images | ranks | MACs | params |",
             "|---|---|---|---|---|---|"]
    for row in args.rows:
        first, second = read(args.first / row / "metrics.json"), read(args.second / f"{row}{args.suffix}" / "metrics.json")
        if first is None or second is None:
            lines.append(f"| {row} | not finished in {'both' if first is second else 'one'} | | | | |")
            continue
        lines.append("| " + " | ".join([row, *compare(first, second)]) + " |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
