"""Rule schedules: train with one scoring rule, then continue with another.

The paper's recipe pre-trains with the logarithmic score and fine-tunes with another rule.
A schedule is a list of stages ``(rule, steps)``; as a string ``"logarithmic:13000,brier:5000"``
(stages separated by ``,``; the text after a stage's last ``:`` is its number of optimizer
steps, so rules with parameters read ``"power:3:2000"``; ``"power:3@2000"`` is accepted too).

Step ``s`` (0-based: the number of optimizer steps completed before it, ``state.global_step``
in ``transformers``) uses stage ``k`` for ``s`` in ``[b_k, b_k + steps_k)`` with
``b_k = steps_0 + ... + steps_(k-1)``; steps past the end keep the last stage's rule.

:class:`RuleScheduleCallback` applies a schedule inside one ``transformers.Trainer`` run, so
the model, the optimizer state and the learning-rate schedule carry on across stages.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..rules import RuleLike, ScoringRule, get_rule

__all__ = ["RuleSchedule", "RuleScheduleCallback", "RuleSwitchable"]


class RuleSwitchable(Protocol):
    """What a schedule drives.

    A :class:`~properlm.integrations.transformers.ScoringRuleHandle` or a
    :class:`~properlm.integrations.transformers.ScoringRuleLossFunc`.
    """

    @property
    def rule(self) -> ScoringRule:
        """The rule in use."""
        ...

    def set_rule(self, rule: RuleLike, smoothing: float | None = None) -> None:
        """Switch to ``rule`` (and ``smoothing``, unless ``None``)."""
        ...


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_steps(text: str, stage: int, source: str) -> int:
    text = text.strip()
    try:
        steps = int(text)
    except ValueError:
        raise ValueError(
            f"schedule stage {stage} ({source!r}): the number of steps must be a positive integer, got {text!r}"
        ) from None
    if steps <= 0:
        raise ValueError(f"schedule stage {stage} ({source!r}): the number of steps must be positive, got {steps}")
    return steps


@dataclass(frozen=True)
class RuleSchedule:
    """Stages ``(rule, steps)`` run one after the other.

    Example::

        >>> schedule = RuleSchedule.parse("logarithmic:13000,brier:5000")
        >>> schedule.total_steps, schedule.rule_at(12999).spec, schedule.rule_at(13000).spec
        (18000, 'logarithmic', 'brier')
    """

    stages: tuple[tuple[ScoringRule, int], ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a rule schedule needs at least one stage")
        checked = []
        for i, stage in enumerate(self.stages, start=1):
            try:
                rule, steps = stage
            except (TypeError, ValueError):
                raise ValueError(f"schedule stage {i}: expected a (rule, steps) pair, got {stage!r}") from None
            try:
                rule_obj = get_rule(rule)
            except ValueError as err:
                raise ValueError(f"schedule stage {i} ({stage!r}): {err}") from None
            if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
                raise ValueError(
                    f"schedule stage {i} ({stage!r}): the number of steps must be a positive integer, got {steps!r}"
                )
            checked.append((rule_obj, steps))
        object.__setattr__(self, "stages", tuple(checked))

    @classmethod
    def from_stages(cls, stages: Iterable[tuple[RuleLike, int]]) -> RuleSchedule:
        """Schedule from ``[(rule, steps), ...]`` pairs."""
        return cls(tuple(stages))  # type: ignore[arg-type]

    @classmethod
    def single(cls, rule: RuleLike, steps: int = 1) -> RuleSchedule:
        """A one-stage schedule (the rule for every step)."""
        return cls(((get_rule(rule), steps),))

    @classmethod
    def parse(cls, text: str) -> RuleSchedule:
        """Parse ``"rule:steps,rule:steps,..."`` (see the module docstring).

        Raises ``ValueError`` naming the stage (1-based) and its text for an unknown rule, bad
        rule parameters, or a missing, non-integer or non-positive number of steps.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"a rule schedule must be a non-empty string like 'logarithmic:13000,brier:5000', got {text!r}"
            )
        stages: list[tuple[ScoringRule, int]] = []
        pending = ""  # a rule spec with several comma-separated parameters spans several pieces
        for piece in text.split(","):
            source = f"{pending},{piece}" if pending else piece
            source = source.strip()
            number = len(stages) + 1
            if not source:
                raise ValueError(f"schedule stage {number} is empty in {text!r}")
            if "@" in source:
                rule_text, _, steps_text = source.rpartition("@")
            elif ":" in source:
                rule_text, _, steps_text = source.rpartition(":")
                if not steps_text.strip().lstrip("+-").isdigit() and _is_number(steps_text):
                    # "name:1.5" followed by ",2:100": a parameter list, keep reading
                    pending = source
                    continue
            else:
                raise ValueError(f"schedule stage {number} ({source!r}): expected 'rule:steps', e.g. 'brier:5000'")
            steps = _parse_steps(steps_text, number, source)
            if not rule_text.strip():
                raise ValueError(f"schedule stage {number} ({source!r}): missing rule name before the steps")
            try:
                rule = get_rule(rule_text.strip())
            except ValueError as err:
                raise ValueError(f"schedule stage {number} ({source!r}): {err}") from None
            stages.append((rule, steps))
            pending = ""
        if pending:
            raise ValueError(
                f"schedule stage {len(stages) + 1} ({pending!r}): expected 'rule:steps', the number of "
                "steps is missing or not an integer"
            )
        return cls(tuple(stages))

    @property
    def total_steps(self) -> int:
        """Sum of the stages' steps."""
        return sum(steps for _, steps in self.stages)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """First step of each stage: ``(0, steps_0, steps_0 + steps_1, ...)``."""
        starts, total = [], 0
        for _, steps in self.stages:
            starts.append(total)
            total += steps
        return tuple(starts)

    def stage_at(self, step: int) -> int:
        """0-based index of the stage that step ``step`` (0-based) belongs to.

        The last stage for steps past :attr:`total_steps`.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        return bisect.bisect_right(self.boundaries, step) - 1

    def rule_at(self, step: int) -> ScoringRule:
        """The rule of step ``step`` (0-based optimizer step)."""
        return self.stages[self.stage_at(step)][0]

    @property
    def spec(self) -> str:
        """The string that :meth:`parse` turns back into this schedule."""
        return ",".join(f"{rule.spec}:{steps}" for rule, steps in self.stages)

    def __str__(self) -> str:
        return self.spec

    def __len__(self) -> int:
        return len(self.stages)


def _trainer_callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is an optional dependency
        return object
    return TrainerCallback


class RuleScheduleCallback(_trainer_callback_base()):  # type: ignore[misc]
    """``transformers.TrainerCallback`` that follows a :class:`RuleSchedule`.

    Before every optimizer step (``on_step_begin``, and at ``on_train_begin`` so a resumed run
    starts with the right rule) it sets ``target``'s rule to ``schedule.rule_at(state.global_step)``.
    ``target`` is what computes the loss: the handle of :func:`~properlm.integrations.transformers.
    apply_scoring_rule` or the :class:`~properlm.integrations.transformers.ScoringRuleLossFunc` passed
    as ``compute_loss_func``. The optimizer and scheduler are the Trainer's, so they carry on.

    Every log record gets ``rule`` (spec of the rule of the last completed step) and
    ``rule_stage`` (its 0-based stage index): in the ``logs`` passed on to the callbacks after this
    one, and in ``state.log_history``.

    Args:
        schedule: a :class:`RuleSchedule` or its string form.
        target: object with ``set_rule(rule, smoothing=None)``.
        smoothing: score smoothing for every stage; ``None`` keeps the target's.
    """

    def __init__(self, schedule: RuleSchedule | str, target: RuleSwitchable, smoothing: float | None = None) -> None:
        self.schedule = RuleSchedule.parse(schedule) if isinstance(schedule, str) else schedule
        if not isinstance(self.schedule, RuleSchedule):
            raise ValueError(f"schedule must be a RuleSchedule or a string, got {type(schedule).__name__}")
        if not callable(getattr(target, "set_rule", None)):
            raise ValueError(
                f"target must have a set_rule(rule, smoothing) method (a ScoringRuleHandle or a "
                f"ScoringRuleLossFunc), got {type(target).__name__}"
            )
        self.target = target
        self.smoothing = smoothing
        #: (global_step, rule spec) for every switch made, for inspection and tests
        self.switches: list[tuple[int, str]] = []
        self._current: ScoringRule | None = None

    def _sync(self, step: int) -> None:
        rule = self.schedule.rule_at(step)
        if rule != self._current or rule != getattr(self.target, "rule", rule):
            self.target.set_rule(rule, self.smoothing)
            self._current = rule
            self.switches.append((step, rule.spec))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Set the rule of the step training starts (or resumes) at."""
        self._sync(int(state.global_step))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Switch the rule when this step begins a new stage."""
        self._sync(int(state.global_step))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Add ``rule`` and ``rule_stage`` to the logged record."""
        step = max(int(state.global_step) - 1, 0)
        stage = self.schedule.stage_at(step)
        extra = {"rule": self.schedule.stages[stage][0].spec, "rule_stage": stage}
        if logs is not None:
            logs.update(extra)
        history: Sequence[dict[str, Any]] = getattr(state, "log_history", [])
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(extra)
