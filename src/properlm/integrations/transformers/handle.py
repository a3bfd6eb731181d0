"""The handle of a patched model: read and switch its rule and smoothing, remove the patch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...options import check_smoothing, check_smoothing_variant
from ...rules import RuleLike, ScoringRule, get_rule
from .hooks import PatchState

__all__ = ["ScoringRuleHandle"]


class ScoringRuleHandle:
    """Handle of a model patched by :func:`apply_scoring_rule`.

    ``rule`` / ``smoothing`` can be read and assigned, :meth:`set_rule` switches both (from the
    next forward on; the optimizer state is untouched), :meth:`remove` restores the model's own
    loss. Also a context manager that removes the patch on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        state: PatchState,
        removables: list[torch.utils.hooks.RemovableHandle],
        restore: Callable[[], None],
    ) -> None:
        self.model, self.head, self._state = model, head, state
        self._removables, self._restore = removables, restore

    @property
    def rule(self) -> ScoringRule:
        """The rule of the patched loss; assignable (a spec or a rule)."""
        return self._state.rule

    @rule.setter
    def rule(self, rule: RuleLike) -> None:
        self._state.rule = get_rule(rule)

    @property
    def smoothing(self) -> float:
        """Score smoothing ``eps``; assignable."""
        return self._state.smoothing

    @smoothing.setter
    def smoothing(self, smoothing: float) -> None:
        self._state.smoothing = check_smoothing(smoothing)

    @property
    def smoothing_variant(self) -> str:
        """The masked-log variant of score smoothing (``"paper"``, ``"gated"`` or ``"none"``); assignable."""
        return self._state.smoothing_variant

    @smoothing_variant.setter
    def smoothing_variant(self, smoothing_variant: str) -> None:
        self._state.smoothing_variant = check_smoothing_variant(smoothing_variant)

    @property
    def fused(self) -> bool:
        """Whether the loss is the fused one (computed from the hidden states, no logits)."""
        return self._state.fused

    @property
    def shift_labels(self) -> bool:
        """Whether the labels are shifted by one (causal LMs) before scoring."""
        return self._state.shift

    @property
    def softcap(self) -> float | None:
        """The final-logit soft-cap the fused loss applies (from the model's config), or ``None``."""
        return self._state.softcap

    @property
    def logit_scale(self) -> float | None:
        """The logit multiplier the fused loss applies (from the model's config), or ``None``."""
        return self._state.logit_scale

    @property
    def ignore_index(self) -> int:
        """The label value that is not scored."""
        return self._state.ignore_index

    @property
    def active(self) -> bool:
        """Whether the patch is still applied (``False`` after :meth:`remove`)."""
        return bool(self._removables)

    @property
    def improper_loss(self) -> str | None:
        """The name of the improper objective trained instead of the rule, or ``None``.

        Set by :func:`apply_improper_loss`.
        """
        improper = self._state.improper
        return None if improper is None else improper.name

    def set_rule(self, rule: RuleLike, smoothing: float | None = None) -> None:
        """Switch to ``rule`` (and ``smoothing`` unless None) from the next forward on."""
        new_rule = get_rule(rule)
        new_eps = self._state.smoothing if smoothing is None else check_smoothing(smoothing)
        self._state.rule, self._state.smoothing = new_rule, new_eps

    def remove(self) -> None:
        """Remove the hooks (idempotent); ``model(..., labels=...)`` returns the model's own loss again."""
        for removable in self._removables:
            removable.remove()
        if self._removables:
            self._restore()
        self._removables = []
        self._state.calls.clear()

    def __enter__(self) -> ScoringRuleHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        if self.improper_loss is not None:
            return (
                f"ScoringRuleHandle(model={type(self.model).__name__}, improper_loss={self.improper_loss!r}, "
                f"fused={self.fused}, shift_labels={self.shift_labels}, active={self.active})"
            )
        return (
            f"ScoringRuleHandle(model={type(self.model).__name__}, rule={self.rule.spec!r}, "
            f"smoothing={self.smoothing}, fused={self.fused}, shift_labels={self.shift_labels}, "
            f"active={self.active})"
        )
