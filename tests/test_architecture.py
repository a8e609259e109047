"""The package's shape, checked from its source: no import circles, no file over 600 lines, techniques that
meet only through core, exporters and the runtime layer that know no technique.

The import graph has one node per module (a package is its ``__init__.py``). Every ``import`` and
``from ... import`` counts, at any depth (inside functions and ``if TYPE_CHECKING:`` blocks too: a lazy
import hides a circle, it does not remove it). ``from pkg import name`` is an edge to the submodule
``pkg.name`` when there is one, else to ``pkg`` itself. Importing ``a.b.c`` also runs ``a/__init__.py``
and ``a/b/__init__.py``, but those implicit parents are not edges: a package re-exports its submodules, so
counting them would make every package a circle with its own modules. What does count is a module that
imports its own package's ``__init__`` (``from deepsqueeze.quant import quantize_`` inside
``deepsqueeze/quant/``) while that ``__init__`` imports it: a real circle, reported like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "deepsqueeze"
MAX_LINES = 600
TECHNIQUES = ("quant", "prune", "share", "lowrank", "distill")
# Old module paths kept for one release (module __getattr__ shims): they import what moved, wherever it went.
DEPRECATED_SHIMS = {"deepsqueeze.quant.modules", "deepsqueeze.quant.packed_weights", "deepsqueeze.quant.ternary_modules",
                    "deepsqueeze.quant.onnx_forms", "deepsqueeze.lowrank.modules", "deepsqueeze.distill.losses",
                    "deepsqueeze.distill.text"}


def module_files(root: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` of ``package`` (``a/b/__init__.py`` is module ``a.b``)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _known_prefix(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` (at ``path``) imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known_prefix(alias.name, modules)
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = module.split(".") if is_package else module.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in modules else _known_prefix(base, modules)
                if target:
                    found.add(target)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is a few hundred modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth first, back to where it started)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(parents[chain[-1]])
                    return [*reversed(chain), start]
                if w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    return sorted(component)


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_sees_lazy_relative_and_package_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from deepsqueeze.a.x import f\n")
    (pkg / "a" / "x.py").write_text("def f():\n    from . import y\n")
    (pkg / "a" / "y.py").write_text("from deepsqueeze.a import g  # a name of the package, not a module\n")
    (pkg / "a" / "z.py").write_text("import deepsqueeze.a.x\n")
    modules = module_files(tmp_path)
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph == {"deepsqueeze": set(), "deepsqueeze.a": {"deepsqueeze.a.x"}, "deepsqueeze.a.x": {"deepsqueeze.a.y"},
                     "deepsqueeze.a.y": {"deepsqueeze.a"}, "deepsqueeze.a.z": {"deepsqueeze.a.x"}}
    assert find_cycles(graph) == [["deepsqueeze.a", "deepsqueeze.a.x", "deepsqueeze.a.y", "deepsqueeze.a"]]


def test_no_import_circles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_file_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in sorted(SRC.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_technique_folders_do_not_import_each_other():
    wrong = [f"{m} -> {t}" for m, targets in sorted(import_graph().items()) for t in sorted(targets)
             if _folder(m) in TECHNIQUES and _folder(t) in TECHNIQUES and _folder(m) != _folder(t)]
    assert not wrong, "technique folders meet only through core (and runtime for what they install):\n" + "\n".join(wrong)


def test_exporters_and_the_runtime_import_no_technique():
    wrong = [f"{m} -> {t}" for m, targets in sorted(import_graph().items()) for t in sorted(targets)
             if _folder(m) in ("export", "runtime") and _folder(t) in TECHNIQUES]
    wrong += [f"{m} -> {t}" for m, targets in sorted(import_graph().items()) for t in sorted(targets)
              if _folder(m) == "runtime" and _folder(t) == "export"]
    assert not wrong, "exporters read runtime/ and core, never a technique; runtime knows no technique:\n" + \
        "\n".join(wrong)


def test_runtime_stands_on_core_primitives_and_errors_only():
    allowed = {"core", "primitives", "errors", "runtime"}
    wrong = [f"{m} -> {t}" for m, targets in sorted(import_graph().items()) for t in sorted(targets)
             if _folder(m) == "runtime" and _folder(t) not in allowed]
    assert not wrong, "\n".join(wrong)


def test_outside_runtime_representations_come_from_the_package():
    """``from deepsqueeze.runtime import Int8Linear``, never ``deepsqueeze.runtime.int8`` (the runtime's modules
    may move between themselves without touching a technique or an exporter)."""
    wrong = [f"{m} -> {t}" for m, targets in sorted(import_graph().items()) for t in sorted(targets)
             if _folder(t) == "runtime" and t != "deepsqueeze.runtime" and _folder(m) != "runtime"
             and m not in DEPRECATED_SHIMS]
    assert not wrong, "\n".join(wrong)
