"""``properlm`` console script: dispatches to one module per sub-command.

Each command module in :data:`COMMANDS` exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace, returning an exit code).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shlex
import sys
import warnings
from collections.abc import Iterator

from .. import __version__

#: sub-command modules under ``properlm.cli``, in ``--help`` order
COMMANDS = ("train", "evaluate", "generate", "compare", "demo")


def build_parser() -> argparse.ArgumentParser:
    """The ``properlm`` parser with one sub-command per module of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="properlm",
        description="Train and evaluate language-generation models with strictly proper scoring rules "
        "(logarithmic, Brier, spherical, power:ALPHA, pseudo-spherical:ALPHA).",
    )
    parser.add_argument("--version", action="version", version=f"properlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"properlm.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"properlm.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


#: the directory of the ``properlm`` package (its warnings are the command's own)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: exit status of a command stopped by Ctrl-C (128 + SIGINT), as a shell reports it
EXIT_INTERRUPTED = 130


def interrupted_message(args: argparse.Namespace, command: str) -> str:
    """The line printed when Ctrl-C stops ``command``: what was saved and how to continue.

    A command module may define ``interrupted(args, command) -> str`` for it; otherwise the line says only
    that the command was interrupted.
    """
    module = importlib.import_module(f"properlm.cli.{args.command}")
    describe = getattr(module, "interrupted", None)
    if describe is None:
        return f"properlm {args.command}: interrupted"
    return str(describe(args, command))


def format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """``warnings.formatwarning`` of the console script: ``properlm: warning: MESSAGE``, one line per warning.

    No source path and line (``.../training/run.py:54: UserWarning``): properlm's warnings are about the
    command's options and data. A warning from another package is named with it and its category
    (``properlm: warning: FutureWarning from transformers: ...``). Only the format changes: a recorder of
    warnings (``warnings.catch_warnings(record=True)``, pytest) still receives them.
    """
    origin = _package_of(filename)
    where = "" if origin == "properlm" else f"{category.__name__} from {origin}: "
    return f"properlm: warning: {where}{message}\n"


def _package_of(filename: str) -> str:
    """The top-level package a source file belongs to (``transformers``), else the file's name."""
    path = os.path.normpath(os.path.abspath(filename))
    if path.startswith(_PACKAGE_DIR + os.sep):
        return "properlm"
    parts = path.split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return os.path.splitext(parts[parts.index(marker) + 1])[0]
    return os.path.basename(filename)


@contextlib.contextmanager
def console_warnings() -> Iterator[None]:
    """Format Python warnings with :func:`format_warning` while a command runs (the console script only)."""
    previous = warnings.formatwarning
    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = previous


def main(argv: list[str] | None = None) -> int:
    """Run ``properlm`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Ctrl-C prints one line (:func:`interrupted_message`) instead of a traceback and returns
    :data:`EXIT_INTERRUPTED`; warnings print as ``properlm: warning: MESSAGE`` (:func:`console_warnings`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    command = shlex.join(["properlm", *(sys.argv[1:] if argv is None else argv)])
    try:
        with console_warnings():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        start = "\n" if sys.stderr.isatty() else ""  # off the line of a progress bar and the echoed ^C
        print(start + interrupted_message(args, command), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
