"""lrx: low-rank expansions that make convolutional networks faster (Jaderberg et al., BMVC 2014)."""

import importlib

__version__ = "0.1.0"
LAZY = {"load_run": "lrx.export", "expand": "lrx.expansion"}  # public name -> its module


def __getattr__(name: str):
    """``lrx.load_run`` (:func:`lrx.export.load_run`) and ``lrx.expand`` (:func:`lrx.expansion.expand`),
    imported on first use so that ``import lrx`` stays light and lrx's lowest modules do not import its
    highest (PEP 562)."""
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'lrx' has no attribute {name!r}")
