"""``properlm`` console script: dispatches to one module per sub-command.

Each command module in :data:`COMMANDS` exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

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


def main(argv: list[str] | None = None) -> int:
    """Run ``properlm`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Ctrl-C prints one line (:func:`interrupted_message`) instead of a traceback and returns
    :data:`EXIT_INTERRUPTED`.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    command = shlex.join(["properlm", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(interrupted_message(args, command), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
