"""The Pareto plot: a PNG from run folders, the front, and a clear error when nothing can be drawn."""
import json
import math

import pytest

from lrx.base.errors import UserError
from lrx.output.plot import pareto_figure, pareto_front, plot_pareto, row_label, skipped, text_box
from lrx.output.table import collect_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DECOMPOSE = {"layers": [2, 3, 4, 5], "scheme": "v2", "bases": [8, 8, 6, 4], "decomposed": False}


def write_metrics(root, name, **fields):
    (root / name).mkdir(parents=True)
    metrics = {"name": name, "status": "done", "decompose": None, "finetune": [], **fields}
    (root / name / "metrics.json").write_text(json.dumps(metrics))


def test_plot_writes_a_png(tmp_path):
    runs = tmp_path / "runs"
    write_metrics(runs, "exp01", no=1, acc1=83.1, macs=698_886_090, cpu_time_ms=1265.0,
                  latency={"original_ms": 900.0, "expanded_ms": None})
    write_metrics(runs, "exp10", no=10, acc1=80.2, macs=300_000_000, decompose=DECOMPOSE,
                  latency={"original_ms": 910.0, "expanded_ms": 400.0, "speedup": 2.275})
    write_metrics(runs, "exp11", no=11, acc1=81.0, decompose=DECOMPOSE)  # no cost of its own, no parent: skipped
    write_metrics(runs, "exp12", no=12, macs=250_000_000, decompose=DECOMPOSE)  # no accuracy: skipped
    rows = collect_rows(runs)
    out = plot_pareto(rows, tmp_path / "pics" / "pareto.png")
    data = out.read_bytes()
    assert skipped(rows) == ["exp11: no MACs or CPU time measured, its own or a parent run's (profile: enabled: false?)",
                             "exp12: finished without an acc1"], "the runs left out are named, with why"
    assert data[:8] == PNG_SIGNATURE, f"the file is a PNG, starts with {data[:8]!r}"
    assert len(data) > 10_000, f"the PNG holds a drawing, not an empty canvas ({len(data)} bytes)"


def test_fine_tuned_run_takes_its_parents_cost(tmp_path):
    runs = tmp_path / "runs"
    write_metrics(runs, "exp02", acc1=77.4, macs=446_850_000, decompose=DECOMPOSE)
    write_metrics(runs, "exp04", acc1=82.3, decompose=DECOMPOSE, parent="exp02")
    rows = collect_rows(runs)
    out = plot_pareto(rows, tmp_path / "p.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE, "a run with only its parent's cost is still drawn"


def test_pareto_front_keeps_only_undominated_points():
    points = [(100.0, 80.0), (50.0, 70.0), (60.0, 65.0), (120.0, 79.0), (50.0, 60.0)]
    assert pareto_front(points) == [(50.0, 70.0), (100.0, 80.0)], \
        "the front keeps points that nothing cheaper-and-more-accurate beats, ordered by cost"


def test_nothing_to_plot_names_the_missing_metrics(tmp_path):
    runs = tmp_path / "runs"
    write_metrics(runs, "exp01", acc1=83.1)
    with pytest.raises(UserError, match="exp01 lacks macs, latency or cpu_time_ms"):
        plot_pareto(collect_rows(runs), tmp_path / "p.png")
    with pytest.raises(UserError, match="no runs found"):
        plot_pareto([], tmp_path / "p.png")


def test_time_axis_is_relative_to_the_original_from_in_process_speedups():
    from lrx.output.plot import _time_ms

    assert _time_ms({"decompose": None, "latency": {"original_ms": 477.0}}) == 1.0, "the original is 1"
    assert _time_ms({"decompose": DECOMPOSE, "latency": {"original_ms": 195.0, "expanded_ms": 100.0,
                                                        "speedup": 2.0}}) == 0.5, "1 / measured speedup"
    assert _time_ms({"decompose": DECOMPOSE, "cpu_time_ms": 300.0}) is None, "no cross-process absolute times"


# ---------------------------------------------------------------- the figure: labels, legend, fronts

V1 = {"layers": [2, 3, 4, 5], "scheme": "v1", "bases": [8, 8, 6, 4], "decomposed": False, "basis": "shared"}
L2, CE = {"l2": 1.0, "ce": 0.0, "epochs": 1}, {"l2": 0.0, "ce": 1.0, "epochs": 1}


def quick_rows(root, model="alexnet_cifar10"):
    """The README's quick table (rows 1-13): crowded, rows 3-5 and 7-9 at their parent's cost."""
    def run(name, no, acc, macs=None, speedup=None, dec=None, parent=None, finetune=(), original=False):
        latency = {"original_ms": 100.0}
        if speedup:
            latency.update(expanded_ms=100.0 / speedup, speedup=speedup)
        write_metrics(root, name, no=no, acc1=acc, decompose=dec, parent=parent, finetune=list(finetune),
                      macs=macs and macs * 1e6, latency=latency if (original or speedup) else None)
        (root / name / "config.yaml").write_text(json.dumps({"model": {"name": model}, "data": {"name": "fm"}}))

    dec = {**V1, "decomposed": True}
    run("exp01", 1, 85.90, macs=698.89, original=True)
    run("exp02", 2, 73.70, macs=445.65, speedup=1.09, dec=V1)
    run("exp03", 3, 83.90, dec=V1, parent="exp02", finetune=[L2])
    run("exp04", 4, 82.70, dec=V1, parent="exp03", finetune=[L2, CE])
    run("exp05", 5, 81.50, dec=V1, parent="exp02", finetune=[CE])
    run("exp06", 6, 56.30, macs=437.59, speedup=1.03, dec=dec)
    run("exp07", 7, 80.90, dec=dec, parent="exp06", finetune=[L2])
    run("exp08", 8, 81.50, dec=dec, parent="exp07", finetune=[L2, CE])
    run("exp09", 9, 80.70, dec=dec, parent="exp06", finetune=[CE])
    for no, acc, macs, speedup in ((10, 83.40, 405.58, 1.34), (11, 83.30, 308.36, 1.85), (12, 82.80, 259.53, 1.97)):
        run(f"exp{no}", no, acc, macs=macs, speedup=speedup, finetune=[L2, CE],
            dec={**V1, "scheme": "v2", "plan": {"target": {"speedup": no - 8.0}}})
    run("exp13", 13, 83.10, macs=445.65, speedup=1.07, dec={**V1, "basis": "per-channel"}, finetune=[L2, CE])
    return collect_rows(root)


QUICK_LABELS = {"1: original", "2: s1", "3: s1 L2", "4: s1 L2+CE", "5: s1 CE", "6: s1 dec", "7: s1 dec L2",
                "8: s1 dec L2+CE", "9: s1 dec CE", "10: s2 2x L2+CE", "11: s2 3x L2+CE", "12: s2 4x L2+CE",
                "13: s1 per-ch L2+CE"}


def distance_to_box(point, box):
    x, y = point
    return math.hypot(max(box.x0 - x, 0.0, x - box.x1), max(box.y0 - y, 0.0, y - box.y1))


def labels(ax):
    from matplotlib.text import Annotation

    return [t for t in ax.texts if isinstance(t, Annotation)]


@pytest.fixture(scope="module")
def quick_figure(tmp_path_factory):
    fig = pareto_figure(quick_rows(tmp_path_factory.mktemp("quick") / "runs"))
    fig.canvas.draw()
    return fig


def test_points_are_labelled_by_row_number_and_a_short_description(quick_figure):
    for ax in quick_figure.axes:
        texts = [t.get_text() for t in labels(ax)]
        assert sorted(texts) == sorted(QUICK_LABELS), f"{ax.get_xlabel()}: one label per row, as the table numbers it"
        assert not any("exp" in t for t in texts), f"no run names: {texts}"


def test_labels_are_apart_inside_the_axes_and_off_the_points(quick_figure):
    renderer = quick_figure.canvas.get_renderer()
    for ax in quick_figure.axes:
        frame = ax.get_window_extent(renderer)
        boxes = {t.get_text(): text_box(t, renderer) for t in labels(ax)}
        for name, box in boxes.items():
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, \
                f"{ax.get_xlabel()}: label {name!r} {box.extents} is cut by the axes {frame.extents}"
        names = sorted(boxes)
        touching = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if boxes[a].overlaps(boxes[b])]
        assert not touching, f"{ax.get_xlabel()}: labels overlap: {touching}"
        centres = [c for coll in ax.collections for c in ax.transData.transform(coll.get_offsets())]
        assert len(centres) == len(QUICK_LABELS), f"{ax.get_xlabel()}: one point per row"
        for x, y in centres:
            covered = [n for n, box in boxes.items() if box.contains(x, y)]
            assert not covered, f"{ax.get_xlabel()}: the point at {(x, y)} is hidden under {covered}"
        for label in labels(ax):
            if label.arrow_patch is not None:
                continue  # a leader line shows which point it belongs to
            box, own = boxes[label.get_text()], ax.transData.transform(label.xy)
            apart = [c for c in centres if math.dist(c, own) > 6]  # closer than a marker: one place for the eye
            nearest = min(apart, key=lambda c: distance_to_box(c, box))
            assert distance_to_box(own, box) <= distance_to_box(nearest, box) + 0.5, \
                f"{ax.get_xlabel()}: {label.get_text()!r} sits nearer another point than its own"


def test_the_legend_is_outside_the_axes_and_inside_the_figure(quick_figure):
    renderer = quick_figure.canvas.get_renderer()
    (legend,) = quick_figure.legends
    box, page = legend.get_window_extent(renderer), quick_figure.bbox
    for ax in quick_figure.axes:
        assert not box.overlaps(ax.get_window_extent(renderer)), f"the legend covers the {ax.get_xlabel()} panel"
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, "legend cut"
    texts = [t.get_text() for t in legend.get_texts()]
    assert any("alexnet_cifar10" in t for t in texts) and "original model" in texts, texts


def test_each_model_has_its_own_pareto_front(tmp_path):
    root = tmp_path / "runs"
    quick_rows(root)
    write_metrics(root, "r01", no=21, acc1=90.0, macs=1.8e9, latency={"original_ms": 100.0})
    write_metrics(root, "r02", no=22, acc1=88.0, macs=2e8, decompose={**V1, "scheme": "v2"}, finetune=[L2],
                  latency={"original_ms": 100.0, "expanded_ms": 40.0, "speedup": 2.5})
    for name in ("r01", "r02"):
        (root / name / "config.yaml").write_text(json.dumps({"model": {"name": "resnet18"}, "data": {"name": "fm"}}))
    rows = collect_rows(root)
    fig = pareto_figure(rows)
    macs_panel = fig.axes[0]
    fronts = {line.get_gid(): list(zip(line.get_xdata(), line.get_ydata())) for line in macs_panel.get_lines()}
    assert set(fronts) == {"front:alexnet_cifar10", "front:resnet18"}, f"one front per model: {set(fronts)}"
    assert fronts["front:resnet18"] == [(200.0, 88.0), (1800.0, 90.0)], fronts["front:resnet18"]
    alexnet = [pytest.approx(p) for p in [(259.53, 82.8), (308.36, 83.3), (405.58, 83.4), (445.65, 83.9),
                                               (698.89, 85.9)]]
    assert fronts["front:alexnet_cifar10"] == alexnet, \
        "resnet18's cheaper, more accurate runs do not push alexnet's runs off alexnet's front"
    assert "21: original" in [t.get_text() for t in labels(macs_panel)]


@pytest.mark.parametrize("row,text", [
    ({"no": 7, "decompose": None}, "7: original"),
    ({"name": "mine", "decompose": {**V1, "scheme": "v2", "plan": {"target": {"macs": 0.4}}},
      "history": [{"l2": 1.0, "ce": 0.5}]}, "mine: s2 macs 0.4 L2&CE"),
    ({"no": 11, "decompose": {**V1, "scheme": "v2", "plan": {"target": {"speedup": 3.0}}},
      "finetune": [{"l2": 1.0, "ce": 0.0}, {"l2": None, "ce": 0.0, "kd": 1.0}, {"kd": 1.0, "ce": 1.0}]},
     "11: s2 3x L2+KD+KD&CE"),
    ({"no": True, "name": "odd", "decompose": {"scheme": ["x"]}, "history": "nonsense"}, "odd: ['x']"),
])
def test_row_label(row, text):
    assert row_label(row) == text


def test_runs_fitted_to_data_are_marked(tmp_path):
    runs = tmp_path / "runs"
    write_metrics(runs, "exp01", no=1, acc1=85.0, macs=7e8, latency={"original_ms": 100.0})
    write_metrics(runs, "exp11", no=11, acc1=83.0, macs=3e8, decompose={**V1, "scheme": "v2"},
                  latency={"original_ms": 100.0, "expanded_ms": 50.0, "speedup": 2.0})
    write_metrics(runs, "exp17", no=17, acc1=84.0, macs=3e8, decompose={**V1, "scheme": "v2", "fit": "data"},
                  latency={"original_ms": 100.0, "expanded_ms": 50.0, "speedup": 2.0})
    write_metrics(runs, "exp18", no=18, acc1=84.5, macs=2e8, decompose={**V1, "scheme": "v2"},
                  stages={"decompose": {"hash": "x", "fit": "data"}})  # older metrics: the fit in the stage only
    fig = pareto_figure(collect_rows(runs))
    texts = {t.get_text() for t in labels(fig.axes[0])}
    assert texts == {"1: original", "11: s2", "17: s2 data", "18: s2 data"}, texts
    markers = {tuple(coll.get_offsets()[0]): coll.get_paths()[0].vertices.shape[0] for coll in fig.axes[0].collections}
    assert len(set(markers.values())) == 3, "dots, diamonds for the data fits, a star for the original"
    (legend,) = fig.legends
    assert any("fitted to data" in t.get_text() for t in legend.get_texts()), "the legend says what a diamond is"


@pytest.mark.parametrize("where", ["suffix", "directory", "fifo", "dev-full", "run-folder"])
def test_a_plot_output_no_picture_can_go_to_is_one_line_from_lrx_plot(tmp_path, where):
    import os

    from typer.testing import CliRunner

    from lrx.cli import app

    runs = tmp_path / "runs"
    write_metrics(runs, "exp01", no=1, acc1=83.1, macs=698_886_090, cpu_time_ms=1265.0)
    out = {"suffix": tmp_path / "p.xyz", "directory": runs, "fifo": tmp_path / "p.png", "dev-full": "/dev/full",
           "run-folder": runs / "exp01" / "p.png"}[where]
    if where == "fifo":
        os.mkfifo(out)  # no reader: opening it to write would hang
    before = (runs / "exp01" / "metrics.json").read_bytes()
    result = CliRunner().invoke(app, ["plot", str(runs), "-o", str(out)])
    assert result.exit_code == 2 and str(out) in result.output, f"{where}: refused naming it: {result.output}"
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert (runs / "exp01" / "metrics.json").read_bytes() == before and not (runs / "exp01" / "p.png").exists(), \
        f"{where}: the run folder is as it was"


def test_a_plot_that_fails_half_way_keeps_the_previous_picture(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    runs = tmp_path / "runs"
    write_metrics(runs, "exp01", no=1, acc1=83.1, macs=698_886_090, cpu_time_ms=1265.0)
    out = tmp_path / "p.png"
    out.write_bytes(b"previous")

    def torn(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(PNG_SIGNATURE)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", torn)
    with pytest.raises(UserError, match="No space left on device"):
        plot_pareto(collect_rows(runs), out)
    assert out.read_bytes() == b"previous", "the previous picture is kept whole"
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == [], "no temporary file is left"
