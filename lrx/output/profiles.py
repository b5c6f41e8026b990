"""What ``lrx profile`` prints: whole-model times per layout, per-layer figures and where the time goes.

Everything here reads a run's metrics (:func:`lrx.measure.profiling.profile_pair`'s fields, as ``metrics.json``
holds them) and measures nothing. A figure whose repeats spread too widely carries the table's
:data:`lrx.output.table.NOISY` mark.
"""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from lrx.nn.surgery import shown_name
from lrx.output.table import NOISY

__all__ = ["SHOWN_SHARE", "whole_model_table", "layers_table", "breakdown_table", "profile_tables", "print_profile", "busy_warning"]

# Modules below this share of the forward in both models are summed into one line of the breakdown.
SHOWN_SHARE = 0.01


def _ms(value: Any, noisy: Any = False) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value:.2f}{NOISY if noisy is True else ''}"


def _ratio(value: Any) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _share(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def whole_model_table(latency: dict) -> Table:
    """The original in each plain layout and the expansion in each of its layouts: medians, quartiles, and the
    expansion's (fastest layout's) speedup against each original layout."""
    spread = latency.get("spread") or {}
    layouts = spread.get("layouts") or {}
    least = latency.get("min_time_s")
    at_least = f" and {least:g} s of each model" if isinstance(least, (int, float)) and least > 0 else ""
    table = Table(title=f"whole model (ms, batch {latency.get('batch', '?')}, at least {latency.get('repeats', '?')} "
                        f"interleaved repeats{at_least} a round; median of the rounds' medians; {NOISY} = noisy)")
    for column in ("model", "median", "p25-p75", "expansion's speedup"):
        table.add_column(column, justify="left" if column == "model" else "right")
    expanded_ms = latency.get("expanded_ms")
    for name, stats in layouts.items():
        median = stats.get("median_ms")
        mark = " (fastest: the reference)" if name == latency.get("original_layout") else ""
        speedup = median / expanded_ms if isinstance(median, (int, float)) and expanded_ms else None
        table.add_row(f"original, {name}{mark}", _ms(median, stats.get("noisy")),
                      f"{_ms(stats.get('p25_ms'))}-{_ms(stats.get('p75_ms'))}", _ratio(speedup))
    own = spread.get("expanded_layouts") or ({"": spread.get("expanded") or {}} if expanded_ms is not None else {})
    for name, stats in own.items():  # older profiles: the expansion in one layout, unnamed
        mark = " (fastest)" if name and name == latency.get("expanded_layout") else ""
        table.add_row(f"expansion{', ' + name if name else ''}{mark}", _ms(stats.get("median_ms"), stats.get("noisy")),
                      f"{_ms(stats.get('p25_ms'))}-{_ms(stats.get('p75_ms'))}", "")
    rounds = latency.get("round_speedups")
    if isinstance(rounds, list) and len(rounds) > 1:
        table.caption = (f"{len(rounds)} rounds on fresh copies, speedup per round: "
                         + ", ".join(_ratio(r) for r in rounds)
                         + ("; they disagree by more than 10%: re-time on a quiet machine" if latency.get("rounds_disagree") else ""))
    return table


def layers_table(layers: list[dict]) -> Table:
    """Each replaced layer alone: times, speedup, MAC ratio and how much of it is realised."""
    table = Table(title=f"replaced layers alone (ms; {NOISY} = noisy)")
    for column in ("layer", "input", "original", "expansion", "speedup", "MAC ratio", "realised"):
        table.add_column(column, justify="left" if column in ("layer", "input") else "right")
    for entry in layers:
        noisy = entry.get("noisy")
        table.add_row(shown_name(str(entry.get("layer"))), "x".join(str(s) for s in entry.get("input_shape") or []),
                      _ms(entry.get("original_ms")), _ms(entry.get("expanded_ms")),
                      _ratio(entry.get("speedup")) + (NOISY if noisy is True else ""), _ratio(entry.get("mac_ratio")),
                      _share(entry.get("realised")))
    return table


def breakdown_table(modules: dict) -> Table:
    """Per-module medians of each model, in forward order; small modules summed, the replaced layers' share last."""
    names = list(modules)
    table = Table(title="where the time goes (ms and share of the forward, hooks on every module)")
    table.add_column("module")
    table.add_column("type")
    for name in names:
        table.add_column(name, justify="right")
    per_model = {name: {m["name"]: m for m in modules[name].get("modules", [])} for name in names}
    order = list(dict.fromkeys(unit for name in names for unit in per_model[name]))
    small = {name: 0.0 for name in names}
    hidden = 0
    for unit in order:
        entries = [per_model[name].get(unit) for name in names]
        shares = [e.get("share") or 0.0 for e in entries if e]
        if max(shares, default=0.0) < SHOWN_SHARE:
            hidden += 1
            for name, e in zip(names, entries):
                small[name] += (e or {}).get("ms") or 0.0
            continue
        kind = " -> ".join(dict.fromkeys(e["type"] for e in entries if e))  # "Conv2d -> LowRankExpConvV2"
        table.add_row(shown_name(unit), kind, *[f"{_ms(e.get('ms'))} ({_share(e.get('share'))})" if e else "-" for e in entries])
    if hidden:
        table.add_row(f"{hidden} smaller modules", "", *[_ms(small[name]) for name in names])
    table.add_row("outside any module", "", *[_ms(modules[name].get("outside_ms")) for name in names])
    table.add_row("whole forward", "", *[_ms(modules[name].get("total_ms")) for name in names])
    if any(modules[name].get("replaced_ms") is not None for name in names):
        table.add_row("replaced layers", "", *[f"{_ms(modules[name].get('replaced_ms'))} "
                                               f"({_share(modules[name].get('replaced_share'))})" for name in names])
    return table


def profile_tables(metrics: dict) -> list[Table]:
    """The tables :func:`print_profile` prints, for whatever of them ``metrics`` holds."""
    latency = metrics.get("latency") if isinstance(metrics.get("latency"), dict) else {}
    tables = []
    if latency.get("spread"):
        tables.append(whole_model_table(latency))
    if latency.get("layers"):
        tables.append(layers_table(latency["layers"]))
    if latency.get("modules"):
        tables.append(breakdown_table(latency["modules"]))
    return tables


def print_profile(metrics: dict, console: Console | None = None) -> None:
    """Print :func:`profile_tables` (what ``lrx profile`` shows after its one-line summary)."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: do not wrap the columns at 80
            console = Console(width=140)
    for table in profile_tables(metrics):
        console.print(table)
    warning = busy_warning(metrics)
    if warning:
        console.print(warning, markup=False)


def busy_warning(metrics: dict) -> str | None:
    """One line when the profile was timed on a busy machine (its times, breakdown included, are suspect)."""
    machine = (metrics.get("latency") or {}).get("machine") or {}
    if not machine.get("busy"):
        return None
    return ("warning: timed on a busy machine (" + "; ".join(machine.get("reasons", [])) + "): these times and the "
            "breakdown may be far off; profile again on a quiet machine (lrx profile CONFIG --force)")
