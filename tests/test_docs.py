"""README.md and docs/: the config reference is current, the README stays a short front door, the results page
shows results/quick.md as it is, links and names point at what exists inside the repository, and the pages
speak of lrx and its users only."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from lrx.config.reference import render_reference, sections
from lrx.config.settings import NOT_KEYS, Config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _code_spans(text: str) -> list[str]:
    """The contents of inline code spans and fenced blocks' lines (a fence's lines are spans too)."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return [line for block in fenced for line in block.splitlines()] + re.findall(r"`([^`]+)`", rest)


# ---------------------------------------------------------------- the config reference


def test_configs_md_is_what_the_dataclasses_generate():
    assert _text(ROOT / "docs" / "configs.md") == render_reference(), \
        "docs/configs.md is out of date: run `make docs` (python -m lrx.config.reference > docs/configs.md)"


def test_every_config_field_is_in_the_reference():
    page = render_reference()
    for field in dataclasses.fields(Config):
        assert f"`{field.name}`" in page, f"top-level field {field.name} is missing from docs/configs.md"
    for prefix, cls in sections():
        for field in dataclasses.fields(cls):
            if cls is Config and field.name in NOT_KEYS:
                continue
            assert f"| `{prefix}{field.name}` |" in page, f"{prefix}{field.name} has no row in docs/configs.md"


def test_the_reference_shows_defaults_and_literal_values():
    page = render_reference()
    row = next(line for line in page.splitlines() if line.startswith("| `decompose.scheme` |"))
    assert "`v1`" in row.split("|")[2] and "`v1`, `v2`" in row.split("|")[3], row
    row = next(line for line in page.splitlines() if line.startswith("| `profile.dtype` |"))
    assert "`float32`, `bfloat16`, `float16`" in row and "autocast" in row, "allowed values and the field's comment"


# ---------------------------------------------------------------- README and the results page


def test_readme_is_a_short_front_door():
    lines = _text(README).splitlines()
    assert len(lines) <= 210, f"README.md has {len(lines)} lines; move detail into docs/"
    text = _text(README)
    for needed in ("make demo", "make test", "lrx run configs/", "lrx table runs/ > RESULTS.md",
                   "results/quick-pareto.png"):
        assert needed in text, f"README.md no longer shows {needed!r}"


def test_results_md_shows_quick_md_unedited():
    quick = _text(ROOT / "results" / "quick.md").strip()
    assert quick in _text(ROOT / "docs" / "results.md").strip(), \
        "docs/results.md must hold results/quick.md byte for byte (paste it again after `make demo`)"


def test_readme_python_example_uses_public_names():
    import lrx

    blocks = re.findall(r"^```python\n(.*?)^```", _text(README), flags=re.M | re.S)
    assert blocks, "README.md has a Python example"
    for block in blocks:
        tree = ast.parse(block)
        used = {node.attr for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lrx"}
        assert used and used <= set(lrx.__all__), f"README uses lrx names that are not public: {used - set(lrx.__all__)}"


# ---------------------------------------------------------------- links, paths and names


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", flags=re.M)
HTML = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_links_stay_inside_the_repository(page):
    text = _text(page)
    targets = LINK.findall(text) + REFERENCE.findall(text) + HTML.findall(text)
    for target in targets:
        if re.match(r"^https?://", target):
            continue  # a web page, not a file
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I), f"{page.name}: link {target} is not a file"
        path = target.split("#", 1)[0]
        if not path:
            continue  # an anchor on the same page
        assert not path.startswith(("/", "~")), f"{page.name}: link {target} is an absolute path"
        resolved = (page.parent / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{page.name}: link {target} leaves the repository"
        assert resolved.exists(), f"{page.name}: link {target} points at nothing"
    outside = re.search(r"(?:\.\./)+shared\b|shared/seed|(?:^|[\s(`'\"])/work/", text, flags=re.M)
    assert not outside, f"{page.name} points at a folder outside the repository: {outside.group(0)!r}"


# Files these pages name that a command makes, not the repository.
MADE_BY_COMMANDS = {"examples/own_model/work/"}


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_repository_paths_a_page_names_exist(page):
    missing = []
    for span in _code_spans(_text(page)):
        words = span.split()
        if not words:
            continue
        for word in {words[0], span.strip()}:
            if not re.fullmatch(r"(?:benchmarks|tests|results|lrx|configs|examples|docs)/[\w./-]*", word):
                continue
            if word in MADE_BY_COMMANDS or "NN" in word:
                continue
            if not (ROOT / word).exists():
                missing.append(word)
    assert not missing, f"{page.name} names files that do not exist: {sorted(set(missing))}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for part in parts[cut:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_lrx_names_a_page_uses_exist(page):
    names = set()
    for span in _code_spans(_text(page)):
        names |= set(re.findall(r"\blrx(?:\.[A-Za-z_]\w*)+", span))
    wrong = sorted(name for name in names if not _resolves(name))
    assert not wrong, f"{page.name} names code that does not exist: {wrong}"


# ---------------------------------------------------------------- about lrx and its users only


HISTORY = [r"[Ii]ssue\s*#?\d+", r"\b[Ss]essions?\b", r"\b[Tt]ickets?\b", r"\bPR\s*#?\d+", r"\b[Ll]ast session\b"]


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_pages_speak_of_lrx_not_of_its_development(page):
    text = _text(page)
    found = [match.group(0) for pattern in HISTORY for match in re.finditer(pattern, text)]
    assert not found, f"{page.name} speaks of issues or development history: {found}"
