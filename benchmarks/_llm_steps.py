"""The steps of ``reproduce_llm.py``: run directories, the ``properlm`` commands of training and
evaluation and the plan (:func:`plan`, a list of :class:`_runner.Step`, run by :func:`_runner.run_study`)."""

from __future__ import annotations

import argparse
import os

import _runner
from _llm_common import ARMS, BASELINE, EXTRA_MAX_LENGTH, EXTRA_MAX_NEW_TOKENS, Arm, schedule_argv, switch_branch
from _runner import RESUME_ALWAYS, RESUME_IF_CHECKPOINT, Arg, FromJson, Step


def run_dir(work: str, arm: str, seed: int | None) -> str:
    """``WORK/untuned`` or ``WORK/seedS/ARM``."""
    return os.path.join(work, "untuned") if seed is None else os.path.join(work, f"seed{seed}", arm)


def model_dir(work: str, base: str, arm: str, seed: int | None) -> str:
    return base if seed is None else os.path.join(run_dir(work, arm, seed), "train", "final")


def _data(work: str, split: str) -> list[str]:
    d = os.path.join(work, "data")
    return [
        "--source-file",
        os.path.join(d, f"{split}.de"),
        "--target-file",
        os.path.join(d, f"{split}.en"),
        "--source-lang",
        "German",
        "--target-lang",
        "English",
    ]


def _cap_argv(args: argparse.Namespace) -> list[str]:
    if args.max_new_tokens_ratio == 0:
        return []
    return [
        "--max-new-tokens-ratio",
        f"{args.max_new_tokens_ratio:g}",
        "--max-new-tokens-offset",
        str(args.max_new_tokens_offset),
    ]


def _bf16(args: argparse.Namespace) -> list[str]:
    """``--bf16`` (bfloat16 mixed precision over float32 weights) for every command, or nothing."""
    return ["--bf16"] if getattr(args, "bf16", False) else []


def fit_argv(args: argparse.Namespace, model: str, work: str, out: str) -> list[str]:
    """Teacher-forced scores of the dev sentences and the temperature that maximises their log score."""
    return [
        "evaluate",
        "--model",
        model,
        *_data(work, "dev"),
        "--max-length",
        str(args.max_length),
        "--no-generate",
        "--fit-temperature",
        "--batch-size",
        str(args.eval_batch_size),
        "--dtype",
        "float32",
        *_bf16(args),
        "--device",
        "cpu",
        "--output-dir",
        out,
        "--no-progress",
    ]


def decode_argv(
    args: argparse.Namespace, model: str, work: str, split: str, out: str, temperature: Arg | float | None
) -> list[Arg]:
    """Decode a split (dev, test or an --extra-test name) and score it teacher-forced at T = 1 and
    at ``temperature`` (the dev fit: :func:`fitted_temperature`, read when the step starts)."""
    if split in args.extra_tests:
        src, ref = args.extra_tests[split]
        data = ["--source-file", src, "--target-file", ref, "--source-lang", "German", "--target-lang", "English"]
        length, new = EXTRA_MAX_LENGTH, max(EXTRA_MAX_NEW_TOKENS, args.max_new_tokens)
    else:
        data, length, new = _data(work, split), args.max_length, args.max_new_tokens
    argv: list[Arg] = [
        "evaluate",
        "--model",
        model,
        *data,
        "--max-length",
        str(length),
        "--num-beams",
        str(args.num_beams),
        "--max-new-tokens",
        str(new),
        *_cap_argv(args),
        "--batch-size",
        str(args.eval_batch_size),
        "--dtype",
        "float32",
        *_bf16(args),
        "--device",
        "cpu",
        "--output-dir",
        out,
        "--no-progress",
    ]
    if temperature is not None:
        argv += ["--also-temperature", _runner.arg(temperature)]
    return argv


def train_argv(
    args: argparse.Namespace, base: str, work: str, arm: Arm, seed: int, out: str, keep_all_checkpoints: bool = False
) -> list[str]:
    """``properlm train`` of one arm and seed into ``out`` (``--resume`` is the runner's: a switch arm always resumes
    the checkpoint it branched from, another run when it holds a checkpoint)."""
    d = os.path.join(work, "data")
    if arm.switch:
        objective = ["--schedule", f"logarithmic:{args.switch_at},{arm.rule}:{args.steps - args.switch_at}"]
    elif arm.improper is not None:
        objective = ["--improper-loss", arm.improper]
    else:
        objective = ["--rule", arm.rule]
        if arm.smoothing != "none":
            objective += ["--smoothing", str(args.smoothing), "--smoothing-variant", arm.smoothing]
    argv = [
        "train",
        "--model",
        base,
        *_data(work, "train"),
        "--validation-source-file",
        os.path.join(d, "val.de"),
        "--validation-target-file",
        os.path.join(d, "val.en"),
        *objective,
        *schedule_argv(args, seed, out, keep_all_checkpoints),
        *_bf16(args),
    ]
    if args.lora:
        argv += ["--lora", "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha)]
    return argv


def fitted_temperature(fit_out: str) -> FromJson:
    """The temperature a ``fit_dev`` step fitted (its ``results.json``), read when a step that needs it starts."""
    return FromJson(os.path.join(fit_out, "results.json"), ("temperature_fit", "temperature"), "T_FITTED_ON_DEV")


def plan(args: argparse.Namespace, work: str, base: str) -> list[Step]:
    """Every step in priority order: the untuned model, then seed by seed each arm's training
    followed by its evaluations (dev fit, test, --decode-dev, --extra-test)."""
    steps: list[Step] = []
    switch = [a for a in args.arm_list if ARMS[a].switch]

    def evaluations(arm: str, seed: int | None, after: tuple[str, ...]) -> None:
        rdir = run_dir(work, arm, seed)
        model = model_dir(work, base, arm, seed)
        prefix = "untuned" if seed is None else f"seed{seed}/{arm}"
        fit_out = os.path.join(rdir, "fit_dev")
        steps.append(
            Step(
                f"{prefix}/fit_dev",
                "fit",
                fit_out,
                fit_argv(args, model, work, fit_out),
                arm=arm,
                seed=seed,
                split="dev",
                deps=after,
            )
        )
        for split in ["test", *(["dev"] if args.decode_dev else []), *args.extra_tests]:
            out = os.path.join(rdir, split if split in ("test", "dev") else f"extra_{split}")
            temperature = fitted_temperature(fit_out) if split != "dev" else None
            steps.append(
                Step(
                    f"{prefix}/{split}",
                    split if split in ("test", "dev") else "extra",
                    out,
                    decode_argv(args, model, work, split, out, temperature),
                    arm=arm,
                    seed=seed,
                    split=split,
                    deps=(f"{prefix}/fit_dev",) if temperature is not None else after,
                )
            )

    evaluations("untuned", None, ())
    for seed in args.seed_list:
        for name in args.arm_list:
            arm = ARMS[name]
            tdir = os.path.join(run_dir(work, name, seed), "train")
            keep = name == BASELINE and bool(switch)
            log_run = os.path.join(run_dir(work, BASELINE, seed), "train")
            steps.append(
                Step(
                    f"seed{seed}/{name}/train",
                    "train",
                    tdir,
                    train_argv(args, base, work, arm, seed, tdir, keep_all_checkpoints=keep),
                    arm=name,
                    seed=seed,
                    deps=(f"seed{seed}/{BASELINE}/train",) if arm.switch else (),
                    train_steps=args.steps - args.switch_at if arm.switch else args.steps,
                    resume=RESUME_ALWAYS if arm.switch else RESUME_IF_CHECKPOINT,
                    branch=switch_branch(log_run, args.switch_at) if arm.switch else None,
                )
            )
            evaluations(name, seed, (f"seed{seed}/{name}/train",))
    return steps
