"""The Pareto plot: a PNG from run folders, the front, and a clear error when nothing can be drawn."""
import json

import pytest

from lrx.errors import UserError
from lrx.plot import pareto_front, plot_pareto
from lrx.table import collect_rows

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
    out = plot_pareto(collect_rows(runs), tmp_path / "pics" / "pareto.png")
    data = out.read_bytes()
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
    from lrx.plot import _time_ms

    assert _time_ms({"decompose": None, "latency": {"original_ms": 477.0}}) == 1.0, "the original is 1"
    assert _time_ms({"decompose": DECOMPOSE, "latency": {"original_ms": 195.0, "expanded_ms": 100.0,
                                                        "speedup": 2.0}}) == 0.5, "1 / measured speedup"
    assert _time_ms({"decompose": DECOMPOSE, "cpu_time_ms": 300.0}) is None, "no cross-process absolute times"
