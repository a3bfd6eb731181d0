"""The documentation: the API reference in docs/reference documents every public name and module (``make docs``
builds it in strict mode, so a name that does not resolve fails there), the code snippets of the concept and how-to
pages run, and the README's links and the sections other pages refer to are there."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import properlm

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference"
PACKAGE = ROOT / "src" / "properlm"


def _documented_modules() -> list[str]:
    return [
        m
        for page in sorted(REFERENCE.glob("*.md"))
        for m in re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), re.M)
    ]


def _public_modules() -> list[str]:
    """Every module of the package whose dotted name has no component starting with ``_`` (``__init__`` files
    stand for their package)."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if not any(p.startswith("_") for p in parts):
            out.append(".".join(parts))
    return [m for m in out if m in _OPTIONAL or importlib.import_module(m).__name__ == m]


#: a module that needs an optional package: not imported by the discovery (it is a module of its own)
_OPTIONAL = ("properlm.fused.triton_kernels",)


def test_every_public_name_is_in_the_reference():
    modules = [importlib.import_module(m) for m in _documented_modules() if m != "properlm.fused.triton_kernels"]
    missing = []
    for name in properlm.__all__:
        obj = getattr(properlm, name)
        if not any(
            getattr(obj, "__module__", None) == m.__name__ or name in getattr(m, "__all__", ())
            for m in modules
            if m is not properlm
        ):
            missing.append(name)
    assert not missing, f"not in docs/reference: {missing}"


def test_every_public_submodule_has_a_page():
    wanted = set(_public_modules())
    # a sanity check of the discovery itself
    assert {
        "properlm",
        "properlm.rules",
        "properlm.fused.chunked",
        "properlm.cli.train",
        "properlm.evaluation",
        "properlm.evaluation.metrics",
        "properlm.evaluation.run",
    } <= wanted
    documented = set(_documented_modules())
    assert wanted <= documented, (
        f"public modules without a '::: module' block in docs/reference: {sorted(wanted - documented)}"
    )
    assert documented <= wanted, f"docs/reference names modules that do not exist: {sorted(documented - wanted)}"


def test_every_example_is_in_the_docs():
    pattern = r"<!-- generated: include examples/([\w.]+\.py) -->"
    included = {m for page in DOCS.rglob("*.md") for m in re.findall(pattern, page.read_text(encoding="utf-8"))}
    examples = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert examples == included, (sorted(examples - included), sorted(included - examples))


#: a python block, optionally preceded by the marker that exempts it (a torchrun script, a fragment, a slow compile)
_BLOCK = re.compile(r"(<!-- snippet: not run[^\n]*-->\n)?```python\n(.*?)```", re.S)
_SNIPPET_PAGES = ("concepts", "how-to")
_GENERATED = re.compile(r"<!-- generated: [^>]+ -->\n.*?<!-- end generated -->", re.S)

_RUNNER = r"""
import json, sys, traceback
failures, ran = [], 0
for page, blocks in json.load(open(sys.argv[1])).items():
    namespace = {"__name__": "__main__"}          # the blocks of one page run in order, in one namespace
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page} (python block {i + 1})", "exec"), namespace)
            ran += 1
        except BaseException:
            failures.append(traceback.format_exc(limit=4))
print(json.dumps({"ran": ran, "failures": failures}))
"""


def _snippets() -> tuple[dict[str, list[str]], list[str]]:
    """``{page: [code, ...]}`` of the python blocks to run, and the exempted blocks' markers."""
    blocks: dict[str, list[str]] = {}
    exempt: list[str] = []
    for folder in _SNIPPET_PAGES:
        for page in sorted((DOCS / folder).glob("*.md")):
            # an included examples/ script runs in tests/test_examples.py, the generated help is text
            text = _GENERATED.sub("", page.read_text(encoding="utf-8"))
            for marker, code in _BLOCK.findall(text):
                if marker:
                    exempt.append(f"{page.relative_to(DOCS)}: {marker.strip()}")
                else:
                    blocks.setdefault(str(page.relative_to(DOCS)), []).append(code)
    return blocks, exempt


@pytest.mark.slow
def test_snippets_run(tmp_path):
    """Every python block of the concept and how-to pages runs (in a fresh process, so the rules they register
    stay out of this one), except those marked ``<!-- snippet: not run (reason) -->``; each marker names its
    reason."""
    blocks, exempt = _snippets()
    assert sum(map(len, blocks.values())) >= 8, blocks.keys()
    for marker in exempt:
        assert re.search(r"not run[^(]*\(.{10,}\)", marker), f"a snippet marker without its reason: {marker}"
    spec = tmp_path / "snippets.json"
    spec.write_text(json.dumps(blocks), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(spec)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["failures"], "\n".join(result["failures"])
    assert result["ran"] == sum(map(len, blocks.values()))


def test_readme_is_a_landing_page_with_working_links():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    # .ci/run runs the README's test command; other issues and the training warning refer to these sections
    assert "make test" in text and "make demo" in text
    for heading in ("## Does it help?", "## Score smoothing"):
        assert re.search(rf"^{re.escape(heading)}", text, re.M), heading
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://", t)]
    assert len(links) >= 20, links
    broken = [t for t in links if not (ROOT / t.split("#")[0]).exists()]
    assert not broken, f"README links to missing files: {broken}"


def test_no_page_repeats_a_section():
    """A heading appears once per page: a results section edited in place, not appended twice."""
    pages = [
        ROOT / "README.md",
        ROOT / "benchmarks" / "RESULTS.md",
        ROOT / "benchmarks" / "README.md",
        *sorted(DOCS.rglob("*.md")),
    ]
    repeated = {}
    for page in pages:
        lines = page.read_text(encoding="utf-8").splitlines()
        fence = False
        headings = []
        for line in lines:
            if line.startswith("```"):
                fence = not fence
            elif not fence and re.match(r"#{1,3} ", line):
                headings.append(line.strip())
        dup = sorted({h for h in headings if headings.count(h) > 1})
        if dup:
            repeated[str(page.relative_to(ROOT))] = dup
    assert not repeated, f"sections that appear twice: {repeated}"


@pytest.mark.slow
@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_the_first_example_runs_without_the_collapsing_smoothing(page, monkeypatch):
    """The five-line example a new user copies first runs, and is not the paper's masked-log smoothing of a bounded
    rule at V = 32,000 (which flattens the distribution; the library warns about it)."""
    import re
    import warnings

    from properlm import stats

    monkeypatch.setattr(stats, "_WARNED_PAPER_SMOOTHING", set())
    text = (ROOT / page).read_text(encoding="utf-8")
    code = re.search(r"```python\n(import torch, properlm\n.*?)```", text, re.S)
    assert code is not None, f"{page}: the first example is missing"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace: dict = {}
        exec(compile(code.group(1), page, "exec"), namespace)
    assert namespace["loss"].ndim == 0 and namespace["logits"].grad is not None
    assert not [w for w in caught if "masked-log" in str(w.message)]
    bad = code.group(1).replace('rule="spherical")', 'rule="spherical", smoothing=0.1)')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(bad, page, "exec"), {})
    assert [w for w in caught if "masked-log" in str(w.message)]  # the warning the example avoids


@pytest.mark.slow
def test_generated_regions_are_up_to_date():
    """The pages carry the examples, every command's --help and the train options table themselves (they read
    whole in the repository, not only on the site); `make docs-sync` refreshes them, and this fails until it ran."""
    result = subprocess.run(
        [sys.executable, str(DOCS / "hooks.py"), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    trainer = (DOCS / "how-to" / "transformers-trainer.md").read_text(encoding="utf-8")
    assert (ROOT / "examples" / "hf_trainer.py").read_text(encoding="utf-8").strip() in trainer
    options = (DOCS / "how-to" / "command-line.md").read_text(encoding="utf-8")
    assert "usage: properlm train" in options and "| `smoothing_variant` |" in options
