"""`lrx decompose --dry-run`, `--show-bases` and `--compare-fits`: look at a decomposition before and after making it."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table
from torch import nn

from lrx.base.distributed import resolve_device
from lrx.base.errors import UserError
from lrx.config.settings import Config, profile_input_size, size_text
from lrx.data.datasets import load_data
from lrx.nn.layers import LowRankExpConvV1, LowRankExpConvV2
from lrx.nn.models import build_model, initial_model
from lrx.nn.surgery import shown_name
from lrx.output.plot import save_figure
from lrx.plan.latency import tucker_option
from lrx.pipeline.rundir import RunDir, load_model
from lrx.pipeline.runner import dependencies
from lrx.pipeline.stages import expand_model

__all__ = ["preview_decomposition", "print_preview", "latency_table", "save_bases_picture", "fit_comparison"]


def preview_decomposition(cfg: Config, runs_dir: str | Path = "runs", data_root: str | None = None,
                          involved: list[Config] | None = None) -> tuple[list[dict], str, dict | None, str | None]:
    """Per layer: rank, MACs before/after, retained energy, planned exactly as ``lrx run`` will plan them.

    The weights are the ones the run will decompose: the baseline run's final model when it is finished, else
    (a baseline that only evaluates ``model.checkpoint`` or ``model.weights``, ``train.epochs: 0``) those
    weights as the baseline will load them. With ``fit: data`` an auto plan ranks layers by output energy on
    the same calibration images as the run. Where the run's weights are not known yet (a baseline still to be
    trained) the plan is made on freshly initialised weights and ``caveat`` says so.

    Returns (rows, where the weights came from, the rank plan of ``bases: auto`` or None, caveat or None).
    Writes nothing but, for a latency target, the times it measured into the machine's cache
    (:func:`lrx.pipeline.rundir.latency_cache_path`).
    """
    model, source, caveat = _planning_weights(cfg, runs_dir, involved)
    settings = cfg.decompose
    batches = None
    if settings.fit == "data" and settings.bases == "auto":
        device = resolve_device(cfg.runtime.device)
        batches, _ = load_data(cfg, device, data_root)
        batches.set_epoch(0)  # the calibration images: the first of epoch 0's (seeded) order, as the run takes them
        model.to(device)
    # A latency target's measured times are kept in the machine's cache (the one file a dry run writes), so
    # that the run does not measure them again, and plans what the dry run showed.
    _, report = expand_model(model, cfg, batches=batches, write_cache=True, fit="weights")
    rows = [{"name": layer["name"], "rank": layer["rank"], "max_rank": layer["max_rank"],
             "macs_before": layer["macs_before"], "macs_after": layer["macs_after"],
             "retained_energy": 1.0 - layer["rel_error"] ** 2, "rel_error": layer["rel_error"],
             "scheme": layer.get("scheme")}
            for layer in report.layers]
    if report.plan is not None:
        source += f"; ranks by rule: {report.plan['rule']}"
    return rows, source, report.plan, caveat


def _planning_weights(cfg: Config, runs_dir: str | Path,
                      involved: list[Config] | None) -> tuple[nn.Module, str, str | None]:
    """(model, where its weights come from, a caveat when they are not the ones the run will decompose).
    ``involved``: the configs ``cfg`` builds on and ``cfg`` itself, as :func:`lrx.pipeline.runner.configs_to_run`
    loaded them (loaded here when None)."""
    source = cfg.baseline
    if source is not None and cfg.parent is None:
        try:
            path = RunDir(runs_dir, source).final_model_path()
            if path.exists():
                model, _, _ = load_model(path, cfg.model.name, cfg.model.num_classes)
                return model, f"the trained baseline {path}", None
        except UserError:
            pass
    builds_on = involved[:-1] if involved is not None else dependencies(cfg)
    start = next((dep for dep in builds_on if dep.name == cfg.baseline), None) if cfg.baseline else None
    start = start or cfg
    given = start.model.checkpoint or start.model.weights
    if given is not None and start.train.epochs == 0 and cfg.parent is None:
        return initial_model(start.model), f"the weights the baseline loads ({given})", None
    model = build_model(cfg.model.name, cfg.model.num_classes)
    why = (f"the baseline run {source!r} is not finished in {runs_dir}" if source is not None
           else "the config names no baseline run")
    return model, "freshly initialised weights", (f"this plan is on freshly initialised weights, not the run's: {why}, "
                                                   "so the run may choose other ranks")


def print_preview(cfg: Config, runs_dir: str | Path = "runs", data_root: str | None = None,
                  involved: list[Config] | None = None) -> None:
    """Print :func:`preview_decomposition` as a table (what ``lrx decompose --dry-run`` shows)."""
    rows, source, plan, caveat = preview_decomposition(cfg, runs_dir, data_root, involved)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not wrap the columns at 80
        console = Console(width=120)
    if caveat is not None:
        console.print(f"note: {caveat}", markup=False)
    settings = cfg.decompose
    if settings.scheme == "v1":
        form = f"{settings.basis} basis, {settings.method}{', decomposed' if settings.decomposed else ''}"
    elif settings.scheme == "channel":
        form = "1x1 convs and linear layers as C -> R -> N"
    elif settings.scheme == "auto":
        form = f"v2 (order {settings.order}) for larger kernels, channel for 1x1 convs and linear layers"
    else:
        form = f"order {settings.order}"
    written = "nothing written" if plan is None or "table" not in plan else "only the latency cache written"
    table = Table(title=f"{cfg.name}: scheme {settings.scheme}, {form} (dry run: {written})")
    for column in ("layer", "rank", "max", "MACs before (M)", "MACs after (M)", "ratio", "retained energy"):
        table.add_column(column, justify="right" if column != "layer" else "left")
    before = after = 0
    for row in rows:
        before, after = before + row["macs_before"], after + row["macs_after"]
        scheme = f" ({row['scheme']})" if settings.scheme == "auto" and row.get("scheme") else ""
        table.add_row(shown_name(row["name"]) + scheme, str(row["rank"]), str(row["max_rank"]), f"{row['macs_before'] / 1e6:.2f}",
                      f"{row['macs_after'] / 1e6:.2f}", f"{row['macs_before'] / max(row['macs_after'], 1):.2f}x",
                      f"{row['retained_energy']:.4f}")
    table.add_row("replaced layers", "", "", f"{before / 1e6:.2f}", f"{after / 1e6:.2f}", f"{before / max(after, 1):.2f}x", "")
    console.print(table)
    console.print(f"weights: {source}; MACs at input {size_text(profile_input_size(cfg))}")
    if plan is not None and "table" in plan:
        console.print(latency_table(plan))
        for i, step in enumerate(plan["rounds"]):
            console.print(f"round {i + 1}: ranks {dict(zip(step['names'], step['ranks']))}, predicted "
                          f"{step['predicted_speedup']:.2f}x, measured {step['measured_speedup']:.2f}x "
                          f"(against the original {step['original_layout']})")
        console.print(f"chosen: predicted {plan['predicted_speedup']:.2f}x, measured {plan['measured_speedup']:.2f}x "
                      f"for target {plan['target']['latency']:g}x on {plan['device']}, batch {plan['batch']} at "
                      f"{size_text(plan['input_size'])}")
        if plan.get("target_met") is False:
            best = plan.get("best_reachable")
            console.print(f"target {plan['target']['latency']:g}x missed: "
                          + (f"the measured layer times reach {best:.2f}x at best; this is the fastest expansion"
                             if best is not None else "the kept plan is the fastest measured"))


def latency_table(plan: dict) -> Table:
    """A latency plan's measured layer table: ms dense and per rank, the choice marked with '*'; a conv's Tucker-2
    options (scheme auto) as ``t<rank>``."""
    table = Table(title=f"layer times in the model (ms, batch {plan['batch']}, {plan['device']}; * = chosen; "
                        "t<rank> = Tucker-2)")
    table.add_column("layer")
    table.add_column("dense", justify="right")
    table.add_column("rank: ms", justify="left")
    for row in plan["table"]:
        ms = row["model_ms"]  # the table's times relative to dense, on the dense conv's time in the model
        mark = {k: "*" if row.get("choice") == k else "" for k in ms}
        options = [str(r) for r in row["ranks"]] + [tucker_option(r) for r in row.get("tucker_ranks", ())]
        ranks = "  ".join(f"{k}: {ms[k]:.2f}{mark[k]}" for k in options)
        table.add_row(shown_name(row["name"]) + (" (cached)" if row["cached"] else ""), f"{ms['dense']:.2f}{mark['dense']}", ranks)
    return table


def save_bases_picture(model_path: Path, cfg: Config, out: Path) -> None:
    """A grid of each replaced layer's basis filters (scheme 1) or rank-1 filter pairs (scheme 2), as in the paper."""
    import matplotlib  # local: heavy to import and only pictures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # local: as above; after use("Agg")

    model, names, _ = load_model(model_path, cfg.model.name, cfg.model.num_classes)
    modules = dict(model.named_modules())
    panels = []
    for name in names:
        layer = modules[name]
        if isinstance(layer, (LowRankExpConvV1, LowRankExpConvV2)):
            panels.append((name, layer.basis_filters().detach().float().cpu()))
    if not panels:
        raise UserError(f"{model_path} has no low-rank layers to show")
    width = max(min(len(f), 16) for _, f in panels)
    fig, axes = plt.subplots(len(panels), width, figsize=(width * 0.9, len(panels) * 1.1), squeeze=False)
    for row, (name, filters) in enumerate(panels):
        for col in range(width):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(filters):
                ax.imshow(filters[col].numpy(), cmap="gray")
        axes[row][0].set_title(name, fontsize=7, loc="left")
    fig.suptitle(f"{cfg.name}: basis filters (first {width} per layer)")
    fig.tight_layout()
    try:
        save_figure(fig, out, dpi=120)
    finally:
        plt.close(fig)


def fit_comparison(rows: Sequence[dict]) -> str:
    """The per-layer table of ``lrx decompose --compare-fits``: both fits' relative output errors on the
    calibration images and, where measured, on held-out images (rows of the report of :func:`lrx.expand` with ``fit="data"``)."""
    held = all("held_out_error" in row for row in rows)
    lines = ["relative output error   calibration images: weights fit -> data fit"
             + ("   held-out images: weights fit -> data fit" if held else "")]
    for row in rows:
        line = f"{shown_name(row['name']):<20} rank {row['rank']:>4}   {row['output_error_weights']:.4f} -> {row['output_error']:.4f}"
        if held:
            line += f"                  {row['held_out_error_weights']:.4f} -> {row['held_out_error']:.4f}"
        lines.append(line)
    return "\n".join(lines)
