"""Integrations of properlm with training libraries.

* :mod:`properlm.integrations.transformers` -- Hugging Face ``transformers`` (and PEFT, TRL):
  :func:`~properlm.integrations.transformers.scoring_rule_loss_func` for
  ``Trainer(compute_loss_func=...)`` and :func:`~properlm.integrations.transformers.apply_scoring_rule`,
  which patches a model so that its own loss is the fused scoring-rule loss.
* :mod:`properlm.integrations.schedule` -- rule schedules (``"logarithmic:13000,brier:5000"``)
  and the ``TrainerCallback`` that switches the rule at stage boundaries.

The submodules import ``transformers`` lazily; importing this package needs only torch. How-to:
[Hugging Face Trainer](../how-to/transformers-trainer.md), [TRL SFTTrainer](../how-to/trl-sft.md),
[rule schedules](../how-to/rule-schedule.md).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "RuleSchedule",
    "RuleScheduleCallback",
    "ScoringRuleHandle",
    "ScoringRuleLossFunc",
    "apply_scoring_rule",
    "remove_scoring_rule",
    "scoring_rule_loss_func",
]

_LAZY = {
    "scoring_rule_loss_func": "transformers",
    "ScoringRuleLossFunc": "transformers",
    "apply_scoring_rule": "transformers",
    "remove_scoring_rule": "transformers",
    "ScoringRuleHandle": "transformers",
    "is_scoring_rule_applied": "transformers",
    "RuleSchedule": "schedule",
    "RuleScheduleCallback": "schedule",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
