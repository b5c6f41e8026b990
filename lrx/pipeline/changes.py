"""What changed since a run was made, said in the user's words.

- Its settings: the resolved config the run wrote (``RunDir.read_config()``) against the one given now,
  key by key with the old and the new value (:func:`config_changes`), so that "settings changed from stage
  decompose" says which.
- The runs it builds on, while it runs: each one's final model file as it was when the run read that run's
  record (:func:`fingerprint`: size and modification time), so that a baseline or parent redone meanwhile
  is noticed before results built on two states of it are recorded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lrx.base.yamlread import show

__all__ = ["DESCRIPTIVE", "config_changes", "fingerprint"]

# Keys that name or describe a run and change none of its results.
DESCRIPTIVE = ("name", "no", "group", "remark")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to values: mappings and lists of mappings (``finetune``) are opened, other lists kept whole."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flat(item, f"{prefix}.{i}"))
        return out
    return {prefix: value}


def config_changes(old: dict, new: dict) -> list[str]:
    """``"key: old -> new"`` for every setting that differs between two resolved configs (``Config.to_dict()``
    or a run's config.yaml), in the new config's order; descriptive keys (:data:`DESCRIPTIVE`) left out.

    A key only one side has (a key a later lrx added, a fine-tune stage added or removed) shows ``(not set)``
    on the other side; such keys are listed only when no key both sides have differs. Empty when the configs
    agree or ``old`` is empty (a run that wrote no config)."""
    if not old:
        return []
    before, after = _flat(old), _flat(new)
    both, one_side = [], []
    for key in list(after) + [k for k in before if k not in after]:
        if key.split(".")[0] in DESCRIPTIVE:
            continue
        if key in before and key in after:
            if before[key] != after[key]:
                both.append(f"{key}: {show(before[key])} -> {show(after[key])}")
        else:
            one_side.append(f"{key}: {show(before[key]) if key in before else '(not set)'} -> "
                            f"{show(after[key]) if key in after else '(not set)'}")
    return both or one_side


def fingerprint(path: str | Path) -> tuple[int, int] | None:
    """A file's (size, modification time in ns), or None when it is not there: what changes when a stage
    writes it again (every model file is replaced whole, by a rename)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns
