"""MkDocs hooks of the properlm site (``hooks:`` in mkdocs.yml; excluded from the pages by ``exclude_docs``).

1. Repository files the pages link to are served from where they lie, not copied into docs/: the benchmark
   write-ups ``benchmarks/README.md`` and ``benchmarks/RESULTS.md`` become pages at ``benchmarks/``, and the
   committed figures ``benchmarks/figures/*.png`` are served at the same paths. A page links to them as
   ``benchmarks/RESULTS.md`` relative to docs/ (``../benchmarks/...`` from a sub-folder), and the links inside
   those files (``figures/x.png``, ``README.md``) resolve as they do in the repository.
2. Generated regions, written into the pages themselves so that they read whole in the repository too (not only
   on the site), and refreshed by ``make docs-sync`` (``python docs/hooks.py --sync``; ``tests/test_docs.py``
   fails when a page is out of date). A region is

       <!-- generated: WHAT -->
       ...the generated text...
       <!-- end generated -->

   with WHAT one of ``include examples/NAME.py`` (the script, as a python block), ``properlm-help COMMAND``
   (the ``--help`` text of ``properlm COMMAND``, from the parsers, so it cannot drift from the code) and
   ``properlm-train-options`` (a table of every ``properlm train`` option and YAML key,
   :func:`properlm.training.config_fields`). The build expands them again (the same text when in sync).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
#: repository files served by the site, as globs relative to the repository root
REPOSITORY_FILES = ("benchmarks/README.md", "benchmarks/RESULTS.md", "benchmarks/figures/*.png")

#: a generated region: its WHAT and its body
REGION = re.compile(r"<!-- generated: ([^>]+?) -->\n.*?<!-- end generated -->", re.S)


def on_files(files: Files, config: Any) -> Files:
    """Add the repository files of :data:`REPOSITORY_FILES` to the site, at their repository paths."""
    for pattern in REPOSITORY_FILES:
        for path in sorted(ROOT.glob(pattern)):
            uri = path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def _command_help(command: str, columns: int = 100) -> str:
    from properlm.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command not in sub.choices:
        raise ValueError(f"docs: unknown properlm command {command!r} (known: {', '.join(sub.choices)})")
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(columns)
    try:
        return sub.choices[command].format_help()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _train_options() -> str:
    from properlm.training import config_fields

    rows = ["| YAML key | flag | type | default | meaning |", "|---|---|---|---|---|"]
    for f in config_fields():
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        default = "none" if f.default is None else f.default
        meaning = f.metadata.get("help", "")
        if "choices" in f.metadata:
            meaning += " (one of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + ")"
        flag = "--" + f.name.replace("_", "-")
        if kind == "bool":
            flag += " / --no-" + f.name.replace("_", "-")
        rows.append(f"| `{f.name}` | `{flag}` | `{_cell(kind)}` | `{_cell(default)}` | {_cell(meaning)} |")
    return "\n".join(rows)


def generated_text(what: str) -> str:
    """The body of the generated region ``what`` (see the module docstring)."""
    kind, _, arg = what.partition(" ")
    if kind == "include":
        code = (ROOT / arg).read_text(encoding="utf-8")
        return f"```python\n{code.rstrip()}\n```"
    if kind == "properlm-help":
        return "```text\n" + _command_help(arg).rstrip() + "\n```"
    if kind == "properlm-train-options":
        return _train_options()
    raise ValueError(
        f"docs: unknown generated region {what!r} (include PATH, properlm-help COMMAND, properlm-train-options)"
    )


def expand(markdown: str) -> str:
    """``markdown`` with every generated region's body regenerated."""
    return REGION.sub(
        lambda m: f"<!-- generated: {m.group(1)} -->\n{generated_text(m.group(1))}\n<!-- end generated -->", markdown
    )


def pages() -> list[Path]:
    """The markdown pages that may hold generated regions."""
    return sorted((ROOT / "docs").rglob("*.md"))


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Regenerate the page's generated regions (the same text when the page is in sync)."""
    return expand(markdown)


def main(argv: list[str] | None = None) -> int:
    """``python docs/hooks.py --sync`` rewrites the out-of-date pages; ``--check`` lists them (exit 1)."""
    parser = argparse.ArgumentParser(description="Refresh the generated regions of the documentation pages.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--sync", dest="mode", action="store_const", const="--sync", help="rewrite stale pages")
    group.add_argument("--check", dest="mode", action="store_const", const="--check", help="list stale pages")
    mode = parser.parse_args(argv).mode
    stale = []
    for path in pages():
        text = path.read_text(encoding="utf-8")
        new = expand(text)
        if new != text:
            stale.append(path.relative_to(ROOT).as_posix())
            if mode == "--sync":
                path.write_text(new, encoding="utf-8")
    verb = "rewrote" if mode == "--sync" else "out of date (run `make docs-sync`)"
    print(f"{verb}: {', '.join(stale)}" if stale else "generated regions are up to date")
    return 1 if stale and mode == "--check" else 0


if __name__ == "__main__":
    raise SystemExit(main())
