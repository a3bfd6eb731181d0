"""The steps of ``reproduce_llm.py``: run directories, the ``properlm`` commands of training and
evaluation and the plan (:func:`plan`, a list of :class:`_runner.Step`, run by :func:`_runner.run_steps`)."""

from __future__ import annotations

import argparse
import os

import _runner
from _llm_common import ARMS, BASELINE, EXTRA_MAX_LENGTH, EXTRA_MAX_NEW_TOKENS, Arm, schedule_argv
from _runner import Step


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
    args: argparse.Namespace, model: str, work: str, split: str, out: str, temperature: float | str | None
) -> list[str]:
    """Decode a split (dev, test or an --extra-test name) and score it teacher-forced at T = 1 and
    at ``temperature`` (the dev fit)."""
    if split in args.extra_tests:
        src, ref = args.extra_tests[split]
        data = ["--source-file", src, "--target-file", ref, "--source-lang", "German", "--target-lang", "English"]
        length, new = EXTRA_MAX_LENGTH, max(EXTRA_MAX_NEW_TOKENS, args.max_new_tokens)
    else:
        data, length, new = _data(work, split), args.max_length, args.max_new_tokens
    argv = [
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
        argv += ["--also-temperature", str(temperature)]
    return argv


def train_argv(
    args: argparse.Namespace, base: str, work: str, arm: Arm, seed: int, out: str, keep_all_checkpoints: bool = False
) -> list[str]:
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
    from properlm.training import find_checkpoints

    if arm.switch or find_checkpoints(out):  # a branch always starts from the copied checkpoint
        argv.append("--resume")
    return argv


def branch_from(src: str, dst: str, step: int) -> None:
    """Start run directory ``dst`` from ``src``'s ``checkpoint-STEP`` (weights, optimizer,
    scheduler, RNG and data order) and its log records up to ``step`` (whole curves), by
    :func:`_runner.start_from_checkpoint` (no tokenizer copy: the run of a pretrained model has
    none; ``final`` holds it)."""
    _runner.start_from_checkpoint(
        src,
        dst,
        step,
        tokenizer=False,
        missing_hint=(
            ": the switch arms branch from it (was the logarithmic run finished, and its checkpoints deleted, before "
            "they were requested? use --keep-checkpoints or a new --work-dir)"
        ),
    )


def _temperature(args: argparse.Namespace, fit_out: str) -> float | str:
    if args.dry_run or args.estimate:
        return "T_FITTED_ON_DEV"
    return _runner.read_json(os.path.join(fit_out, "results.json"))["temperature_fit"]["temperature"]


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
                arm,
                seed,
                fit_out,
                lambda: fit_argv(args, model, work, fit_out),
                after,
                "dev",
            )
        )
        splits = ["test", *(["dev"] if args.decode_dev else []), *args.extra_tests]
        for split in splits:
            out = os.path.join(rdir, split if split in ("test", "dev") else f"extra_{split}")
            kind = split if split in ("test", "dev") else "extra"
            temperature = split != "dev"

            def argv(split: str = split, out: str = out, temperature: bool = temperature) -> list[str]:
                t = _temperature(args, fit_out) if temperature else None
                return decode_argv(args, model, work, split, out, t)

            steps.append(
                Step(
                    f"{prefix}/{split}",
                    kind,
                    arm,
                    seed,
                    out,
                    argv,
                    (f"{prefix}/fit_dev",) if temperature else after,
                    split,
                )
            )

    evaluations("untuned", None, ())
    for seed in args.seed_list:
        for name in args.arm_list:
            arm = ARMS[name]
            tdir = os.path.join(run_dir(work, name, seed), "train")
            keep = name == BASELINE and bool(switch)
            deps: tuple[str, ...] = ()
            prepare = None
            if arm.switch:
                src = os.path.join(run_dir(work, BASELINE, seed), "train")
                deps = (f"seed{seed}/{BASELINE}/train",)

                def prepare(src: str = src, tdir: str = tdir) -> None:
                    if not _runner.started(tdir):
                        branch_from(src, tdir, args.switch_at)

            steps.append(
                Step(
                    f"seed{seed}/{name}/train",
                    "train",
                    name,
                    seed,
                    tdir,
                    lambda arm=arm, seed=seed, tdir=tdir, keep=keep: train_argv(
                        args, base, work, arm, seed, tdir, keep_all_checkpoints=keep
                    ),
                    deps,
                    train_steps=args.steps - args.switch_at if arm.switch else args.steps,
                    prepare=prepare,
                )
            )
            evaluations(name, seed, (f"seed{seed}/{name}/train",))
    return steps
