"""The studies' command line: the shared options (:data:`OPTIONS`, :func:`add_options`, :class:`HelpFormatter`),
the argument checks (:func:`check_data_dir`, :func:`int_list`, :func:`parse_protocols`, :func:`check_stages`) and
one set of settings per work directory (:func:`check_settings`)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from _runner import read_json

__all__ = [
    "OPTIONS",
    "HelpFormatter",
    "add_options",
    "check_data_dir",
    "check_settings",
    "check_stages",
    "int_list",
    "parse_protocols",
]


# ------------------------------------------------------------------------------ command-line options

#: options shared by the studies' scripts: name -> ``add_argument`` keywords; a script
#: names the ones it takes with :func:`add_options`, in its own order, overriding defaults and help
OPTIONS: dict[str, dict[str, Any]] = {
    "work_dir": {"help": "where runs, evaluations and the summary go"},
    "t1": {"type": int, "help": "T1: steps of the logarithmic stage before the switch"},
    "t2": {"type": int, "help": "T2: steps after the switch (every protocol runs T1 + T2)"},
    "batch_size": {"type": int, "help": "examples per step"},
    "learning_rate": {"type": float, "help": "peak learning rate"},
    "warmup_steps": {"type": int, "help": "linear warm-up steps before inverse-sqrt decay"},
    "smoothing": {"type": float, "default": 0.1, "help": "score smoothing eps of every protocol"},
    "vocab_size": {"type": int, "help": "joint BPE vocabulary size"},
    "hidden_size": {"type": int, "default": 128, "help": "model width"},
    "num_layers": {"type": int, "default": 2, "help": "encoder and decoder layers (each)"},
    "num_heads": {"type": int, "default": 4, "help": "attention heads"},
    "ffn_size": {"type": int, "default": 512, "help": "feed-forward width"},
    "dropout": {"type": float, "default": 0.1, "help": "dropout"},
    "eval_every": {"type": int, "default": 250, "help": "validation scores every N steps (the curves)"},
    "save_every": {
        "type": int,
        "default": 500,
        "help": "checkpoint every N steps (T1 must be a multiple: the branches start from it)",
    },
    "num_beams": {"type": int, "help": "beam width of every decoding"},
    "eval_batch_size": {"type": int, "default": 50, "help": "sentences per decoding batch"},
    "bootstrap_samples": {"type": int, "default": 1000, "help": "paired bootstrap resamples"},
    "threads": {"type": int, "default": 1, "help": "torch threads of each step"},
    "jobs": {"type": int, "default": 1, "help": "steps run at the same time (independent runs in parallel)"},
    "report_only": {"action": "store_true", "help": "only aggregate what has finished"},
    "dry_run": {"action": "store_true", "help": "print the commands that would run"},
    "archive": {
        "metavar": "DIR",
        "default": None,
        "help": "also keep the small outputs of every finished step (results, hypotheses, metric logs; no "
        "weights) in DIR, and restore finished steps from DIR into a new --work-dir, so a study that "
        "outlives its machine continues on the next one (commit DIR; see _archive.py)",
    },
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where it is ``None`` (the help text then says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_options(parser: Any, options: dict[str, Any]) -> None:
    """Add the shared :data:`OPTIONS` named in ``options`` to an ``argparse`` parser, in that order.

    ``options`` maps an option name (``"batch_size"`` for ``--batch-size``) to its default, or to a
    dict of ``add_argument`` keywords that override the shared ones (``{}``: as they are).
    """
    for name, value in options.items():
        kwargs = {**OPTIONS[name], **(value if isinstance(value, dict) else {"default": value})}
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


# ------------------------------------------------------------------------------ argument checks


def check_data_dir(prog: str, data_dir: str, files: Sequence[str], expected: str) -> None:
    """Exit (``SystemExit`` naming ``prog``) unless ``data_dir`` holds every one of ``files``."""
    missing = [f for f in files if not os.path.isfile(os.path.join(data_dir, f))]
    if missing:
        raise SystemExit(
            f"{prog}: data directory {data_dir!r} lacks {', '.join(missing)} (expected {expected}: {', '.join(files)})"
        )


def int_list(text: str) -> list[int]:
    """``"1,2, 3"`` -> ``[1, 2, 3]`` (empty items skipped); ``ValueError`` on a non-integer."""
    return [int(s) for s in text.split(",") if s.strip()]


def parse_protocols(
    prog: str, text: str, protocols: Sequence[str], branches: Sequence[str], root: str = "a"
) -> list[str]:
    """The comma-separated protocol names of ``text``, each one of ``protocols``; exit when there is
    none, one is unknown, or one of ``branches`` (which start from a checkpoint of ``root``) is named
    without ``root``."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names or any(p not in protocols for p in names):
        raise SystemExit(f"{prog}: --protocols {text!r}: allowed values are {', '.join(protocols)}")
    if any(p in branches for p in names) and root not in names:
        raise SystemExit(f"{prog}: protocols {', '.join(branches)} branch from {root}'s checkpoint; include {root}")
    return names


def check_stages(prog: str, args: Any, positive: Sequence[str]) -> None:
    """Exit unless the options named in ``positive`` are positive and ``args.t1`` is a multiple of
    ``args.save_every`` (the branches start from the checkpoint at T1)."""
    for name in positive:
        if getattr(args, name) <= 0:
            raise SystemExit(f"{prog}: --{name.replace('_', '-')} must be positive")
    if args.t1 % args.save_every:
        raise SystemExit(f"{prog}: --t1 {args.t1} must be a multiple of --save-every {args.save_every}")


def check_settings(
    prog: str,
    work_dir: str,
    settings: dict[str, Any],
    *,
    record: bool,
    reuse: str | None = None,
    reuse_keys: Sequence[str] = (),
) -> None:
    """Keep one set of ``settings`` per work directory, in ``WORK_DIR/settings.json``.

    Exits when ``work_dir`` holds runs made with other settings (or when ``reuse``, a work directory
    whose runs are continued, differs from ``settings`` in one of ``reuse_keys``), then records
    ``settings`` there if ``record`` and none are recorded yet.
    """
    path = os.path.join(work_dir, "settings.json")
    if os.path.isfile(path):
        saved = read_json(path)
        diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if diff:
            raise SystemExit(
                f"{prog}: {work_dir} holds runs made with other settings "
                f"(option: (saved, now)) {diff}; use the same options or another --work-dir"
            )
    if reuse:
        other = os.path.join(reuse, "settings.json")
        if not os.path.isfile(other):
            raise SystemExit(f"{prog}: --reuse {reuse!r} holds no settings.json")
        saved = read_json(other)
        diff = {k: (saved.get(k), settings[k]) for k in reuse_keys if saved.get(k) != settings[k]}
        if diff:
            raise SystemExit(f"{prog}: --reuse {reuse}: its runs used other settings (option: (theirs, now)) {diff}")
    if record and not os.path.isfile(path):
        os.makedirs(work_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)
