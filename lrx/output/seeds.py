"""Rows run with several seeds: the table's mean and spread of acc@1 over a row's seeds.

A config with ``seed: [0, 1, 2]`` (or ``lrx run --seeds 0,1,2``) runs once per seed into ``<name>-s<seed>``
(:func:`lrx.config.settings.seed_runs`), each run's metrics.json naming its row (``seed_of``) and its ``seed``.
The markdown table shows such a row once (:func:`merge_seeds`): acc@1 is the mean over its seeds with their
min-max beside it, the remark's before/after accuracies and L2 norms are means too, and every other column
is the lowest seed's run; a footnote (:func:`seed_notes`) gives each seed's acc@1 and difference from its
original. csv and json keep one record per seed's run, with the row's mean, min, max and standard deviation
beside each (:func:`seed_fields`).
"""
from __future__ import annotations

import math
from typing import Any

from lrx.base.yamlread import finite_float

__all__ = ["AVERAGED", "seed_sets", "spread", "merge_seeds", "seed_fields", "SEED_FIELDS", "acc1_text", "seed_notes"]

# Figures of a merged row that are the mean over its seeds (the rest are the lowest seed's run's).
AVERAGED = ("acc1", "acc1_before", "l2_before", "l2_after")


def _seed(row: dict) -> int | None:
    seed = row.get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def seed_sets(rows: list[dict]) -> dict[str, list[dict]]:
    """The runs of each row run with several seeds, by the row's name (metrics.json's ``seed_of``), each
    list ordered by seed; runs of one seed are not in it."""
    sets: dict[str, list[dict]] = {}
    for row in rows:
        of = row.get("seed_of")
        if isinstance(of, str) and of and _seed(row) is not None:
            sets.setdefault(of, []).append(row)
    return {name: sorted(runs, key=_seed) for name, runs in sets.items()}


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min, max and sample standard deviation (0 for one value) of ``values`` (at least one)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "min": min(values), "max": max(values), "std": std}


def _finished_acc(runs: list[dict]) -> list[float]:
    return [v for row in runs if row.get("status") == "done" and (v := finite_float(row.get("acc1"))) is not None]


def merge_seeds(rows: list[dict]) -> list[dict]:
    """``rows`` with each row run with several seeds shown once, where its lowest seed's run was: that run's
    row with :data:`AVERAGED` figures averaged over the finished seeds, ``seeds`` (each seed's ``seed``,
    ``acc1``, ``vs_original``) and ``acc1_spread`` (:func:`spread` of acc@1); no single-run interval
    (``acc1_ci``, ``vs_original``). A row none of whose seeds finished keeps its lowest seed's run as it is."""
    sets = seed_sets(rows)
    out = []
    for row in rows:
        runs = sets.get(row.get("seed_of")) if isinstance(row.get("seed_of"), str) else None
        if runs is None:
            out.append(row)
            continue
        if row is not runs[0]:
            continue
        done = [run for run in runs if run.get("status") == "done"]
        merged = dict(row)
        merged["seeds"] = [{"seed": _seed(run), "acc1": finite_float(run.get("acc1")), "status": run.get("status"),
                            "vs_original": finite_float((run.get("vs_original") or {}).get("diff"))
                            if isinstance(run.get("vs_original"), dict) else None} for run in runs]
        if done:
            for key in AVERAGED:
                values = [finite_float(run.get(key)) for run in done]
                merged[key] = None if None in values else sum(values) / len(values)
            merged["acc1_spread"] = spread(_finished_acc(done)) if merged["acc1"] is not None else None
            merged["status"] = next((run.get("status") for run in runs if run.get("status") != "done"), "done")
            merged["selected_on"] = "test" if any(run.get("selected_on") == "test" for run in done) else row.get("selected_on")
            merged["acc1_ci"] = merged["vs_original"] = None
        out.append(merged)
    return out


def acc1_text(row: dict) -> str:
    """What follows a merged row's mean acc@1 in its cell: `` (min-max)``; empty for a run of one seed."""
    s = row.get("acc1_spread")
    if not isinstance(s, dict):
        return ""
    return f" ({s['min']:.2f}-{s['max']:.2f})"


SEED_FIELDS = ["seed", "seed_of", "seeds", "acc1_mean", "acc1_min", "acc1_max", "acc1_std"]


def seed_fields(row: dict, sets: dict[str, list[dict]]) -> dict[str, Any]:
    """csv / json fields of one run: its ``seed``, its row (``seed_of``) and, for a run of a row with several
    seeds, the row's number of seeds and the mean, min, max and standard deviation of its finished seeds' acc@1."""
    runs = sets.get(row.get("seed_of")) if isinstance(row.get("seed_of"), str) else None
    values = _finished_acc(runs) if runs else []
    s = spread(values) if values else {}
    return {"seed": _seed(row), "seed_of": row.get("seed_of") if runs else None, "seeds": len(runs) if runs else None,
            "acc1_mean": s.get("mean"), "acc1_min": s.get("min"), "acc1_max": s.get("max"), "acc1_std": s.get("std")}


def seed_notes(rows: list[dict], ids: dict[int, str]) -> list[str]:
    """The footnote of merged rows (:func:`merge_seeds`): what their cells are, and each seed's acc@1 (and its
    difference from its own original where measured)."""
    merged = [row for row in rows if isinstance(row.get("seeds"), list)]
    if not merged:
        return []
    parts = []
    for row in merged:
        each = []
        for seed in row["seeds"]:
            acc = "-" if seed["acc1"] is None or seed["status"] != "done" else f"{seed['acc1']:.2f}"
            diff = f" ({seed['vs_original']:+.2f})" if seed["vs_original"] is not None and acc != "-" else ""
            each.append(f"s{seed['seed']} {acc}{diff}")
        s = row.get("acc1_spread")
        std = f", std {s['std']:.2f}" if isinstance(s, dict) else ""
        parts.append(f"row {ids[id(row)]}: {', '.join(each)}{std}")
    return ["Rows run with several seeds show acc@1 as the mean over their finished seeds with the min-max in "
            "brackets, and the means of the remark's accuracies and L2 norms; their other columns are the lowest "
            "seed's run (--format csv has one record per seed). Each seed's acc@1 (minus its original's, points): "
            + "; ".join(parts) + "."]
