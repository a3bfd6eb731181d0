"""``properlm evaluate``: teacher-forced scores and calibration, then decoding and BLEU/chrF/ROUGE.

Writes ``results.json`` (every figure and setting), ``hypotheses.txt`` and
``reliability.png`` to ``--output-dir`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..data import TASKS, DataError
from ..evaluation import DTYPES, EvalError, EvalSettings, markdown_table, parse_rules, run_evaluation
from ..models import ModelLoadError

EPILOG = """\
examples:
  properlm evaluate --model runs/sph/final --source-file test.de --target-file test.en \\
      --target-lang en --num-beams 5 --output-dir runs/sph/eval
  properlm evaluate --model runs/alpaca/final --data-file alpaca_eval.json --max-examples 100 \\
      --rules logarithmic,brier,spherical,power:3 --objective spherical --num-beams 4 --output-dir eval/sph-beam
  properlm evaluate --model runs/xsum/final --data-file test.jsonl --no-generate --output-dir eval/calib

outputs in --output-dir: results.json, hypotheses.txt (one per line, in data order), reliability.png.
BLEU and chrF (sacrebleu, with signatures) for translation, ROUGE-1/2/L F1 (rouge-score, stemming)
for summarization, both for instruction data. Summarization rows with "annotations" (a list of
further reference summaries) also get multi-reference ROUGE: per example and ROUGE type the best
F1 over the summary and its annotations, then the mean over examples.

truncation: --max-length and --max-source-length default to the training run's (recorded by
`properlm train` in the model directory), so examples are cut as in training; a length beyond the
model's position table (config.max_position_embeddings) is refused before any data is read.
results.json ("truncation") and the table state both lengths and where they came from.

decoding length: --max-new-tokens caps every output; --max-new-tokens-ratio A --max-new-tokens-offset B
also caps each batch at ceil(A x L + B) new tokens, L its longest source text in tokens (batches hold
inputs of similar length), so a run-away output stops near its source's length; results.json
(generation.new_token_cap) says how many outputs stopped at their cap.

temperature scaling: fit T on validation data (--fit-temperature --no-generate), then evaluate the
test set with --also-temperature T: the teacher-forced metrics at T = 1 and at T from one pass.
"""


def add_length_arguments(group: Any, what: str) -> None:
    """``--max-length`` and ``--max-source-length`` (both default to the training run's)."""
    group.add_argument(
        "--max-length",
        type=int,
        default=None,
        metavar="N",
        help=f"most tokens per {what}; must fit the model's positions (default: the training "
        "run's --max-length, else the model's position limit, at most 512)",
    )
    group.add_argument(
        "--max-source-length",
        type=int,
        default=None,
        metavar="N",
        help="cut each source text (document, source sentence, instruction input) to its first N "
        "tokens before the prompt template, as `properlm train --max-source-length` does "
        "(default: the training run's; none: only --max-length cuts)",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--gguf-file``, ``--dtype``, ``--device``."""
    g = parser.add_argument_group("model (--model and/or --gguf-file)")
    g.add_argument(
        "--model",
        metavar="DIR_OR_ID",
        default=None,
        help="a model directory (e.g. runs/NAME/final written by `properlm train`, or any "
        "save_pretrained directory, or a LoRA adapter directory) or a hub id; with --gguf-file, "
        "the directory that holds the GGUF file",
    )
    g.add_argument(
        "--gguf-file",
        metavar="FILE",
        default=None,
        help="a GGUF model file (a path, or a name inside --model); needs the gguf package",
    )
    g.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="weights dtype (default: auto = as stored in the checkpoint)"
    )
    g.add_argument(
        "--device",
        default="auto",
        help="torch device, e.g. cpu, cuda, cuda:1 (default: auto = cuda when available, else cpu)",
    )
    g.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 mixed precision: the model's matrix products in bfloat16 (torch.autocast), its "
        "output head in float32, so logits and scores stay float32 (several times faster on CPUs with "
        "AVX512-BF16 or AMX, and on GPUs; other CPUs compute the bfloat16 products in float32: the same "
        "values, no faster than float32)",
    )


def add_decoding_arguments(parser: argparse.ArgumentParser, group: Any = None) -> None:
    """Add the decoding options to ``parser``.

    ``--objective``, ``--num-beams``, ``--length-penalty``, ``--max-new-tokens``,
    ``--max-new-tokens-ratio``, ``--max-new-tokens-offset``.
    """
    g = group or parser.add_argument_group("decoding")
    g.add_argument(
        "--objective",
        default="logarithmic",
        metavar="RULE",
        help="beam search objective: the sum of token scores S(p(.|prefix), y_t) of this rule "
        "(logarithmic = ordinary beam search = sum of log-probabilities; brier, spherical, "
        "power:ALPHA, pseudo-spherical:ALPHA); needs --num-beams > 1 (default: logarithmic)",
    )
    g.add_argument("--num-beams", type=int, default=1, metavar="K", help="beam width; 1 = greedy search (default: 1)")
    g.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        metavar="X",
        help="finished beams are ranked by score / length**X (beam search only; 1 = mean token "
        "score, 0 = plain sum; note that spherical scores are >= 0, so with X < 1 their sums favour "
        "long outputs) (default: 1.0)",
    )
    g.add_argument(
        "--max-new-tokens", type=int, default=128, metavar="N", help="most tokens generated per input (default: 128)"
    )
    g.add_argument(
        "--max-new-tokens-ratio",
        type=float,
        default=None,
        metavar="A",
        help="also cap the new tokens by source length: a batch generates at most min(--max-new-tokens, "
        "ceil(A x L + B)) tokens, L the most tokens of a source text in the batch (the source sentence, "
        "document or instruction tokenised alone, without the prompt template) and B "
        "--max-new-tokens-offset. Inputs are batched longest first, so the cap follows each source's "
        "length and a run-away output cannot hold its batch for --max-new-tokens steps; results.json "
        "counts the outputs that stopped at the cap (generation.new_token_cap.num_at_cap). E.g. "
        "--max-new-tokens-ratio 1.0 --max-new-tokens-offset 10 (default: none, --max-new-tokens only)",
    )
    g.add_argument(
        "--max-new-tokens-offset",
        type=int,
        default=None,
        metavar="B",
        help="the B of --max-new-tokens-ratio: tokens allowed beyond A x source length; needs "
        "--max-new-tokens-ratio (default: 0)",
    )


def register(subparsers: Any) -> None:
    """Add the ``evaluate`` command to the ``properlm`` sub-command parsers."""
    parser = subparsers.add_parser(
        "evaluate",
        help="teacher-forced scores, calibration (ECE), and BLEU/chrF/ROUGE of decoded outputs",
        description="Evaluate a model on a data set: the mean token score of every requested scoring rule "
        "under teacher forcing (with perplexity, token accuracy, the mean probability of the target tokens, "
        "expected calibration error of the top-1 token and a reliability diagram), then decode the sources "
        "(greedy or beam search, optionally with a scoring rule as the beam objective) and score the "
        "hypotheses with sacrebleu (BLEU, chrF) or rouge-score (ROUGE-1/2/L). Arguments and data are "
        "validated before the model is loaded.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    d = parser.add_argument_group("data (--data-file, or --source-file with --target-file)")
    d.add_argument(
        "--data-file",
        metavar="FILE",
        default=None,
        help="Alpaca JSON/JSONL (instruction, input, output) or JSONL with document/summary",
    )
    d.add_argument("--source-file", metavar="FILE", default=None, help="translation: source sentences, one per line")
    d.add_argument(
        "--target-file",
        metavar="FILE",
        default=None,
        help="translation: reference translations, line-aligned with --source-file",
    )
    d.add_argument(
        "--source-lang",
        metavar="LANG",
        default=None,
        help="translation: source language (used in decoder-only prompts; default: the training run's, else 'source')",
    )
    d.add_argument(
        "--target-lang",
        metavar="LANG",
        default=None,
        help="translation: target language (decoder-only prompts; a code such as zh/ja/ko also "
        "selects sacrebleu's tokenizer for BLEU; default: the training run's, else 'target')",
    )
    d.add_argument("--task", choices=TASKS, default=None, help="data format; inferred from the files when omitted")
    add_length_arguments(
        d, "tokenised example (seq2seq: encoder input and reference each; decoder-only: prompt + reference)"
    )
    d.add_argument(
        "--max-examples", type=int, default=None, metavar="N", help="evaluate only the first N examples (quick looks)"
    )
    m = parser.add_argument_group("metrics")
    m.add_argument(
        "--rules",
        default="logarithmic,brier,spherical",
        metavar="R1,R2,...",
        help="scoring rules whose mean token score is reported, comma-separated, e.g. "
        "logarithmic,brier,spherical,power:3,pseudo-spherical:1.5 (default: logarithmic,brier,spherical)",
    )
    m.add_argument(
        "--num-bins",
        type=int,
        default=15,
        metavar="N",
        help="equal-width confidence bins of the ECE and reliability diagram (default: 15)",
    )
    m.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="score softmax(logits / T) in the teacher-forced metrics (temperature scaling: token "
        "scores, perplexity, ECE); decoding is unaffected. Use a T fitted with --fit-temperature on "
        "validation data, never on the test set itself (default: 1)",
    )
    m.add_argument(
        "--also-temperature",
        type=float,
        default=None,
        metavar="T",
        help="also report the teacher-forced metrics at temperature T (results.json "
        '"teacher_forced_scaled"), from the same forward passes: metrics before and after temperature '
        "scaling in one run, e.g. with T fitted by --fit-temperature on validation data (default: none)",
    )
    m.add_argument(
        "--fit-temperature",
        action="store_true",
        help="also fit temperature scaling: the T with the best mean log score of the references "
        "(81 temperatures from 0.2 to 5 scanned in the teacher-forced pass, the best refined between "
        "its neighbours), then one more teacher-forced pass at T for the log score, ECE and "
        'reliability_fitted.png at it (results.json "temperature_fit"; run this on validation data)',
    )
    g = parser.add_argument_group("decoding")
    add_decoding_arguments(parser, g)
    g.add_argument(
        "--no-generate",
        dest="generate",
        action="store_false",
        help="skip decoding and the generation metrics (teacher-forced metrics only)",
    )
    r = parser.add_argument_group("run")
    r.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="examples per forward pass / generate call (default: 8)"
    )
    r.add_argument(
        "--output-dir",
        required=True,
        metavar="DIR",
        help="where results.json, hypotheses.txt and reliability.png are written",
    )
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)


def new_token_offset(args: argparse.Namespace) -> int:
    """``--max-new-tokens-offset`` (0 when not given); refused without ``--max-new-tokens-ratio``."""
    if args.max_new_tokens_offset is not None and args.max_new_tokens_ratio is None:
        raise EvalError(
            f"--max-new-tokens-offset {args.max_new_tokens_offset} needs --max-new-tokens-ratio (the cap "
            "is ceil(ratio x source tokens + offset))"
        )
    return 0 if args.max_new_tokens_offset is None else args.max_new_tokens_offset


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The :class:`~properlm.evaluation.EvalSettings` of parsed ``properlm evaluate`` arguments."""
    return EvalSettings(
        model=args.model,
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        device=args.device,
        bf16=args.bf16,
        data_file=args.data_file,
        source_file=args.source_file,
        target_file=args.target_file,
        source_lang=args.source_lang,
        target_lang=args.target_lang,
        task=args.task,
        max_length=args.max_length,
        max_source_length=args.max_source_length,
        rules=parse_rules(args.rules),
        num_bins=args.num_bins,
        temperature=args.temperature,
        fit_temperature=args.fit_temperature,
        objective=args.objective,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        max_new_tokens=args.max_new_tokens,
        max_new_tokens_ratio=args.max_new_tokens_ratio,
        max_new_tokens_offset=new_token_offset(args),
        also_temperature=args.also_temperature,
        batch_size=args.batch_size,
        max_examples=args.max_examples,
        generate=args.generate,
        output_dir=args.output_dir,
        progress=args.progress,
    )


def interrupted(args: argparse.Namespace, command: str) -> str:
    """What Ctrl-C leaves of ``properlm evaluate``: the decoded outputs in its journal, and the command to rerun."""
    from ..evaluation.journal import journaled_outputs
    from ..evaluation.run import DECODE_JOURNAL

    journal = os.path.join(args.output_dir, DECODE_JOURNAL)
    return "properlm evaluate: " + interrupted_decoding(journal, journaled_outputs(journal), command)


def interrupted_decoding(journal: str, outputs: int, command: str) -> str:
    """``interrupted; ...``: the decoded outputs kept in ``journal`` (if any) and the ``command`` that continues."""
    if outputs:
        return f"interrupted; {outputs} decoded outputs saved in {journal}; the same command continues: {command}"
    return f"interrupted before any output was decoded, so nothing was saved; run it again: {command}"


def run(args: argparse.Namespace) -> int:
    """Run ``properlm evaluate`` with parsed arguments; returns the exit code."""
    try:
        results = run_evaluation(settings_from_args(args))
    except (EvalError, DataError, ModelLoadError) as exc:
        print(f"properlm evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(results))
    print(f"\nwritten: {', '.join(results['files'].values())}")
    return 0
