"""The scores of generated text: BLEU and chrF for translation, ROUGE for summarization.

* :func:`translation_metrics` -- corpus BLEU and chrF with ``sacrebleu`` metric objects,
  each with its signature string (every setting that the number depends on).
* :func:`summarization_metrics` -- mean ROUGE-1/2/L F1 with ``rouge-score`` (stemming on)
  against one reference each, and multi-reference ROUGE when several references per example
  are given: per example and per ROUGE type the best F1 over its references, then the mean
  over examples (:func:`rouge_per_example` gives the per-example F1s, e.g. for a paired
  bootstrap over documents). rouge-score's default tokenizer keeps only ASCII letters and
  digits, so it is meant for English text.

All scores are percentages (0-100).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "ROUGE_TYPES",
    "bleu_metric",
    "generation_metrics",
    "one_line",
    "rouge_per_example",
    "rouge_version",
    "summarization_metrics",
    "translation_metrics",
]

#: the ROUGE variants reported (F1 of each)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# sacrebleu chooses its tokenizer from the target language code; map a few spelled-out names
_LANG_CODES = {"chinese": "zh", "japanese": "ja", "korean": "ko"}


def one_line(text: str) -> str:
    """``text`` with line breaks replaced by spaces and outer whitespace removed.

    So a hypothesis takes exactly one line of a hypotheses file.
    """
    return " ".join(text.replace("\r", "\n").split("\n")).strip()


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no hypotheses to score")


def bleu_metric(target_lang: str | None = None) -> Any:
    """The ``sacrebleu`` ``BLEU`` metric object for ``target_lang``.

    ``target_lang`` is a code such as ``"de"`` or ``"zh"``, or ``None``; the tokenizer is
    ``zh``/``ja-mecab``/``ko-mecab`` for those languages, ``13a`` otherwise. When the language's
    tokenizer is unavailable (e.g. mecab not installed) it warns and returns the 13a one (the
    signature names the tokenizer used).
    """
    from sacrebleu.metrics import BLEU

    lang = _LANG_CODES.get(target_lang.strip().lower(), target_lang.strip().lower()) if target_lang else None
    if not lang:
        return BLEU()
    try:
        bleu = BLEU(trg_lang=lang)
        bleu.corpus_score(["a"], [["a"]])  # a tokenizer that imports lazily fails here, not mid-evaluation
        return bleu
    except Exception as exc:  # e.g. ja-mecab not installed: the default tokenizer, said out loud
        import warnings

        reason = " ".join(str(exc).split())
        warnings.warn(
            f"BLEU: sacrebleu's tokenizer for target language {lang!r} is unavailable ({reason}); "
            "scored with the default 13a tokenizer instead, which splits this language poorly "
            "(bleu_signature names the tokenizer used)",
            UserWarning,
            stacklevel=3,
        )
        return BLEU()


def translation_metrics(
    hypotheses: Sequence[str], references: Sequence[str], target_lang: str | None = None
) -> dict[str, Any]:
    """Corpus BLEU and chrF (``sacrebleu``) of ``hypotheses`` against one reference each.

    ``target_lang`` (a code such as ``"de"`` or ``"zh"``) lets sacrebleu pick its BLEU
    tokenizer (``zh``/``ja-mecab``/``ko-mecab`` for those languages, ``13a`` otherwise).

    Returns ``{"bleu", "bleu_signature", "chrf", "chrf_signature"}``.
    """
    from sacrebleu.metrics import CHRF

    _check_pairs(hypotheses, references)
    hyps = [one_line(h) for h in hypotheses]
    refs = [[one_line(r) for r in references]]
    bleu = bleu_metric(target_lang)
    bleu_score = bleu.corpus_score(hyps, refs)
    chrf = CHRF()
    chrf_score = chrf.corpus_score(hyps, refs)
    return {
        "bleu": float(bleu_score.score),
        "bleu_signature": str(bleu.get_signature()),
        "chrf": float(chrf_score.score),
        "chrf_signature": str(chrf.get_signature()),
    }


def rouge_version() -> str:
    """The installed ``rouge-score`` version (``"unknown"`` when its metadata is missing)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rouge-score")
    except PackageNotFoundError:
        return "unknown"


def rouge_per_example(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, list[float]]:
    """Per-example ROUGE-1/2/L F1 (``rouge-score``, Porter stemming), as fractions in [0, 1].

    Args:
        hypotheses: ``n`` system outputs.
        references: ``n`` entries, each one reference text or a non-empty sequence of them;
            with several, an example's score of each ROUGE type is the best F1 over its
            references (chosen per type, as ``RougeScorer.score_multi`` does).

    Returns ``{"rouge1": [n floats], "rouge2": [...], "rougeL": [...]}``.
    """
    from rouge_score import rouge_scorer

    _check_pairs(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out: dict[str, list[float]] = {t: [] for t in ROUGE_TYPES}
    for i, (h, refs) in enumerate(zip(hypotheses, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"example {i} has no reference")
        scores = [scorer.score(r, h) for r in refs]  # score(target, prediction)
        for t in ROUGE_TYPES:
            out[t].append(max(s[t].fmeasure for s in scores))
    return out


def summarization_metrics(
    hypotheses: Sequence[str], references: Sequence[str], multi_references: Sequence[Sequence[str]] | None = None
) -> dict[str, Any]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (``rouge-score``, Porter stemming) in percent.

    ``references`` holds one reference per example. With ``multi_references`` (per example a
    sequence of references, e.g. the summary followed by annotators' summaries) the
    multi-reference scores are added: per example the best F1 over its references, per ROUGE
    type, then the mean over examples.

    Returns ``{"rouge1", "rouge2", "rougeL", "rouge_settings", "rouge_version"}``, and with
    ``multi_references`` also ``"rouge1_multi"``, ``"rouge2_multi"``, ``"rougeL_multi"``,
    ``"rouge_multi_settings"`` and ``"num_references"`` (the mean number per example).
    """
    n = len(hypotheses)
    single = rouge_per_example(hypotheses, references)
    ver = rouge_version()
    out: dict[str, Any] = {t: 100.0 * sum(single[t]) / n for t in ROUGE_TYPES}
    out["rouge_settings"] = f"rouge-score {ver}|F1|one reference|mean over examples|stemmer:porter|tok:default"
    out["rouge_version"] = ver
    if multi_references is not None:
        multi = rouge_per_example(hypotheses, multi_references)
        for t in ROUGE_TYPES:
            out[f"{t}_multi"] = 100.0 * sum(multi[t]) / n
        out["num_references"] = sum(len(r) for r in multi_references) / n
        out["rouge_multi_settings"] = (
            f"rouge-score {ver}|F1|best over each example's references, per ROUGE type|"
            "mean over examples|stemmer:porter|tok:default"
        )
    return out


def generation_metrics(
    task: str,
    hypotheses: Sequence[str],
    references: Sequence[str],
    target_lang: str | None = None,
    multi_references: Sequence[Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Metrics for ``task``: BLEU/chrF for translation, ROUGE for summarization, both for instructions.

    Summarization and instructions get multi-reference ROUGE as well when ``multi_references`` are given
    (BLEU and chrF stay against the first reference).
    """
    if task == "translation":
        return translation_metrics(hypotheses, references, target_lang)
    if task == "summarization":
        return summarization_metrics(hypotheses, references, multi_references)
    if task == "instruction":
        return {
            **translation_metrics(hypotheses, references),
            **summarization_metrics(hypotheses, references, multi_references),
        }
    raise ValueError(f"unknown task {task!r}; expected translation, summarization or instruction")
