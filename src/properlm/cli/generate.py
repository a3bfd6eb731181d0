"""``properlm generate``: decode inputs with a chosen beam-search objective.

The inputs are read one per line, from a file or stdin; one output line per input line, in input order.
With ``--output FILE``, finished batches go to ``FILE.journal.jsonl`` while decoding, and the same command
run again after a kill decodes only the rest (:mod:`properlm.evaluation.journal`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import warnings
from typing import Any

from ..data import DataError, Example, encode_prompt
from ..evaluation import (
    EvalError,
    LengthLimits,
    resolve_device,
    resolve_languages,
    resolve_lengths,
    torch_dtype,
    validate_decoding,
    validate_new_token_cap,
)
from ..models import (
    ModelLoadError,
    check_model_source,
    is_seq2seq,
    load_model_and_tokenizer,
    model_config_dict,
    read_training_record,
)
from .evaluate import (
    add_decoding_arguments,
    add_length_arguments,
    add_model_arguments,
    interrupted_decoding,
    new_token_offset,
)

PROMPT_FORMATS = ("raw", "instruction", "translation", "summarization")
#: next to ``--output FILE`` while decoding: the journal an interrupted run resumes from (removed when done)
JOURNAL_SUFFIX = ".journal.jsonl"

EPILOG = """\
examples:
  echo "Das Haus ist klein." | properlm generate --model runs/sph/final --task translation \\
      --source-lang German --target-lang English --num-beams 5 --objective spherical
  properlm generate --model runs/alpaca/final --task instruction --input questions.txt --output answers.txt

--task builds the same prompt as training and evaluation (the tokenizer's chat template, else
properlm's plain template); raw feeds each line to the model as it is. --max-length and
--max-source-length default to the training run's, and a length beyond the model's position
table is refused before any input is read; the truncation is reported on stderr.
--max-new-tokens-ratio A --max-new-tokens-offset B caps each batch at ceil(A x L + B) new tokens,
L the longest input line of the batch in tokens (inputs are batched longest first).
"""


def register(subparsers: Any) -> None:
    """Add the ``generate`` command to the ``properlm`` sub-command parsers."""
    parser = subparsers.add_parser(
        "generate",
        help="decode inputs from a file or stdin, optionally with a scoring rule as beam objective",
        description="Decode each input line with greedy or beam search; with --objective RULE beam search "
        "ranks hypotheses by the summed token scores of RULE instead of the summed log-probabilities.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    i = parser.add_argument_group("input and output")
    i.add_argument(
        "--input", default="-", metavar="FILE", help="inputs, one per line (UTF-8); '-' reads stdin (default: -)"
    )
    i.add_argument(
        "--output",
        default="-",
        metavar="FILE",
        help="outputs, one per line in input order; '-' writes stdout (default: -). A file is "
        "written at the end; meanwhile FILE.journal.jsonl keeps the finished batches, so the same "
        "command after a kill decodes only the rest",
    )
    i.add_argument(
        "--task",
        choices=PROMPT_FORMATS,
        default=None,
        help="prompt format: raw (the line as it is), or the training prompt of instruction "
        "(line = instruction), translation (line = source sentence) or summarization "
        "(line = document) (default: the task the model was trained on by properlm train, "
        "else raw)",
    )
    i.add_argument(
        "--source-lang",
        metavar="LANG",
        default=None,
        help="translation prompts: source language (default: the training run's, else 'source')",
    )
    i.add_argument(
        "--target-lang",
        metavar="LANG",
        default=None,
        help="translation prompts: target language (default: the training run's, else 'target')",
    )
    add_length_arguments(i, "prompt (longer ones are cut as in training and evaluation)")
    add_decoding_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="inputs per generate call (default: 8)")
    parser.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> tuple[str, LengthLimits]:
    if not args.model and not args.gguf_file:
        raise EvalError("no model given: pass --model or --gguf-file")
    check_model_source(args.model, args.gguf_file, None)
    lengths = {
        k: v
        for k, v in (("max_length", args.max_length), ("max_source_length", args.max_source_length))
        if v is not None
    }
    objective = validate_decoding(
        args.objective,
        args.num_beams,
        args.length_penalty,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        **lengths,
    )
    validate_new_token_cap(args.max_new_tokens_ratio, new_token_offset(args))
    resolve_device(args.device)
    if args.output != "-":
        parent = os.path.dirname(os.path.abspath(args.output))
        if os.path.isdir(args.output) or not os.path.isdir(parent):
            raise EvalError(
                f"--output {args.output!r}: "
                + ("a directory, not a file" if os.path.isdir(args.output) else f"directory {parent!r} does not exist")
            )
    record, path = read_training_record(args.model) if args.gguf_file is None else (None, None)
    if args.task is None:
        trained = (record or {}).get("task")
        args.task = trained if trained in PROMPT_FORMATS else "raw"
        if trained in PROMPT_FORMATS:
            print(
                f"properlm generate: {trained} prompts, as in the training run ({path}); --task raw feeds "
                "the lines as they are",
                file=sys.stderr,
            )
    langs = [
        f"--{n.replace('_', '-')} {getattr(args, n)}"
        for n in ("source_lang", "target_lang")
        if getattr(args, n) is not None
    ]
    if langs and args.task != "translation":
        import warnings

        warnings.warn(
            f"{', '.join(langs)}: no effect with --task {args.task} (the language names go into "
            "--task translation prompts only)",
            UserWarning,
            stacklevel=2,
        )
    if args.task == "translation":  # the prompt's language names default to the training run's
        src, tgt, origin = resolve_languages(args.source_lang, args.target_lang, record, path)
        if origin is not None:
            args.source_lang, args.target_lang = src, tgt
            print(
                f"properlm generate: language names {src or 'source'} -> {tgt or 'target'} from the {origin}",
                file=sys.stderr,
            )
    return objective, _limits(args, model_config_dict(args.model, args.gguf_file))


def _limits(args: argparse.Namespace, config: Any) -> LengthLimits:
    record, path = read_training_record(args.model) if args.gguf_file is None else (None, None)
    seq2seq = None
    if config is not None:
        seq2seq = bool(
            config.get("is_encoder_decoder")
            if isinstance(config, dict)
            else getattr(config, "is_encoder_decoder", False)
        )
    return resolve_lengths(
        args.max_length,
        args.max_source_length,
        config=config,
        record=record,
        record_path=path,
        seq2seq=seq2seq,
        max_new_tokens=args.max_new_tokens,
    )


def _read_inputs(path: str) -> list[str]:
    if path == "-":
        if sys.stdin.isatty():  # a user typing: say how the input ends
            print(
                "properlm generate: reading inputs from the terminal, one per line; end with Ctrl-D (or give "
                "--input FILE)",
                file=sys.stderr,
                flush=True,
            )
        text = sys.stdin.read()
        name = "stdin"
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise DataError(f"--input file {path!r} does not exist") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"--input file {path!r} is not valid UTF-8 ({exc.reason})") from None
        name = path
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise DataError(f"{name} line {n}: empty line (one input per line)")
    if not lines:
        raise DataError(f"{name}: no input lines")
    return lines


def _prompt(line: str, args: argparse.Namespace, tokenizer: Any, seq2seq: bool, limits: LengthLimits) -> list[int]:
    n = limits.decode_prompt_length
    if args.task == "raw":
        ids = list(tokenizer(line, verbose=False)["input_ids"])
        if limits.max_source_length is not None:
            n = min(n, limits.max_source_length)
        return ids[:n] if seq2seq else ids[-n:]
    fields: dict[str, str]
    if args.task == "instruction":
        fields = {"instruction": line, "input": "", "output": ""}
    elif args.task == "translation":
        fields = {
            "source": line,
            "target": "",
            "source_lang": args.source_lang or "",
            "target_lang": args.target_lang or "",
        }
    else:
        fields = {"document": line, "summary": ""}
    example = Example(line, "", args.task, fields, "input")
    return encode_prompt(example, tokenizer, seq2seq=seq2seq, max_length=n, max_source_length=limits.max_source_length)


def interrupted(args: argparse.Namespace, command: str) -> str:
    """What Ctrl-C leaves of ``properlm generate``: with ``--output FILE``, the outputs in its journal."""
    from ..evaluation.journal import journaled_outputs

    if args.output == "-":
        return (
            "properlm generate: interrupted; nothing was saved (with --output FILE the decoded outputs are kept "
            "and the same command continues from them)"
        )
    journal = args.output + JOURNAL_SUFFIX
    return "properlm generate: " + interrupted_decoding(journal, journaled_outputs(journal), command)


def run(args: argparse.Namespace) -> int:
    """Run ``properlm generate`` with parsed arguments; returns the exit code."""
    from ..evaluation.generation import decode_prompts_with_stats
    from ..evaluation.journal import DecodeJournal, journal_key
    from ..evaluation.precision import emulated_bf16_warning, mixed_precision
    from ..evaluation.text_metrics import one_line

    try:
        objective, limits = _validate(args)
        if args.bf16 and args.dtype in ("bfloat16", "float16"):
            raise EvalError(
                f"--bf16 is mixed precision over float32 weights; with --dtype {args.dtype} the weights "
                "are already half precision (drop one of the two)"
            )
        slow = emulated_bf16_warning(args.device, "generate") if args.bf16 else None
        if slow:
            warnings.warn(slow, UserWarning, stacklevel=1)
        inputs = _read_inputs(args.input)
        model, tokenizer = load_model_and_tokenizer(args.model, gguf_file=args.gguf_file, dtype=torch_dtype(args.dtype))
        seq2seq = is_seq2seq(model)
        if limits.model_max_positions is None:  # a hub id or GGUF file: its limits are known now
            limits = _limits(args, model.config)
    except (EvalError, DataError, ModelLoadError) as exc:
        print(f"properlm generate: error: {exc}", file=sys.stderr)
        return 2
    model.to(resolve_device(args.device))
    prompts = [_prompt(line, args, tokenizer, seq2seq, limits) for line in inputs]
    uncut = dataclasses.replace(limits, max_source_length=None, decode_prompt_length=sys.maxsize)
    n_cut = sum(len(p) < len(_prompt(line, args, tokenizer, seq2seq, uncut)) for p, line in zip(prompts, inputs))
    if n_cut:  # said only when something was cut
        src = (
            ""
            if limits.max_source_length is None
            else f", sources at {limits.max_source_length} tokens ({limits.max_source_length_from})"
        )
        print(
            f"properlm generate: {n_cut} of {len(inputs)} input(s) cut: prompts at {limits.decode_prompt_length} "
            f"tokens (max length {limits.max_length}: {limits.max_length_from}){src}",
            file=sys.stderr,
        )
    # the input line alone (the source text, without the prompt template), for the new-token cap
    source_lengths = [len(tokenizer(line, add_special_tokens=False, verbose=False)["input_ids"]) for line in inputs]
    if limits.max_source_length is not None:  # sources are cut to it in the prompts
        source_lengths = [min(n, limits.max_source_length) for n in source_lengths]
    journal = None
    if args.output != "-":  # an interrupted run with the same command resumes from OUTPUT.journal.jsonl
        journal = DecodeJournal(
            args.output + JOURNAL_SUFFIX,
            key=journal_key(args.model, args.gguf_file, args.dtype + ("+bf16-autocast" if args.bf16 else ""), model),
        )
    with mixed_precision(model) if args.bf16 else contextlib.nullcontext():
        hyps, _ = decode_prompts_with_stats(
            model,
            tokenizer,
            prompts,
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            max_new_tokens=args.max_new_tokens,
            max_new_tokens_ratio=args.max_new_tokens_ratio,
            max_new_tokens_offset=new_token_offset(args),
            source_lengths=source_lengths,
            batch_size=args.batch_size,
            objective=None if objective == "logarithmic" else objective,
            journal=journal,
        )
    if journal is not None and journal.resumed:
        print(
            f"properlm generate: {journal.resumed} of {len(hyps)} outputs from the interrupted run's journal "
            f"{journal.path}",
            file=sys.stderr,
        )
    out = "".join(one_line(h) + "\n" for h in hyps)
    if args.output == "-":
        sys.stdout.write(out)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(out)
    if journal is not None:
        journal.finish()
    return 0
