"""The results table: the seed's header and notation, rebuilt from run folders written here."""
import csv
import io
import json

import pytest
import yaml
from typer.testing import CliRunner

from lrx.base.errors import UserError
from lrx.cli import app
from lrx.output.table import HEADER, collect_rows, render

SEED_HEADER = "|No.|layers|#bases|decomped|L2 finetune|CE finetune|acc@1(%)|macs(M)|params(M)|CPU time(ms)|CUDA time(ms)|Remark|"
DECOMPOSE = {"layers": [2, 3, 4, 5], "scheme": "v1", "bases": [8, 8, 6, 4], "decomposed": False, "report": []}


def write_run(root, folder, metrics=None, config=None, raw_metrics=None):
    run = root / folder
    run.mkdir(parents=True)
    if config is not None:
        (run / "config.yaml").write_text("# lrx 0.1.0, torch 2.x\n" + yaml.safe_dump(config))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if raw_metrics is not None:
        (run / "metrics.json").write_text(raw_metrics)
    return run


def done(name, no, group, **fields):
    return {"name": name, "no": no, "group": group, "remark": "", "status": "done", "seed": 0,
            "versions": {"torch": "2.x", "lrx": "0.1.0"}, "finetune": [], "decompose": None, **fields}


@pytest.fixture
def seed_runs(tmp_path):
    """Runs shaped like the seed's rows 1-5 plus broken ones; folder names sort unlike ``no``."""
    root = tmp_path / "runs"
    write_run(root, "z_original", done(
        "z_original", 1, 1, remark="original model", acc1=83.14, macs=698_886_090, params=44_428_106,
        cpu_time_ms=1265.4, cuda_time_ms=6.612,
        latency={"threads": 2, "original_ms": 900.0, "expanded_ms": None, "speedup": None, "mac_ratio": None}))
    write_run(root, "y_expanded", done(
        "y_expanded", 2, 2, remark="LowRankExpV1 applied, not decomposed", decompose=DECOMPOSE,
        acc1=77.43, acc1_before=77.43, l2_before=1952.3, l2_after=None, macs=446_850_000, params=43_580_000,
        cpu_time_ms=1254.0, cuda_time_ms=None,
        latency={"threads": 2, "original_ms": 918.0, "expanded_ms": 900.0, "speedup": 1.02, "mac_ratio": 1.564}))
    # Row 3: L2 fine-tune of row 2's expansion; its metrics hold only its own stage, the parent is in config.yaml.
    l2_stage = {"l2": 1.0, "ce": 0.0, "epochs": 20, "acc1_before": 77.43, "acc1_after": 72.67}
    write_run(root, "x_l2", done("x_l2", 3, 2, finetune=[l2_stage], acc1_before=77.43, acc1=72.67,
                                 l2_before=1952.4, l2_after=176.6),
              config={"name": "x_l2", "no": 3, "group": 2, "parent": "y_expanded", "baseline": "z_original"})
    # Row 4: CE after row 3; as lrx.pipeline.runner writes it, its finetune list holds row 3's stage, then its own.
    write_run(root, "w_l2_ce", done("w_l2_ce", 4, 2, finetune=[l2_stage, {"l2": 0.0, "ce": 1.0, "epochs": 10}],
                                    acc1_before=72.67, acc1=82.35, l2_before=176.6, l2_after=783.2),
              config={"name": "w_l2_ce", "no": 4, "group": 2, "parent": "x_l2", "baseline": "z_original"})
    write_run(root, "v_ce", done("v_ce", 5, 2, finetune=[{"l2": 0.0, "ce": 1.0, "epochs": 10}],
                                 acc1_before=77.43, acc1=82.27, remark="CE only | no L2"),
              config={"name": "v_ce", "no": 5, "group": 2, "parent": "y_expanded", "baseline": "z_original"})
    write_run(root, "u_running", {"name": "u_running", "no": 6, "group": 3, "status": "running",
                                  "decompose": {**DECOMPOSE, "decomposed": True}, "finetune": []})
    write_run(root, "t_pending", config={"name": "t_pending", "no": 7, "group": 3, "remark": "planned",
                                         "decompose": {**DECOMPOSE, "decomposed": True},
                                         "finetune": [{"l2": 1.0, "ce": 0.0, "epochs": 20}]})
    # Not run yet, continuing from row 3: the parent's L2 stage precedes the CE stage of its config.
    write_run(root, "r_planned", config={"name": "r_planned", "no": 8, "group": 3, "parent": "x_l2",
                                         "finetune": [{"l2": 0.0, "ce": 1.0, "epochs": 10}]})
    write_run(root, "s_broken", raw_metrics="{not json")
    (root / "quick" / "exp01").mkdir(parents=True)  # nested runs: not one level down, not a row
    (root / "quick" / "exp01" / "metrics.json").write_text(json.dumps(done("exp01", 1, 1)))
    return root


def table_lines(root):
    """The table's lines, without the footnotes after it."""
    return render(collect_rows(root)).split("\n\n")[0].splitlines()


def cells_of(line):
    assert line.startswith("|") and line.endswith("|"), f"a table row starts and ends with '|': {line!r}"
    return line[1:-1].split("|")


def test_header_is_the_seeds_exactly(seed_runs):
    lines = table_lines(seed_runs)
    assert HEADER == SEED_HEADER, "the module's header constant is the seed's header"
    assert lines[0] == SEED_HEADER, f"first line is the seed's header, got {lines[0]!r}"
    assert lines[1] == "|" + "---|" * 12, f"second line is the 12-column rule, got {lines[1]!r}"


def test_rows_ordered_by_no_with_group_separators(seed_runs):
    lines = table_lines(seed_runs)[2:]
    first_cells = [cells_of(line)[0] if line != "|" else "|" for line in lines]
    # Numbered rows 1..7 in order (folders sort the other way), a '|' line where the group changes,
    # then the broken run, which has no number, under its folder name.
    assert first_cells == ["1", "|", "2", "3", "4", "5", "|", "6", "7", "8", "|", "s_broken"], \
        f"rows in 'no' order with separators on group change, got {first_cells}"


def test_seed_notation(seed_runs):
    rows = {cells_of(line)[0]: cells_of(line) for line in table_lines(seed_runs)[2:] if line != "|"}
    assert rows["1"][:11] == ["1", "-", "-", "-", "-", "-", "83.14", "698.89", "44.43", "1265", "6.61"], \
        f"baseline row: '-' for decomposition and schedules, 2 decimals, whole-ms CPU time: {rows['1']}"
    assert rows["2"][1:11] == ["2,3,4,5", "8,8,6,4", "-", "-", "-", "77.43", "446.85", "43.58", "1254", "-"], \
        f"expanded row without fine-tuning: '-' schedules, '-' for a null CUDA time: {rows['2']}"
    assert rows["3"][1:9] == ["2,3,4,5", "8,8,6,4", "-", "1.0x20", "0.0", "72.67", "-", "-"], \
        f"L2-only row: layers inherited from its parent, '1.0x20' and '0.0', unmeasured '-': {rows['3']}"
    assert rows["4"][4:6] == ["1.0x20", "1.0x10"], f"L2 then CE, as listed in metrics.json: {rows['4']}"
    assert rows["5"][4:6] == ["0.0", "1.0x10"], f"CE only: {rows['5']}"
    assert rows["6"][3] == "Y", f"a decomposed run shows 'Y': {rows['6']}"


def test_remarks_in_the_seeds_style(seed_runs):
    rows = {cells_of(line.replace("\\|", "/"))[0]: line for line in table_lines(seed_runs)[2:] if line != "|"}
    remark = {no: cells_of(line.replace("\\|", "/"))[11] for no, line in rows.items()}
    assert remark["1"] == "original model", f"a baseline's remark is its config remark alone: {remark['1']!r}"
    assert remark["2"] == "LowRankExpV1 applied, not decomposed; L2 norm 1952, speedup 1.02x measured / 1.56x by MACs", \
        f"remark, then the measured L2 norm and speedup: {remark['2']!r}"
    assert remark["3"] == "acc 77.43 -> 72.67, L2 norm 1952 -> 177", f"seed-style measured remark: {remark['3']!r}"
    assert "CE only \\| no L2; acc 77.43 -> 82.27" in rows["5"], f"a '|' in a remark is escaped: {rows['5']!r}"


def test_unfinished_and_broken_runs_are_rows(seed_runs):
    rows = {cells_of(line)[0]: cells_of(line) for line in table_lines(seed_runs)[2:] if line != "|"}
    assert rows["6"][6] == "-" and rows["6"][11].startswith("[interrupted"), \
        f"a run marked running whose lock nobody holds was stopped: {rows['6']}"
    assert rows["7"][1:6] == ["2,3,4,5", "8,8,6,4", "Y", "1.0x20", "0.0"], \
        f"a run with config.yaml only shows what it is configured to be: {rows['7']}"
    assert rows["7"][11] == "[not run: no metrics.json] planned", f"and that it has not run: {rows['7'][11]!r}"
    assert rows["8"][1:6] == ["2,3,4,5", "8,8,6,4", "-", "1.0x20", "1.0x10"], \
        f"a configured run continuing from row 3 shows row 3's expansion and L2 stage before its own CE: {rows['8']}"
    assert rows["s_broken"][11].startswith("[unreadable: metrics.json: not valid JSON (Expecting property name"), \
        f"unreadable metrics.json is a row saying so: {rows['s_broken']}"


def test_empty_runs_dir_prints_only_the_header(tmp_path):
    rows = collect_rows(tmp_path)
    assert rows == [], f"no run folders, no rows: {rows}"
    assert render(rows).splitlines() == [SEED_HEADER, "|" + "---|" * 12], "empty table is the header and rule"


def test_missing_runs_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        collect_rows(tmp_path / "nowhere")


def test_csv_and_json_parse(seed_runs):
    rows = collect_rows(seed_runs)
    records = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    assert [r["no"] for r in records] == ["1", "2", "3", "4", "5", "6", "7", "8", ""], f"csv rows in order: {records}"
    assert records[3]["l2_finetune"] == "1.0x20" and records[3]["ce_finetune"] == "1.0x10", f"csv notation: {records[3]}"
    data = json.loads(render(rows, "json"))
    assert data[0]["macs_m"] == pytest.approx(698.88609) and data[0]["acc1"] == 83.14, f"json numbers unformatted: {data[0]}"
    assert data[1]["latency_speedup"] == 1.02 and data[6]["status"] == "not run", "json keeps speedup and states"
    with pytest.raises(UserError, match="allowed: markdown, csv, json"):
        render(rows, "html")


# ---------------------------------------------------------------- damaged run folders


def _huge(path):
    with open(path, "wb") as f:
        f.truncate(64 * 2**20)  # sparse: 64 MiB without writing them; must be refused unread


DAMAGE = {
    "metrics null": ("metrics.json", "null", "metrics.json holds null, not an object"),
    "stages a list": ("metrics.json", '{"stages": []}', "metrics.json: damaged: 'stages' is"),
    "status a number": ("metrics.json", '{"stages": {}, "status": 7}', "metrics.json: damaged:"),
    "metrics list": ("metrics.json", "[]", "metrics.json holds a list, not an object"),
    "metrics deep": ("metrics.json", "[" * 100_000, "metrics.json: not valid JSON: nested too deeply"),
    "metrics huge": ("metrics.json", _huge, "metrics.json: cannot read it: 67108864 bytes"),
    "metrics binary": ("metrics.json", b"\xff\xfe\x00", "metrics.json: cannot read it: not UTF-8"),
    "metrics folder": ("metrics.json", "mkdir", "metrics.json: cannot read it"),
    "metrics long int": ("metrics.json", '{"acc1": ' + "9" * 5000 + "}", "metrics.json: not valid JSON"),
    "config deep": ("config.yaml", "[" * 100_000, "config.yaml: "),
    "config huge": ("config.yaml", _huge, "config.yaml: cannot read it: 67108864 bytes"),
    "config list": ("config.yaml", "- 1\n- 2\n", "config.yaml holds a list, not a mapping"),
    "config long int": ("config.yaml", "no: " + "9" * 5000 + "\n", "config.yaml: not valid YAML"),
    "config binary": ("config.yaml", b"\xff\xfe\x00", "config.yaml: cannot read it: not UTF-8"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_run_is_an_unreadable_row_and_the_rest_still_shows(tmp_path, case):
    from lrx.output.plot import plot_pareto, skipped

    name, content, expected = DAMAGE[case]
    root = tmp_path / "runs"
    write_run(root, "good", done("good", 1, 1, acc1=80.0, macs=1e8, latency={"original_ms": 10.0}))
    bad = root / "bad"
    bad.mkdir()
    target = bad / name
    if callable(content):
        content(target)
    elif content == "mkdir":
        target.mkdir()
    elif isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    rows = {row["name"]: row for row in collect_rows(root)}
    assert rows["good"]["status"] == "done", f"{case}: the sound run is still a finished row: {rows['good']}"
    assert rows["bad"]["status"] == "unreadable", f"{case}: the damaged run is a row marked unreadable: {rows['bad']}"
    assert expected in rows["bad"]["error"], f"{case}: the row says what is wrong ({expected!r}): {rows['bad']['error']}"
    for fmt in ("markdown", "csv", "json"):
        text = render(list(rows.values()), fmt)
        assert "[unreadable: " in text, f"{case}: the {fmt} table shows the unreadable run: {text[:300]}"
    out = plot_pareto(list(rows.values()), tmp_path / "p.png")
    assert out.exists(), f"{case}: the plot draws the sound run"
    assert any(line.startswith("bad: unreadable: ") for line in skipped(list(rows.values()))), \
        f"{case}: the plot's skipped list names the unreadable run"


def test_null_metrics_is_not_called_missing(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "n", raw_metrics="null")
    (row,) = collect_rows(root)
    assert row["error"] == "metrics.json holds null, not an object", \
        f"a null metrics.json says what it holds, not 'no metrics.json': {row['error']!r}"


def test_hostile_field_values_do_not_break_the_table(tmp_path):
    root = tmp_path / "runs"
    # YAML aliases nest a list 2**30 elements wide if printed whole; a date cannot go into json output.
    config = "a: &a [1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n" \
             "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n" \
             "name: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\nremark: *e\ngroup: 2024-01-01\nno: *e\n" \
             "decompose: {layers: *e, bases: [1, 2]}\nfinetune: [{l2: 1.0, epochs: *e}]\n"
    (root / "hostile").mkdir(parents=True)
    (root / "hostile" / "config.yaml").write_text(config)
    write_run(root, "big", {"name": "big", "status": "done", "acc1": 10**400, "macs": 1e999, "no": 10**100})
    rows = collect_rows(root)
    for fmt in ("markdown", "csv", "json"):
        text = render(rows, fmt)
        assert len(text) < 10_000, f"{fmt}: hostile values are not printed whole ({len(text)} characters)"
    names = sorted(row["name"] for row in rows)
    assert names == ["big", "hostile"], f"a name that is not text falls back to the folder's: {names}"


def test_a_run_whose_lock_is_held_shows_as_running(seed_runs):
    from lrx.pipeline.rundir import RunDir

    holder = RunDir(seed_runs, "u_running")
    holder.lock()
    try:
        rows = {cells_of(line)[0]: cells_of(line) for line in table_lines(seed_runs)[2:] if line != "|"}
    finally:
        holder.unlock()
    assert rows["6"][11].startswith("[running]"), f"a run with a live lock holder is running: {rows['6']}"


# ---------------------------------------------------------------- time columns a reader can trust (issue 14)


def timed(name, no, median, batch=16, noisy=False, **latency):
    stats = {"median_ms": median, "p25_ms": median * 0.9, "p75_ms": median * (1.5 if noisy else 1.05),
             "repeats": 5, "noisy": noisy, "batch": batch, "threads": 2, "source": "interleaved"}
    return done(name, no, 1, acc1=80.0, macs=1e8, params=1e6, cpu_time_ms=median, cpu_time=stats,
                latency={"batch": batch, "noisy": noisy, **latency})


def test_noisy_times_are_marked_not_printed_as_fact(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", timed("a", 1, 214.2))
    write_run(root, "b", timed("b", 2, 104.4, noisy=True, speedup=1.85, mac_ratio=2.27, original_layout="channels_last",
                               speedup_default=2.4))
    text = render(collect_rows(root))
    table, _, notes = text.partition("\n\n")
    rows = {cells_of(line)[0]: cells_of(line) for line in table.splitlines()[2:]}
    assert rows["1"][9] == "214" and rows["2"][9] == "104~", f"a noisy median ends in '~': {rows['1'][9]}, {rows['2'][9]}"
    assert "speedup 1.85x~ measured / 2.27x by MACs" in rows["2"][11], f"the speedup is marked too: {rows['2'][11]}"
    noisy_notes = [n for n in notes.splitlines() if n.startswith("- ~ noisy")]
    assert len(noisy_notes) == 1 and "(row 2)" in noisy_notes[0] and "20%" in noisy_notes[0], notes
    assert "row 2 1.85x against channels_last, 2.40x against PyTorch's default" in notes, \
        f"the footnote names each speedup's reference and the default beside it: {notes}"
    assert "batch" not in notes and "torch.profiler" not in notes, f"nothing else to qualify: {notes}"
    record = json.loads(render(collect_rows(root), "json"))[1]
    assert (record["cpu_time_noisy"], record["latency_noisy"], record["timing_batch"], record["original_layout"],
            record["speedup_default"]) == (True, True, 16, "channels_last", 2.4), record


def test_a_time_column_mixing_batch_sizes_says_so(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", timed("a", 1, 214.0))
    write_run(root, "b", timed("b", 2, 60.0, batch=4))
    write_run(root, "c", timed("c", 3, 110.0))
    notes = render(collect_rows(root)).partition("\n\n")[2]
    assert "- The time columns mix batch sizes: batch 4 (row 2); batch 16 (rows 1, 3);" in notes, notes


def sized(name, no, median, size, batch=16):
    """A timed row whose profile stage recorded the input size it measured at (as lrx's profile stage does)."""
    return {**timed(name, no, median, batch=batch), "stages": {"profile": {"hash": "h", "input_size": size, "batch": batch}}}


def test_the_table_says_the_input_size_and_batch_its_time_columns_were_measured_at(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", sized("a", 1, 20.0, [3, 64, 64]))
    write_run(root, "b", sized("b", 2, 12.0, [3, 64, 64]))
    notes = render(collect_rows(root)).partition("\n\n")[2]
    assert "- Measured at input 3x64x64, batch 16: macs(M) counts one 3x64x64 image" in notes, notes
    assert "mix input sizes" not in notes, f"one size: nothing mixed: {notes}"
    records = json.loads(render(collect_rows(root), "json"))
    assert [r["timing_input_size"] for r in records] == ["3x64x64", "3x64x64"], records
    header = next(csv.reader(io.StringIO(render(collect_rows(root), "csv"))))
    assert "timing_input_size" in header, header


def test_rows_measured_at_different_input_sizes_are_named_per_size(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", sized("a", 1, 214.0, [3, 224, 224]))
    write_run(root, "b", sized("b", 2, 20.0, [3, 64, 64]))
    write_run(root, "c", sized("c", 3, 110.0, [3, 224, 224]))
    # An older run: no size in its profile record; config.yaml's resolved profile.input_size says it.
    write_run(root, "d", timed("d", 4, 100.0), config={"name": "d", "profile": {"input_size": [3, 64, 64]}})
    write_run(root, "e", timed("e", 5, 90.0))  # neither says: unknown, never silently one of the others
    notes = render(collect_rows(root)).partition("\n\n")[2]
    assert ("- The macs(M) and time columns mix input sizes: 3x64x64 (rows 2, 4); 3x224x224 (rows 1, 3); "
            "unknown (row 5); compare them only within one size") in notes, notes
    assert "Measured at input" not in notes, f"no single size is claimed: {notes}"
    records = {r["name"]: r["timing_input_size"] for r in json.loads(render(collect_rows(root), "json"))}
    assert records == {"a": "3x224x224", "b": "3x64x64", "c": "3x224x224", "d": "3x64x64", "e": None}, records
    rows = list(csv.DictReader(io.StringIO(render(collect_rows(root), "csv"))))
    assert [r["timing_input_size"] for r in rows] == ["3x224x224", "3x64x64", "3x224x224", "3x64x64", ""], rows


def on_device(name, no, median, device, torch_version="2.14.1"):
    """A timed row whose profile stage recorded the device it was timed on (as lrx's profile stage does)."""
    return {**timed(name, no, median), "stages": {"profile": {"hash": "h", "input_size": [3, 64, 64], "batch": 16,
                                                              "device_name": device, "torch": torch_version}}}


def test_the_table_names_the_device_its_times_were_taken_on(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", on_device("a", 1, 20.0, "AMD EPYC, 2 CPUs, 2 threads"))
    write_run(root, "b", on_device("b", 2, 12.0, "AMD EPYC, 2 CPUs, 2 threads"))
    write_run(root, "c", timed("c", 3, 11.0))  # profiled by an lrx that did not record its device: not counted
    notes = render(collect_rows(root)).partition("\n\n")[2].splitlines()
    assert "- Timed on AMD EPYC, 2 CPUs, 2 threads, torch 2.14.1." in notes, notes
    write_run(root, "d", on_device("d", 4, 1.0, "NVIDIA H100 80GB HBM3\x1b]0;title\x07", "2.11.0"))
    notes = render(collect_rows(root)).partition("\n\n")[2]
    assert ("- The time columns come from several devices: AMD EPYC, 2 CPUs, 2 threads, torch 2.14.1 (rows 1, 2); "
            "NVIDIA H100 80GB HBM3, torch 2.11.0 (row 4); compare times only within one device.") in notes, notes
    assert "Timed on" not in notes, f"no single device is claimed: {notes}"


def test_single_profiler_runs_are_named(seed_runs):
    notes = render(collect_rows(seed_runs)).partition("\n\n")[2].splitlines()
    assert "- Rows 1, 2: time from one torch.profiler run (profiled by an older lrx), not a median; " \
           "lrx profile CONFIG --force re-times it." in notes, notes
    assert render([]).count("\n") == 2, "no rows, no footnotes"


def test_several_models_get_a_model_column_and_footnotes_name_each_row_once(tmp_path):
    root = tmp_path / "runs"
    for model in ("resnet18", "tiny_cnn", "vgg11"):
        for no in (1, 2):
            name = f"{model}_{no}"
            latency = {"original_ms": 10.0, "expanded_ms": 5.0, "speedup": 2.0, "original_layout": "channels_last",
                       "noisy": True} if no == 2 else {}
            write_run(root, name, done(name, no, no, acc1=80.0, cpu_time_ms=5.0, latency=latency,
                                       cpu_time={"noisy": no == 2, "batch": 16}),
                      config={"name": name, "no": no, "group": no, "model": {"name": model}})
    text = render(collect_rows(root))
    table, notes = text.split("\n\n")
    lines = table.splitlines()
    assert lines[0] == SEED_HEADER.replace("|No.|", "|No.|model|"), f"a model column after No.: {lines[0]}"
    rows = [cells_of(line)[:2] for line in lines[2:] if line != "|"]
    assert rows == [["1", "resnet18"], ["2", "resnet18"], ["1", "tiny_cnn"], ["2", "tiny_cnn"], ["1", "vgg11"],
                    ["2", "vgg11"]], f"each model's rows together, in order: {rows}"
    assert "rows 2 (resnet18_2), 2 (tiny_cnn_2), 2 (vgg11_2)" in notes, f"footnotes name each row once: {notes}"
    single = render(collect_rows(root)[:2])
    assert single.splitlines()[0] == SEED_HEADER and "rows 2 (" not in single and "row 2 " in single, \
        f"one model: the seed's table as before: {single}"


def test_rows_chosen_on_the_test_images_are_marked_and_intervals_are_carried(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", done("a", 1, 1, acc1=85.9, selected_on="test", acc1_ci=[83.6, 87.9]))
    write_run(root, "b", done("b", 2, 2, acc1=83.3, selected_on="validation", acc1_ci=[80.9, 85.5],
                              vs_original={"diff": -2.6, "low": -4.1, "high": -1.2, "p": 0.0004},
                              finetune=[{"l2": 1.0, "ce": 0.0, "epochs": 2, "kept_input": True},
                                        {"l2": 0.0, "ce": 1.0, "epochs": 1, "kept_input": False}]))
    write_run(root, "c", done("c", 3, 2, acc1=80.0, acc1_ci="lies", vs_original={"diff": "x"}))  # older or damaged
    text = render(collect_rows(root))
    table, notes = text.split("\n\n")
    rows = {cells_of(line)[0]: cells_of(line) for line in table.splitlines()[2:] if line != "|"}
    assert rows["1"][6] == "85.90†" and rows["2"][6] == "83.30" and rows["3"][6] == "80.00", "only row 1 is marked"
    assert "fine-tune 1 kept its input" in rows["2"][-1], rows["2"][-1]
    assert "† chosen on the test images (row 1)" in notes, notes
    assert "row 1 83.6-87.9; row 2 80.9-85.5." in notes and "row 2 -2.60 (-4.10 to -1.20, p 0.0004)" in notes, notes
    records = {r["name"]: r for r in json.loads(render(collect_rows(root), "json"))}
    assert (records["a"]["acc1_low"], records["a"]["acc1_high"], records["a"]["selected_on"]) == (83.6, 87.9, "test")
    assert (records["b"]["vs_original"], records["b"]["vs_original_low"], records["b"]["vs_original_high"],
            records["b"]["vs_original_p"]) == (-2.6, -4.1, -1.2, 0.0004)
    assert records["c"]["acc1_low"] is None and records["c"]["vs_original"] is None, "a damaged field is left out"
    csv_rows = list(csv.DictReader(io.StringIO(render(collect_rows(root), "csv"))))
    assert csv_rows[0]["acc1_low"] == "83.6" and csv_rows[1]["vs_original_high"] == "-1.2"


def test_versus_prints_each_rows_paired_difference_from_the_run_named(tmp_path):
    from lrx.measure.accuracy import pack
    runs = tmp_path / "runs"
    a = [True] * 80 + [False] * 20                     # 80 of 100
    b = [True] * 70 + [False] * 10 + [True] * 5 + [False] * 15  # 75: 10 only a, 5 only b
    write_run(runs, "a", done("a", 2, 1, acc1=80.0, test_correct=pack(a)))
    write_run(runs, "b", done("b", 3, 1, acc1=75.0, test_correct=pack(b)))
    write_run(runs, "c", done("c", 4, 1, acc1=50.0, test_correct=pack([True] * 10)))  # other images: left out
    result = CliRunner().invoke(app, ["table", str(runs), "--versus", "a"])
    assert result.exit_code == 0, result.output
    note = [line for line in result.output.splitlines() if "minus row 2's (a)" in line]
    assert len(note) == 1 and "row 3 -5.00 (" in note[0] and "p 0.3" in note[0], result.output
    assert "row 4" not in note[0], "a row tested on other images has no paired figure"
    missing = CliRunner().invoke(app, ["table", str(runs), "--versus", "zz"])
    assert missing.exit_code == 2 and "'zz'" in missing.output and "a, b, c" in missing.output, missing.output
    csv = CliRunner().invoke(app, ["table", str(runs), "--versus", "a", "--format", "csv"])
    assert csv.exit_code == 2 and "--versus" in csv.output, csv.output
    write_run(runs, "d", done("d", 5, 1, acc1=50.0))
    bare = CliRunner().invoke(app, ["table", str(runs), "--versus", "d"])
    assert bare.exit_code == 2 and "per-image correctness" in bare.output, bare.output
