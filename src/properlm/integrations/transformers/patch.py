"""Way in 2: patch a model so that ``model(..., labels=labels)`` returns the scoring-rule loss.

:func:`apply_scoring_rule` (or :func:`apply_improper_loss`, an improper baseline objective) installs the hooks of
:mod:`properlm.integrations.transformers.hooks` and returns a
:class:`~properlm.integrations.transformers.handle.ScoringRuleHandle`; :func:`remove_scoring_rule` removes every
patch, also one carried into a copy of the model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...improper import ImproperObjective, get_improper_objective
from ...options import check_smoothing, check_smoothing_variant
from ...rules import RuleLike, get_rule
from .handle import ScoringRuleHandle
from .heads import check_fusable, head_transform
from .hooks import LOGARITHMIC, HeadPreHook, ModelPostHook, ModelPreHook, PatchState
from .introspection import is_encoder_decoder, output_head, unwrap_peft

__all__ = ["apply_improper_loss", "apply_scoring_rule", "is_scoring_rule_applied", "remove_scoring_rule"]


def apply_scoring_rule(
    model: nn.Module,
    rule: RuleLike = "logarithmic",
    smoothing: float = 0.0,
    fused: bool = True,
    ignore_index: int = -100,
    *,
    shift_labels: bool | None = None,
    smoothing_variant: str = "paper",
) -> ScoringRuleHandle:
    r"""Make ``model(..., labels=labels)`` return the scoring-rule loss.

    The loss is ``S_max - S_eps(softmax(z), y)`` averaged over the non-ignored targets (or summed
    and divided by ``num_items_in_batch`` when the caller passes it, as ``Trainer`` does), with
    ``z = hidden @ W.T + b`` the logits of the output embedding ``model.get_output_embeddings()``
    (plus ``final_logits_bias`` for BART-like models), soft-capped / scaled as the model's config says
    (Gemma 2/3, Cohere, Granite; see :mod:`~properlm.integrations.transformers.heads`). See
    :mod:`~properlm.integrations.transformers.hooks` for the mechanism.

    Args:
        model: a Hugging Face causal-LM or seq2seq-LM model, or a PEFT model wrapping one. With
            PEFT, patch the outer (PEFT) model: PEFT calls the inner model's ``forward`` directly,
            which bypasses hooks placed on the inner model.
        rule: spec string or :class:`~properlm.rules.ScoringRule`.
        smoothing: score smoothing ``eps`` in ``[0, 1)``.
        fused: compute the loss with the fused linear loss from the hidden states (no logits; the
            output's ``logits`` is then empty, shape ``(..., 0, V)``). ``False``: the model builds
            its logits as usual and they are scored by :func:`properlm.scoring_rule_loss`.
        ignore_index: label value that is not scored.
        shift_labels: ``None`` (default) shifts unless ``model.config.is_encoder_decoder``.
        smoothing_variant: the masked-log term of bounded rules with smoothing: ``"paper"``
            (default, the paper's formula), ``"gated"`` (recommended for large vocabularies) or
            ``"none"`` (see :func:`properlm.scoring_rule_loss`).

    Returns:
        A :class:`ScoringRuleHandle` (``.set_rule``, ``.remove``). Applying again replaces the
        previous patch.

    Raises:
        ValueError: the model has no output embedding; or ``fused=True`` and the logits are not
            a transform of ``hidden @ W.T + b`` that the fused loss expresses (a PEFT-wrapped head,
            a head without a 2-D weight, a soft-cap or scale in the config that is not a number > 0).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rule_obj = get_rule(rule)
    eps = check_smoothing(smoothing)
    variant = check_smoothing_variant(smoothing_variant)
    if shift_labels is not None and not isinstance(shift_labels, bool):
        raise ValueError(f"shift_labels must be True, False or None, got {shift_labels!r}")
    head = output_head(model)
    softcap = logit_scale = None
    if fused:
        check_fusable(model, head)
        softcap, logit_scale = head_transform(model)
    remove_scoring_rule(model)
    shift = (not is_encoder_decoder(unwrap_peft(model))) if shift_labels is None else shift_labels
    state = PatchState(rule_obj, eps, int(ignore_index), bool(fused), shift, softcap, logit_scale, variant)
    removables = [
        model.register_forward_pre_hook(ModelPreHook(state), with_kwargs=True),
        model.register_forward_hook(ModelPostHook(state), with_kwargs=True, always_call=True),
    ]
    if fused:
        removables.append(head.register_forward_pre_hook(HeadPreHook(state)))
    # What Trainer reads off the model when it is built: it passes num_items_in_batch only to
    # models it believes accept loss kwargs (the pre-hook always takes it out of the call), and
    # counts num_items_in_batch over labels[..., 1:] only for models whose loss_type is the
    # causal one (GPT-2 has loss_type None, so every label, position 0 included, would count).
    base = unwrap_peft(model)
    overrides: dict[str, Any] = {"accepts_loss_kwargs": True}
    if shift and getattr(base, "loss_type", None) is None:
        overrides["loss_type"] = "ForCausalLM"
    for name, value in overrides.items():
        state.saved_attrs[name] = (base.__dict__[name],) if name in base.__dict__ else ()
        setattr(base, name, value)
    return ScoringRuleHandle(model, head, state, removables, lambda: _restore_attrs(base, state))


def apply_improper_loss(
    model: nn.Module,
    objective: str | ImproperObjective = "dft",
    fused: bool = True,
    ignore_index: int = -100,
    *,
    shift_labels: bool | None = None,
) -> ScoringRuleHandle:
    r"""Make ``model(..., labels=labels)`` return an **improper** baseline loss (:mod:`properlm.improper`).

    The objective is ``"dft"`` (``-log p_y * stopgrad(p_y)``, TRL's ``loss_type="dft"``) or
    ``"one-minus-p"`` (``1 - p_y``).

    The patch of :func:`apply_scoring_rule` (same hooks, alignment, ``num_items_in_batch`` and TRL
    handling, fused or not): the per-token ``-log p_y`` of the logarithmic rule is computed (fused:
    from the hidden states, without logits) and mapped to the objective's per-token loss, then
    averaged over the non-ignored targets (or summed and divided by ``num_items_in_batch``).
    These objectives are not scoring rules: the handle's ``improper_loss`` names the objective, and
    its rule (logarithmic) and smoothing (0) are ignored while it is set. Remove the patch with
    :meth:`ScoringRuleHandle.remove` or :func:`remove_scoring_rule`.

    Args:
        model: as :func:`apply_scoring_rule`.
        objective: a name of :data:`properlm.improper.IMPROPER_OBJECTIVES` or an
            :class:`~properlm.improper.ImproperObjective`.
        fused: as :func:`apply_scoring_rule`.
        ignore_index: as :func:`apply_scoring_rule`.
        shift_labels: as :func:`apply_scoring_rule`.
    """
    obj = get_improper_objective(objective)
    handle = apply_scoring_rule(model, LOGARITHMIC, 0.0, fused, ignore_index, shift_labels=shift_labels)
    handle._state.improper = obj
    return handle


def _restore_attrs(base: nn.Module, state: PatchState) -> None:
    """Undo the instance attributes set by :func:`apply_scoring_rule`."""
    for name, previous in state.saved_attrs.items():
        if previous:
            setattr(base, name, previous[0])
        else:
            base.__dict__.pop(name, None)
    state.saved_attrs = {}


_HOOK_TYPES = (ModelPreHook, ModelPostHook, HeadPreHook)


def _strip_hooks(module: nn.Module) -> PatchState | None:
    found = None
    for hooks, extras in (
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
    ):
        for key, hook in list(hooks.items()):
            if isinstance(hook, _HOOK_TYPES):
                del hooks[key]
                for extra in extras:
                    extra.pop(key, None)
                found = hook.state
    return found


def remove_scoring_rule(model: nn.Module) -> bool:
    """Remove every :func:`apply_scoring_rule` patch from ``model``; returns whether anything was removed.

    Also a patch carried into a ``deepcopy`` or an unpickled copy.
    """
    states = [state for module in model.modules() if (state := _strip_hooks(module)) is not None]
    if states:
        _restore_attrs(unwrap_peft(model), states[0])
        for state in states:
            state.calls.clear()
    return bool(states)


def is_scoring_rule_applied(model: nn.Module) -> bool:
    """Whether ``model`` carries an :func:`apply_scoring_rule` patch."""
    return any(isinstance(h, ModelPreHook) for h in model._forward_pre_hooks.values())
