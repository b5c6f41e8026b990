"""The accuracy / cost picture of a runs folder: acc@1 against MACs and against measured CPU time.

Each point is labelled as the table numbers its row, with a short description ("4: s1 L2+CE": scheme 1,
then L2 and CE fine-tuning); labels are placed greedily where they overlap no other label and no point,
stay inside the axes and sit nearer their own point than any other (far ones get a leader line). Runs fitted
to data (``fit: data``) are diamonds, their labels say "data". The legend sits outside the axes. Every model
(and dataset, when the runs use several) has its own colour and its own Pareto front: accuracies of
different models are never compared on one front.

Drawn with matplotlib's Agg canvas on a ``Figure`` of its own, so pyplot's global state (and a
notebook's backend) is never touched. Every picture lrx writes (this one, ``--show-bases``) goes through
:func:`save_figure`: atomically, never into a run folder, a directory or a device.

It is long because placing labels where they overlap nothing takes most of it, beside the figure it places them in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lrx.base.errors import UserError
from lrx.base.files import os_reason, write_named_atomic
from lrx.base.yamlread import finite_float
from lrx.output.export import check_output

__all__ = ["skipped", "pareto_front", "row_label", "describe", "fitted_to_data", "model_groups", "Point", "PANELS", "FONT_SIZE",
           "MARKER_AREA", "plot_pareto", "pareto_figure", "DISTANCES", "DIRECTIONS", "LEADER_FROM", "place_labels",
           "LINE_WEIGHT", "FRONT_WEIGHT", "CROSSING_COST", "MARKER_WEIGHT", "AMBIGUITY_COST", "text_box"]


def skipped(rows: list[dict]) -> list[str]:
    """One line per run :func:`plot_pareto` leaves out of a panel or both, for the caller to print on
    stderr: not finished or not readable ("exp05: unreadable: metrics.json: not valid JSON (...)"), or
    finished without an accuracy or a cost, its own or a parent run's ("exp14: no MACs or CPU time ...")."""
    out = []
    for row in rows:
        status = row.get("status", "done")
        if status != "done":
            error = row.get("error")
            out.append(f"{row.get('name')}: {status}" + (f": {error}" if error else ""))
    done = [r for r in rows if r.get("status", "done") == "done"]
    by_name = {r.get("name"): r for r in done}
    for row in done:
        name = row.get("name")
        if finite_float(row.get("acc1")) is None:
            out.append(f"{name}: finished without an acc1")
            continue
        missing = [what for what, get in zip(("MACs", "CPU time"), (_macs_m, _time_ms))
                   if _lookup(row, get, by_name) is None]
        if len(missing) == 2:
            out.append(f"{name}: no MACs or CPU time measured, its own or a parent run's (profile: enabled: false?)")
        elif missing:
            out.append(f"{name}: not on the {missing[0]} panel: no {missing[0]} measured, its own or a parent run's")
    return out


def _macs_m(row: dict) -> float | None:
    macs = finite_float(row.get("macs"))
    return None if macs is None else macs / 1e6


def _time_ms(row: dict) -> float | None:
    """The run's CPU time relative to the original model's: 1 for the original, 1 / measured speedup else.

    Absolute times from different processes do not compare on a shared machine; each run's speedup was
    measured against the original in one process, interleaved, so the ratio is what is plotted.
    """
    latency = row.get("latency") if isinstance(row.get("latency"), dict) else {}
    if not row.get("decompose"):
        measured = finite_float(latency.get("original_ms")) is not None or finite_float(row.get("cpu_time_ms")) is not None
        return 1.0 if measured else None
    speedup = finite_float(latency.get("speedup"))
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


# ---------------------------------------------------------------- what a point says


def row_label(row: dict) -> str:
    """The point's label: the table's row number (the run's name without one) and :func:`describe`."""
    no = row.get("no")
    number = str(no) if isinstance(no, int) and not isinstance(no, bool) and abs(no) < 10**9 else \
        str(row.get("name"))[:40]
    return f"{number}: {describe(row)}"


def describe(row: dict) -> str:
    """A few words on how the run's model was made: "original", or the scheme ("s1", "s2"), "dec"
    (scheme 1 decomposed), "per-ch" (per-channel basis), "data" (fitted to data), a rank target ("3x"), and the fine-tune
    stages in order ("L2+CE", "L2+KD"; "L2&CE" for one stage with both losses)."""
    dec = row.get("decompose") if isinstance(row.get("decompose"), dict) else None
    if not dec:
        return "original"
    scheme = dec.get("scheme")
    parts = [{"v1": "s1", "v2": "s2"}[scheme] if scheme in ("v1", "v2") else str(scheme)[:8]]
    if dec.get("decomposed") is True:
        parts.append("dec")
    if dec.get("basis") == "per-channel":
        parts.append("per-ch")
    if fitted_to_data(row):
        parts.append("data")
    target = (dec.get("plan") or {}).get("target") if isinstance(dec.get("plan"), dict) else None
    if isinstance(target, dict) and len(target) == 1:
        kind, value = next(iter(target.items()))
        value = finite_float(value)
        if value is not None:
            parts.append(f"{value:g}x" if kind in ("speedup", "latency") else f"{kind} {value:g}")
    stages = row.get("history", row.get("finetune")) or []
    tunes = [_tune(s) for s in stages if isinstance(s, dict)] if isinstance(stages, list) else []
    if any(tunes):
        parts.append("+".join(t for t in tunes if t))
    return " ".join(parts)


def fitted_to_data(row: dict) -> bool:
    """Whether the run's expansion was fitted to data (``decompose.fit: data``; older metrics: its own
    decompose stage's record)."""
    dec = row.get("decompose") if isinstance(row.get("decompose"), dict) else {}
    stages = row.get("stages") if isinstance(row.get("stages"), dict) else {}
    own = stages.get("decompose") if isinstance(stages.get("decompose"), dict) else {}
    return (dec.get("fit") or own.get("fit")) == "data"


def _tune(stage: dict) -> str:
    """A fine-tune stage's losses: "L2", "CE", "KD", or those it combines joined by "&" ("KD&CE")."""
    return "&".join(name for name in ("L2", "KD", "CE") if (finite_float(stage.get(name.lower())) or 0.0) > 0)


def _section_name(row: dict, section: str) -> str | None:
    value = row.get(section)
    name = value.get("name") if isinstance(value, dict) else None
    return name if isinstance(name, str) else None


def model_groups(rows: list[dict]) -> dict[str, str]:
    """{run name: its group}: the model's name, with the dataset's when the rows use several datasets.
    Each group gets its own Pareto front."""
    datasets = {_section_name(r, "data") for r in rows}
    out = {}
    for row in rows:
        group = _section_name(row, "model") or "model unknown"
        if len(datasets) > 1:
            group += f" on {_section_name(row, 'data') or 'data unknown'}"
        out[row.get("name")] = group
    return out


@dataclass
class Point:
    cost: float
    acc: float
    label: str
    original: bool
    group: str
    data_fit: bool = False


# ---------------------------------------------------------------- the figure


PANELS = [("MACs (M)", _macs_m), ("CPU time relative to the original (1 / measured speedup)", _time_ms)]
FONT_SIZE = 8  # points, of the labels
MARKER_AREA = {False: 30, True: 160}  # scatter sizes (points**2) of an expanded run's dot and an original's star


def plot_pareto(rows: list[dict], out_path: str | Path) -> Path:
    """Write :func:`pareto_figure` of ``rows`` as a PNG (or any format matplotlib knows from the suffix);
    missing parent folders are created. Returns the path."""
    return save_figure(pareto_figure(rows), out_path)


def save_figure(fig, out_path: str | Path, **options) -> Path:
    """Write the matplotlib ``fig`` to ``out_path`` in the format its suffix names, as every file lrx writes:
    to a temporary file renamed over the target (:func:`lrx.base.files.write_named_atomic`), never into a
    directory, a device or FIFO, or a run's folder (:func:`lrx.output.export.check_output`); missing parent
    folders are created. ``options`` go to ``savefig``. :class:`UserError` naming the file otherwise."""
    out = Path(out_path)
    kind = check_picture(out)
    write_named_atomic(check_output(out), lambda tmp: fig.savefig(tmp, format=kind, **options))
    return out


def check_picture(out_path: str | Path) -> str:
    """The format of the picture file ``out_path`` (its suffix, one matplotlib writes), its missing parent
    folders created; :class:`UserError` naming it when no picture can go there (:func:`save_figure`'s checks:
    made before the work that draws it)."""
    from matplotlib.backend_bases import FigureCanvasBase  # local: heavy to import, only pictures need it

    out = Path(out_path)
    formats = FigureCanvasBase.get_supported_filetypes()
    kind = out.suffix[1:].lower()
    if kind not in formats:
        raise UserError(f"a picture's suffix names its format; allowed: {', '.join(sorted(formats))}", file=str(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create its folder ({os_reason(err)})", file=str(out)) from None
    check_output(out)
    return kind


def pareto_figure(rows: list[dict]):
    """The two-panel matplotlib ``Figure`` of ``rows`` (from :func:`lrx.output.table.collect_rows`; finished runs
    are drawn, the others skipped).

    Left panel: acc@1 (%) against MACs (M); right: acc@1 against CPU time relative to the original model
    (1 / the speedup measured in the run's own profile, interleaved with the original). One point per run
    with both values (a run without its own cost takes its parent run's, see :func:`_lookup`), labelled
    by :func:`row_label`; per model (:func:`model_groups`) a colour and a dashed step line through its
    Pareto front (``gid`` "front:<group>"); the original models as stars. The legend is outside the axes.

    Raises :class:`UserError` naming the missing metrics when no run can be drawn on either panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # local: heavy to import, only the plot needs it
    from matplotlib.figure import Figure  # local: as above
    from matplotlib.lines import Line2D  # local: as above

    done = [r for r in rows if r.get("status", "done") == "done"]
    by_name = {r.get("name"): r for r in done}
    groups = model_groups(done)
    data = []
    for _, get in PANELS:
        points = []
        for row in done:
            acc, cost = finite_float(row.get("acc1")), _lookup(row, get, by_name)
            if acc is not None and cost is not None:
                points.append(Point(cost, acc, row_label(row), not row.get("decompose"), groups[row.get("name")],
                                    fitted_to_data(row)))
        data.append(points)
    if not any(data):
        raise UserError(_nothing_to_plot(rows, done, by_name))
    drawn = sorted({p.group for points in data for p in points})
    colours = {group: f"C{i % 10}" for i, group in enumerate(drawn)}

    fig = Figure(figsize=(13, 7), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, (xlabel, _), points in zip(axes, PANELS, data):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("acc@1 (%)")
        ax.grid(True, alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "no run has this cost measured", ha="center", va="center", transform=ax.transAxes)
            continue
        for group in drawn:
            mine = [p for p in points if p.group == group]
            if not mine:
                continue
            front = pareto_front([(p.cost, p.acc) for p in mine])
            ax.step([c for c, _ in front], [a for _, a in front], where="post", linestyle="--", linewidth=1,
                    color=colours[group], gid=f"front:{group}", zorder=1)
            for original, data_fit, marker in ((False, False, "o"), (False, True, "D"), (True, False, "*")):
                chosen = [p for p in mine if p.original == original and p.data_fit == data_fit]
                if chosen:
                    ax.scatter([p.cost for p in chosen], [p.acc for p in chosen], color=colours[group],
                               edgecolors="black", linewidths=0.5, zorder=3, marker=marker, s=MARKER_AREA[original])
        ax.margins(x=0.15, y=0.15)  # room for labels around the outermost points
    handles = [Line2D([], [], color=colours[g], marker="o", linestyle="--", label=f"{g} (dashed: its Pareto front)")
               for g in drawn]
    handles.append(Line2D([], [], color="gray", marker="*", markersize=12, linestyle="none", label="original model"))
    if any(p.data_fit for points in data for p in points):
        handles.append(Line2D([], [], color="gray", marker="D", markersize=6, linestyle="none",
                              label="fitted to data (fit: data; label 'data')"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize=9)
    fig.suptitle("accuracy against cost: one point per run, labelled by its row in the table")
    fig.canvas.draw()  # settles the layout: labels are placed in the final pixel positions
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    for ax, points in zip(axes, data):
        if points:
            ax.set_xlim(ax.get_xlim())
            ax.set_ylim(ax.get_ylim())
            place_labels(ax, points, renderer)
    return fig


# Offsets of a label from its point, nearest first: distances (points), then the eight directions.
DISTANCES = (4, 10, 18, 28, 40, 56, 76, 100)
DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
LEADER_FROM = 18  # a label at least this far (points) from its point gets a line to it


def place_labels(ax, points: list[Point], renderer) -> list:
    """Annotate each point with its label at the first place, of :data:`DISTANCES` x :data:`DIRECTIONS`
    in order, where the label's box stays inside the axes and overlaps no label placed before, no
    point's marker and no front, and where its leader line (from :data:`LEADER_FROM` points away) crosses
    no label, marker or other leader. The points with the most neighbours are placed first. Where no
    place is free, the one with the least overlap is taken. Returns the annotations, in the order of
    ``points``."""
    from matplotlib.transforms import Bbox  # local: matplotlib is heavy to import, only the plot needs it

    frame = ax.get_window_extent(renderer)
    centres = [tuple(ax.transData.transform((p.cost, p.acc))) for p in points]
    radii = [math.sqrt(MARKER_AREA[p.original]) / 2 * ax.figure.dpi / 72 + 1 for p in points]  # pixels
    markers = [Bbox.from_extents(x - r, y - r, x + r, y + r) for (x, y), r in zip(centres, radii)]
    lines = _line_boxes(ax)  # the fronts' segments: a label across a dashed line is hard to read
    crowd = [sum(math.dist(c, o) < 60 for o in centres) for c in centres]
    placed: list = []  # label boxes
    leaders: list = []  # (from, to) in pixels
    out: list = [None] * len(points)
    for i in sorted(range(len(points)), key=lambda k: (-crowd[k], -points[k].acc)):
        point, centre = points[i], centres[i]
        others = markers[:i] + markers[i + 1:]
        probe = ax.annotate(point.label, (point.cost, point.acc), xytext=(0, 0), textcoords="offset points",
                            fontsize=FONT_SIZE)
        best, best_cost, best_box = None, math.inf, None
        for distance in DISTANCES:
            for dx, dy in DIRECTIONS:
                _aim(probe, dx, dy, distance)
                box = probe.get_window_extent(renderer)
                if not _inside(box, frame):
                    continue
                cost = sum(_overlap(box, other) for other in placed) + _overlap(box, markers[i])
                cost += FRONT_WEIGHT * sum(_overlap(box, line) for line in lines)
                cost += MARKER_WEIGHT * sum(_overlap(box, other) for other in others)
                own = _distance(centre, box)  # a label nearer another point than its own reads as that point's
                cost += AMBIGUITY_COST * sum(_distance(c, box) < own for k, c in enumerate(centres) if k != i)
                cost += LINE_WEIGHT * sum(_clip_length(a, b, box) for a, b in leaders)
                if distance >= LEADER_FROM:
                    leader = (centre, ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2))
                    cost += LINE_WEIGHT * sum(_clip_length(*leader, other) for other in placed + others)
                    cost += CROSSING_COST * sum(_crosses(leader, other) for other in leaders)
                if cost < best_cost:
                    best, best_cost, best_box = (dx, dy, distance), cost, box
                if cost == 0:
                    break
            if best_cost == 0:
                break
        probe.remove()
        dx, dy, distance = best or (1, 1, DISTANCES[0])
        arrow = {"arrowstyle": "-", "color": "0.3", "linewidth": 0.7, "shrinkA": 1, "shrinkB": 3}
        label = ax.annotate(point.label, (point.cost, point.acc), xytext=(0, 0), textcoords="offset points",
                            fontsize=FONT_SIZE, arrowprops=arrow if distance >= LEADER_FROM else None, zorder=4)
        _aim(label, dx, dy, distance)
        box = best_box or text_box(label, renderer)  # the probe had no leader: its box is the text's
        placed.append(box.padded(2))
        if distance >= LEADER_FROM:
            leaders.append((centre, ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)))
        out[i] = label
    return out


LINE_WEIGHT = 4.0  # a leader's length inside a box counts as this many pixels of width
FRONT_WEIGHT = 0.1  # a front under a label costs less than a far label: a long leader misleads more
CROSSING_COST = 200.0  # two leaders crossing count as this many square pixels of overlap
MARKER_WEIGHT = 10.0  # a label over another point hides it: worse than the same area of another label
AMBIGUITY_COST = 100.0  # per other point nearer to a label than the label's own point (square pixels)


def _distance(point, box) -> float:
    """From ``point`` to the nearest edge of ``box`` (0 inside), in pixels."""
    x, y = point
    return math.hypot(max(box.x0 - x, 0.0, x - box.x1), max(box.y0 - y, 0.0, y - box.y1))


def _clip_length(a, b, box) -> float:
    """The length (pixels) of segment ``a``-``b`` inside ``box`` (Liang-Barsky clipping)."""
    (x, y), (dx, dy) = a, (b[0] - a[0], b[1] - a[1])
    low, high = 0.0, 1.0
    for p, q in ((-dx, x - box.x0), (dx, box.x1 - x), (-dy, y - box.y0), (dy, box.y1 - y)):
        if p == 0:
            if q < 0:
                return 0.0
            continue
        t = q / p
        if p < 0:
            low = max(low, t)
        else:
            high = min(high, t)
        if low > high:
            return 0.0
    return (high - low) * math.hypot(dx, dy)


def _crosses(one, other) -> bool:
    """Whether two segments ((x, y), (x, y)) cross (touching ends do not count)."""
    def side(a, b, c):
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])

    (p, q), (r, t) = one, other
    return side(p, q, r) * side(p, q, t) < 0 and side(r, t, p) * side(r, t, q) < 0


def text_box(label, renderer):
    """The box of a label's text alone (an annotation's own box also holds its leader line), in pixels."""
    from matplotlib.text import Text  # local: matplotlib is heavy to import, only the plot needs it

    label.update_positions(renderer)  # the text's place follows its point and offset only when this runs
    return Text.get_window_extent(label, renderer)


def _line_boxes(ax) -> list:
    """A thin box (pixels) around each segment of the lines drawn on ``ax`` (the Pareto fronts)."""
    from matplotlib.transforms import Bbox  # local: matplotlib is heavy to import, only the plot needs it

    boxes = []
    for line in ax.get_lines():
        xy = line.get_transform().transform(line.get_path().vertices)
        for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:]):
            boxes.append(Bbox.from_extents(min(x0, x1) - 1, min(y0, y1) - 1, max(x0, x1) + 1, max(y0, y1) + 1))
    return boxes


def _aim(label, dx: int, dy: int, distance: float) -> None:
    """Put ``label`` ``distance`` points from its point in direction (dx, dy), its near corner towards the point."""
    step = distance / math.sqrt(2) if dx and dy else distance
    label.xyann = (dx * step, dy * step)
    label.set_horizontalalignment({1: "left", -1: "right", 0: "center"}[dx])
    label.set_verticalalignment({1: "bottom", -1: "top", 0: "center"}[dy])


def _inside(box, frame) -> bool:
    return box.x0 >= frame.x0 + 1 and box.x1 <= frame.x1 - 1 and box.y0 >= frame.y0 + 1 and box.y1 <= frame.y1 - 1


def _overlap(a, b) -> float:
    """The area two boxes share (0 when apart)."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _nothing_to_plot(rows: list[dict], done: list[dict], by_name: dict) -> str:
    if not rows:
        return "nothing to plot: no runs found (run folders hold metrics.json)"
    if not done:
        return "nothing to plot: no finished run (status 'done'); states: " + ", ".join(
            f"{r.get('name')}: {r.get('status')}" for r in rows[:8])
    missing = []
    for row in done[:8]:
        lacks = [name for name, value in (
            ("acc1", finite_float(row.get("acc1"))),
            ("macs", _lookup(row, _macs_m, by_name)),
            ("latency or cpu_time_ms", _lookup(row, _time_ms, by_name)),
        ) if value is None]
        missing.append(f"{row.get('name')} lacks {', '.join(lacks)}")
    return "nothing to plot: no finished run has acc1 with macs or a CPU time; " + "; ".join(missing)
