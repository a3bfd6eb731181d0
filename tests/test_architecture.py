"""The package's architecture (issue 29): the layout page lists every module, and dependencies point one way.

``docs/reference/properlm.md`` shows the package layout, one line per module; the first test keeps it true. The
import graph of ``src/properlm`` is built from every ``import`` / ``from ... import`` statement of every module (those
inside functions and ``if TYPE_CHECKING:`` blocks included: a lazy import is still a dependency). The tests fail on an
import cycle, on an import from the torch-only core into application code, and on a private name (``_x``) taken from
another module.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
LAYOUT_PAGE = ROOT / "docs" / "reference" / "properlm.md"
PACKAGE = "properlm"

#: the torch-only core: the scoring rules, the token statistics, and the loss paths built on them
CORE = ("rules", "stats", "options", "loss", "fused", "distributed", "dtensor", "compiled", "improper")
#: the application packages, which may use the core and never the other way round
APPLICATION = ("training", "evaluation", "integrations", "cli", "data", "models")


@dataclass(frozen=True)
class Import:
    """One imported name: ``source`` imports ``name`` (``None`` for a whole module) from module ``target``."""

    source: str
    target: str
    name: str | None
    line: int


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__.py``)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(modules: dict[str, Path]) -> list[Import]:
    """Every import of a package module by a package module, resolved to the module that defines the name (a
    ``from package import submodule`` is an import of the submodule)."""
    found = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found += [
                    Import(name, a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE
                ]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != PACKAGE:
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in modules:
                        found.append(Import(name, sub, None, node.lineno))
                    else:
                        found.append(Import(name, target, a.name, node.lineno))
    return found


def layer(module: str) -> str | None:
    """``"core"``, ``"application"`` or ``None`` (the top-level package itself) for a module name."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    if parts[1] in CORE:
        return "core"
    if parts[1] in APPLICATION:
        return "application"
    raise AssertionError(f"{module}: neither core nor application: add it to CORE or APPLICATION in {__file__}")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Import]]:
    modules = module_files()
    return modules, imports(modules)


def test_the_layout_in_the_docs_lists_every_module():
    text = LAYOUT_PAGE.read_text(encoding="utf-8")
    block = text.split("## Package layout", 1)[1].split("    src/properlm/\n", 1)[1].split("\n\n", 1)[0]
    listed: set[str] = set()
    stack: list[tuple[int, str]] = []  # (indent, folder)
    for line in block.splitlines():
        m = re.match(r"^( +)(\S+)\s{2,}\S", line)
        assert m, f"not 'NAME  what it does': {line!r}"
        indent, name = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "/".join([folder for _, folder in stack] + [name.rstrip("/")])
        listed.add(path)
        if name.endswith("/"):
            stack.append((indent, name.rstrip("/")))
    actual = set()
    for path in (SRC / PACKAGE).rglob("*.py"):
        rel = path.relative_to(SRC / PACKAGE)
        if rel.name != "__init__.py":
            actual.add(rel.with_suffix("").as_posix() + ".py")
        for parent in rel.parents:
            if parent.as_posix() != ".":
                actual.add(parent.as_posix())
    assert listed == actual, (
        f"docs/reference/properlm.md 'Package layout' lacks {sorted(actual - listed)} and lists "
        f"{sorted(listed - actual)} that do not exist"
    )


def test_every_module_is_placed(graph):
    modules, _ = graph
    for name in modules:
        layer(name)


def test_no_import_cycle(graph):
    modules, found = graph
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for imp in found:
        if imp.target in modules and imp.target != imp.source:
            edges[imp.source].add(imp.target)
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_core_imports_no_application_code(graph):
    _, found = graph
    bad = [
        f"{i.source} (line {i.line}) imports {i.target}"
        for i in found
        if layer(i.source) == "core" and layer(i.target) == "application"
    ]
    assert bad == []


def test_the_core_does_not_import_the_top_level_package(graph):
    _, found = graph
    bad = [f"{i.source} (line {i.line})" for i in found if layer(i.source) == "core" and i.target == PACKAGE]
    assert bad == []


def test_no_private_name_crosses_a_module_boundary(graph):
    _, found = graph
    bad = [
        f"{i.source} (line {i.line}) imports {i.name} from {i.target}"
        for i in found
        if i.name and i.name.startswith("_") and not i.name.startswith("__") and i.target != i.source
    ]
    assert bad == []


def test_the_checks_catch_what_they_look_for():
    """The graph code finds a cycle and resolves relative imports (so that the tests above can fail)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    modules = module_files()
    assert f"{PACKAGE}.rules" in modules and f"{PACKAGE}.cli" in modules
