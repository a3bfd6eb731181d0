"""Training and evaluation data: file formats, validation, prompts, tokenisation, batching.

Three formats are read, each validated line by line before anything expensive happens, so
that a malformed file stops with a :class:`DataError` naming the file, the line and the field:

``instruction``
    Alpaca-style JSON (an array of objects) or JSONL, one object per record with the string
    fields ``instruction`` (required), ``input`` (optional) and ``output`` (required).
    The loss covers the response only: prompt tokens are labelled ``-100``.
``translation``
    Two line-aligned plain-text files, ``source_file`` and ``target_file`` (one sentence per
    line, UTF-8), with optional language names ``source_lang``/``target_lang``.
``summarization``
    JSONL (or a JSON array) of objects with the string fields ``document`` and ``summary``,
    and optionally ``annotations``: a list of further reference summaries (e.g. AESLC's
    development split), used by multi-reference ROUGE (:attr:`Example.references`).

Every record becomes an :class:`Example` ``(source, target)``. Long sources can be cut to
their first ``max_source_length`` tokens (:func:`truncate_source`: the document, the source
sentence or the instruction's input, before the prompt template), in training and evaluation
alike. The model sees it as

* seq2seq (encoder-decoder): encoder ``input_ids`` = the source text (for instructions the
  plain prompt), ``labels`` = the target tokens followed by EOS;
* decoder-only: ``input_ids`` = prompt tokens + target tokens + EOS, ``labels`` = ``-100``
  on the prompt, the target tokens + EOS after it. The prompt is the tokenizer's chat
  template applied to one user message when the tokenizer has one, else a plain template
  (:data:`INSTRUCTION_TEMPLATE`, :data:`TRANSLATION_TEMPLATE`, :data:`SUMMARIZATION_TEMPLATE`).

Example::

    >>> examples = load_examples("train.jsonl")                     # task detected from the fields
    >>> ds = tokenize_examples(examples, tokenizer, seq2seq=False, max_length=512)
    >>> batch = DataCollator(tokenizer.pad_token_id)([ds[0], ds[1]])

Modules, one job each, in the order the data goes through them:

* :mod:`~properlm.data.reading` -- :class:`Example`, :class:`DataError`, reading and validating the three formats,
  :func:`load_examples`, :func:`split_validation`;
* :mod:`~properlm.data.prompts` -- the prompt templates, :func:`build_prompt`, :func:`truncate_source`;
* :mod:`~properlm.data.tokenization` -- :func:`tokenize_example`, :func:`tokenize_examples`, :func:`encode_prompt`,
  :data:`IGNORE_INDEX`;
* :mod:`~properlm.data.collate` -- :class:`DataCollator`, the padded batch.

The package exports the public names of those modules. How-to: [the command line](../how-to/command-line.md),
[summarisation](../how-to/summarisation.md).
"""

from __future__ import annotations

from .collate import DataCollator
from .prompts import (
    INSTRUCTION_TEMPLATE,
    INSTRUCTION_TEMPLATE_NO_INPUT,
    SUMMARIZATION_TEMPLATE,
    TRANSLATION_TEMPLATE,
    build_prompt,
    truncate_source,
)
from .reading import (
    TASKS,
    DataError,
    Example,
    detect_task,
    load_examples,
    read_instruction_file,
    read_parallel_files,
    read_summarization_file,
    split_validation,
)
from .tokenization import IGNORE_INDEX, encode_prompt, tokenize_example, tokenize_examples

__all__ = [
    "IGNORE_INDEX",
    "INSTRUCTION_TEMPLATE",
    "INSTRUCTION_TEMPLATE_NO_INPUT",
    "SUMMARIZATION_TEMPLATE",
    "TASKS",
    "TRANSLATION_TEMPLATE",
    "DataCollator",
    "DataError",
    "Example",
    "build_prompt",
    "detect_task",
    "encode_prompt",
    "load_examples",
    "read_instruction_file",
    "read_parallel_files",
    "read_summarization_file",
    "split_validation",
    "tokenize_example",
    "tokenize_examples",
    "truncate_source",
]
