"""The API reference in docs/reference documents every public name (``make docs`` builds it in strict mode, so a
name that does not resolve fails there)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import properlm

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference"


def _documented_modules() -> list[str]:
    return [m for page in sorted(REFERENCE.glob("*.md"))
            for m in re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), re.M)]


def test_every_public_name_is_in_the_reference():
    modules = [importlib.import_module(m) for m in _documented_modules()]
    missing = []
    for name in properlm.__all__:
        obj = getattr(properlm, name)
        if not any(getattr(obj, "__module__", None) == m.__name__ or name in getattr(m, "__all__", ())
                   for m in modules if m is not properlm):
            missing.append(name)
    assert not missing, f"not in docs/reference: {missing}"


def test_every_public_submodule_has_a_page():
    wanted = {"properlm.rules", "properlm.loss", "properlm.stats", "properlm.fused", "properlm.distributed",
              "properlm.dtensor", "properlm.integrations.transformers", "properlm.integrations.schedule",
              "properlm.metrics", "properlm.decoding"}
    assert wanted <= set(_documented_modules()), sorted(wanted - set(_documented_modules()))


def test_every_example_is_in_the_docs():
    docs = REFERENCE.parent
    included = {m for page in docs.rglob("*.md")
                for m in re.findall(r'--8<-- "examples/([\w.]+\.py)"', page.read_text(encoding="utf-8"))}
    examples = {p.name for p in (docs.parent / "examples").glob("*.py")}
    assert examples == included, (sorted(examples - included), sorted(included - examples))
