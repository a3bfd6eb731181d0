"""Way in 1: a scoring-rule loss for ``transformers.Trainer(compute_loss_func=...)``.

:func:`scoring_rule_loss_func` returns a :class:`ScoringRuleLossFunc`, which scores the model's full logits with
:func:`properlm.scoring_rule_loss`; its rule and smoothing can be switched between steps
(:class:`~properlm.integrations.schedule.RuleScheduleCallback`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ...loss import scoring_rule_loss
from ...options import check_smoothing, check_smoothing_variant
from ...rules import RuleLike, ScoringRule, get_rule
from .alignment import align_labels, check_aligned
from .introspection import config_of, is_encoder_decoder

__all__ = ["ScoringRuleLossFunc", "scoring_rule_loss_func"]


class ScoringRuleLossFunc:
    r"""Scoring-rule loss for ``transformers.Trainer(compute_loss_func=...)``.

    ``loss_func(outputs, labels, num_items_in_batch=None) -> Tensor`` scores ``outputs.logits``
    ``(B, T, V)`` against ``labels`` ``(B, T)`` with :func:`properlm.scoring_rule_loss`
    (``reduction="mean"``: the sum over non-ignored tokens divided by ``num_items_in_batch`` when
    given, else by their count).

    Attributes:
        rule: the :class:`~properlm.rules.ScoringRule` in use (assign a spec string or a rule
            to switch, e.g. from :class:`~properlm.integrations.schedule.RuleScheduleCallback`).
        smoothing: score smoothing ``eps`` in ``[0, 1)``.
        smoothing_variant: the masked-log term of bounded rules, ``"paper"`` (default), ``"gated"``
            or ``"none"`` (see :func:`properlm.scoring_rule_loss`); assignable.
        ignore_index: label value that is not scored.
        shift_labels: ``True`` for causal LMs (``logits[..., :-1, :]`` vs ``labels[..., 1:]``),
            ``False`` for encoder-decoder models (no shift), ``None`` to decide per call from the
            outputs: a ``Seq2SeqLMOutput`` (it has ``encoder_last_hidden_state``) is not shifted,
            anything else is. Set it with :meth:`for_model` or ``scoring_rule_loss_func(model=...)``.
    """

    def __init__(
        self,
        rule: RuleLike = "logarithmic",
        smoothing: float = 0.0,
        ignore_index: int = -100,
        shift_labels: bool | None = None,
        *,
        smoothing_variant: str = "paper",
    ) -> None:
        self._rule = get_rule(rule)
        self._smoothing = check_smoothing(smoothing)
        self._smoothing_variant = check_smoothing_variant(smoothing_variant)
        self.ignore_index = int(ignore_index)
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise ValueError(f"shift_labels must be True, False or None, got {shift_labels!r}")
        self.shift_labels = shift_labels

    @property
    def rule(self) -> ScoringRule:
        """The rule of the loss; assignable (a spec or a rule)."""
        return self._rule

    @rule.setter
    def rule(self, rule: RuleLike) -> None:
        self._rule = get_rule(rule)

    @property
    def smoothing(self) -> float:
        """Score smoothing ``eps``; assignable."""
        return self._smoothing

    @smoothing.setter
    def smoothing(self, smoothing: float) -> None:
        self._smoothing = check_smoothing(smoothing)

    @property
    def smoothing_variant(self) -> str:
        """The masked-log variant of score smoothing (``"paper"``, ``"gated"`` or ``"none"``); assignable."""
        return self._smoothing_variant

    @smoothing_variant.setter
    def smoothing_variant(self, smoothing_variant: str) -> None:
        self._smoothing_variant = check_smoothing_variant(smoothing_variant)

    def set_rule(self, rule: RuleLike, smoothing: float | None = None) -> None:
        """Switch to ``rule`` (and ``smoothing`` unless None) from the next call on."""
        new_rule = get_rule(rule)
        new_eps = self._smoothing if smoothing is None else check_smoothing(smoothing)
        self._rule, self._smoothing = new_rule, new_eps

    def for_model(self, model: nn.Module) -> ScoringRuleLossFunc:
        """Set :attr:`shift_labels` from ``model.config.is_encoder_decoder``; returns ``self``."""
        if config_of(model) is None:
            raise ValueError(f"model of type {type(model).__name__} has no config to read is_encoder_decoder from")
        self.shift_labels = not is_encoder_decoder(model)
        return self

    def __call__(
        self,
        outputs: Any,
        labels: Tensor | None,
        num_items_in_batch: int | Tensor | None = None,
        shift_labels: Tensor | None = None,
        **_: Any,
    ) -> Tensor:
        """The loss of a model's ``outputs`` for ``labels``, as ``Trainer(compute_loss_func=...)`` calls it."""
        if labels is None and shift_labels is None:
            raise ValueError("the scoring-rule loss needs labels: the batch has no 'labels' field")
        if isinstance(outputs, Mapping):
            if outputs.get("logits") is None:
                raise ValueError(
                    "model outputs have no 'logits' (was the model patched by apply_scoring_rule "
                    "and called with labels? use one of the two, not both)"
                )
            logits = outputs["logits"]
            shift = self.shift_labels
            if shift is None:
                shift = "encoder_last_hidden_state" not in outputs
        else:
            logits = outputs[0]
            shift = True if self.shift_labels is None else self.shift_labels
        z, y = align_labels(logits, labels, shift, shift_labels)
        check_aligned(z, y, "logits")
        return scoring_rule_loss(
            z,
            y,
            self._rule,
            self._smoothing,
            self.ignore_index,
            "mean",
            num_items_in_batch,
            smoothing_variant=self._smoothing_variant,
        )

    def __repr__(self) -> str:
        variant = "" if self._smoothing_variant == "paper" else f"smoothing_variant={self._smoothing_variant!r}, "
        return (
            f"ScoringRuleLossFunc(rule={self._rule.spec!r}, smoothing={self._smoothing}, {variant}"
            f"ignore_index={self.ignore_index}, shift_labels={self.shift_labels})"
        )


def scoring_rule_loss_func(
    rule: RuleLike = "logarithmic",
    smoothing: float = 0.0,
    ignore_index: int = -100,
    *,
    shift_labels: bool | None = None,
    model: nn.Module | None = None,
    smoothing_variant: str = "paper",
) -> ScoringRuleLossFunc:
    """A :class:`ScoringRuleLossFunc` for ``Trainer(compute_loss_func=...)``.

    Args:
        rule: spec string (``"brier"``, ``"power:3"``, ...) or :class:`~properlm.rules.ScoringRule`.
        smoothing: score smoothing ``eps`` in ``[0, 1)``.
        smoothing_variant: ``"paper"`` (default), ``"gated"`` or ``"none"``: the masked-log term of
            bounded rules (see :func:`properlm.scoring_rule_loss`).
        ignore_index: label value that is not scored (``-100`` in Hugging Face collators).
        shift_labels: ``True`` causal (shift by one), ``False`` encoder-decoder (no shift),
            ``None``: from ``model`` when given, else decided per call from the outputs.
        model: the model to be trained; sets ``shift_labels = not model.config.is_encoder_decoder``.
    """
    func = ScoringRuleLossFunc(rule, smoothing, ignore_index, shift_labels, smoothing_variant=smoothing_variant)
    if model is not None and shift_labels is None:
        func.for_model(model)
    return func
