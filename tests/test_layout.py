"""The package layout: the tree of ``docs/reference/properlm.md`` lists every module, the core imports nothing of the
application, and the application modules import one another without cycles."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "properlm"
LAYOUT_PAGE = ROOT / "docs" / "reference" / "properlm.md"

#: the application subpackages (everything else in ``src/properlm`` is the core)
APPLICATION = ("cli", "data", "evaluation", "integrations", "models", "training")


def _modules() -> dict[str, Path]:
    """``{dotted name: path}`` of every module of the package (a package by its ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_application(module: str) -> bool:
    parts = module.split(".")
    return len(parts) > 1 and parts[1] in APPLICATION


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The properlm modules that ``module`` imports anywhere in its source (lazy imports included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names]
            # ``from package import module`` depends on the module; ``from package import name``, on the package
            names = subs if all(n in known for n in subs) else [target, *subs]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


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
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.name != "__init__.py":
            actual.add(rel.with_suffix("").as_posix() + ".py")
        for parent in rel.parents:
            if parent.as_posix() != ".":
                actual.add(parent.as_posix())
    assert listed == actual, (
        f"docs/reference/properlm.md 'Package layout' lacks {sorted(actual - listed)} and lists "
        f"{sorted(listed - actual)} that do not exist"
    )


def test_the_core_imports_nothing_of_the_application():
    modules = _modules()
    known = set(modules)
    wrong = {
        m: sorted(i for i in _imports(m, p, known) if _is_application(i))
        for m, p in modules.items()
        if not _is_application(m) and m != "properlm"
    }
    assert not {m: i for m, i in wrong.items() if i}, wrong


def test_the_application_modules_import_one_another_without_cycles():
    modules = _modules()
    known = set(modules)
    graph = {m: {i for i in _imports(m, p, known) if _is_application(i)} for m, p in modules.items()}
    graph = {m: deps for m, deps in graph.items() if _is_application(m)}
    # a package __init__ that re-exports its modules depends on them: a module that imports names from the package
    # depends on every module the package imports
    cycles = []
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append([*trail[trail.index(d) :], d] if d in trail else [m, d])
            elif d not in state:
                visit(d, [*trail, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
