"""``properlm train``: train a model with a scoring rule (options from flags and/or a YAML file).

Every option is a field of :class:`properlm.training.TrainConfig`; the YAML file uses the same
names (``learning_rate: 3e-4`` or ``learning-rate: 3e-4``). Flags given on the command line
override the YAML file, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

from ..data import DataError
from ..models import ModelLoadError
from ..training import (
    ConfigError,
    TrainConfig,
    config_fields,
    find_checkpoints,
    load_yaml_config,
    make_config,
    run_training,
)
from ..training.checkpoints import checkpoint_step
from ..training.resume import options_to_resume

_GROUP_TITLES = {
    "model": "model (--model and/or --gguf-file, or --init; the other options here configure --init only)",
    "data": "data",
    "objective": "scoring rule (or an improper baseline objective)",
    "optimisation": "optimisation",
    "lora": "LoRA (peft)",
    "checkpoints": "evaluation, checkpoints and logs",
}

EPILOG = """\
examples:
  properlm train --init tiny-seq2seq --source-file train.de --target-file train.en \\
      --rule spherical --max-steps 2000 --eval-steps 200 --validation-fraction 0.05 --output-dir runs/sph
  properlm train --model ./SmolLM2-135M-Instruct --train-file alpaca.json --lora --bf16 \\
      --schedule logarithmic:13000,brier:5000 --lr-scheduler inverse_sqrt --warmup-steps 4000 \\
      --save-steps 1000 --average-last 5 --output-dir runs/alpaca
  properlm train --model ./SmolLM2-135M-Instruct --train-file alpaca.json --improper-loss dft \\
      --output-dir runs/dft                                  # an improper baseline (DFT), not a scoring rule
  properlm train --config run.yaml --learning-rate 3e-4        # flags override the YAML file
  properlm train --config run.yaml --resume                    # continue a stopped run
  properlm train --resume --output-dir runs/sph                # the same, with the options saved in the run
  torchrun --nproc_per_node 4 -m properlm.cli.main train --config run.yaml   # data parallel

outputs in --output-dir: checkpoint-N/, final/ (model + tokenizer), averaged/ (with --average-last),
metrics.jsonl (one record per log step and evaluation), runs/ (TensorBoard), results.json.
"""


_METAVARS = {
    "model": "DIR_OR_HUB_ID",
    "rule": "RULE",
    "schedule": "RULE:STEPS,...",
    "source_lang": "LANG",
    "target_lang": "LANG",
    "lora_target_modules": "NAMES",
}


def _base_type(f: Any) -> str:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return kind.replace(" | None", "")


def _add_option(group: argparse._ArgumentGroup, f: Any) -> None:
    flag = "--" + f.name.replace("_", "-")
    meta = f.metadata
    help_text = meta["help"]
    kind = _base_type(f)
    if kind == "bool":
        group.add_argument(
            flag,
            dest=f.name,
            action=argparse.BooleanOptionalAction,
            default=argparse.SUPPRESS,
            help=f"{help_text} (default: {'on' if f.default else 'off'})",
        )
        return
    conv = {"int": int, "float": float, "str": str}[kind]
    default = "none" if f.default is None else f.default
    kwargs: dict[str, Any] = {
        "dest": f.name,
        "type": conv,
        "default": argparse.SUPPRESS,
        "help": f"{help_text} (default: {default})",
    }
    if "choices" in meta:
        kwargs["choices"] = meta["choices"]
    else:
        kwargs["metavar"] = _METAVARS.get(f.name) or (
            "PATH" if f.name.endswith(("_file", "_dir")) else {"int": "N", "float": "X", "str": "STR"}[kind]
        )
    group.add_argument(flag, **kwargs)


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every ``properlm train`` option to ``parser``."""
    parser.add_argument(
        "--config",
        metavar="YAML",
        default=None,
        help="read options from a YAML mapping (keys as the long options, with - or _); command-line flags override it",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in config_fields():
        g = f.metadata.get("group", "other")
        if g not in groups:
            groups[g] = parser.add_argument_group(_GROUP_TITLES.get(g, g))
        _add_option(groups[g], f)
    return parser


def register(subparsers: Any) -> None:
    """Add the ``train`` command to the ``properlm`` sub-command parsers."""
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a model with a scoring rule",
        description="Train or fine-tune a Hugging Face model (or a fresh tiny one) with a strictly proper "
        "scoring rule as the loss: logarithmic (cross-entropy), brier, spherical, power:ALPHA, "
        "pseudo-spherical:ALPHA, or a schedule of them. Arguments and data are validated before "
        "anything is loaded.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build_parser(parser)
    parser.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Merge the YAML file (``args.config``) and the flags given on the command line."""
    names = {f.name for f in config_fields()}
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml_config(args.config))
    values.update({k: v for k, v in vars(args).items() if k in names})
    return values


def with_saved_options(values: dict[str, Any]) -> dict[str, Any]:
    """With ``resume`` and no data options: the options saved with the run's newest checkpoint, under ``values``.

    See :func:`properlm.training.resume.options_to_resume`; says which file the options came from.
    """
    path, merged = options_to_resume(values)
    if path is not None and os.environ.get("RANK", "0") == "0":
        print(f"properlm train: --resume: the options not given are the run's, from {path}", flush=True)
    return merged


def interrupted(args: argparse.Namespace, command: str) -> str:
    """What Ctrl-C leaves of a ``properlm train`` run: its newest checkpoint and the command that continues it."""
    try:
        output_dir = str(options_from_args(args).get("output_dir") or TrainConfig.output_dir)
    except ConfigError:
        output_dir = str(getattr(args, "output_dir", TrainConfig.output_dir))
    checkpoints = find_checkpoints(output_dir)
    if not checkpoints:
        return (
            f"properlm train: interrupted before a checkpoint was saved in {output_dir} (--save-steps N saves "
            f"one every N steps); nothing to resume: run the command again to start afresh"
        )
    step = checkpoint_step(checkpoints[-1])
    return (
        f"properlm train: interrupted; saved: {checkpoints[-1]} (step {step}); continue with: "
        f"properlm train --resume --output-dir {shlex.quote(output_dir)}"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``properlm train`` with parsed arguments; returns the exit code."""
    try:
        source = f"config file {args.config}" if getattr(args, "config", None) else "arguments"
        cfg = make_config(with_saved_options(options_from_args(args)), source=source)
        results = run_training(cfg)
    except (ConfigError, DataError, ModelLoadError) as exc:
        print(f"properlm train: error: {exc}", file=sys.stderr)
        return 2
    if results and os.environ.get("RANK", "0") == "0":
        summary: dict[str, Any] = {
            k: results[k] for k in ("global_step", "final_model", "averaged_model") if k in results
        }
        if "eval" in results:
            summary["eval"] = {k: v for k, v in results["eval"].items() if k.startswith(("eval_loss", "eval_score"))}
        print(json.dumps(summary, indent=2))
    return 0
