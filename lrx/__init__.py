"""lrx: low-rank expansions that make convolutional networks faster (Jaderberg et al., BMVC 2014)."""

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
    """``lrx.load_run`` (:func:`lrx.export.load_run`), imported on first use so that ``import lrx`` stays light
    and lrx's lowest modules do not import its highest (PEP 562)."""
    if name == "load_run":
        return importlib.import_module("lrx.export").load_run
    raise AttributeError(f"module 'lrx' has no attribute {name!r}")
