"""The accuracy / cost picture of a runs folder: acc@1 against MACs and against measured CPU time.

Drawn with matplotlib's Agg canvas on a ``Figure`` of its own, so pyplot's global state (and a
notebook's backend) is never touched.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from .errors import UserError


def _number(value: Any) -> float | None:
    """A finite float, or None (an infinite or NaN value cannot be placed on an axis)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a float's range
        return None
    return number if math.isfinite(number) else None


def skipped(rows: list[dict]) -> list[str]:
    """One line per run :func:`plot_pareto` leaves out because it is not finished or not readable,
    e.g. "exp05: unreadable: metrics.json: not valid JSON (...)", for the caller to print on stderr."""
    out = []
    for row in rows:
        status = row.get("status", "done")
        if status != "done":
            error = row.get("error")
            out.append(f"{row.get('name')}: {status}" + (f": {error}" if error else ""))
    return out


def _macs_m(row: dict) -> float | None:
    macs = _number(row.get("macs"))
    return None if macs is None else macs / 1e6


def _time_ms(row: dict) -> float | None:
    """The run's CPU time relative to the original model's: 1 for the original, 1 / measured speedup else.

    Absolute times from different processes do not compare on a shared machine; each run's speedup was
    measured against the original in one process, interleaved, so the ratio is what is plotted.
    """
    latency = row.get("latency") if isinstance(row.get("latency"), dict) else {}
    if not row.get("decompose"):
        measured = _number(latency.get("original_ms")) is not None or _number(row.get("cpu_time_ms")) is not None
        return 1.0 if measured else None
    speedup = _number(latency.get("speedup"))
    return 1.0 / speedup if speedup else None


def _lookup(row: dict, get: Callable[[dict], float | None], by_name: dict[str, dict]) -> float | None:
    """``get(row)``, else from the nearest ``parent`` run that has it.

    Fine-tuning changes weights, not structure, so a fine-tuned run that was not profiled itself
    costs what the run it continues from costs (the seed's rows 3-5 and 7-9 show "-" there).
    """
    seen = set()
    while row is not None and row.get("name") not in seen:
        value = get(row)
        if value is not None:
            return value
        seen.add(row.get("name"))
        parent = row.get("parent")
        row = by_name.get(parent) if isinstance(parent, str) else None
    return None


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, acc) points that no other point beats (lower cost and higher acc), by cost."""
    front: list[tuple[float, float]] = []
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((cost, acc))
    return front


def plot_pareto(rows: list[dict], out_path: str | Path) -> Path:
    """Write a two-panel PNG (or any format matplotlib knows from the suffix) of ``rows``.

    Parameters
    ----------
    rows : rows from :func:`lrx.table.collect_rows` (finished runs are used, others skipped).
    out_path : the picture's path; missing parent folders are created.

    Left panel: acc@1 (%) against MACs (M); right: acc@1 against CPU time relative to the original
    model (1 / the speedup measured in the run's own profile, interleaved with the original). One point per run with both values
    (a run without its own cost takes its parent run's, see :func:`_lookup`), labelled with the run
    name; the Pareto front (higher accuracy, lower cost) as a dashed step line; the original model
    (a run without ``decompose``) as a red star.

    Raises :class:`UserError` naming the missing metrics when no run can be drawn on either panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # local: heavy to import, only the plot needs it
    from matplotlib.figure import Figure  # local: as above

    done = [r for r in rows if r.get("status", "done") == "done"]
    by_name = {r.get("name"): r for r in done}
    panels = [("MACs (M)", _macs_m), ("CPU time relative to the original (1 / measured speedup)", _time_ms)]
    data = []
    for _, get in panels:
        points = []
        for row in done:
            acc, cost = _number(row.get("acc1")), _lookup(row, get, by_name)
            if acc is not None and cost is not None:
                points.append((cost, acc, str(row.get("name")), not row.get("decompose")))
        data.append(points)
    if not any(data):
        raise UserError(_nothing_to_plot(rows, done, by_name))

    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (xlabel, _), points in zip(fig.subplots(1, 2), panels, data):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("acc@1 (%)")
        ax.grid(True, alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "no run has this cost measured", ha="center", va="center", transform=ax.transAxes)
            continue
        front = pareto_front([(c, a) for c, a, _, _ in points])
        ax.step([c for c, _ in front], [a for _, a in front], where="post", linestyle="--", color="tab:gray",
                marker="o", markersize=11, markerfacecolor="none", label="Pareto front")
        others = [p for p in points if not p[3]]
        originals = [p for p in points if p[3]]
        if others:
            ax.scatter([p[0] for p in others], [p[1] for p in others], color="tab:blue", label="expanded")
        if originals:
            ax.scatter([p[0] for p in originals], [p[1] for p in originals], marker="*", s=200, color="tab:red",
                       label="original", zorder=3)
        for cost, acc, name, _ in points:
            ax.annotate(name, (cost, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.legend(loc="lower right")
    fig.suptitle("accuracy against cost, one point per run")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def _nothing_to_plot(rows: list[dict], done: list[dict], by_name: dict) -> str:
    if not rows:
        return "nothing to plot: no runs found (run folders hold metrics.json)"
    if not done:
        return "nothing to plot: no finished run (status 'done'); states: " + ", ".join(
            f"{r.get('name')}: {r.get('status')}" for r in rows[:8])
    missing = []
    for row in done[:8]:
        lacks = [name for name, value in (
            ("acc1", _number(row.get("acc1"))),
            ("macs", _lookup(row, _macs_m, by_name)),
            ("latency or cpu_time_ms", _lookup(row, _time_ms, by_name)),
        ) if value is None]
        missing.append(f"{row.get('name')} lacks {', '.join(lacks)}")
    return "nothing to plot: no finished run has acc1 with macs or a CPU time; " + "; ".join(missing)
