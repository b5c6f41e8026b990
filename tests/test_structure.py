"""The shape of the code: packages in levels, imports point downward, no circles, no hidden imports, no
private names used across modules, ``__all__`` everywhere, and docs that name real code."""
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
# Each module by its dotted name under lrx ("base.errors", "cli"; a package's own __init__ is "base.__init__").
MODULES = sorted(".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py"))

# Each package's level: a module may import modules of its own package or of a package of a lower level.
# Within a package the order is free, and the circle test keeps it a tree.
LEVEL = {
    "__init__": 0, "base": 0, "factor": 1, "config": 2, "data": 3, "nn": 4, "measure": 5, "plan": 6,
    "expansion": 7, "train": 8, "pipeline": 9, "output": 10, "cli": 11, "__main__": 12,
}
# Packages that may be imported inside a function (heavy to import, needed by one feature), with a
# "# local:" comment on the line or the line before saying why. lrx's own packages may be imported inside
# cli's commands, so that a config error is reported before torch is loaded.
LOCAL_OK = ("matplotlib", "ptflops", "onnx")  # onnx: onnx, onnxscript, onnxruntime (the lrx[export] extra)


def _package(module: str) -> str:
    """The level-bearing unit of a module: its package ("base" for "base.errors"), or the module itself."""
    return module.split(".")[0]


def _path(module: str) -> Path:
    return PACKAGE.joinpath(*module.split(".")).with_suffix(".py")


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The lrx modules an ImportFrom names (relative or absolute), as dotted names under lrx."""
    if node.level:
        base = module.split(".")[:-node.level] if "." in module or node.level > 1 else []
        stem = ".".join(base + ([node.module] if node.module else []))
    elif node.module == "lrx" or (node.module or "").startswith("lrx."):
        stem = node.module[4:]
    else:
        return [node.module]
    out = []
    for alias in node.names:
        candidate = f"{stem}.{alias.name}" if stem else alias.name
        if candidate in MODULES or f"{candidate}.__init__" in MODULES:
            out.append(candidate if candidate in MODULES else f"{candidate}.__init__")
        else:
            out.append(stem if stem in MODULES else (f"{stem}.__init__" if stem else "__init__"))
    return [f"lrx.{name}" for name in out]


def _imports(module: str, path: Path | None = None) -> list[tuple[str, int, bool, ast.AST]]:
    """(imported module, line, inside a function, node) for every import statement of a file."""
    tree = ast.parse((path or _path(module)).read_text())
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, in_function, child) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                out.extend((name, child.lineno, in_function, child) for name in _resolve(module, child))
            visit(child, inner)

    visit(tree, False)
    return out


def _lrx_edges() -> dict[str, set[str]]:
    edges = {}
    for module in MODULES:
        edges[module] = {name[4:] for name, _, _, _ in _imports(module)
                         if name.startswith("lrx.") and name[4:] in MODULES} - {module}
    return edges


def test_every_package_has_a_level():
    packages = {_package(m) for m in MODULES}
    assert packages == set(LEVEL), f"packages without a level: {packages - set(LEVEL)}; " \
                                   f"levels of missing packages: {set(LEVEL) - packages}"
    assert all(isinstance(level, int) for level in LEVEL.values()), "levels are integers"


def test_no_module_lies_loose_in_lrx():
    loose = [m for m in MODULES if "." not in m and m not in ("__init__", "__main__", "cli")]
    assert not loose, f"modules outside a package: {loose}"


def test_every_lrx_import_points_downward():
    wrong = [f"{a} (level {LEVEL[_package(a)]}) imports {b} (level {LEVEL[_package(b)]})"
             for a, targets in _lrx_edges().items() for b in targets
             if _package(a) != _package(b) and LEVEL[_package(b)] >= LEVEL[_package(a)]]
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
        lines = _path(module).read_text().splitlines()
        for name, line, in_function, _ in _imports(module):
            if not in_function:
                continue
            reason = "# local:" in lines[line - 1] or "# local:" in lines[line - 2]
            allowed = name.startswith(LOCAL_OK) or (module in ("cli", "__main__") and name.startswith("lrx."))
            if not allowed or not reason:
                bad.append(f"{_path(module).relative_to(ROOT)}:{line} imports {name} inside a function")
    assert not bad, "\n".join(bad)


def _python_files() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "examples").rglob("*.py")])


def test_no_file_imports_another_modules_private_name():
    bad = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lrx")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {', '.join(private)}")
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in _lrx_module_aliases(path):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {owner.id}.{node.attr}")
    assert not bad, "a private name used outside its module:\n" + "\n".join(bad)


def _lrx_module_aliases(path: Path) -> set[str]:
    """Names a file binds to lrx modules (``from lrx.nn import layers``, ``import lrx.nn.layers as layers``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lrx"):
            for alias in node.names:
                dotted = f"{node.module[4:]}.{alias.name}".strip(".")
                if dotted in MODULES or f"{dotted}.__init__" in MODULES:
                    names.add(alias.asname or alias.name)
        if isinstance(node, ast.Import):
            names.update(alias.asname for alias in node.names if alias.name.startswith("lrx") and alias.asname)
    return names


def test_every_module_says_what_it_exports():
    missing = [m for m in MODULES if m not in ("__main__",)
               and not any(isinstance(node, (ast.Assign, ast.AnnAssign)) and "__all__" in ast.unparse(node).split("=")[0]
                           for node in ast.parse(_path(m).read_text()).body)]
    assert not missing, f"modules without __all__: {missing}"


def test_all_names_only_what_exists():
    wrong = []
    for module in MODULES:
        if module in ("__main__", "cli"):
            continue
        mod = importlib.import_module("lrx" if module == "__init__" else f"lrx.{module.removesuffix('.__init__')}")
        wrong += [f"lrx.{module}: {name}" for name in getattr(mod, "__all__", []) if not hasattr(mod, name)]
    assert not wrong, f"__all__ names what the module lacks: {wrong}"


def test_each_module_imports_alone():
    # One interpreter; before each module every lrx module is dropped from sys.modules, so each is
    # imported as if first (torch stays loaded: a fresh interpreter per module would cost ~3 s each).
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    for loaded in [m for m in sys.modules if m == 'lrx' or m.startswith('lrx.')]:\n"
            "        del sys.modules[loaded]\n"
            "    importlib.import_module(name)\n")
    names = [f"lrx.{m.removesuffix('.__init__')}" for m in MODULES if m not in ("__init__", "__main__")]
    result = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_modules_stay_short_or_say_why():
    long = []
    for module in MODULES:
        text = _path(module).read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > 450 and "long because" not in doc:
            long.append(f"{_path(module).relative_to(ROOT)}: {len(text.splitlines())} lines and no 'long because' in its docstring")
    assert not long, "\n".join(long)


# ---------------------------------------------------------------- docs/design.md names real code

DESIGN = ROOT / "docs" / "design.md"


def _design_rows() -> list[tuple[str, list[str]]]:
    """(dotted module, [names in the entry-points column]) per row of design.md's module tables."""
    rows = []
    for line in DESIGN.read_text().splitlines():
        match = re.match(r"^\| `lrx/([\w/]+)\.py` \|(.*)\|(.*)\|\s*$", line)
        if match:
            names = re.findall(r"`([A-Za-z_][\w.]*)", match.group(3))
            rows.append((match.group(1).replace("/", "."), names))
    return rows


def test_design_md_draws_the_levels_the_code_has():
    """The floor plan in design.md (one line per level, lowest last) is the order LEVEL holds."""
    block = DESIGN.read_text().split("```text\n", 1)[1].split("```", 1)[0]
    drawn = [re.findall(r"(\w+)/?", line.split("  ")[0].strip()) for line in block.splitlines() if line.strip()]
    by_level: dict[int, set[str]] = {}
    for package, level in LEVEL.items():
        if package not in ("__init__", "__main__"):
            by_level.setdefault(level, set()).add(package)
    expected = [sorted(by_level[level]) for level in sorted(by_level, reverse=True)]
    assert [sorted(names) for names in drawn] == expected, f"design.md draws {drawn}, the code has {expected}"


def test_design_md_lists_every_module():
    listed = {module for module, _ in _design_rows()}
    real = {m for m in MODULES if not m.endswith("__init__") and m != "__main__"}
    assert not real - listed, f"docs/design.md does not describe: {sorted(real - listed)}"
    assert not listed - real, f"docs/design.md describes modules that do not exist: {sorted(listed - real)}"


@pytest.mark.parametrize("module,names", _design_rows(), ids=[m for m, _ in _design_rows()])
def test_design_md_names_only_what_exists(module, names):
    mod = importlib.import_module(f"lrx.{module}")
    for dotted in names:
        obj = mod
        for part in dotted.split("."):
            assert hasattr(obj, part), f"docs/design.md names {dotted} in lrx/{module}, which has no {part}"
            obj = getattr(obj, part)


def test_design_md_names_only_files_a_run_writes():
    from lrx.pipeline import rundir

    named = set(re.findall(r"^- `([\w.]+)`", DESIGN.read_text(), flags=re.M))
    known = {rundir.CONFIG, rundir.METRICS, rundir.LOG, rundir.LOCK, *rundir.MODEL_FILES.values(),
             rundir.model_file("finetune.0").replace("0", "K"), rundir.checkpoint_file("train"),
             rundir.checkpoint_file("finetune.0").replace("0", "K")}
    assert named and named <= known, f"docs/design.md names run files lrx.pipeline.rundir does not write: {named - known}"


def test_the_command_line_reads_a_config_before_it_imports_torch():
    """A config's mistake is reported at start-up speed: `lrx.cli` and the config reader do not import torch
    (benchmarks/startup.py times it)."""
    code = "import sys, lrx.cli; assert 'torch' not in sys.modules, 'lrx.cli imported torch'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
