"""``properlm`` console script: dispatches to one module per sub-command.

Each command module in :data:`COMMANDS` exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
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


def main(argv: list[str] | None = None) -> int:
    """Run ``properlm`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
