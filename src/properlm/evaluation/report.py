"""The results of ``properlm evaluate`` as markdown: the table it prints (and ``properlm compare`` builds on)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_value", "markdown_table"]


def format_value(v: Any, spec: str = ".4f") -> str:
    """One markdown table cell.

    ``-`` for missing, numbers with ``spec`` (floats only), ``|`` escaped in text.
    """
    if v is None:
        return "-"
    if isinstance(v, bool | int):
        return str(v)
    if isinstance(v, float):
        return format(v, spec) if math.isfinite(v) else str(v)
    return str(v).replace("|", "\\|")


def _fmt(v: Any, digits: int = 4) -> str:
    return format_value(v, f".{digits}f")


def _pct(v: Any) -> Any:
    return 100 * v if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def markdown_table(results: dict[str, Any]) -> str:
    """The headline figures of a results dictionary as a two-column markdown table.

    The sacrebleu signatures follow it.
    """
    tf = results["teacher_forced"]
    rows: list[tuple[str, str]] = [
        ("examples", _fmt(results["num_examples"])),
        ("reference tokens", _fmt(tf["num_tokens"])),
        ("perplexity", _fmt(tf["perplexity"], 3)),
        ("token accuracy (%)", _fmt(_pct(tf["token_accuracy"]), 2)),
    ]
    if tf.get("mean_target_prob") is not None:  # the model's prior on the targets (absent in older results)
        rows += [
            ("mean p(target token)", _fmt(tf["mean_target_prob"], 3)),
            ("targets with p > 0.5 (%)", _fmt(_pct(tf.get("target_prob_above_half")), 1)),
        ]
    rows.append((f"ECE, {tf['num_bins']} bins (%)", _fmt(_pct(tf["ece"]), 2)))
    if tf.get("temperature", 1.0) != 1.0:
        rows.insert(2, ("temperature (scores, ECE)", _fmt(tf["temperature"], 3)))
    cut = results.get("truncation")
    if cut:
        limit = f"; the model takes {cut['model_max_positions']}" if cut.get("model_max_positions") else ""
        rows.insert(1, ("max length (tokens)", f"{cut['max_length']} ({cut['max_length_from']}{limit})"))
        if cut.get("max_source_length") is not None:
            rows.insert(
                2,
                (
                    "source cut at (tokens)",
                    f"{cut['max_source_length']} ({cut['max_source_length_from']}); "
                    f"{cut['num_sources_cut']} of {results['num_examples']} sources cut",
                ),
            )
        if cut.get("num_prompts_over_max_length"):
            rows.insert(
                2,
                (
                    "prompts cut at max length",
                    f"{cut['num_prompts_over_max_length']} of "
                    f"{results['num_examples']} examples (their prompt alone exceeds {cut['max_length']} "
                    "tokens)",
                ),
            )
    fit = results.get("temperature_fit")
    if fit:
        if fit["on_boundary"]:
            where = " (grid edge: the optimum may lie beyond)"
        elif "grid_temperature" in fit and fit["grid_temperature"] != fit["temperature"]:
            where = f" (refined from the grid's {_fmt(fit['grid_temperature'], 4)})"
        else:
            where = ""
        rows += [
            ("fitted temperature", _fmt(fit["temperature"], 4) + where),
            ("mean log score at it", _fmt(fit["mean_log_prob"], 4)),
            ("ECE at it (%)", _fmt(_pct(fit["ece"]), 2)),
        ]
    for spec, v in tf["mean_scores"].items():
        rows.append((f"mean score {spec}", f"{v:.5g}" if isinstance(v, float) else _fmt(v)))
    scaled = results.get("teacher_forced_scaled")
    if scaled:
        t = _fmt(scaled["temperature"], 3)
        rows += [
            (f"ECE at T={t} (%)", _fmt(_pct(scaled["ece"]), 2)),
            (f"mean log score at T={t}", _fmt(scaled["mean_log_prob"], 4)),
        ]
        for spec, v in scaled["mean_scores"].items():
            rows.append((f"mean score {spec} at T={t}", f"{v:.5g}" if isinstance(v, float) else _fmt(v)))
    gen = results.get("generation")
    notes: list[str] = []
    if gen:
        rows.append(("decoding", f"{gen['decoding']}, objective {gen['objective']}"))
        cap = gen.get("new_token_cap")
        if cap:
            rule = ""
            if cap["ratio"] is not None:
                rule = f", per batch ceil({cap['ratio']:g} x longest source + {cap['offset']}): "
                rule += f"mean {cap['mean_cap']:.1f}"
            rows.append(
                (
                    "new-token cap",
                    f"{cap['max_new_tokens']}{rule}; {cap['num_at_cap']} of "
                    f"{cap['num_hypotheses']} hypotheses stopped at it",
                )
            )
        multi = f" (multi-ref, {gen['num_references']:.3g} refs/example)" if "num_references" in gen else ""
        for key, label in (
            ("bleu", "BLEU"),
            ("chrf", "chrF"),
            ("rouge1", "ROUGE-1"),
            ("rouge2", "ROUGE-2"),
            ("rougeL", "ROUGE-L"),
            ("rouge1_multi", "ROUGE-1" + multi),
            ("rouge2_multi", "ROUGE-2" + multi),
            ("rougeL_multi", "ROUGE-L" + multi),
        ):
            if key in gen:
                rows.append((label, _fmt(gen[key], 2)))
        for key, label in (
            ("bleu_signature", "BLEU"),
            ("chrf_signature", "chrF"),
            ("rouge_settings", "ROUGE"),
            ("rouge_multi_settings", "ROUGE multi-reference"),
        ):
            if key in gen:
                notes.append(f"{label} signature: {gen[key]}")
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines + (["", *notes] if notes else []))
