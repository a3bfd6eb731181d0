"""``properlm demo``: the paper's recipe end to end, offline, on CPU, in a few minutes.

1. Generate a deterministic translation-like data set: numbers in digits -> English words
   (:mod:`properlm.cli.demo_data`), disjoint train and test sets.
2. Pre-train a tiny Marian-style (Transformer) seq2seq model from scratch (``--init tiny-seq2seq``, BPE
   tokenizer trained on the data) with the logarithmic score for ``--steps`` steps,
   saving a checkpoint at the end.
3. From that checkpoint -- same weights, optimizer state and learning-rate schedule --
   continue for ``--finetune-steps`` steps with each of logarithmic, Brier and spherical
   (a rule schedule ``logarithmic:N,RULE:M`` resumed from checkpoint N).
4. Evaluate every model on the test set: exact match and BLEU (sacrebleu) of greedy
   translations, and each rule's mean held-out token score (teacher forcing).
5. Print a table; write ``results.json``, ``results.md`` and ``loss_curves.png`` into
   ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

_RULES = ("logarithmic", "brier", "spherical")


def register(subparsers: Any) -> None:
    """Add the ``demo`` command to the ``properlm`` sub-command parsers."""
    parser = subparsers.add_parser(
        "demo",
        help="offline demo: train a tiny translation model with each scoring rule and compare",
        description="Generate a numbers-to-words data set, pre-train a tiny seq2seq model with the logarithmic "
        "score, fine-tune copies with Brier, spherical and continued logarithmic training for the same number "
        "of steps, and compare exact match, BLEU and every rule's held-out score. No network; CPU is enough.",
    )
    parser.add_argument(
        "--output-dir",
        default="demo_output",
        help="where to write runs, results and the plot; "
        "an earlier demo's pretrain/ and finetune_*/ runs there are replaced, other files are kept "
        "(default: demo_output)",
    )
    parser.add_argument(
        "--steps", type=int, default=350, help="pre-training steps with the logarithmic score (default: 350)"
    )
    parser.add_argument("--finetune-steps", type=int, default=250, help="fine-tuning steps per rule (default: 250)")
    parser.add_argument("--train-size", type=int, default=6000, help="training pairs (default: 6000)")
    parser.add_argument("--max-digits", type=int, default=6, help="numbers have 1 to this many digits (default: 6)")
    parser.add_argument("--test-size", type=int, default=300, help="held-out test pairs (default: 300)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width (default: 64)")
    parser.add_argument("--num-layers", type=int, default=2, help="encoder and decoder layers (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1; a model this small "
        "gains little from more, and loses much when the cores are shared)",
    )
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    for name in (
        "steps",
        "finetune_steps",
        "train_size",
        "test_size",
        "batch_size",
        "hidden_size",
        "num_layers",
        "max_digits",
        "threads",
    ):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_digits > 9:
        raise ValueError(f"--max-digits must be at most 9, got {args.max_digits}")
    if args.hidden_size % 4:
        raise ValueError(f"--hidden-size must be a multiple of 4 (4 attention heads), got {args.hidden_size}")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning-rate must be positive, got {args.learning_rate}")


def _generate(
    model: Any, tokenizer: Any, sources: list[str], batch_size: int = 128, max_new_tokens: int = 40
) -> list[str]:
    """Greedy translations of ``sources`` (seq2seq model)."""
    import torch

    from ..data import DataCollator, Example, encode_prompt

    model.eval()
    collate = DataCollator(tokenizer.pad_token_id)
    out: list[str] = []
    for i in range(0, len(sources), batch_size):
        feats = [
            {"input_ids": encode_prompt(Example(s, "", "translation"), tokenizer, seq2seq=True)}
            for s in sources[i : i + batch_size]
        ]
        batch = collate(feats)
        with torch.no_grad():
            gen = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                num_beams=1,
                do_sample=False,
            )
        out += [t.strip() for t in tokenizer.batch_decode(gen, skip_special_tokens=True)]
    return out


def _evaluate(model_dir: str, test: list[tuple[str, str]]) -> dict[str, Any]:
    import sacrebleu

    from ..models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_dir)
    sources = [s for s, _ in test]
    refs = [t for _, t in test]
    hyps = _generate(model, tokenizer, sources)
    exact = sum(h == r for h, r in zip(hyps, refs)) / len(refs)
    metric = sacrebleu.metrics.BLEU()
    bleu = metric.corpus_score(hyps, [refs])
    examples = [{"source": s, "reference": r, "hypothesis": h} for s, r, h in list(zip(sources, refs, hyps))[:5]]
    return {
        "exact_match": exact,
        "bleu": bleu.score,
        "bleu_signature": str(metric.get_signature()),
        "examples": examples,
    }


def _plot(runs: dict[str, str], pretrain_dir: str, path: str) -> None:
    """The training curves of the pre-training run and of each fine-tuning run (:func:`plot_curves`)."""
    from ..evaluation.curves import plot_curves
    from ..evaluation.run_records import RunRecord

    records = [RunRecord.from_log("logarithmic (pre-training)", pretrain_dir)]
    records += [RunRecord.from_log(f"fine-tuned with {rule}", run_dir) for rule, run_dir in runs.items()]
    plot_curves(records, path, title="properlm demo: numbers -> words, tiny seq2seq")


def _table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "steps", "exact match", "BLEU", "log score", "Brier score", "spherical score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['steps']} | {100 * r['exact_match']:.1f}% | {r['bleu']:.1f} | "
            f"{r['score_logarithmic']:.4f} | {r['score_brier']:.4f} | {r['score_spherical']:.4f} |"
        )
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the results dictionary."""
    import torch

    from ..training import make_config, run_training
    from .demo_data import make_number_dataset, write_parallel

    _check(args)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = time.time()
    out = args.output_dir
    if os.path.isdir(out):
        for sub in ("pretrain", *(f"finetune_{r}" for r in _RULES)):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    train, test = make_number_dataset(args.train_size, args.test_size, seed=args.seed, max_digits=args.max_digits)
    data_dir = os.path.join(out, "data")
    train_src, train_tgt = write_parallel(train, data_dir, "train")
    test_src, test_tgt = write_parallel(test, data_dir, "test")
    print(f"data: {len(train)} training and {len(test)} test pairs, e.g. {train[0][0]} -> {train[0][1]!r}")

    common = {
        "init": "tiny-seq2seq",
        "source_file": train_src,
        "target_file": train_tgt,
        "source_lang": "digits",
        "target_lang": "English",
        "validation_source_file": test_src,
        "validation_target_file": test_tgt,
        "vocab_size": 400,
        "hidden_size": args.hidden_size,
        "num_layers": args.num_layers,
        "num_heads": 4,
        "dropout": 0.1,
        "max_length": 48,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": 256,
        "learning_rate": args.learning_rate,
        "lr_scheduler": "inverse_sqrt",
        "warmup_steps": min(200, max(1, args.steps // 5)),
        "adam_beta2": 0.98,
        "seed": args.seed,
        "logging_steps": max(1, min(args.steps, args.finetune_steps) // 10),
        "progress_bar": False,
        "tensorboard": False,
        "overwrite_output_dir": True,
    }
    pre_dir = os.path.join(out, "pretrain")
    t0 = time.time()
    print(f"pre-training with the logarithmic score for {args.steps} steps ...", flush=True)
    pre = run_training(
        make_config(
            {
                **common,
                "rule": "logarithmic",
                "max_steps": args.steps,
                "save_steps": args.steps,
                "eval_steps": max(1, args.steps // 3),
                "output_dir": pre_dir,
            }
        ),
        quiet=True,
    )
    timings = {"pretrain": time.time() - t0}
    checkpoint = os.path.join(pre_dir, f"checkpoint-{args.steps}")
    runs: dict[str, str] = {}
    finals: dict[str, dict[str, Any]] = {}
    for rule in _RULES:
        run_dir = os.path.join(out, f"finetune_{rule}")
        os.makedirs(run_dir, exist_ok=True)
        shutil.copytree(checkpoint, os.path.join(run_dir, os.path.basename(checkpoint)))
        shutil.copytree(os.path.join(pre_dir, "tokenizer"), os.path.join(run_dir, "tokenizer"))
        t0 = time.time()
        print(f"continuing with {rule} for {args.finetune_steps} steps ...", flush=True)
        finals[rule] = run_training(
            make_config(
                {
                    **common,
                    "schedule": f"logarithmic:{args.steps},{rule}:{args.finetune_steps}",
                    "resume": True,
                    "eval_steps": max(1, args.finetune_steps // 3),
                    "output_dir": run_dir,
                }
            ),
            quiet=True,
        )
        timings[f"finetune_{rule}"] = time.time() - t0
        runs[rule] = run_dir

    t0 = time.time()
    rows: list[dict[str, Any]] = []
    for name, run_dir, res, steps in [("logarithmic (pre-trained)", pre_dir, pre, args.steps)] + [
        (f"+ {rule}", runs[rule], finals[rule], args.steps + args.finetune_steps) for rule in _RULES
    ]:
        ev = _evaluate(os.path.join(run_dir, "final"), test)
        row = {"name": name, "steps": steps, "model": os.path.join(run_dir, "final"), **ev}
        for rule in _RULES:
            row[f"score_{rule}"] = res["eval"][f"eval_score_{rule}"]
        rows.append(row)
    timings["evaluate"] = time.time() - t0
    plot_path = os.path.join(out, "loss_curves.png")
    _plot(runs, pre_dir, plot_path)
    table = _table(rows)
    results: dict[str, Any] = {
        "task": "numbers in digits -> English words (properlm.cli.demo_data)",
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "rows": rows,
        "timings_seconds": {**timings, "total": time.time() - started},
        "plot": plot_path,
        "note": "token scores are means over held-out target tokens under teacher forcing (higher is better); "
        "exact match and BLEU use greedy decoding",
    }
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print()
    print(table)
    print(
        "(scores: mean held-out score per target token under teacher forcing, higher is better; exact match "
        "and BLEU: greedy decoding on the test set)"
    )
    print()
    for ex in rows[0]["examples"][:3]:
        print(f"  {ex['source']} -> {ex['hypothesis']!r} (reference {ex['reference']!r})")
    print(
        f"\nwrote {os.path.join(out, 'results.json')}, {os.path.join(out, 'results.md')} and {plot_path} "
        f"in {results['timings_seconds']['total']:.0f} s"
    )
    return results


def run(args: argparse.Namespace) -> int:
    """Run ``properlm demo`` with parsed arguments; returns the exit code."""
    try:
        run_demo(args)
    except ValueError as exc:
        print(f"properlm demo: error: {exc}", file=sys.stderr)
        return 2
    return 0
