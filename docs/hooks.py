"""MkDocs hooks of the properlm site (``hooks:`` in mkdocs.yml; excluded from the pages by ``exclude_docs``).

1. Repository files the pages link to are served from where they lie, not copied into docs/: the benchmark
   write-ups ``benchmarks/README.md`` and ``benchmarks/RESULTS.md`` become pages at ``benchmarks/``, and the
   committed figures ``benchmarks/figures/*.png`` are served at the same paths. A page links to them as
   ``benchmarks/RESULTS.md`` relative to docs/ (``../benchmarks/...`` from a sub-folder), and the links inside
   those files (``figures/x.png``, ``README.md``) resolve as they do in the repository.
2. The command-line reference is generated from the parsers, so it cannot drift from the code:
   ``<!-- properlm-help: COMMAND -->`` becomes the ``--help`` text of ``properlm COMMAND``, and
   ``<!-- properlm-train-options -->`` a table of every ``properlm train`` option and YAML key
   (:func:`properlm.training.config_fields`).
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

_HELP = re.compile(r"<!-- properlm-help: ([a-z]+) -->")
_OPTIONS = "<!-- properlm-train-options -->"


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


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Replace the command-line placeholders of a page by the generated help and option table."""
    if _OPTIONS in markdown:
        markdown = markdown.replace(_OPTIONS, _train_options())
    return _HELP.sub(lambda m: "```text\n" + _command_help(m.group(1)).rstrip() + "\n```", markdown)
