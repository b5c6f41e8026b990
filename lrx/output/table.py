"""The seed's results table, regenerated from the run directories under ``runs/``.

:func:`collect_rows` reads every ``runs/<name>/`` one level down (``metrics.json``, and
``config.yaml`` for what a run not yet measured was meant to be); :func:`render` prints the rows as
the seed's markdown table, or as csv / json records for plotting elsewhere.

Notation (the seed's): layers "2,3,4,5", #bases "8,8,6,4", decomped "Y" or "-", fine-tune
schedules "1.0x20" (loss weight x epochs, stages joined by "+"), "0.0" (that loss not used),
"-" (no fine-tuning at all); "-" for anything not measured. Time columns are medians of interleaved
repeats (lrx.measure.timing); a noisy one ends in "~", and :func:`footnotes` under the table say what the
marks, the input size (and batch) the columns were measured at, mixed batch or input sizes, older single-run
times and the speedups' references mean. An acc@1 whose kept
epochs were chosen on the test images (``selected_on: test`` in metrics.json) ends in "†"; its 95% interval
and an expansion's paired difference from the original are footnotes, and fields of csv / json.

This module is long because those footnotes read the same cells the rows print; split reading runs
(``collect_rows``) from printing them if it grows further.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import yaml

from lrx.base.files import load_json, read_text_limited
from lrx.base.errors import UserError
from lrx.base.yamlread import finite_float
from lrx.measure.accuracy import paired_difference, unpack
from lrx.pipeline.rundir import RunDir, metrics_problem
from lrx.measure.timing import NOISY_MIN_REPEATS, NOISY_SPREAD
from lrx.output.seeds import SEED_FIELDS, acc1_text, merge_seeds, seed_fields, seed_notes, seed_sets

__all__ = ["COLUMNS", "HEADER", "RULE", "NO_METRICS", "UNREADABLE", "collect_rows", "sort_rows", "model_of",
           "models_of", "NOISY", "ON_TEST", "cells", "record", "RECORD_FIELDS", "row_ids", "footnotes", "render"]

COLUMNS = ["No.", "layers", "#bases", "decomped", "L2 finetune", "CE finetune", "acc@1(%)", "macs(M)",
           "params(M)", "CPU time(ms)", "CUDA time(ms)", "Remark"]
HEADER = "|" + "|".join(COLUMNS) + "|"
RULE = "|" + "|".join("---" for _ in COLUMNS) + "|"

# libyaml's safe loader when installed: it refuses a deeply nested file at once, where the pure-Python
# one takes seconds to run into Python's recursion limit.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# States of a row that is not a finished run (anything but status "done").
NO_METRICS = "not run"
UNREADABLE = "unreadable"


# ---------------------------------------------------------------- reading runs


def collect_rows(runs_dir: str | Path) -> list[dict]:
    """One row per sub-directory of ``runs_dir`` holding a ``metrics.json`` or a ``config.yaml``.

    Only one level down is read (``runs/quick/exp01`` is a row of ``collect_rows("runs/quick")``).
    A row is the run's ``config.yaml`` mapping overlaid with its ``metrics.json`` (see docs/design.md),
    plus:

    - ``name``: metrics' name, else the config's, else the folder name; ``dir``: the folder;
    - ``status``: metrics' status ("done", "running", "failed"), ``"not run"`` without metrics.json,
      ``"unreadable"`` when metrics.json (or, without one, config.yaml) cannot be read, is too large,
      too deeply nested or not a JSON object; ``error``: why, or None;
    - ``history``: the fine-tune stages that made this model: metrics.json's ``finetune`` (which
      lrx.pipeline.runner writes with the parent's stages first); for a run not yet measured, the parent
      run's ``history`` followed by the stages in its config.yaml;
    - ``decompose`` taken from the parent run when the run has none of its own.

    Never raises for a broken run; raises :class:`UserError` only when ``runs_dir`` is not a folder.
    Rows come back ordered as the table prints them (see :func:`sort_rows`).
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise UserError(f"{str(root)!r} is not a folder of runs (e.g. runs/)")
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError as err:
        raise UserError(f"cannot list {root} ({err.strerror or err})") from None
    rows = []
    for folder in folders:
        row = _read_run(folder)
        if row is not None:
            rows.append(row)
    _inherit(rows)
    return sort_rows(rows)


def _read_run(folder: Path) -> dict | None:
    """The row of one run folder (None when it holds neither file); never raises for a damaged file.

    A file that cannot be read, is larger than :data:`lrx.base.files.READ_LIMIT` (refused unread),
    nests too deeply or holds the wrong type makes the row "unreadable", with the reason as its error.
    """
    metrics_path, config_path = folder / "metrics.json", folder / "config.yaml"
    if not _present(metrics_path) and not _present(config_path):
        return None
    row: dict[str, Any] = {}
    config_error = None
    if _present(config_path):
        try:
            loaded = yaml.load(read_text_limited(config_path), Loader=_YAML_LOADER)
        except FileNotFoundError:
            loaded = None
        except UserError as err:
            loaded, config_error = None, f"config.yaml: {err.message}"
        except (yaml.YAMLError, ValueError) as err:  # ValueError: e.g. an integer too long to convert
            loaded, config_error = None, f"config.yaml: not valid YAML ({_one_line(err, 120)})"
        except RecursionError:
            loaded, config_error = None, "config.yaml: nested too deeply to read"
        if isinstance(loaded, dict):
            row.update(loaded)
        elif loaded is not None:
            config_error = f"config.yaml holds {_kind(loaded)}, not a mapping"
    status, error = NO_METRICS, "no metrics.json"
    metrics_keys: set = set()
    metrics: Any = None
    if _present(metrics_path):
        status = UNREADABLE
        try:
            metrics = load_json(metrics_path)
        except FileNotFoundError:
            status = NO_METRICS  # removed while we looked
        except UserError as err:
            error = f"metrics.json: {err.message}"
        else:
            problem = metrics_problem(metrics) if isinstance(metrics, dict) else None
            if not isinstance(metrics, dict):
                error = f"metrics.json holds {_kind(metrics)}, not an object"
            elif problem:  # the runner's own check: what it refuses, the table shows so
                error = f"metrics.json: damaged: {problem}"
            else:
                row.update(metrics)
                metrics_keys = set(metrics)
                status, error = str(_scalar(metrics.get("status")) or "done"), metrics.get("error")
    if status == NO_METRICS and config_error:
        status, error = UNREADABLE, config_error
    for key in ("name", "no", "group", "remark", "parent"):  # shown or compared: plain values only
        if key in row:
            row[key] = _scalar(row[key])
    if status == "running" and not RunDir(folder.parent, folder.name).in_use():
        status, error = "interrupted", "marked running, but no process holds its lock: stopped before it finished"
    row["name"] = str(row.get("name") or folder.name)
    row["dir"] = str(folder)
    row["status"] = status
    row["error"] = _one_line(_scalar(error)) if status != "done" and error is not None else None
    if not isinstance(row.get("finetune"), list):
        row["finetune"] = []
    row["finetune_from"] = "metrics.json" if "finetune" in metrics_keys else "config.yaml"
    if not isinstance(row.get("decompose"), dict):
        row["decompose"] = None
    return row


def _present(path: Path) -> bool:
    """Whether anything is at ``path`` (a dangling symlink or a folder too: reading it says what is wrong)."""
    try:
        return path.exists() or path.is_symlink()
    except OSError:
        return True


def _scalar(value: Any) -> Any:
    """``value`` when it is a string or a finite-size number (or None); None for containers and other types.

    YAML and JSON can put anything in a field the table prints; a nested or aliased structure printed
    whole could be enormous, and dates or sets would break the json output.
    """
    if value is None or isinstance(value, (str, bool, float)):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**18 else None
    return None


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _one_line(value: Any, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _inherit(rows: list[dict]) -> None:
    """Fill ``history`` and a missing ``decompose`` from each run's ``parent`` chain.

    ``metrics.json``'s ``finetune`` already lists every stage that made the model, the parent's
    included (lrx.pipeline.runner writes it so), and is taken as it is. A run known only from its
    ``config.yaml`` lists its own stages there; the parent's history goes before them.
    """
    by_name = {row["name"]: row for row in rows}

    def history(row: dict, seen: tuple) -> list[dict]:
        if "history" in row:
            return row["history"]
        own = [s for s in row["finetune"] if isinstance(s, dict)]
        parent = by_name.get(row.get("parent")) if isinstance(row.get("parent"), str) else None
        result = own
        if parent is not None and parent["name"] not in seen:
            before = history(parent, seen + (row["name"],))
            if row["decompose"] is None:
                row["decompose"] = parent["decompose"]
            if row["finetune_from"] == "config.yaml":
                result = before + own
        row["history"] = result
        return result

    for row in rows:
        history(row, ())


def sort_rows(rows: list[dict]) -> list[dict]:
    """Rows by ``no`` (runs without a number last), then by name; when the rows hold more than one model
    (:func:`models_of`), each model's rows together first, models by name."""
    several = len(models_of(rows)) > 1

    def key(row):
        no = row.get("no")
        numbered = isinstance(no, (int, float)) and not isinstance(no, bool)
        return (model_of(row) or "~" if several else "", not numbered, no if numbered else 0, str(row.get("name", "")))

    return sorted(rows, key=key)


def model_of(row: dict) -> str | None:
    """The model a row's run uses (``model.name`` of its config.yaml), or None when unknown."""
    model = row.get("model")
    name = _scalar(model.get("name")) if isinstance(model, dict) else None
    return name if isinstance(name, str) and name else None


def models_of(rows: list[dict]) -> list[str]:
    """The models the rows use, by name (unknown ones left out)."""
    return sorted({name for name in map(model_of, rows) if name is not None})


# ---------------------------------------------------------------- cells

# Appended to a time (or speedup) whose repeats spread too widely (lrx.measure.timing.NOISY_SPREAD); a footnote says so.
NOISY = "~"


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _time(row: dict, column: str, digits: int) -> str:
    """A time column's cell: ``column + "_ms"`` formatted, with :data:`NOISY` when its stats say noisy."""
    text = _fmt(row.get(f"{column}_ms"), digits)
    if text != "-" and _dict(row.get(column)).get("noisy") is True:
        text += NOISY
    return text


def _fmt(value: Any, digits: int, scale: float = 1.0) -> str:
    number = finite_float(value)
    return "-" if number is None else f"{number / scale:.{digits}f}"


def _bases(dec: dict) -> Any:
    """The #bases of a decompose record, a Tucker-2 layer's rank as ``t<rank>`` (a plan of scheme auto records each
    layer's scheme in ``schemes``; a row of scheme tucker2 is Tucker-2 throughout)."""
    bases, schemes = dec.get("bases"), dec.get("schemes")
    if not isinstance(bases, list):
        return bases
    if dec.get("scheme") == "tucker2":
        schemes = ["tucker2"] * len(bases)
    if not isinstance(schemes, list) or len(schemes) != len(bases):
        return bases
    return [f"t{b}" if own == "tucker2" and _scalar(b) is not None else b for b, own in zip(bases, schemes)]


def _join(values: Any) -> str:
    if isinstance(values, (list, tuple)) and values:
        plain = [_scalar(v) for v in values]
        return ",".join(str(v) for v in plain) if None not in plain else "?"
    if isinstance(values, (str, int)) and not isinstance(values, bool):
        return str(values)
    return "-"


def _schedule(stages: list[dict], loss: str) -> str:
    """ "1.0x20" per stage where ``loss`` has weight > 0, joined by "+"; "0.0" when none has."""
    parts = []
    for stage in stages:
        weight, epochs = finite_float(stage.get(loss)), _scalar(stage.get("epochs"))
        if weight is not None and weight > 0:
            parts.append(f"{weight:.1f}x{epochs if epochs is not None else '?'}")
    return "+".join(parts) if parts else "0.0"


def _measured(row: dict) -> list[str]:
    """What the run measured, in the seed's words: acc a -> b, L2 norm x -> y, speedup."""
    parts = []
    before, after = finite_float(row.get("acc1_before")), finite_float(row.get("acc1"))
    if before is not None and after is not None and (row.get("finetune") or before != after):
        parts.append(f"acc {before:.2f} -> {after:.2f}")
    l2_before, l2_after = finite_float(row.get("l2_before")), finite_float(row.get("l2_after"))
    if l2_before is not None and l2_after is not None:
        parts.append(f"L2 norm {l2_before:.0f} -> {l2_after:.0f}")
    elif l2_before is not None or l2_after is not None:
        parts.append(f"L2 norm {(l2_before if l2_before is not None else l2_after):.0f}")
    latency = _dict(row.get("latency"))
    speedup, mac_ratio = finite_float(latency.get("speedup")), finite_float(latency.get("mac_ratio"))
    if speedup is not None:
        text = f"speedup {speedup:.2f}x{NOISY if latency.get('noisy') is True else ''} measured"
        if mac_ratio is not None:
            text += f" / {mac_ratio:.2f}x by MACs"
        parts.append(text)
    target = finite_float(latency.get("target"))
    if speedup is not None and target is not None and latency.get("target_missed") is True:
        parts.append(f"latency target {target:g}x missed")
    elif speedup is None:
        plan = _dict(_dict(row.get("decompose")).get("plan"))
        planned, aimed = finite_float(plan.get("measured_speedup")), finite_float(_dict(plan.get("target")).get("latency"))
        if plan.get("target_met") is False and planned is not None and aimed is not None:
            parts.append(f"latency target {aimed:g}x out of reach: planned {planned:.2f}x")
    return parts


def _stage_notes(row: dict) -> list[str]:
    """What the fine-tune columns do not show, per stage of the row's whole history (1-based): distillation
    ("kd 1.0x2 (T 4)": weight x epochs, temperature) and "fine-tune K kept its input"."""
    stages = [s for s in row.get("finetune") if isinstance(s, dict)] if isinstance(row.get("finetune"), list) else []
    notes = []
    for stage in stages:
        kd, epochs, t = finite_float(stage.get("kd")), _scalar(stage.get("epochs")), finite_float(stage.get("temperature"))
        if kd is not None and kd > 0:
            temperature = f" (T {t:g})" if t is not None else ""
            notes.append(f"kd {kd:.1f}x{epochs if epochs is not None else '?'}{temperature}")
    kept = [str(i) for i, stage in enumerate(stages, 1) if stage.get("kept_input") is True]
    if kept:
        notes.append(f"fine-tune {', '.join(kept)} kept {'its' if len(kept) == 1 else 'their'} input")
    return notes


def _remark(row: dict) -> str:
    remark = str(_scalar(row.get("remark")) or "").strip()
    measured = ", ".join(_measured(row) + _stage_notes(row))
    text = "; ".join(part for part in (remark, measured) if part)
    if row.get("status") != "done":
        state = str(row.get("status"))
        if row.get("error"):
            state += f": {row['error']}"
        text = f"[{state}] {text}".strip()
    return " ".join(text.split())  # one line: newlines would break the table


def cells(row: dict) -> dict[str, str]:
    """The row's table cells, keyed by column name, unescaped."""
    dec = row.get("decompose") if isinstance(row.get("decompose"), dict) else None
    stages = row.get("history", row.get("finetune")) or []
    if stages:
        l2, ce = _schedule(stages, "l2"), _schedule(stages, "ce")
    else:
        l2 = ce = "-"
    no = row.get("no")
    return {
        "No.": str(no) if no is not None else str(row.get("name", "")),
        "model": model_of(row) or "-",
        "layers": _join(dec.get("layers")) if dec else "-",
        "#bases": _join(_bases(dec)) if dec else "-",
        "decomped": "Y" if dec and dec.get("decomposed") else "-",
        "L2 finetune": l2,
        "CE finetune": ce,
        "acc@1(%)": _fmt(row.get("acc1"), 2) + acc1_text(row) + (ON_TEST if _on_test(row) and row.get("acc1") is not None else ""),
        "macs(M)": _fmt(row.get("macs"), 2, 1e6),
        "params(M)": _fmt(row.get("params"), 2, 1e6),
        "CPU time(ms)": _time(row, "cpu_time", 0),
        "CUDA time(ms)": _time(row, "cuda_time", 2),
        "Remark": _remark(row),
    }


# Appended to an acc@1 whose kept epochs were chosen on the test images it is measured on; a footnote says so.
ON_TEST = "†"


def _on_test(row: dict) -> bool:
    return row.get("selected_on") == "test"


def _interval(value: Any) -> tuple[float, float] | None:
    """A [low, high] pair of finite numbers from metrics.json, or None."""
    if isinstance(value, list) and len(value) == 2:
        low, high = finite_float(value[0]), finite_float(value[1])
        if low is not None and high is not None:
            return low, high
    return None


def record(row: dict, sets: dict | None = None) -> dict:
    """A flat record for csv / json: the notation columns as text, the measurements as numbers; ``sets``: the
    runs of rows run with several seeds (:func:`lrx.output.seeds.seed_sets`), for their spread."""
    c = cells(row)
    latency = _dict(row.get("latency"))
    ci, vs = _interval(row.get("acc1_ci")), _dict(row.get("vs_original"))
    return {
        "no": row.get("no"),
        "name": row.get("name"),
        "model": model_of(row),
        "group": row.get("group"),
        "status": row.get("status"),
        "layers": c["layers"],
        "bases": c["#bases"],
        "decomposed": c["decomped"] == "Y",
        "l2_finetune": c["L2 finetune"],
        "ce_finetune": c["CE finetune"],
        "acc1": finite_float(row.get("acc1")),
        "acc1_low": ci[0] if ci else None,
        "acc1_high": ci[1] if ci else None,
        "selected_on": row.get("selected_on") if row.get("selected_on") in ("validation", "test") else None,
        "vs_original": finite_float(vs.get("diff")),
        "vs_original_low": finite_float(vs.get("low")),
        "vs_original_high": finite_float(vs.get("high")),
        "vs_original_p": finite_float(vs.get("p")),
        "macs_m": _scaled(row.get("macs")),
        "params_m": _scaled(row.get("params")),
        "cpu_time_ms": finite_float(row.get("cpu_time_ms")),
        "cuda_time_ms": finite_float(row.get("cuda_time_ms")),
        "cpu_time_noisy": _flag(_dict(row.get("cpu_time")).get("noisy")),
        "cuda_time_noisy": _flag(_dict(row.get("cuda_time")).get("noisy")),
        "timing_batch": _timing_batch(row),
        "timing_input_size": _size_text(_timing_size(row)),
        "latency_speedup": finite_float(latency.get("speedup")),
        "latency_noisy": _flag(latency.get("noisy")),
        "original_layout": _scalar(latency.get("original_layout")),
        "speedup_default": finite_float(latency.get("speedup_default")),
        "mac_ratio": finite_float(latency.get("mac_ratio")),
        "latency_target": finite_float(latency.get("target")),
        "latency_target_missed": _flag(latency.get("target_missed")),
        "remark": c["Remark"],
        **seed_fields(row, sets or {}),
    }


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


RECORD_FIELDS = ["no", "name", "model", "group", "status", "layers", "bases", "decomposed", "l2_finetune",
                 "ce_finetune", "acc1", "acc1_low", "acc1_high", "selected_on", "vs_original", "vs_original_low",
                 "vs_original_high", "vs_original_p", "macs_m", "params_m", "cpu_time_ms", "cuda_time_ms", "cpu_time_noisy",
                 "cuda_time_noisy", "timing_batch", "timing_input_size", "latency_speedup", "latency_noisy", "original_layout",
                 "speedup_default", "mac_ratio", "latency_target", "latency_target_missed", "remark"]
RECORD_FIELDS += SEED_FIELDS  # a run's seed and, for a row run with several seeds, its spread (lrx.output.seeds)


def _scaled(value: Any) -> float | None:
    number = finite_float(value)
    return None if number is None else number / 1e6


# ---------------------------------------------------------------- footnotes


def _timing_batch(row: dict) -> int | None:
    """The batch the row's times were measured at (older metrics: the profile stage's setting), or None."""
    for source in (_dict(row.get("cpu_time")), _dict(row.get("latency")), _dict(_dict(row.get("stages")).get("profile"))):
        batch = _scalar(source.get("batch"))
        if isinstance(batch, int) and not isinstance(batch, bool):
            return batch
    return None


def _timing_size(row: dict) -> tuple[int, int, int] | None:
    """(C, H, W) of one image the row's MACs were counted and times measured at: the profile stage's record,
    else the resolved config's ``profile.input_size`` (metrics of an older lrx); None when neither says."""
    config = row.get("profile")  # config.yaml's profile section (metrics.json has none of that name)
    for source in (_dict(_dict(row.get("stages")).get("profile")), _dict(row.get("latency")), _dict(config)):
        size = source.get("input_size")
        if (isinstance(size, list) and len(size) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 10**6 for v in size)):
            return tuple(size)
    return None


def _size_text(size: tuple | None) -> str | None:
    return "x".join(map(str, size)) if size is not None else None


def _timed(row: dict) -> bool:
    return finite_float(row.get("cpu_time_ms")) is not None or finite_float(row.get("cuda_time_ms")) is not None


def _rows_text(label: str, rows: list[dict], ids: dict[int, str]) -> str:
    named = [ids[id(row)] for row in rows]
    return f"{label}{'s' if len(named) > 1 else ''} {', '.join(named)}"


def row_ids(rows: list[dict]) -> dict[int, str]:
    """How footnotes name each row (keyed by ``id(row)``): its "No." cell, with the run's name after it
    where two rows share a number (runs of several models in one folder)."""
    numbers = [cells(row)["No."] for row in rows]
    return {id(row): number if numbers.count(number) == 1 else f"{number} ({row.get('name')})"
            for row, number in zip(rows, numbers)}


def footnotes(rows: list[dict]) -> list[str]:
    """What a reader must know to trust the time columns and speedups, one line each (none when all is plain).

    - which figures are marked noisy (:data:`NOISY`) and the rule behind the mark;
    - a time column that mixes batch sizes, naming the rows of each batch;
    - the input size of the macs(M) and time columns, or the rows of each size when they mix sizes;
    - the device the times were taken on (with torch's version), or the rows of each when they differ;
    - rows whose time comes from one torch.profiler run (metrics written before lrx timed repeats);
    - what each speedup is measured against: the original's fastest plain layout, with PyTorch's default beside it;
    - rows whose kept epochs were chosen on the test images (:data:`ON_TEST`), each acc@1's 95% interval and each
      expansion's paired difference from the original.
    """
    notes = []
    ids = row_ids(rows)
    noisy = [row for row in rows if _timed(row) and (
        any(_dict(row.get(c)).get("noisy") is True for c in ("cpu_time", "cuda_time"))
        or _dict(row.get("latency")).get("noisy") is True)]
    if noisy:
        notes.append(f"{NOISY} noisy ({_rows_text('row', noisy, ids)}): the middle half of the repeats spans more than "
                     f"{NOISY_SPREAD:.0%} of the median, or fewer than {NOISY_MIN_REPEATS} repeats; the spread is in metrics.json "
                     f"(cpu_time, cuda_time, latency.spread). Re-time on a quiet machine: lrx profile CONFIG --force.")
    batches: dict[int | None, list[dict]] = {}
    for row in rows:
        if _timed(row):
            batches.setdefault(_timing_batch(row), []).append(row)
    if len(batches) > 1:
        parts = [f"batch {batch if batch is not None else 'unknown'} ({_rows_text('row', group, ids)})"
                 for batch, group in sorted(batches.items(), key=lambda item: (item[0] is None, item[0] or 0))]
        notes.append(f"The time columns mix batch sizes: {'; '.join(parts)}; compare times only within one batch.")
    notes += _size_notes(rows, ids, batches)
    notes += _device_notes(rows, ids)
    single = [row for row in rows if _timed(row) and not row.get("cpu_time") and not row.get("cuda_time")]
    if single:
        notes.append(f"{_rows_text('Row', single, ids)}: time from one torch.profiler run (profiled by an older lrx), "
                     f"not a median; lrx profile CONFIG --force re-times it.")
    against = []
    for row in rows:
        latency = _dict(row.get("latency"))
        layout, speedup = _scalar(latency.get("original_layout")), finite_float(latency.get("speedup"))
        if speedup is not None and isinstance(layout, str):
            default = finite_float(latency.get("speedup_default"))
            beside = f", {default:.2f}x against PyTorch's default" if default is not None and layout != "default" else ""
            own = _scalar(latency.get("expanded_layout"))
            runs = f" (expansion {_LAYOUT_NAMES.get(own, own)})" if isinstance(own, str) else ""
            rounds = latency.get("round_speedups")
            spread = (f", rounds {min(rounds):.2f}-{max(rounds):.2f}x" if isinstance(rounds, list) and len(rounds) > 1
                      and all(finite_float(r) is not None for r in rounds) else "")
            against.append(f"row {ids[id(row)]} {speedup:.2f}x against {layout}{runs}{beside}{spread}")
    if against:
        notes.append("Measured speedups are each model in its fastest layout on the profile device, the original in a "
                     "plain one: " + "; ".join(against) + ".")
    return notes + _accuracy_notes(rows, ids) + seed_notes(rows, ids)


# How a footnote names the layout an expansion ran fastest in.
_LAYOUT_NAMES = {"lrx": "on lrx's inference paths", "default": "in PyTorch's default layout"}


def _size_notes(rows: list[dict], ids: dict[int, str], batches: dict) -> list[str]:
    """The input size behind the macs(M) and time columns: one line when every timed row was measured at the
    same known size (with the batch, when that is one too), else the rows of each size, so that rows timed at
    224 and at 64 pixels are never compared unawares."""
    sizes: dict[tuple | None, list[dict]] = {}
    for row in rows:
        if _timed(row):
            sizes.setdefault(_timing_size(row), []).append(row)
    if len(sizes) == 1 and None not in sizes:
        (size,) = sizes
        batch = next(iter(batches)) if len(batches) == 1 and None not in batches else None
        of_batch = f", batch {batch}" if batch is not None else ""
        return [f"Measured at input {_size_text(size)}{of_batch}: macs(M) counts one {_size_text(size)} image, the "
                f"time columns time one forward of the batch."]
    if len(sizes) > 1:
        parts = [f"{_size_text(size) or 'unknown'} ({_rows_text('row', group, ids)})"
                 for size, group in sorted(sizes.items(), key=lambda item: (item[0] is None, item[0] or ()))]
        return [f"The macs(M) and time columns mix input sizes: {'; '.join(parts)}; compare them only within one "
                "size (lrx profile CONFIG --input-size C,H,W profiles a finished run at another size, into a file "
                "of its own)."]
    return []


def _device_notes(rows: list[dict], ids: dict[int, str]) -> list[str]:
    """The device (and torch) behind the time columns, from each timed row's profile record: one line when all
    name the same one, else the rows of each (rows profiled by an lrx that did not record it are left out)."""
    devices: dict[str, list[dict]] = {}
    for row in rows:
        profile = _dict(_dict(row.get("stages")).get("profile"))
        name, version = _scalar(profile.get("device_name")), _scalar(profile.get("torch"))
        if _timed(row) and isinstance(name, str):
            devices.setdefault(f"{name}, torch {version}" if isinstance(version, str) else name, []).append(row)
    if len(devices) == 1:
        return [f"Timed on {next(iter(devices))}."]
    if devices:
        return ["The time columns come from several devices: "
                + "; ".join(f"{name} ({_rows_text('row', group, ids)})" for name, group in devices.items())
                + "; compare times only within one device."]
    return []


def _accuracy_notes(rows: list[dict], ids: dict[int, str]) -> list[str]:
    """The footnotes on acc@1: chosen on the test images, 95% intervals, differences from the original."""
    notes = []
    on_test = [row for row in rows if _on_test(row) and row.get("acc1") is not None]
    if on_test:
        notes.append(f"{ON_TEST} chosen on the test images ({_rows_text('row', on_test, ids)}): a kept epoch behind the "
                     "figure was chosen on the images acc@1 is measured on, so it is optimistic by that choice; "
                     "select_on: validation chooses on images held out of training.")
    intervals = [f"row {ids[id(row)]} {ci[0]:.1f}-{ci[1]:.1f}" for row in rows
                 if (ci := _interval(row.get("acc1_ci"))) is not None]
    if intervals:
        notes.append("acc@1 95% interval (Wilson, over the test images): " + "; ".join(intervals) + ".")
    diffs = []
    for row in rows:
        vs = _dict(row.get("vs_original"))
        diff, low, high, p = (finite_float(vs.get(key)) for key in ("diff", "low", "high", "p"))
        if None not in (diff, low, high, p):
            diffs.append(f"row {ids[id(row)]} {diff:+.2f} ({low:+.2f} to {high:+.2f}, p {p:.2g})")
    if diffs:
        notes.append("acc@1 minus the original's on the same test images, points (exact 95% interval, McNemar's "
                     "exact p): " + "; ".join(diffs) + ".")
    return notes


# ---------------------------------------------------------------- rendering


# Terminal control a hostile metrics.json or config could put into a printed value: CSI sequences (ESC [ ...,
# colours, cursor moves), OSC, DCS, SOS, PM and APC strings up to BEL or ST (ESC ] 8 ;; URL BEL is a
# hyperlink, ESC ] 0 ; ... a window title), any other ESC sequence, and every other control character.
_CONTROL = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
                      r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|$)"
                      r"|\x1b[ -/]*[0-~]?|[\x00-\x1f\x7f-\x9f]", re.S)


def _plain(value: Any) -> Any:
    """A printed string without terminal control sequences (:data:`_CONTROL`); other values as they are."""
    return _CONTROL.sub("", value) if isinstance(value, str) else value


def versus_note(rows: list[dict], name: str) -> str:
    """The footnote of ``lrx table --versus NAME``: each other row's acc@1 minus run ``name``'s, paired on the same
    test images (exact 95% interval and McNemar's exact p, as the differences from the original). Rows without
    per-image correctness over the same images are left out; a ``name`` no row has, or whose run holds no
    per-image correctness, is refused naming the runs there are."""
    ids = row_ids(rows)
    named = [row for row in rows if row.get("name") == name]
    if not named:
        there = ", ".join(sorted(str(row.get("name")) for row in rows)) or "none"
        raise UserError(f"--versus {name!r}: no run of that name; runs: {there}", key="--versus")
    try:
        reference = unpack(named[0].get("test_correct"))
    except ValueError:
        raise UserError(f"--versus {name!r}: its metrics.json holds no per-image correctness on the test images "
                        "(a run that is not finished, or made before lrx kept it)", key="--versus") from None
    diffs = []
    for row in rows:
        try:
            bits = unpack(row.get("test_correct")) if row is not named[0] else None
        except ValueError:
            continue
        if bits is not None and len(bits) == len(reference):
            d = paired_difference(reference, bits)
            diffs.append(f"row {ids[id(row)]} {100 * d.diff:+.2f} ({100 * d.low:+.2f} to {100 * d.high:+.2f}, "
                         f"p {d.p:.2g})")
    return (f"acc@1 minus row {ids[id(named[0])]}'s ({name}) on the same test images, points (exact 95% interval, "
            f"McNemar's exact p): {'; '.join(diffs) if diffs else 'no other row was tested on the same images'}.")


def render(rows: list[dict], fmt: str = "markdown", versus: str | None = None) -> str:
    """The table as text, ending with a newline.

    ``markdown``: the seed's header, a ``|---|`` rule, one line per row and a blank ``|`` line
    wherever ``group`` changes between consecutive rows; a ``|`` inside a cell is escaped as ``\\|``;
    then, after an empty line, the :func:`footnotes` as a list (nothing when there are none).
    ``csv`` / ``json``: one record per row (see :func:`record`), numbers unformatted. Terminal control
    sequences in any value (colours, OSC titles and hyperlinks) are left out of every format. ``versus``: a run's
    name; the markdown table then ends with :func:`versus_note`, every other row's paired difference from it.
    """
    if versus is not None and fmt != "markdown":
        raise UserError(f"--versus is a footnote of the markdown table; --format {fmt} has none", key="--versus")
    if fmt == "markdown":
        extra = [versus_note(rows, versus)] if versus is not None else []
        rows = merge_seeds(rows)  # a row run with several seeds once: their mean and spread
        columns = COLUMNS if len(models_of(rows)) <= 1 else COLUMNS[:1] + ["model"] + COLUMNS[1:]
        lines = ["|" + "|".join(columns) + "|", "|" + "|".join("---" for _ in columns) + "|"]
        previous = object()
        for i, row in enumerate(rows):
            group = (row.get("group"), model_of(row))
            if i > 0 and group != previous:
                lines.append("|")
            previous = group
            c = cells(row)
            lines.append("|" + "|".join(_plain(c[col]).replace("|", "\\|") for col in columns) + "|")
        notes = footnotes(rows) + extra
        if notes:
            lines += [""] + [f"- {_plain(note)}" for note in notes]
        return "\n".join(lines) + "\n"
    sets = seed_sets(rows)
    records = [{key: _plain(value) for key, value in record(row, sets).items()} for row in rows]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=RECORD_FIELDS, lineterminator="\n")
        writer.writeheader()
        for one in records:
            writer.writerow(one)
        return out.getvalue()
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    raise UserError(f"unknown table format {fmt!r}; allowed: markdown, csv, json", key="--format")
