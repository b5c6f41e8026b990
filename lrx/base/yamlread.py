"""Reading YAML that a person (or an attacker) wrote: lrx's safe loader, its limits, ``extends:`` and ``--set``.

The loader is PyYAML's safe loader with YAML 1.2 booleans and floats, duplicate keys refused, no anchors or
aliases, and limits on size, nesting and values, so that a hostile file is refused within a second or two
in bounded memory. :mod:`lrx.config.settings` builds typed configs from what this module reads.
"""
from __future__ import annotations

import math
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml

from lrx.base.errors import UserError

__all__ = ["MAX_FILE_BYTES", "MAX_NODES", "MAX_DEPTH", "MAX_INT_CHARS", "MAX_EXTENDS", "read_yaml",
           "apply_override", "kind", "show", "cut", "key_text", "is_number", "is_finite_number", "finite_float"]



# Limits of what the loader reads. A config is about 1 KB, a few dozen values nested 4 deep
# (finetune: - betas: [..]); PyYAML is pure Python and reads dense YAML at ~40 KB/s on a busy core, so
# these keep a hostile file's refusal under a second or two, in bounded memory.
MAX_FILE_BYTES = 256 * 1024
MAX_NODES = 10_000  # values (scalars, lists, mappings) in one file or --set value
MAX_DEPTH = 32  # nesting of lists and mappings; deeper, PyYAML's recursive composer would overflow the stack
MAX_INT_CHARS = 1000  # an integer's text; bounds it to < 1300 decimal digits (Python prints at most 4300)
MAX_EXTENDS = 16  # files in one extends: chain


class _Refused(yaml.YAMLError):
    """Raised inside the loader for a construct lrx does not read; ``key`` is the dotted key it sits under."""

    def __init__(self, message: str, key: str | None):
        super().__init__(message)
        self.message, self.key = message, key


class _Loader(yaml.SafeLoader):
    """The safe loader with YAML 1.2 booleans (only true/false, so the table's ``no:`` key stays a key),
    duplicate keys refused, and no anchors or aliases (a "billion laughs" is refused at its first anchor,
    never expanded). It tracks the dotted key it is reading so a refusal can name it."""

    def __init__(self, stream):
        super().__init__(stream)
        self._keys: list[str | None] = []  # per level: the key or index read (None: a mapping's key, the root)
        self._nodes = 0

    def _key(self, extra: str | None = None) -> str | None:
        keys = [key_text(k) for k in (*self._keys, extra) if k is not None]
        return ".".join(keys[:6]) + (".etc" if len(keys) > 6 else "") or None

    def compose_node(self, parent, index):
        # index: the key node of a mapping's value, the position in a list, None for a key or the root
        self._keys.append(index.value if isinstance(index, yaml.ScalarNode) else
                          str(index) if isinstance(index, int) else None)
        try:
            event = self.peek_event()
            line = f"line {event.start_mark.line + 1}: "
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise _Refused(line + "YAML anchors and aliases (&name, *name) are not read; "
                               "share settings with extends: instead", self._key())
            self._nodes += 1
            if self._nodes > MAX_NODES:
                raise _Refused(line + f"more than {MAX_NODES} values; a config has a few dozen", self._key())
            if len(self._keys) > MAX_DEPTH:
                raise _Refused(line + f"nested deeper than {MAX_DEPTH} levels; a config needs 4", self._key())
            return super().compose_node(parent, index)
        finally:
            self._keys.pop()

    def compose_scalar_node(self, anchor):
        node = super().compose_scalar_node(anchor)
        if node.tag == "tag:yaml.org,2002:int" and len(node.value) > MAX_INT_CHARS:
            raise _Refused(f"line {node.start_mark.line + 1}: an integer {len(node.value)} characters long; "
                           f"no setting takes one longer than {MAX_INT_CHARS}", self._key())
        return node

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        first: dict[tuple, tuple[int, bool]] = {}  # (tag, text) of a key -> its line, whether merged
        for key_node, merged in _mapping_keys(node):
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: refused later as not a string
            ident, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
            if ident in first:
                seen, earlier_merged = first[ident]
                how = ("one would silently replace the other (one comes through a merge key <<:)"
                       if merged or earlier_merged else "the second would silently replace the first")
                raise _Refused(f"key {show(key_node.value)} appears twice, on lines {seen} and {line}; {how}",
                               self._key(key_node.value))
            first[ident] = (line, merged)
        return node


_MERGE = "tag:yaml.org,2002:merge"


def _mapping_keys(node: yaml.MappingNode, merged: bool = False):
    """(key node, whether it comes through a merge key ``<<:``) of every key a mapping ends up with: its
    own, and those of the mappings its merge keys name (YAML's merge silently lets one win)."""
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE:
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in sources:
                if isinstance(source, yaml.MappingNode):  # anything else: PyYAML refuses the merge itself
                    yield from _mapping_keys(source, True)
        else:
            yield key_node, merged


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.1 reads 1e-4 and 3E-4 as strings (it wants a dot and a signed exponent); YAML 1.2 and people read numbers.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+.0123456789"))


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping with the safe loader; ``extends:`` is resolved recursively."""
    return _read_yaml(Path(path), seen=())


def _read_yaml(path: Path, seen: tuple, named_by: Path | None = None) -> dict:
    """``named_by``: the file whose ``extends:`` names ``path``; a file that cannot be read is its mistake."""
    here = {"file": str(path)}
    said = {"file": str(named_by), "key": "extends"} if named_by is not None else here
    named = f" {path}" if named_by is not None else ""
    if named_by is not None and len(seen) > MAX_EXTENDS:
        raise UserError(f"more than {MAX_EXTENDS} files in one extends: chain", **said)
    try:
        if path.resolve() in seen:
            raise UserError("extends: loops back to this file", file=str(path), key="extends")
        if not path.exists():
            raise UserError(f"no such file{named}", **said)
        if not path.is_file():
            raise UserError(f"{path} is not a regular file" if named else "is not a regular file", **said)
        with path.open("rb") as stream:  # bounded: a special or growing file cannot fill memory
            data = stream.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise UserError(f"is larger than {MAX_FILE_BYTES // 1024} KiB; a config is a few KB of YAML", **here)
        text = data.decode("utf-8")
    except UserError:
        raise
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path, or not UTF-8
        raise UserError(f"cannot read{named}: {cut(getattr(err, 'strerror', None) or str(err))}", **said) from None
    try:
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader: never builds Python objects
    except _Refused as err:
        raise UserError(err.message, file=str(path), key=err.key) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"not valid YAML{where}: {cut(problem)}", **here) from None
    if raw is None or raw == {}:
        raise UserError("is empty: a config needs at least extends: or one setting such as model: "
                        "(an empty file would run every default)", **here)
    if not isinstance(raw, dict):
        raise UserError(f"expected a mapping of keys, got {type(raw).__name__}", **here)
    if "extends" not in raw:
        return raw
    parent = raw.pop("extends")
    if not isinstance(parent, str) or not parent:
        raise UserError(f"must be the path of another YAML, got {show(parent)}", file=str(path), key="extends")
    base = _read_yaml(path.parent / parent, seen + (path.resolve(),), named_by=path)
    return _merge(base, raw)


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# What makes a --set value YAML structure rather than a plain word: brackets, braces, quotes, a line break,
# "key: value", or a tag, anchor, alias, block scalar, comment or list item at its start.
_STRUCTURED = re.compile(r"""[\[\]{}"'\n\r]|:(?:\s|$)|^\s*[!&*|>#%]|^\s*[-?](?:\s|$)""")


def apply_override(raw: dict, assignment: str, file: str = "--set") -> None:
    """Apply ``a.b.0.c=value`` to the raw mapping; the value is parsed as YAML. A value that is not valid
    YAML is refused naming the key, unless it is a plain word (no brackets, quotes, ``key: value``, ...),
    which is taken as the string it is.

    A list index may be at most the list's length (the next new entry); a key below a number or a
    string is refused, naming the key that holds it.
    """
    if "=" not in assignment:
        raise UserError(f"override {show(assignment)} must look like key.sub=value", file=file)
    dotted, text = assignment.split("=", 1)
    dotted = dotted.strip()
    shown = cut(dotted)
    if len(assignment) > MAX_FILE_BYTES:
        raise UserError(f"is longer than {MAX_FILE_BYTES // 1024} KiB", file=file, key=shown)
    try:
        value = yaml.load(text, Loader=_Loader)
    except _Refused as err:
        raise UserError(err.message, file=file, key=shown) from None
    except yaml.YAMLError as err:
        if _STRUCTURED.search(text):  # meant as YAML (a list, a mapping, a quote, a tag) but broken: say so
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UserError(f"{show(text)} is not valid YAML ({cut(problem)}); to give a string, quote it: "
                            f"--set '{cut(dotted, 40)}=\"...\"'", file=file, key=shown) from None
        value = text  # a plain word YAML has no reading for (@home, `cmd`): the string it says
    keys = dotted.split(".")
    if len(keys) > MAX_DEPTH:
        raise UserError(f"more than {MAX_DEPTH} levels of keys", file=file, key=shown)
    node: Any = raw
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            slot = _index(key, node, ".".join(keys[:i]), shown, file)
            if slot == len(node):
                node.append({})
        elif isinstance(node, dict):
            slot = key
        else:
            held = cut(".".join(keys[:i]))
            raise UserError(f"{held} is {kind(node)}, not a mapping", file=file, key=shown)
        if last:
            node[slot] = value
        else:
            if (isinstance(node, dict) and key not in node) or node[slot] is None:
                node[slot] = [] if keys[i + 1].isdigit() else {}
            node = node[slot]


def _index(key: str, node: list, held: str, shown: str, file: str) -> int:
    if not (key.isascii() and key.isdigit()):
        raise UserError(f"expected a list index, got {show(key)}", file=file, key=shown)
    if len(key) > 6 or int(key) > len(node):  # 6 digits: never a huge int() of a digit string
        raise UserError(f"index {cut(key, 12)} is beyond the end of {cut(held)} ({len(node)} entries; "
                        f"the next new one is {len(node)})", file=file, key=shown)
    return int(key)


def kind(value: Any) -> str:
    """How a YAML value reads to a person: 'a number', 'a string', ..."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


_REPR = reprlib.Repr()  # bounded work: a huge list or string is never repr'd whole
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 60, 60, 3


def show(value: Any) -> str:
    """A value for a message: at most ~80 characters, on one line, whatever its size."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        text = str(value)  # the loader keeps integers below ~1300 digits, so this is cheap
        return f"{text[:8]}... (an integer of {len(text.lstrip('-'))} digits)"
    return cut(_REPR.repr(value))


def cut(text: str, limit: int = 80) -> str:
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def key_text(key: Any) -> str:
    """A key as it goes into a dotted key: itself when short and printable, else a cut repr."""
    return key if isinstance(key, str) and key.isprintable() and len(key) <= 60 else show(key)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A number that is a finite float (a huge YAML integer overflows one)."""
    return finite_float(value) is not None


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None for what is not a number, is infinite or NaN (nothing to place
    on an axis or print as a figure)."""
    if not is_number(value):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a float's range
        return None
    return number if math.isfinite(number) else None
