"""The evaluation pipeline behind ``properlm evaluate``.

Validate the settings, load data and model, compute the teacher-forced metrics and the generation metrics, and
write the results (``results.json``, ``hypotheses.txt``, reliability diagrams: see
:mod:`properlm.evaluation.run`).

Flow (:func:`~properlm.evaluation.run.run_evaluation`), with the module of each step::

    validate_settings (flags, files, rules, decoding, temperatures)   -- settings: fails fast, loads nothing
    resolve_lengths (options, training record, position table)        -- lengths: refuses a length the model cannot take
    resolve_languages (options, training record)                      -- settings: the translation prompt's languages
    load_examples, load_model_and_tokenizer                           -- properlm.data, properlm.models
    teacher_forced_metrics (logits at the scored positions only)      -- teacher_forced
      -> MetricsAccumulator (rule scores, perplexity, accuracy)       -- metrics
      -> calibration bins, ECE, reliability_diagram                   -- calibration
      -> TemperatureScan with fit_temperature                         -- temperature
    decode_prompts_with_stats (greedy / beam, new-token cap)          -- generation
      + DecodeJournal (resume an interrupted decoding)                -- journal
      + ScoringRuleObjective (the scoring-rule beam objective)        -- decoding
    generation_metrics (BLEU, chrF, ROUGE)                            -- text_metrics
    results.json; markdown_table for the terminal                     -- run, report

Modules, one job each:

* :mod:`~properlm.evaluation.settings` -- :class:`~properlm.evaluation.settings.EvalSettings` and their checks;
* :mod:`~properlm.evaluation.lengths` -- the truncation and where it came from;
* :mod:`~properlm.evaluation.teacher_forced` -- the teacher-forced pass over the examples;
* :mod:`~properlm.evaluation.precision` -- bfloat16 mixed precision with a float32 output head (``--bf16``);
* :mod:`~properlm.evaluation.metrics` -- token-level outputs, rule scores, perplexity, the streaming accumulator;
* :mod:`~properlm.evaluation.calibration` -- confidence bins, ECE, the reliability diagram;
* :mod:`~properlm.evaluation.temperature` -- the temperature scan and its fit;
* :mod:`~properlm.evaluation.decoding` -- the scoring-rule beam-search objective;
* :mod:`~properlm.evaluation.generation` -- batched decoding with the new-token cap;
* :mod:`~properlm.evaluation.journal` -- the journal of decoded batches that an interrupted decoding resumes from;
* :mod:`~properlm.evaluation.text_metrics` -- BLEU, chrF, ROUGE;
* :mod:`~properlm.evaluation.run` -- :func:`~properlm.evaluation.run.run_evaluation`, the driver;
* :mod:`~properlm.evaluation.report` -- the markdown table of a results dictionary;
* :mod:`~properlm.evaluation.significance` -- paired bootstrap over examples, intervals and sign test over seeds;
* :mod:`~properlm.evaluation.comparison` -- evaluated runs against a baseline (``properlm compare --baseline``);
* :mod:`~properlm.evaluation.run_records` -- what ``properlm compare`` reads from run directories;
* :mod:`~properlm.evaluation.comparison_table` -- the table across runs of ``properlm compare``;
* :mod:`~properlm.evaluation.curves` -- the training-curve plot (``properlm compare --plot``, ``properlm demo``,
  the studies).

The package exports the driver, the settings and their checks, the truncation and the teacher-forced pass.
How-to: [evaluation, calibration and temperature scaling](../how-to/evaluation.md),
[the scoring-rule beam objective](../how-to/beam-objective.md).
"""

from __future__ import annotations

from .lengths import LengthLimits, resolve_lengths
from .precision import mixed_precision
from .report import format_value, markdown_table
from .run import run_evaluation
from .settings import (
    DEFAULT_MAX_LENGTH,
    DTYPES,
    RESULTS_KIND,
    EvalError,
    EvalSettings,
    parse_rules,
    resolve_device,
    resolve_languages,
    torch_dtype,
    validate_decoding,
    validate_new_token_cap,
    validate_settings,
)
from .teacher_forced import ScoredHiddenStates, teacher_forced_metrics

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "DTYPES",
    "RESULTS_KIND",
    "EvalError",
    "EvalSettings",
    "LengthLimits",
    "ScoredHiddenStates",
    "format_value",
    "markdown_table",
    "mixed_precision",
    "parse_rules",
    "resolve_device",
    "resolve_languages",
    "resolve_lengths",
    "run_evaluation",
    "teacher_forced_metrics",
    "torch_dtype",
    "validate_decoding",
    "validate_new_token_cap",
    "validate_settings",
]
