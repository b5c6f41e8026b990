"""lrx: low-rank expansions that make convolutional networks faster (Jaderberg et al., BMVC 2014).

Everything a user needs from Python is named here; each name is imported on first use (PEP 562), so that
``import lrx`` stays light and lrx's lowest modules do not import its highest::

    import lrx
    fast, report = lrx.expand(model, layers="auto", scheme="v2", ranks="auto", target={"macs": 0.5})
    lrx.run(lrx.load_config("configs/quick/exp11.yaml"), runs_dir="runs/quick")
    model = lrx.load_run("runs/quick/exp11")
"""

import importlib

__version__ = "0.1.0"
# public name -> (its module, its name there)
LAZY = {
    "expand": ("lrx.expansion.model", "expand"),
    "ExpansionReport": ("lrx.expansion.model", "ExpansionReport"),
    "build_expanded": ("lrx.nn.surgery", "build_expanded"),
    "select_layers": ("lrx.nn.surgery", "select_layers"),
    "LowRankExpConvV1": ("lrx.nn.layers", "LowRankExpConvV1"),
    "LowRankExpConvV2": ("lrx.nn.layers", "LowRankExpConvV2"),
    "optimise": ("lrx.nn.inference", "optimise"),
    "build_model": ("lrx.nn.models", "build_model"),
    "load_config": ("lrx.config.settings", "load_config"),
    "run": ("lrx.pipeline.runner", "run_with_dependencies"),
    "load_run": ("lrx.output.export", "load_run"),
    "export_model": ("lrx.output.export", "export_model"),
    "to_plain": ("lrx.output.export", "to_plain"),
    "collect_rows": ("lrx.output.table", "collect_rows"),
    "UserError": ("lrx.base.errors", "UserError"),
}
__all__ = ["__version__", *LAZY]


def __getattr__(name: str):
    """The public names of :data:`LAZY`, imported on first use."""
    if name in LAZY:
        module, attribute = LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'lrx' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *LAZY])
