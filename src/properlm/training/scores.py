"""Held-out evaluation during training: every rule's mean token score on the validation set.

:func:`eval_rules` names the rules reported (:data:`EVAL_RULES` and the training rule); ``score_sums`` computes
each sequence's score sums ``(B, R)`` in chunks of rows from the statistics of :func:`properlm.stats.rule_scores`,
``score_metrics`` turns the gathered sums into ``eval_score_<rule>`` means over all held-out tokens, and
``final_eval`` gives the validation metrics of the final model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..rules import get_rule

__all__ = ["EVAL_RULES", "eval_rules"]


#: rules whose mean held-out token score every evaluation reports
EVAL_RULES = ("logarithmic", "brier", "spherical")


#: float32 elements of one chunk of logits rows in the evaluation's score computation (64 MiB)
_EVAL_CHUNK_ELEMENTS = 1 << 24


def eval_rules(training_rule: str) -> list[str]:
    """Rules reported at evaluation: :data:`EVAL_RULES` plus the training rule(s)."""
    rules = [get_rule(r).spec for r in EVAL_RULES]
    spec = get_rule(training_rule).spec
    return rules if spec in rules else [*rules, spec]


def score_sums(logits: torch.Tensor, labels: torch.Tensor, rules: Sequence[str]) -> torch.Tensor:
    """Per-sequence sums of each rule's token score: ``(B, T, V)``, ``(B, T)`` -> ``(B, R)``.

    The statistics are computed once per chunk of scored rows for all rules
    (:func:`properlm.stats.rule_scores`), and each rule's score comes from its rule object.
    """
    B, T, V = logits.shape
    rows = (labels != -100).reshape(-1).nonzero().squeeze(1)
    z = logits.reshape(-1, V).index_select(0, rows)
    y = labels.reshape(-1).index_select(0, rows)
    return row_score_sums(z, y, rows // T, B, rules)


def row_score_sums(
    z: torch.Tensor, y: torch.Tensor, seq: torch.Tensor, batch: int, rules: Sequence[str]
) -> torch.Tensor:
    """Per-sequence sums of each rule's token score from scored rows -> ``(batch, R)`` (float64).

    Logits ``z (N, V)``, targets ``y (N,)`` and the sequence ``seq (N,)`` of each row.
    """
    from ..stats import rule_scores

    V = z.shape[-1]
    out = torch.zeros(batch, len(rules), dtype=torch.float64, device=z.device)
    chunk = max(1, _EVAL_CHUNK_ELEMENTS // max(V, 1))  # rows per chunk: bounded float32 temporaries
    rule_objs = [get_rule(spec) for spec in rules]
    for start in range(0, y.numel(), chunk):
        scores, _ = rule_scores(z[start : start + chunk].float(), y[start : start + chunk], rule_objs)
        out.index_add_(0, seq[start : start + chunk], scores.double())
    return out


def score_metrics(rules: Sequence[str]) -> Any:
    def compute(pred: Any) -> dict[str, float]:
        sums = torch.as_tensor(pred.predictions, dtype=torch.float64).reshape(-1, len(rules))
        counts = torch.as_tensor(pred.label_ids, dtype=torch.float64).reshape(-1)
        n = float(counts.sum())
        out = {f"score_{r}": float(sums[:, j].sum()) / max(n, 1.0) for j, r in enumerate(rules)}
        out["tokens"] = n
        return out

    return compute


def final_eval(trainer: Any) -> dict[str, Any]:
    """The validation metrics of the final model.

    Those of the scheduled evaluation when one ran at the last step (same weights), else a fresh
    ``trainer.evaluate()``.
    """
    if getattr(trainer.args, "load_best_model_at_end", False):
        return trainer.evaluate()  # the weights are no longer those of the last evaluation
    step = trainer.state.global_step
    for record in reversed(trainer.state.log_history):
        if record.get("step") == step and "eval_loss" in record:
            return {k: v for k, v in record.items() if k.startswith("eval_") or k == "epoch"}
    return trainer.evaluate()
