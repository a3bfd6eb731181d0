r"""Train Hugging Face models with a scoring rule instead of cross-entropy.

Two ways in, both exact under gradient accumulation (they divide by ``num_items_in_batch``):

1. :func:`scoring_rule_loss_func` -- a loss for ``transformers.Trainer(compute_loss_func=...)``.
   It scores the model's full logits with :func:`properlm.scoring_rule_loss`::

       loss_func = scoring_rule_loss_func("spherical", smoothing=0.1, model=model)
       trainer = Trainer(model=model, args=args, train_dataset=ds, compute_loss_func=loss_func)

2. :func:`apply_scoring_rule` -- patches the model so that ``model(..., labels=labels)`` returns
   the scoring-rule loss computed by the fused linear loss
   (:func:`properlm.fused.fused_linear_scoring_rule_loss`) straight from the final hidden
   states and the output-embedding weight: the ``(batch, time, vocab)`` logits are never
   built. Any training loop that reads ``outputs.loss`` (``Trainer``, TRL's ``SFTTrainer``,
   accelerate, a hand-written loop) then trains with the rule::

       handle = apply_scoring_rule(model, "brier", smoothing=0.1)
       Trainer(model=model, args=args, train_dataset=ds).train()
       handle.remove()            # or remove_scoring_rule(model): the model's own loss again

   :func:`apply_improper_loss` installs the same patch with an improper baseline objective
   (:mod:`properlm.improper`: DFT or ``1 - p``) in place of the rule.

Alignment of labels and predictions. Causal LMs predict token ``t+1`` at position ``t``:
the loss pairs ``hidden[..., :-1, :]`` (or ``logits[..., :-1, :]``) with ``labels[..., 1:]``, as
``transformers.loss.loss_utils.ForCausalLMLoss`` does. Encoder-decoder models
(``config.is_encoder_decoder``) feed right-shifted labels to the decoder, so ``labels`` are
already aligned with the decoder outputs and nothing is shifted. A pre-shifted ``shift_labels``
tensor passed to the model (context-parallel collators) is used as is.

How the patch works. :func:`apply_scoring_rule` registers three hooks and changes nothing
else (no parameter, buffer or state-dict key; ``save_pretrained``, ``deepcopy``, pickling and
DDP see the original module; the hooks are plain picklable objects):

* a forward pre-hook on the model that, when ``labels`` are given, takes them (and
  ``num_items_in_batch``, ``shift_labels``) out of the call, builds ``decoder_input_ids`` from
  the labels for encoder-decoder models, and arms the capture;
* a forward pre-hook on the output embedding (``model.get_output_embeddings()``) that, when
  armed, computes the fused loss from its input (the final hidden states, after any rescaling
  such as T5's ``d_model ** -0.5``) inside the model's own forward -- so under the same
  autocast -- and hands the head an empty slice of the time dimension: the model then returns
  logits of shape ``(batch, 0, vocab)``;
* an always-called forward hook on the model that puts the loss into the output (the first
  field, as Hugging Face models do when given labels) and disarms.

``Trainer`` reads two things off the model when it is built, so patch before building it: the
patch sets ``accepts_loss_kwargs = True`` (the pre-hook consumes ``num_items_in_batch``) and, for
causal models whose ``loss_type`` is None (GPT-2), ``loss_type = "ForCausalLM"`` so that
``num_items_in_batch`` counts ``labels[..., 1:]``; both are restored by :meth:`ScoringRuleHandle.remove`.

TRL. ``SFTTrainer`` (TRL >= 1) computes its loss from ``model(..., labels=..., fused_lm_head=True)``
(its own fused NLL head). The pre-hook takes over such calls too: it returns TRL's
``FusedCausalLMOutput`` with ``loss`` the scoring-rule loss, ``log_probs`` minus the per-token
loss (so TRL's ``-log_probs.sum() / num_items_in_batch`` is the scoring-rule loss), and
``entropy`` / ``is_top1`` of the model for TRL's metrics. Patch ``trainer.model`` after building
the ``SFTTrainer`` (or the model before, when you wrap it with PEFT yourself).

During a call with labels in fused mode ``outputs.logits`` is therefore an empty tensor of
shape ``(..., 0, vocab)`` (``(..., 1, vocab)`` for a tensor-parallel head whose weight is a
``DTensor``; its loss is then the vocabulary-parallel loss of :mod:`properlm.dtensor`); call the
model without labels to get logits (generation and evaluation do). With ``fused=False`` the model
computes its full logits and the loss is
:func:`properlm.scoring_rule_loss` on them: use it for heads the fused loss cannot express
(a PEFT-wrapped head).

Output heads of today's models. Some models transform ``hidden @ W.T`` after the output
embedding; the fused loss applies the same transform to each chunk of logits (``softcap`` and
``logit_scale`` of :func:`properlm.fused.fused_linear_scoring_rule_loss`), read off the (text)
config: ``final_logit_softcapping`` ``c`` (Gemma 2/3: ``c tanh(z / c)``), ``logit_scale`` (Cohere:
``s z``), ``logits_scaling`` (Granite: ``z / s``), ``output_multiplier`` and ``lm_head_multiplier``
(``s z``, before any soft-cap). A setting counts only where the model's code reads it (the source
of its class and bases mentions the attribute): Llama ignores a ``final_logit_softcapping`` put
into its config, and Gemma 3's multimodal model does not soft-cap with its text config's.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..dtensor import is_dtensor
from ..improper import ImproperObjective, get_improper_objective
from ..loss import check_smoothing, reduce_loss, scoring_rule_loss
from ..rules import RuleLike, ScoringRule, get_rule
from ..stats import check_head_transform, check_smoothing_variant, head_transform_

__all__ = [
    "ScoringRuleHandle",
    "ScoringRuleLossFunc",
    "apply_improper_loss",
    "apply_scoring_rule",
    "is_scoring_rule_applied",
    "linear_scoring_rule_loss",
    "remove_scoring_rule",
    "scoring_rule_loss_func",
]

#: config attributes of heads whose logits are a transform of ``hidden @ W.T + b``, and how the
#: models apply them (``transformers`` modeling code): the fused loss applies the same transform
_HEAD_TRANSFORM_CONFIG = {
    "final_logit_softcapping": "softcap",  # Gemma 2/3, T5Gemma, Nanochat, ...: c tanh(z / c)
    "logit_scale": "multiply",  # Cohere, Cohere 2: z * s
    "output_multiplier": "multiply",  # MuseGlimmer / MuseSpark: z * s, then the soft-cap
    "lm_head_multiplier": "multiply",  # Falcon-H1: z * s
    "logits_scaling": "divide",  # Granite, GraniteMoE: z / s
}

#: float32 elements of one chunk of logits for the TRL metrics (entropy, top-1)
_METRIC_CHUNK_ELEMENTS = 1 << 24

#: the rule whose per-token loss (-log p_y) the improper objectives are computed from
_LOGARITHMIC = get_rule("logarithmic")


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------

def _fused_impl() -> Callable[..., Tensor] | None:
    """The fused linear scoring-rule loss, or None if :mod:`properlm.fused` is not importable."""
    try:
        from ..fused import fused_linear_scoring_rule_loss
    except ImportError:
        return None
    return fused_linear_scoring_rule_loss


def linear_scoring_rule_loss(hidden: Tensor, weight: Tensor, target: Tensor, rule: RuleLike,
                             bias: Tensor | None = None, smoothing: float = 0.0, ignore_index: int = -100,
                             reduction: str = "mean", num_items_in_batch: int | Tensor | None = None, *,
                             softcap: float | None = None, logit_scale: float | None = None,
                             smoothing_variant: str = "paper") -> Tensor:
    """Scoring-rule loss of the logits ``hidden @ weight.T + bias`` without materialising them.

    The logits are soft-capped / scaled by ``softcap`` / ``logit_scale`` as in :func:`properlm.scoring_rule_loss`.

    Calls :func:`properlm.fused.fused_linear_scoring_rule_loss`; if that module cannot be
    imported it computes the logits with ``F.linear`` and calls :func:`properlm.scoring_rule_loss`
    (same value and gradients, more memory). Shapes: ``hidden (..., H)``, ``weight (V, H)``,
    ``bias (V,)``, ``target (...)``.
    """
    fused = _fused_impl()
    if fused is not None:
        return fused(hidden, weight, target, rule=rule, bias=bias, smoothing=smoothing, ignore_index=ignore_index,
                     reduction=reduction, num_items_in_batch=num_items_in_batch, softcap=softcap,
                     logit_scale=logit_scale, smoothing_variant=smoothing_variant)
    logits = nn.functional.linear(hidden, weight, bias)
    return scoring_rule_loss(logits, target, rule, smoothing, ignore_index, reduction, num_items_in_batch,
                             softcap=softcap, logit_scale=logit_scale, smoothing_variant=smoothing_variant)


def _align(x: Tensor, labels: Tensor, shift: bool, shift_labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """Pair predictions ``x (..., T, D)`` with their targets (see the module docstring)."""
    if shift_labels is not None:
        return x, shift_labels.to(x.device)
    labels = labels.to(x.device)
    if shift:
        return x[..., :-1, :], labels[..., 1:]
    return x, labels


def _check_aligned(x: Tensor, target: Tensor, what: str) -> None:
    if tuple(x.shape[:-1]) != tuple(target.shape):
        raise ValueError(
            f"labels of shape {tuple(target.shape)} (after alignment) do not match the {what} of shape "
            f"{tuple(x.shape)}: pass labels with the same (batch, time) shape as the inputs "
            "(and do not combine labels with logits_to_keep)"
        )


def _config_of(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(_config_of(model), "is_encoder_decoder", False))


def _text_config(model: nn.Module) -> Any:
    config = _config_of(model)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


# --------------------------------------------------------------------------------------------
# 1. compute_loss_func for Trainer
# --------------------------------------------------------------------------------------------

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

    def __init__(self, rule: RuleLike = "spherical", smoothing: float = 0.0, ignore_index: int = -100,
                 shift_labels: bool | None = None, *, smoothing_variant: str = "paper") -> None:
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
        if _config_of(model) is None:
            raise ValueError(f"model of type {type(model).__name__} has no config to read is_encoder_decoder from")
        self.shift_labels = not _is_encoder_decoder(model)
        return self

    def __call__(self, outputs: Any, labels: Tensor | None, num_items_in_batch: int | Tensor | None = None,
                 shift_labels: Tensor | None = None, **_: Any) -> Tensor:
        """The loss of a model's ``outputs`` for ``labels``, as ``Trainer(compute_loss_func=...)`` calls it."""
        if labels is None and shift_labels is None:
            raise ValueError("the scoring-rule loss needs labels: the batch has no 'labels' field")
        if isinstance(outputs, Mapping):
            if outputs.get("logits") is None:
                raise ValueError("model outputs have no 'logits' (was the model patched by apply_scoring_rule "
                                 "and called with labels? use one of the two, not both)")
            logits = outputs["logits"]
            shift = self.shift_labels
            if shift is None:
                shift = "encoder_last_hidden_state" not in outputs
        else:
            logits = outputs[0]
            shift = True if self.shift_labels is None else self.shift_labels
        z, y = _align(logits, labels, shift, shift_labels)
        _check_aligned(z, y, "logits")
        return scoring_rule_loss(z, y, self._rule, self._smoothing, self.ignore_index, "mean", num_items_in_batch,
                                 smoothing_variant=self._smoothing_variant)

    def __repr__(self) -> str:
        variant = "" if self._smoothing_variant == "paper" else f"smoothing_variant={self._smoothing_variant!r}, "
        return (f"ScoringRuleLossFunc(rule={self._rule.spec!r}, smoothing={self._smoothing}, {variant}"
                f"ignore_index={self.ignore_index}, shift_labels={self.shift_labels})")


def scoring_rule_loss_func(rule: RuleLike = "spherical", smoothing: float = 0.0, ignore_index: int = -100, *,
                           shift_labels: bool | None = None, model: nn.Module | None = None,
                           smoothing_variant: str = "paper") -> ScoringRuleLossFunc:
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


# --------------------------------------------------------------------------------------------
# 2. apply_scoring_rule: hooks
# --------------------------------------------------------------------------------------------

class _Call:
    """State of one forward call with labels."""

    __slots__ = ("armed", "done", "extra_bias", "kwargs", "labels", "loss", "metrics", "num_items",
                 "shift_labels", "trl")

    def __init__(self, labels: Tensor, shift_labels: Tensor | None, num_items: Any, trl: bool, armed: bool,
                 extra_bias: Tensor | None) -> None:
        self.labels, self.shift_labels, self.num_items, self.trl = labels, shift_labels, num_items, trl
        self.armed, self.done, self.extra_bias = armed, False, extra_bias
        self.kwargs: dict[str, Any] | None = None
        self.loss: Tensor | None = None
        self.metrics: dict[str, Tensor] | None = None


class _PatchState:
    """Settings shared by the hooks of one patched model (picklable; per-call state is not kept)."""

    #: the masked-log variant of score smoothing (a class default for states pickled before it existed)
    smoothing_variant = "paper"
    #: an improper objective (:mod:`properlm.improper`) trained instead of the rule, or None
    improper: ImproperObjective | None = None

    def __init__(self, rule: ScoringRule, smoothing: float, ignore_index: int, fused: bool, shift: bool,
                 softcap: float | None = None, logit_scale: float | None = None,
                 smoothing_variant: str = "paper") -> None:
        self.rule, self.smoothing, self.ignore_index = rule, smoothing, ignore_index
        self.smoothing_variant = smoothing_variant
        self.fused, self.shift = fused, shift
        #: the output-head transform of the fused loss (see the module docstring)
        self.softcap, self.logit_scale = softcap, logit_scale
        self.calls: list[_Call] = []
        #: instance attributes of the model set by the patch: name -> (previous value,) or ()
        self.saved_attrs: dict[str, tuple[Any, ...]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["calls"] = []
        return state

    def token_losses(self, x: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None,
                     call: _Call) -> Tensor:
        """Loss of the call: reduced (``mean`` / ``num_items_in_batch``), or per token for TRL.

        ``x`` are hidden states ``(..., H)`` when ``weight`` is given, else logits ``(..., V)``."""
        improper = self.improper
        if improper is not None:  # -log p_y per token (the logarithmic loss), mapped to the improper loss
            nll = self._rule_losses(x, y, weight, bias, call, _LOGARITHMIC, 0.0, "paper", "none")
            valid = y != self.ignore_index
            out = improper.token_losses(-nll, valid)
            return out if call.trl else reduce_loss(out, valid, "mean", call.num_items)
        reduction = "none" if call.trl else "mean"
        return self._rule_losses(x, y, weight, bias, call, self.rule, self.smoothing, self.smoothing_variant,
                                 reduction)

    def _rule_losses(self, x: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None, call: _Call,
                     rule: ScoringRule, smoothing: float, variant: str, reduction: str) -> Tensor:
        if weight is None:  # x are the logits
            return scoring_rule_loss(x, y, rule, smoothing, self.ignore_index, reduction, call.num_items,
                                     smoothing_variant=variant)
        return linear_scoring_rule_loss(x, weight, y, rule, bias, smoothing, self.ignore_index,
                                        reduction, call.num_items, softcap=self.softcap, logit_scale=self.logit_scale,
                                        smoothing_variant=variant)

    def finish(self, call: _Call, x: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
        out = self.token_losses(x, y, weight, bias, call)
        if not call.trl:
            call.loss = out
            return
        valid = y != self.ignore_index
        call.loss = reduce_loss(out, valid, "mean", call.num_items)
        call.metrics = _trl_metrics(x, y, valid, out, weight, bias, self.softcap, self.logit_scale)


def _trl_metrics(x: Tensor, y: Tensor, valid: Tensor, token_loss: Tensor, weight: Tensor | None,
                 bias: Tensor | None, softcap: float | None = None,
                 logit_scale: float | None = None) -> dict[str, Tensor]:
    """Fields of TRL's ``FusedCausalLMOutput``.

    ``log_probs`` is minus the per-token loss, so TRL's ``-log_probs.sum() / num_items`` is the
    scoring-rule loss; ``entropy`` and ``is_top1`` of the model distribution are computed without
    gradient in row chunks.
    """
    with torch.no_grad():
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.reshape(-1)
        n = x2.shape[0]
        entropy = torch.zeros(n, dtype=torch.float32, device=x.device)
        top1 = torch.zeros(n, dtype=torch.bool, device=x.device)
        V = weight.shape[0] if weight is not None else x.shape[-1]
        step = max(1, _METRIC_CHUNK_ELEMENTS // max(V, 1))
        for start in range(0, n, step):
            rows = x2[start:start + step]
            z = (nn.functional.linear(rows, weight, bias) if weight is not None else rows).float()
            if weight is not None:  # the model's own logits: its head transform
                z = head_transform_(z, softcap, logit_scale)
            logp = torch.log_softmax(z, dim=-1)
            entropy[start:start + step] = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
            top1[start:start + step] = z.argmax(-1) == y2[start:start + step]
        flat_valid = valid.reshape(-1)
        entropy = torch.where(flat_valid, entropy, 0.0).view(y.shape)
        top1 = (top1 & flat_valid).view(y.shape)
    return {"log_probs": -token_loss, "entropy": entropy, "is_top1": top1, "label_mask": valid}


def _kwargs_from_args(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """Move positional arguments after the first into keywords, so that ``labels`` can be found."""
    if len(args) <= 1:
        return args, kwargs
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    new_kwargs = dict(bound.arguments)
    for name, param in inspect.signature(module.forward).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in new_kwargs:
            new_kwargs.update(new_kwargs.pop(name))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and name in new_kwargs:
            return args, kwargs
    return (), new_kwargs


class _ModelPreHook:
    """Forward pre-hook of the patched model: takes the labels out of the call."""

    def __init__(self, state: _PatchState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("labels") is None and kwargs.get("shift_labels") is None:
            if len(args) <= 1:
                return None
            args, kwargs = _kwargs_from_args(module, args, kwargs)
            if kwargs.get("labels") is None and kwargs.get("shift_labels") is None:
                return None
        kwargs = dict(kwargs)
        labels = kwargs.pop("labels", None)
        shift_labels = kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        trl = bool(kwargs.pop("fused_lm_head", False))
        if labels is None:
            labels = shift_labels
        base = _base_model(module)
        if (_is_encoder_decoder(base) and kwargs.get("decoder_input_ids") is None
                and kwargs.get("decoder_inputs_embeds") is None):
            prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
            if prepare is None:
                raise ValueError(f"{type(base).__name__} has no prepare_decoder_input_ids_from_labels: pass "
                                 "decoder_input_ids together with labels")
            kwargs["decoder_input_ids"] = prepare(labels=labels)
        extra = getattr(base, "final_logits_bias", None)
        call = _Call(labels, shift_labels, num_items, trl, armed=self.state.fused,
                     extra_bias=extra if isinstance(extra, Tensor) else None)
        call.kwargs = kwargs
        self.state.calls.append(call)
        return args, kwargs


class _HeadPreHook:
    """Forward pre-hook of the output embedding: computes the fused loss from its input.

    It then lets the head project an empty slice of the time dimension.
    """

    def __init__(self, state: _PatchState) -> None:
        self.state = state

    def __call__(self, head: nn.Module, args: tuple[Any, ...]) -> Any:
        calls = self.state.calls
        if not calls or not calls[-1].armed or calls[-1].done or not args or not isinstance(args[0], Tensor):
            return None
        call = calls[-1]
        call.done = True
        hidden = args[0]
        x, y = _align(hidden, call.labels, self.state.shift, call.shift_labels)
        _check_aligned(x, y, "final hidden states")
        bias = getattr(head, "bias", None)
        if call.extra_bias is not None:
            extra = call.extra_bias.reshape(-1).to(device=hidden.device)
            bias = extra if bias is None else bias + extra
        self.state.finish(call, x, y, head.weight, bias)
        # a tensor-parallel head (DTensor weight) gets one position: DTensor cannot propagate its
        # sharding through the view of an empty (batch, 0, vocab) output (torch 2.13)
        keep = 1 if is_dtensor(head.weight) else 0
        return (hidden.narrow(-2, 0, keep), *args[1:]) if hidden.dim() >= 2 else (hidden[:keep], *args[1:])


class _ModelPostHook:
    """Always-called forward hook of the patched model: puts the loss into the output."""

    def __init__(self, state: _PatchState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        calls = self.state.calls
        if not calls or calls[-1].kwargs is not kwargs:
            return None
        call = calls.pop()
        if output is None:  # the forward raised; the hooks are disarmed, nothing to add
            return None
        if self.state.fused:
            if not call.done:
                raise RuntimeError(
                    f"apply_scoring_rule: {type(module).__name__} was called with labels but its output embedding "
                    "was never called, so no loss was computed; use apply_scoring_rule(..., fused=False)")
        else:
            logits = output.get("logits") if isinstance(output, Mapping) else output[0]
            x, y = _align(logits, call.labels, self.state.shift, call.shift_labels)
            _check_aligned(x, y, "logits")
            self.state.finish(call, x, y, None, None)
        return _with_loss(output, call)


def _with_loss(output: Any, call: _Call) -> Any:
    loss = call.loss
    if call.trl:
        fields = dict(call.metrics or {})
        try:
            from trl.trainer.utils import FusedCausalLMOutput as _TRLOutput
        except ImportError:  # pragma: no cover - TRL protocol without TRL
            _TRLOutput = None
        aux = output.get("aux_loss") if isinstance(output, Mapping) else None
        if _TRLOutput is not None:
            return _TRLOutput(loss=loss, aux_loss=aux, **fields)
        return {"loss": loss, "aux_loss": aux, **fields}
    if isinstance(output, Mapping):
        items = {k: v for k, v in output.items() if k != "loss"}
        try:
            return type(output)(loss=loss, **items)
        except TypeError:
            output["loss"] = loss
            return output
    if isinstance(output, tuple):
        return (loss, *output)
    raise TypeError(f"apply_scoring_rule cannot add a loss to a model output of type {type(output).__name__}")


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    getter = getattr(model, "get_base_model", None)
    if callable(getter):
        try:
            return getter()
        except Exception:
            return model
    return model


def _output_head(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        raise ValueError(
            f"apply_scoring_rule needs a model with an output embedding: {type(model).__name__}."
            "get_output_embeddings() returned nothing (is it a causal-LM or seq2seq-LM model class?)")
    return head


_SOURCE_CACHE: dict[type, str] = {}


def _class_source(cls: type) -> str | None:
    """Source of ``cls`` (cached), or ``None`` when it cannot be read."""
    if cls not in _SOURCE_CACHE:
        try:
            _SOURCE_CACHE[cls] = inspect.getsource(cls)
        except (OSError, TypeError):
            return None
    return _SOURCE_CACHE[cls]


def _reads_config(model: nn.Module, attr: str) -> bool:
    """Whether the code of ``model``'s class or of one of its model bases mentions ``attr``.

    ``True`` when no source can be read. The generic bases of ``torch`` and ``transformers``
    (``nn.Module``, ``PreTrainedModel``, ``GenerationMixin``, ...) are not model code and are skipped."""
    sources = []
    for cls in type(model).__mro__:
        mod = cls.__module__ or ""
        if mod == "builtins" or mod.startswith("torch") or (mod.startswith("transformers.")
                                                             and not mod.startswith("transformers.models.")):
            continue
        src = _class_source(cls)
        if src is not None:
            sources.append(src)
    word = re.compile(rf"\b{re.escape(attr)}\b")
    return not sources or any(word.search(src) for src in sources)


def _head_transform(model: nn.Module) -> tuple[float | None, float | None]:
    """``(softcap, logit_scale)`` of the model's output head from its (text) config.

    Read as :data:`_HEAD_TRANSFORM_CONFIG` says; ``ValueError`` for a value the fused loss cannot express.
    """
    base = _base_model(model)
    config = _text_config(base)
    softcap: float | None = None
    scale = 1.0
    for attr, kind in _HEAD_TRANSFORM_CONFIG.items():
        value = getattr(config, attr, None)
        if value is None or isinstance(value, bool) or not _reads_config(base, attr):
            continue
        if kind == "softcap" and value == 0:  # "off" (the model itself would divide by zero)
            continue
        try:
            v = check_head_transform(float(value), None)[0]
        except (TypeError, ValueError):
            v = None
        if v is None:
            raise ValueError(
                f"apply_scoring_rule(fused=True) cannot express this model's logits: config.{attr}={value!r} "
                "is not a finite number > 0; use apply_scoring_rule(..., fused=False)")
        if kind == "softcap":
            softcap = v
        else:
            scale = scale * v if kind == "multiply" else scale / v
    return softcap, (None if scale == 1.0 else scale)


def _check_fusable(model: nn.Module, head: nn.Module) -> None:
    if hasattr(head, "base_layer") or hasattr(head, "original_module") or hasattr(head, "lora_A"):
        raise ValueError(
            f"apply_scoring_rule(fused=True): the output embedding is wrapped by PEFT ({type(head).__name__}); "
            "its weight alone does not give the logits. Use fused=False, or leave lm_head out of the adapter")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"apply_scoring_rule(fused=True): the output embedding {type(head).__name__} has no 2-D "
                         "weight (vocab, hidden); use fused=False")


class ScoringRuleHandle:
    """Handle of a model patched by :func:`apply_scoring_rule`.

    ``rule`` / ``smoothing`` can be read and assigned, :meth:`set_rule` switches both (from the
    next forward on; the optimizer state is untouched), :meth:`remove` restores the model's own
    loss. Also a context manager that removes the patch on exit.
    """

    def __init__(self, model: nn.Module, head: nn.Module, state: _PatchState,
                 removables: list[torch.utils.hooks.RemovableHandle], restore: Callable[[], None]) -> None:
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
            return (f"ScoringRuleHandle(model={type(self.model).__name__}, improper_loss={self.improper_loss!r}, "
                    f"fused={self.fused}, shift_labels={self.shift_labels}, active={self.active})")
        return (f"ScoringRuleHandle(model={type(self.model).__name__}, rule={self.rule.spec!r}, "
                f"smoothing={self.smoothing}, fused={self.fused}, shift_labels={self.shift_labels}, "
                f"active={self.active})")


def apply_scoring_rule(model: nn.Module, rule: RuleLike = "spherical", smoothing: float = 0.0, fused: bool = True,
                       ignore_index: int = -100, *, shift_labels: bool | None = None,
                       smoothing_variant: str = "paper") -> ScoringRuleHandle:
    r"""Make ``model(..., labels=labels)`` return the scoring-rule loss.

    The loss is ``S_max - S_eps(softmax(z), y)`` averaged over the non-ignored targets (or summed
    and divided by ``num_items_in_batch`` when the caller passes it, as ``Trainer`` does), with
    ``z = hidden @ W.T + b`` the logits of the output embedding ``model.get_output_embeddings()``
    (plus ``final_logits_bias`` for BART-like models), soft-capped / scaled as the model's config says
    (Gemma 2/3, Cohere, Granite; see the module docstring). See the module docstring for the mechanism.

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
    head = _output_head(model)
    softcap = logit_scale = None
    if fused:
        _check_fusable(model, head)
        softcap, logit_scale = _head_transform(model)
    remove_scoring_rule(model)
    shift = (not _is_encoder_decoder(_base_model(model))) if shift_labels is None else shift_labels
    state = _PatchState(rule_obj, eps, int(ignore_index), bool(fused), shift, softcap, logit_scale, variant)
    removables = [
        model.register_forward_pre_hook(_ModelPreHook(state), with_kwargs=True),
        model.register_forward_hook(_ModelPostHook(state), with_kwargs=True, always_call=True),
    ]
    if fused:
        removables.append(head.register_forward_pre_hook(_HeadPreHook(state)))
    # What Trainer reads off the model when it is built: it passes num_items_in_batch only to
    # models it believes accept loss kwargs (the pre-hook always takes it out of the call), and
    # counts num_items_in_batch over labels[..., 1:] only for models whose loss_type is the
    # causal one (GPT-2 has loss_type None, so every label, position 0 included, would count).
    base = _base_model(model)
    overrides: dict[str, Any] = {"accepts_loss_kwargs": True}
    if shift and getattr(base, "loss_type", None) is None:
        overrides["loss_type"] = "ForCausalLM"
    for name, value in overrides.items():
        state.saved_attrs[name] = (base.__dict__[name],) if name in base.__dict__ else ()
        setattr(base, name, value)
    return ScoringRuleHandle(model, head, state, removables, lambda: _restore_attrs(base, state))


def apply_improper_loss(model: nn.Module, objective: str | ImproperObjective = "dft", fused: bool = True,
                        ignore_index: int = -100, *, shift_labels: bool | None = None) -> ScoringRuleHandle:
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
    handle = apply_scoring_rule(model, _LOGARITHMIC, 0.0, fused, ignore_index, shift_labels=shift_labels)
    handle._state.improper = obj
    return handle


def _restore_attrs(base: nn.Module, state: _PatchState) -> None:
    """Undo the instance attributes set by :func:`apply_scoring_rule`."""
    for name, previous in state.saved_attrs.items():
        if previous:
            setattr(base, name, previous[0])
        else:
            base.__dict__.pop(name, None)
    state.saved_attrs = {}


_HOOK_TYPES = (_ModelPreHook, _ModelPostHook, _HeadPreHook)


def _strip_hooks(module: nn.Module) -> _PatchState | None:
    found = None
    for hooks, extras in ((module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
                          (module._forward_hooks, (module._forward_hooks_with_kwargs,
                                                   module._forward_hooks_always_called))):
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
        _restore_attrs(_base_model(model), states[0])
        for state in states:
            state.calls.clear()
    return bool(states)


def is_scoring_rule_applied(model: nn.Module) -> bool:
    """Whether ``model`` carries an :func:`apply_scoring_rule` patch."""
    return any(isinstance(h, _ModelPreHook) for h in model._forward_pre_hooks.values())
