"""The package's import layering, read from its source with ``ast`` (nothing is imported).

Every module belongs to exactly one layer of ``LAYERS``; imports, those inside functions included,
point down the layer order or sideways within a layer; no import cycles; no long modules; and an
import inside a function body names a package module only where ``LAZY_IMPORTS`` says why.
``python tests/test_layering.py --table`` prints the modules by layer as a markdown table.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

PACKAGE = "discreteflow_jax"

# Lowest layer first, as in the design notes. Entries are module names relative to the package: an
# entry covers that module and everything below it (a subpackage's ``__init__`` is the subpackage's
# name, so it sits in its subpackage's layer); "__init__" is the package's own ``__init__``.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("config", ("config",)),
    ("data", ("data",)),
    ("models", ("models",)),
    ("maths", ("flow", "gumbel", "gumbel_sampling", "gumbel_distill", "conditioning")),
    ("io", ("io",)),
    ("tasks", ("tasks",)),
    ("training", ("training",)),
    ("inference", ("inference",)),
    ("evaluation", ("evaluation",)),
    ("entry points", ("main", "sample", "evaluate", "export", "plot_metrics", "compile_check", "cli", "__init__")),
)

# One concern per module: past this length a module has in practice held two, and is split by
# concern rather than growing further.
MAX_MODULE_LINES = 400

# Imports of package modules inside function bodies, as (importer, imported) relative names. A lazy
# import hides a dependency from the reader and from import-time checks, so it is kept only where
# it spares callers a heavy dependency that most of them never use; the reason stands next to it.
# JAX, flax and orbax take over a second to import; these entry points load none of them at
# module level.
_FAST_HELP = "--help and flag errors answer without importing JAX"
LAZY_IMPORTS: dict[tuple[str, str], str] = {
    ("main", "training.experiment"): _FAST_HELP,
    ("main", "training.distributed"): _FAST_HELP,
    ("export", "inference.export"): _FAST_HELP,
    ("export", "training.experiment"): _FAST_HELP,
    ("compile_check", "training.aot"): _FAST_HELP,
    ("compile_check", "training.experiment"): _FAST_HELP,
}


@dataclass(frozen=True)
class Import:
    """One imported package module: where the import statement is, and whether it runs only when
    a function is called."""

    importer: str
    imported: str
    path: str
    line: int
    lazy: bool

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def package_dir() -> Path:
    """The package's source folder as the import system finds it (``PYTHONPATH`` first), without
    importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations, f"{PACKAGE} is not importable"
    return Path(next(iter(spec.submodule_search_locations)))


def relative(module: str) -> str:
    return "__init__" if module == PACKAGE else module.removeprefix(PACKAGE + ".")


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    root = package_dir()
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((PACKAGE, *parts))] = path
    return found


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, path: Path, known: dict[str, Path]):
        self.module, self.known = module, known
        self.path = str(path.relative_to(package_dir().parent))
        # The package a relative import starts from: a package's ``__init__`` is inside itself.
        self.package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        self.depth = 0
        self.found: list[Import] = []

    def _add(self, imported: str, node: ast.AST) -> None:
        if imported == PACKAGE or imported.startswith(PACKAGE + "."):
            self.found.append(Import(self.module, imported, self.path, node.lineno, self.depth > 0))

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            base = ".".join(base + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            # ``from pkg import name`` imports the submodule pkg.name where there is one.
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.known else base, node)


@cache
def imports() -> tuple[Import, ...]:
    """Every import of a package module in the package, module level and function level."""
    known = modules()
    found: list[Import] = []
    for module, path in known.items():
        visitor = _ImportVisitor(module, path, known)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        found.extend(visitor.found)
    # ``from m import a, b`` names m twice when neither is a submodule: one import.
    return tuple(dict.fromkeys(found))


def layer_matches(module: str) -> list[int]:
    """Indices of the layers that claim ``module``."""
    name = relative(module)
    return [
        index
        for index, (_, entries) in enumerate(LAYERS)
        for entry in entries
        if name == entry or (entry != "__init__" and name.startswith(entry + "."))
    ]


def layer_of(module: str) -> int | None:
    matches = layer_matches(module)
    return matches[0] if len(matches) == 1 else None


def layer_name(index: int) -> str:
    return f"{index} {LAYERS[index][0]}"


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path (first module repeated at the end) per strongly connected component of more
    than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    cycles = []
    for component in components:
        members = set(component)
        first = min(component)
        # Shortest path from first back to itself inside the component (breadth-first).
        parent: dict[str, str] = {}
        frontier = [first]
        while first not in parent:
            next_frontier = []
            for node in frontier:
                for child in sorted(edges.get(node, ())):
                    if child in members and child not in parent:
                        parent[child] = node
                        next_frontier.append(child)
            frontier = next_frontier
        path = [first]
        node = parent[first]
        while node != first:
            path.append(node)
            node = parent[node]
        cycles.append([first, *reversed(path[1:]), first])
    return sorted(cycles)


def strongly_connected(edges: dict[str, set[str]], start: str) -> set[str]:
    """The modules that ``start`` reaches and that reach ``start``."""

    def reach(graph: dict[str, set[str]]) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for child in graph.get(todo.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return seen

    reverse: dict[str, set[str]] = {}
    for node, children in edges.items():
        for child in children:
            reverse.setdefault(child, set()).add(node)
    return reach(edges) & reach(reverse)


def module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {module: set() for module in modules()}
    for imp in imports():
        if imp.imported != imp.importer:
            graph[imp.importer].add(imp.imported)
    return graph


def test_every_module_in_exactly_one_layer():
    problems = []
    for module in modules():
        matches = layer_matches(module)
        if len(matches) != 1:
            claimed = ", ".join(layer_name(i) for i in matches) or "no layer"
            problems.append(f"{relative(module)}: {claimed}")
    for name, entries in LAYERS:
        for entry in entries:
            if not any(relative(module) == entry or relative(module).startswith(entry + ".") for module in modules()):
                problems.append(f"LAYERS entry {entry!r} of layer {name!r} names no module")
    if problems:
        pytest.fail("modules must be in exactly one layer of LAYERS:\n" + "\n".join(problems), pytrace=False)


def test_imports_name_existing_modules():
    known = modules()
    missing = [f"{imp.where()} {imp.importer} -> {imp.imported}" for imp in imports() if imp.imported not in known]
    if missing:
        pytest.fail("imports of package modules that do not exist:\n" + "\n".join(missing), pytrace=False)


def test_no_upward_imports():
    upward = []
    for imp in imports():
        low, high = layer_of(imp.importer), layer_of(imp.imported)
        if low is not None and high is not None and high > low:
            upward.append(f"{imp.where()} {imp.importer} -> {imp.imported} ({layer_name(low)} -> {layer_name(high)})")
    if upward:
        pytest.fail(f"{len(upward)} imports point to a higher layer:\n" + "\n".join(upward), pytrace=False)


def test_no_import_cycles():
    graph = module_graph()
    cycles = find_cycles(graph)
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(relative(m) for m in cycle))
        members = strongly_connected(graph, cycle[0])
        if len(members) > len(cycle) - 1:
            lines.append(f"  (one of the cycles among {', '.join(sorted(relative(m) for m in members))})")
    if cycles:
        pytest.fail(f"{len(cycles)} import cycles:\n" + "\n".join(lines), pytrace=False)


def test_lazy_imports_only_where_allowed():
    seen = set()
    unlisted = []
    for imp in imports():
        if not imp.lazy:
            continue
        pair = (relative(imp.importer), relative(imp.imported))
        seen.add(pair)
        if pair not in LAZY_IMPORTS:
            unlisted.append(f"{imp.where()} {pair[0]} -> {pair[1]}")
    stale = [f"{a} -> {b}" for a, b in LAZY_IMPORTS if (a, b) not in seen]
    blank = [f"{a} -> {b}" for (a, b), reason in LAZY_IMPORTS.items() if not reason.strip()]
    message = []
    if unlisted:
        message += [f"{len(unlisted)} imports inside functions not in LAZY_IMPORTS:", *unlisted]
    if stale:
        message += ["LAZY_IMPORTS entries with no such import:", *stale]
    if blank:
        message += ["LAZY_IMPORTS entries without a reason:", *blank]
    if message:
        pytest.fail("\n".join(message), pytrace=False)


def test_modules_are_short():
    long = []
    for module, path in modules().items():
        count = len(path.read_text().splitlines())
        if count > MAX_MODULE_LINES:
            long.append(f"{relative(module)}: {count} lines")
    if long:
        pytest.fail(f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long), pytrace=False)


def test_cycle_finder_reports_a_path():
    # The cycle test can fail: a three-module loop beside an acyclic edge gives one path.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_module_table_has_a_row_per_module():
    rows = module_table().splitlines()[2:]
    assert len(rows) == len(modules())
    assert all(f"`{relative(m)}`" in "".join(rows) for m in modules())


def module_table() -> str:
    """Markdown table of the modules by layer, with the first sentence of each module's docstring."""
    rows = ["| layer | module | what it is for |", "| --- | --- | --- |"]
    by_layer = sorted(modules().items(), key=lambda item: (layer_of(item[0]) is None, layer_of(item[0]) or 0, item[0]))
    for module, path in by_layer:
        layer = layer_of(module)
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        paragraph = " ".join(doc.strip().split("\n\n")[0].split())
        first = re.split(r"(?<=[.!?])\s", paragraph)[0].replace("|", "\\|")
        rows.append(f"| {layer_name(layer) if layer is not None else '?'} | `{relative(module)}` | {first} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        print(module_table())
    else:
        sys.exit("usage: python tests/test_layering.py --table")
