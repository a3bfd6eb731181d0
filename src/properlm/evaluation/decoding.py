"""Scoring rules as the objective of beam search.

Ordinary beam search ranks a hypothesis ``y_1..y_T`` by ``sum_t log p(y_t | x, y_<t)``.
:class:`ScoringRuleObjective` replaces every term by the token score of a scoring rule,

    score(y_1..y_T) = sum_t S(p(. | x, y_<t), y_t)          [ - T * s_max with subtract_max ]

so that ``model.generate(num_beams=k, logits_processor=[ScoringRuleObjective("spherical")])``
searches for the hypothesis with the largest summed spherical score.

How it plugs into Hugging Face beam search (checked against transformers 5.x,
``GenerationMixin._beam_search``): at each step the logits are turned into log-probabilities
``log_softmax(z)``, the logits processors run on them, and the processed values are added to
the running beam scores. The processor therefore receives scores ``s`` with
``softmax(s) = p`` and returns, for every vocabulary entry ``k``, ``S(p, k)``, computed from
the rule object as ``rule.score(s, {c: LSE(c s)})`` in float32 (no formula is restated here).
Because ``S`` is invariant to adding a constant to ``s``, the same holds when the processor
receives raw logits (greedy search and sampling), and ``p`` is the distribution as left by
the processors that run before it (Hugging Face's built-in processors run first: min-length,
bad words, forced tokens...). Entries of ``-inf`` (tokens forbidden by another processor)
have ``p = 0`` and stay ``-inf``: a forbidden token must never receive a finite score.

For ``logarithmic`` the input is returned unchanged: in beam search it is already ``log p``,
so the output equals ordinary beam search bit for bit.

Length and the length penalty. Finished hypotheses are compared by
``score / T ** length_penalty`` (Hugging Face default ``length_penalty=1.0``: the mean token
score). Log-probabilities are ``<= 0``, so the unnormalised sum falls with every token. The
bounded rules have scores in ``[-1, 1]`` (spherical and pseudo-spherical in ``[0, 1]``): the
sum of spherical scores *grows* with length, so with ``length_penalty=0`` (plain sums) the
search favours long outputs and Hugging Face's early-stopping heuristic (which assumes
scores fall with length) may stop too early. With ``subtract_max=True`` each term is
``S - s_max <= 0`` (the negative token loss) and sums fall with length as log-probabilities
do. With ``length_penalty=1`` both choices rank every pair of hypotheses alike (the mean
shifts by the constant ``s_max``); they differ for other length penalties only.

Greedy search is unchanged by any strictly proper rule of this package (``S(p, k)`` grows
with ``p_k``); sampling from ``softmax(S)`` is not meaningful, so use this processor with
``do_sample=False``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import LogitsProcessor

from ..rules import Logarithmic, RuleLike, ScoringRule, get_rule

__all__ = ["ScoringRuleObjective", "all_token_scores"]


def all_token_scores(scores: Tensor, rule: RuleLike) -> Tensor:
    """``S(softmax(scores), k)`` for every vocabulary entry ``k``: ``(..., V) -> (..., V)``, float32.

    Entries of ``-inf`` in ``scores`` stay ``-inf`` (as do all entries of a row that is entirely ``-inf``).
    """
    rule_obj = get_rule(rule)
    z = scores.float()
    lse = {c: torch.logsumexp(c * z, dim=-1, keepdim=True) for c in rule_obj.score_scales()}
    out = rule_obj.score(z, lse)
    return torch.where(z == -math.inf, -math.inf, out)


class ScoringRuleObjective(LogitsProcessor):
    """A ``LogitsProcessor`` that makes beam search maximise the summed token scores of ``rule``.

    Args:
        rule: a rule spec (``"spherical"``, ``"brier"``, ``"power:3"``, ...) or a
            :class:`~properlm.rules.ScoringRule`.
        subtract_max: return ``S(p, k) - s_max`` (``<= 0``) instead of ``S(p, k)``; see the
            module notes on length.

    Shapes: ``input_ids`` ``(batch * num_beams, cur_len)`` (unused), ``scores``
    ``(batch * num_beams, V)`` -> ``(batch * num_beams, V)`` float32.

    Example::

        >>> out = model.generate(**inputs, num_beams=4, do_sample=False,
        ...                      logits_processor=[ScoringRuleObjective("spherical")])
    """

    def __init__(self, rule: RuleLike, subtract_max: bool = False) -> None:
        self.rule: ScoringRule = get_rule(rule)
        self.subtract_max = bool(subtract_max)
        self._identity = type(self.rule) is Logarithmic

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """The step's token scores ``S(p, k)`` (``- s_max`` with ``subtract_max``) from ``scores`` ``(B, V)``."""
        if self._identity:
            return scores
        out = all_token_scores(scores, self.rule)
        if self.subtract_max and self.rule.s_max != 0:
            out = out - self.rule.s_max
        return out

    def __repr__(self) -> str:
        return f"ScoringRuleObjective({self.rule.spec!r}, subtract_max={self.subtract_max})"
