"""The shape of the code: imports point downward, no circles, no hidden imports, docs that name real code."""
from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lrx"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))

# Each module's level: a module may import only modules of a lower level (cli -> pipeline -> stages ->
# training/expansion -> layers -> math -> basics). Same-level imports are refused too, so the order
# within a level is free to change.
LEVEL = {
    "errors": 0, "__init__": 0, "yamlread": 0.5,
    "config": 1, "checkpoint": 1, "distributed": 1,
    "progress": 2, "decomposition": 2, "models": 2, "data": 2, "plot": 2,
    "speed": 3,
    "layers": 4, "loop": 4, "timing": 4,
    "lowrank": 5, "profiling": 5, "train": 5,
    "ranks": 6, "finetune": 6, "datafit": 6,
    "latency": 6.5,
    "expansion": 6.8,
    "rundir": 7,
    "stages": 8, "table": 8, "export": 8,
    "runs": 9, "preview": 9, "report": 9,
    "cli": 10,
    "__main__": 11,
}
# Packages that may be imported inside a function (heavy to import, needed by one feature), with a
# "# local:" comment on the line or the line before saying why.
LOCAL_OK = ("matplotlib", "ptflops", "onnx")  # onnx: onnx, onnxscript, onnxruntime (the lrx[export] extra)


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported name, line, inside a function) for every import statement of lrx/<module>.py."""
    source = (PACKAGE / f"{module}.py").read_text()
    tree = ast.parse(source)
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from . import x / from .x import y
                    if child.module:
                        out.append((f"lrx.{child.module}", child.lineno, in_function))
                    else:
                        out.extend((f"lrx.{alias.name}", child.lineno, in_function) for alias in child.names)
                else:
                    out.append((child.module, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


def _lrx_edges() -> dict[str, set[str]]:
    edges = {}
    for module in MODULES:
        edges[module] = {name.split(".")[1] for name, _, _ in _imports(module)
                         if name.startswith("lrx.") and name.split(".")[1] in MODULES}
    return edges


def test_every_module_has_a_level():
    assert set(MODULES) == set(LEVEL), f"modules without a level: {set(MODULES) - set(LEVEL)}; " \
                                       f"levels of missing modules: {set(LEVEL) - set(MODULES)}"


def test_every_lrx_import_points_downward():
    wrong = [f"{a} (level {LEVEL[a]}) imports {b} (level {LEVEL[b]})"
             for a, targets in _lrx_edges().items() for b in targets if LEVEL[b] >= LEVEL[a]]
    assert not wrong, "imports that do not point downward:\n" + "\n".join(wrong)


def test_the_module_graph_has_no_circle():
    edges = _lrx_edges()
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def walk(module, path):
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return path + [module, target]
            if target not in state:
                found = walk(target, path + [module])
                if found:
                    return found
        state[module] = 2
        return None

    for module in MODULES:
        if module not in state:
            circle = walk(module, [])
            assert circle is None, f"import circle: {' -> '.join(circle)}"


def test_imports_inside_functions_are_only_heavy_optional_packages_with_a_reason():
    bad = []
    for module in MODULES:
        lines = (PACKAGE / f"{module}.py").read_text().splitlines()
        for name, line, in_function in _imports(module):
            if not in_function:
                continue
            reason = "# local:" in lines[line - 1] or "# local:" in lines[line - 2]
            if not name.startswith(LOCAL_OK) or not reason:
                bad.append(f"lrx/{module}.py:{line} imports {name} inside a function")
    assert not bad, "\n".join(bad)


def test_each_module_imports_alone():
    # One interpreter; before each module every lrx module is dropped from sys.modules, so each is
    # imported as if first (torch stays loaded: a fresh interpreter per module would cost ~3 s each).
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    for loaded in [m for m in sys.modules if m == 'lrx' or m.startswith('lrx.')]:\n"
            "        del sys.modules[loaded]\n"
            "    importlib.import_module(name)\n")
    names = [f"lrx.{m}" for m in MODULES if m not in ("__init__", "__main__")]
    result = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_modules_stay_short_or_say_why():
    long = []
    for module in MODULES:
        text = (PACKAGE / f"{module}.py").read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > 450 and "long because" not in doc:
            long.append(f"lrx/{module}.py: {len(text.splitlines())} lines and no 'long because' in its docstring")
    assert not long, "\n".join(long)


# ---------------------------------------------------------------- docs/design.md names real code

DESIGN = ROOT / "docs" / "design.md"


def _design_rows() -> list[tuple[str, list[str]]]:
    """(module, [names in the entry-points column]) per row of design.md's module table."""
    rows = []
    for line in DESIGN.read_text().splitlines():
        match = re.match(r"^\| `lrx/(\w+)\.py` \|(.*)\|(.*)\|\s*$", line)
        if match:
            names = re.findall(r"`([A-Za-z_][\w.]*)", match.group(3))
            rows.append((match.group(1), names))
    return rows


def test_design_md_lists_every_module():
    listed = {module for module, _ in _design_rows()}
    missing = set(MODULES) - listed - {"__init__", "__main__"}
    assert not missing, f"docs/design.md does not describe: {sorted(missing)}"
    ghosts = listed - set(MODULES)
    assert not ghosts, f"docs/design.md describes modules that do not exist: {sorted(ghosts)}"


@pytest.mark.parametrize("module,names", _design_rows(), ids=[m for m, _ in _design_rows()])
def test_design_md_names_only_what_exists(module, names):
    mod = importlib.import_module(f"lrx.{module}")
    for dotted in names:
        obj = mod
        for part in dotted.split("."):
            assert hasattr(obj, part), f"docs/design.md names {dotted} in lrx/{module}.py, which has no {part}"
            obj = getattr(obj, part)


def test_design_md_names_only_files_a_run_writes():
    from lrx import rundir

    named = set(re.findall(r"^- `([\w.]+)`", DESIGN.read_text(), flags=re.M))
    known = {rundir.CONFIG, rundir.METRICS, rundir.LOG, rundir.LOCK, *rundir.MODEL_FILES.values(),
             rundir.model_file("finetune.0").replace("0", "K"), rundir.checkpoint_file("train"),
             rundir.checkpoint_file("finetune.0").replace("0", "K")}
    assert named and named <= known, f"docs/design.md names run files lrx.rundir does not write: {named - known}"


def test_readme_quick_table_is_the_file_make_demo_writes():
    """README's table under "Results at CPU size" is results/quick.md (what `lrx table runs/quick` wrote), byte for
    byte: a re-run that changes the file and not the README (or the reverse) fails here."""
    written = (ROOT / "results" / "quick.md").read_text().strip()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Results at CPU size"):]
    section = section[:section.index("\n## ", 1)]
    assert written in section, "README's quick table differs from results/quick.md: paste the file into README.md"
