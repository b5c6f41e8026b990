"""docs/configs.md: every config key with its default and allowed values, generated from the dataclasses.

The reference is read off :mod:`lrx.config.settings` itself: the keys are the dataclass fields of
:class:`~lrx.config.settings.Config` and of the dataclasses it nests (``model.``, ``data.``, ``decompose.``,
``finetune.K.``, ...), the defaults are the fields' defaults, the allowed values come from the type hints
(``Literal`` values, ``Union``, lists, mappings) and the description of a key is the comment its field
carries in the source (on its line, or the comment lines right above it) or the class docstring for a
section. The bounds checked at load time are the module's ``MAX_*`` constants with their comments.

Regenerate the page with ``python -m lrx.config.reference > docs/configs.md`` (``make docs``);
``tests/test_docs.py`` checks that the page is current.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from typing import Any, Literal, Union

from lrx.config import settings
from lrx.config.settings import NOT_KEYS, Config

__all__ = ["field_comments", "allowed_values", "default_text", "sections", "render_reference"]

# Fields of Config that are not YAML keys: the loader fills them in and refuses them in a file.


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in ``cls``'s source: the comment lines right above its line, then the comment
    on its line, joined into one sentence-like string ("" for a field without one)."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    comments: dict[int, tuple[str, bool]] = {}  # line (1-based in source) -> (text, alone on its line)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            alone = not token.line[: token.start[1]].strip()
            comments[token.start[0]] = (token.string.lstrip("#").strip(), alone)
    (node,) = ast.parse(source).body
    out = {}
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        above = []
        line = statement.lineno - 1
        while line in comments and comments[line][1]:
            above.insert(0, comments[line][0])
            line -= 1
        inline = [comments[n][0] for n in range(statement.lineno, statement.end_lineno + 1)
                  if n in comments and not comments[n][1]]
        out[statement.target.id] = " ".join(above + inline)
    return out


def _is_config_class(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def allowed_values(tp) -> str:
    """What a type hint allows, in the words a YAML writer uses (``Literal`` values listed as code)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return ", ".join(f"`{_yaml(value)}`" for value in typing.get_args(tp))
    if origin is Union:
        return " or ".join(allowed_values(option) for option in typing.get_args(tp))
    if origin is list:
        return f"a list of {_plural(typing.get_args(tp)[0])}"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"a mapping of {allowed_values(key)} to {allowed_values(value)}"
    if _is_config_class(tp):
        return "a mapping (keys below)"
    if tp is type(None):
        return "`null`"
    if tp is Any:
        return "any value"
    return {int: "an integer", float: "a number", str: "a string", bool: "`true` or `false`"}.get(tp, str(tp))


def _plural(tp) -> str:
    """The items of a list, in the plural: "integers or strings", "mappings (keys below)"."""
    if typing.get_origin(tp) is Union:
        return " or ".join(_plural(option) for option in typing.get_args(tp))
    if _is_config_class(tp):
        return "mappings (keys below)"
    words = {int: "integers", float: "numbers", str: "strings", bool: "`true` or `false` values"}
    return words.get(tp, f"values, each {allowed_values(tp)}")


def _yaml(value) -> str:
    """A default or a Literal value as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def default_text(f: dataclasses.Field) -> str:
    """The field's default as YAML, or where its keys are listed for a nested section."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(keys below)"
    return f"`{_yaml(value)}`"


def _nested(tp) -> tuple[type, str] | None:
    """(the dataclass a field holds, how its keys continue: "." or ".K.") for a section field, else None."""
    origin = typing.get_origin(tp)
    if _is_config_class(tp):
        return tp, "."
    if origin is Union:
        for option in typing.get_args(tp):
            found = _nested(option)
            if found:
                return found
    if origin is list and _is_config_class(typing.get_args(tp)[0]):
        return typing.get_args(tp)[0], ".K."
    return None


def sections(cls: type = Config, prefix: str = "") -> list[tuple[str, type]]:
    """(key prefix, dataclass) of ``cls`` and of every dataclass it nests, depth first in field order."""
    out = [(prefix, cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        found = _nested(hints[f.name])
        if found:
            out += sections(found[0], f"{prefix}{f.name}{found[1]}")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section(prefix: str, cls: type) -> list[str]:
    title = f"`{prefix[:-1]}`" if prefix else "Top level"
    lines = [f"## {title}", ""]
    doc = inspect.getdoc(cls)
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses write a signature where there is no docstring
        lines += [" ".join(doc.split()), ""]
    if prefix.endswith(".K."):
        lines += [f"`{prefix[:-3]}` is a list; K is an entry's position, from 0 (`--set {prefix[:-3]}.0.epochs=2`).", ""]
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    lines += ["| key | default | allowed | what it does |", "|---|---|---|---|"]
    skipped = []
    for f in dataclasses.fields(cls):
        if cls is Config and f.name in NOT_KEYS:
            skipped.append(f)
            continue
        lines.append(f"| `{prefix}{f.name}` | {_cell(default_text(f))} | {_cell(allowed_values(hints[f.name]))} | "
                     f"{_cell(comments.get(f.name, ''))} |")
    for f in skipped:
        lines += ["", f"`{f.name}` is a field of the loaded config, not a key: {comments.get(f.name, '')}."]
    return lines + [""]


def _bounds() -> list[str]:
    """The MAX_* constants of lrx.config.settings, with the comment on their line."""
    source = inspect.getsource(settings)
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.line[: token.start[1]].strip():
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = ["## Bounds", "",
             "Counts and sizes are checked against these when a config is loaded, before anything runs; "
             "a value outside them is refused with a message naming its key.", "",
             "| name | value | note |", "|---|---|---|"]
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.startswith("MAX_"):
                value = getattr(settings, name)
                lines.append(f"| `{name}` | {value:,} | {_cell(comments.get(node.lineno, ''))} |")
    return lines + [""]


def render_reference() -> str:
    """docs/configs.md: every config key, its default, its allowed values and its comment, as markdown."""
    lines = [
        "# Config keys",
        "",
        "<!-- Generated by `python -m lrx.config.reference > docs/configs.md` (`make docs`) from the dataclasses",
        "     in lrx/config/settings.py. Do not edit by hand; tests/test_docs.py checks that it is current. -->",
        "",
        "One YAML file per run. `extends: other.yaml` (a path relative to the file) merges another file first, "
        "key by key, the file itself winning; `--set key.sub=value` on the command line overrides one key "
        "(list entries by position: `finetune.0.epochs`). An unknown key, a wrong type or a value out of range "
        "stops the run before anything is written, naming the file, the key and what is allowed.",
        "",
        "Defaults are what a key takes when no file in the `extends:` chain sets it. `null` is YAML's none.",
        "",
    ]
    for prefix, cls in sections():
        lines += _section(prefix, cls)
    lines += _bounds()
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_reference())
