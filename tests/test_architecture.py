"""The layout is the pipeline: no import cycles, no private cross-module imports, layers point one way.

Every `import` counts, also the ones inside functions: a lazy import hides a cycle from
Python, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "taskling"

# Lower layers never import higher ones. Same-layer packages may not import each other.
LAYERS: list[set[str]] = [
    {"errors", "version"},
    {"io", "extras"},
    {"task"},
    {"config"},
    {"rundir"},
    {"model"},
    {"data"},
    {"extract"},
    {"generate"},
    {"serve"},
    {"train"},
    {"evaluate"},
    {"export", "monitor"},
    {"cli"},
]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = ["taskling", *path.relative_to(SRC).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import of a taskling module in `path`."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    found: list[tuple[str, list[str], int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("taskling")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("taskling"):
                continue
            names = [a.name for a in node.names]
            # `from taskling.pkg import submodule` imports the submodule.
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            found += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f"{target}.{n}" not in known]
            if rest or not subs:
                found.append((target, rest, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _, _ in imports_of(path, name, known):
            if target in known and target != name:
                edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_architecture.py LAYERS")


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_planted_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]


def test_dependencies_point_one_way() -> None:
    wrong = []
    for source, targets in graph().items():
        if source == "taskling":
            continue
        src_top = source.split(".")[1]
        for target in targets:
            if target == "taskling":
                wrong.append(f"{source} imports the package root")
                continue
            tgt_top = target.split(".")[1]
            if src_top == tgt_top:
                continue
            if layer_of(target) >= layer_of(source):
                wrong.append(f"{source} -> {target}")
    assert wrong == []


def test_no_private_imports_across_modules() -> None:
    mods = modules()
    known = set(mods)
    wrong = []
    for name, path in mods.items():
        for target, names, line in imports_of(path, name, known):
            if target == name:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in target.split(".") if p.startswith("_") and p != "__init__"]
            if private:
                wrong.append(f"{path.relative_to(SRC)}:{line} imports {target}: {', '.join(private)}")
    assert wrong == []


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for name, path in modules().items():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == []


@pytest.mark.parametrize("package", sorted({m.split(".")[1] for m in modules() if m.count(".") >= 2}))
def test_each_stage_package_says_what_it_owns(package: str) -> None:
    doc = ast.get_docstring(ast.parse((SRC / package / "__init__.py").read_text()))
    assert doc and "TODO" not in doc and len(doc.split()) >= 20, f"taskling/{package}/__init__.py needs its paragraph"
