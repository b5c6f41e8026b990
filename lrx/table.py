"""The seed's results table, regenerated from the run directories under ``runs/``.

:func:`collect_rows` reads every ``runs/<name>/`` one level down (``metrics.json``, and
``config.yaml`` for what a run not yet measured was meant to be); :func:`render` prints the rows as
the seed's markdown table, or as csv / json records for plotting elsewhere.

Notation (the seed's): layers "2,3,4,5", #bases "8,8,6,4", decomped "Y" or "-", fine-tune
schedules "1.0x20" (loss weight x epochs, stages joined by "+"), "0.0" (that loss not used),
"-" (no fine-tuning at all); "-" for anything not measured.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

COLUMNS = ["No.", "layers", "#bases", "decomped", "L2 finetune", "CE finetune", "acc@1(%)", "macs(M)",
           "params(M)", "CPU time(ms)", "CUDA time(ms)", "Remark"]
HEADER = "|" + "|".join(COLUMNS) + "|"
RULE = "|" + "|".join("---" for _ in COLUMNS) + "|"

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
      ``"unreadable"`` when metrics.json is not a JSON object; ``error``: why, or None;
    - ``history``: the fine-tune stages that made this model: metrics.json's ``finetune`` (which
      lrx.runs writes with the parent's stages first); for a run not yet measured, the parent
      run's ``history`` followed by the stages in its config.yaml;
    - ``decompose`` taken from the parent run when the run has none of its own.

    Never raises for a broken run; raises :class:`UserError` only when ``runs_dir`` is not a folder.
    Rows come back ordered as the table prints them (see :func:`sort_rows`).
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise UserError(f"{str(root)!r} is not a folder of runs (e.g. runs/)")
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        row = _read_run(folder)
        if row is not None:
            rows.append(row)
    _inherit(rows)
    return sort_rows(rows)


def _read_run(folder: Path) -> dict | None:
    metrics_path, config_path = folder / "metrics.json", folder / "config.yaml"
    if not metrics_path.exists() and not config_path.exists():
        return None
    row: dict[str, Any] = {}
    if config_path.exists():
        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                row.update(loaded)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            pass  # the config only supplies defaults; metrics.json or the folder name still name the row
    status, error = NO_METRICS, "no metrics.json"
    metrics_keys: set = set()
    if metrics_path.exists():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            metrics, error = None, f"metrics.json: {type(err).__name__}: {err}"
        if isinstance(metrics, dict):
            row.update(metrics)
            metrics_keys = set(metrics)
            status, error = str(metrics.get("status") or "done"), metrics.get("error")
        else:
            status = UNREADABLE
            if metrics is not None:
                error = f"metrics.json holds {type(metrics).__name__}, not an object"
    row["name"] = str(row.get("name") or folder.name)
    row["dir"] = str(folder)
    row["status"] = status
    row["error"] = error if status != "done" else None
    if not isinstance(row.get("finetune"), list):
        row["finetune"] = []
    row["finetune_from"] = "metrics.json" if "finetune" in metrics_keys else "config.yaml"
    if not isinstance(row.get("decompose"), dict):
        row["decompose"] = None
    return row


def _inherit(rows: list[dict]) -> None:
    """Fill ``history`` and a missing ``decompose`` from each run's ``parent`` chain.

    ``metrics.json``'s ``finetune`` already lists every stage that made the model, the parent's
    included (lrx.runs writes it so), and is taken as it is. A run known only from its
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
    """Rows by ``no`` (runs without a number last), then by name."""
    def key(row):
        no = row.get("no")
        numbered = isinstance(no, (int, float)) and not isinstance(no, bool)
        return (not numbered, no if numbered else 0, str(row.get("name", "")))

    return sorted(rows, key=key)


# ---------------------------------------------------------------- cells


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: Any, digits: int, scale: float = 1.0) -> str:
    number = _number(value)
    return "-" if number is None else f"{number / scale:.{digits}f}"


def _join(values: Any) -> str:
    if isinstance(values, (list, tuple)) and values:
        return ",".join(str(v) for v in values)
    if isinstance(values, (str, int)) and not isinstance(values, bool):
        return str(values)
    return "-"


def _schedule(stages: list[dict], loss: str) -> str:
    """ "1.0x20" per stage where ``loss`` has weight > 0, joined by "+"; "0.0" when none has."""
    parts = []
    for stage in stages:
        weight, epochs = _number(stage.get(loss)), stage.get("epochs")
        if weight is not None and weight > 0:
            parts.append(f"{weight:.1f}x{epochs if epochs is not None else '?'}")
    return "+".join(parts) if parts else "0.0"


def _measured(row: dict) -> list[str]:
    """What the run measured, in the seed's words: acc a -> b, L2 norm x -> y, speedup."""
    parts = []
    before, after = _number(row.get("acc1_before")), _number(row.get("acc1"))
    if before is not None and after is not None and (row.get("finetune") or before != after):
        parts.append(f"acc {before:.2f} -> {after:.2f}")
    l2_before, l2_after = _number(row.get("l2_before")), _number(row.get("l2_after"))
    if l2_before is not None and l2_after is not None:
        parts.append(f"L2 norm {l2_before:.0f} -> {l2_after:.0f}")
    elif l2_before is not None or l2_after is not None:
        parts.append(f"L2 norm {(l2_before if l2_before is not None else l2_after):.0f}")
    latency = row.get("latency") if isinstance(row.get("latency"), dict) else {}
    speedup, mac_ratio = _number(latency.get("speedup")), _number(latency.get("mac_ratio"))
    if speedup is not None:
        text = f"speedup {speedup:.2f}x measured"
        if mac_ratio is not None:
            text += f" / {mac_ratio:.2f}x by MACs"
        parts.append(text)
    return parts


def _remark(row: dict) -> str:
    remark = str(row.get("remark") or "").strip()
    measured = ", ".join(_measured(row))
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
        "layers": _join(dec.get("layers")) if dec else "-",
        "#bases": _join(dec.get("bases")) if dec else "-",
        "decomped": "Y" if dec and dec.get("decomposed") else "-",
        "L2 finetune": l2,
        "CE finetune": ce,
        "acc@1(%)": _fmt(row.get("acc1"), 2),
        "macs(M)": _fmt(row.get("macs"), 2, 1e6),
        "params(M)": _fmt(row.get("params"), 2, 1e6),
        "CPU time(ms)": _fmt(row.get("cpu_time_ms"), 0),
        "CUDA time(ms)": _fmt(row.get("cuda_time_ms"), 2),
        "Remark": _remark(row),
    }


def record(row: dict) -> dict:
    """A flat record for csv / json: the notation columns as text, the measurements as numbers."""
    c = cells(row)
    latency = row.get("latency") if isinstance(row.get("latency"), dict) else {}
    return {
        "no": row.get("no"),
        "name": row.get("name"),
        "group": row.get("group"),
        "status": row.get("status"),
        "layers": c["layers"],
        "bases": c["#bases"],
        "decomposed": c["decomped"] == "Y",
        "l2_finetune": c["L2 finetune"],
        "ce_finetune": c["CE finetune"],
        "acc1": _number(row.get("acc1")),
        "macs_m": _scaled(row.get("macs")),
        "params_m": _scaled(row.get("params")),
        "cpu_time_ms": _number(row.get("cpu_time_ms")),
        "cuda_time_ms": _number(row.get("cuda_time_ms")),
        "latency_speedup": _number(latency.get("speedup")),
        "mac_ratio": _number(latency.get("mac_ratio")),
        "remark": c["Remark"],
    }


RECORD_FIELDS = ["no", "name", "group", "status", "layers", "bases", "decomposed", "l2_finetune", "ce_finetune",
                 "acc1", "macs_m", "params_m", "cpu_time_ms", "cuda_time_ms", "latency_speedup", "mac_ratio", "remark"]


def _scaled(value: Any) -> float | None:
    number = _number(value)
    return None if number is None else number / 1e6


# ---------------------------------------------------------------- rendering


def render(rows: list[dict], fmt: str = "markdown") -> str:
    """The table as text, ending with a newline.

    ``markdown``: the seed's header, a ``|---|`` rule, one line per row and a blank ``|`` line
    wherever ``group`` changes between consecutive rows; a ``|`` inside a cell is escaped as ``\\|``.
    ``csv`` / ``json``: one record per row (see :func:`record`), numbers unformatted.
    """
    if fmt == "markdown":
        lines = [HEADER, RULE]
        previous = object()
        for i, row in enumerate(rows):
            group = row.get("group")
            if i > 0 and group != previous:
                lines.append("|")
            previous = group
            c = cells(row)
            lines.append("|" + "|".join(c[col].replace("|", "\\|") for col in COLUMNS) + "|")
        return "\n".join(lines) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=RECORD_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(record(row))
        return out.getvalue()
    if fmt == "json":
        return json.dumps([record(row) for row in rows], indent=2) + "\n"
    raise UserError(f"unknown table format {fmt!r}; allowed: markdown, csv, json", key="--format")
