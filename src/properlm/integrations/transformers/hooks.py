"""The hooks behind :func:`~properlm.integrations.transformers.patch.apply_scoring_rule`.

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

The three hooks share a ``PatchState`` (the rule, smoothing, fusion, shift and head transform of the patch, and
the state of the calls in flight), which computes the loss of a call.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ...dtensor import is_dtensor
from ...fused import fused_linear_scoring_rule_loss
from ...improper import ImproperObjective
from ...loss import scoring_rule_loss
from ...options import reduce_loss
from ...rules import ScoringRule, get_rule
from .alignment import align_labels, check_aligned
from .introspection import is_encoder_decoder, unwrap_peft
from .trl_metrics import trl_output_fields

#: the rule whose per-token loss (-log p_y) the improper objectives are computed from
LOGARITHMIC = get_rule("logarithmic")


class _Call:
    """State of one forward call with labels."""

    __slots__ = (
        "armed",
        "done",
        "extra_bias",
        "kwargs",
        "labels",
        "loss",
        "metrics",
        "num_items",
        "shift_labels",
        "trl",
    )

    def __init__(
        self,
        labels: Tensor,
        shift_labels: Tensor | None,
        num_items: Any,
        trl: bool,
        armed: bool,
        extra_bias: Tensor | None,
    ) -> None:
        self.labels, self.shift_labels, self.num_items, self.trl = labels, shift_labels, num_items, trl
        self.armed, self.done, self.extra_bias = armed, False, extra_bias
        self.kwargs: dict[str, Any] | None = None
        self.loss: Tensor | None = None
        self.metrics: dict[str, Tensor] | None = None


class PatchState:
    """Settings shared by the hooks of one patched model (picklable; per-call state is not kept)."""

    #: the masked-log variant of score smoothing (a class default for states pickled before it existed)
    smoothing_variant = "paper"
    #: an improper objective (:mod:`properlm.improper`) trained instead of the rule, or None
    improper: ImproperObjective | None = None

    def __init__(
        self,
        rule: ScoringRule,
        smoothing: float,
        ignore_index: int,
        fused: bool,
        shift: bool,
        softcap: float | None = None,
        logit_scale: float | None = None,
        smoothing_variant: str = "paper",
    ) -> None:
        self.rule, self.smoothing, self.ignore_index = rule, smoothing, ignore_index
        self.smoothing_variant = smoothing_variant
        self.fused, self.shift = fused, shift
        #: the output-head transform of the fused loss (see :mod:`properlm.integrations.transformers.heads`)
        self.softcap, self.logit_scale = softcap, logit_scale
        self.calls: list[_Call] = []
        #: instance attributes of the model set by the patch: name -> (previous value,) or ()
        self.saved_attrs: dict[str, tuple[Any, ...]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["calls"] = []
        return state

    def token_losses(self, x: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None, call: _Call) -> Tensor:
        """Loss of the call: reduced (``mean`` / ``num_items_in_batch``), or per token for TRL.

        ``x`` are hidden states ``(..., H)`` when ``weight`` is given, else logits ``(..., V)``."""
        improper = self.improper
        if improper is not None:  # -log p_y per token (the logarithmic loss), mapped to the improper loss
            nll = self._rule_losses(x, y, weight, bias, call, LOGARITHMIC, 0.0, "paper", "none")
            valid = y != self.ignore_index
            out = improper.token_losses(-nll, valid)
            return out if call.trl else reduce_loss(out, valid, "mean", call.num_items)
        reduction = "none" if call.trl else "mean"
        return self._rule_losses(x, y, weight, bias, call, self.rule, self.smoothing, self.smoothing_variant, reduction)

    def _rule_losses(
        self,
        x: Tensor,
        y: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        call: _Call,
        rule: ScoringRule,
        smoothing: float,
        variant: str,
        reduction: str,
    ) -> Tensor:
        if weight is None:  # x are the logits
            return scoring_rule_loss(
                x, y, rule, smoothing, self.ignore_index, reduction, call.num_items, smoothing_variant=variant
            )
        return fused_linear_scoring_rule_loss(
            x,
            weight,
            y,
            rule=rule,
            bias=bias,
            smoothing=smoothing,
            ignore_index=self.ignore_index,
            reduction=reduction,
            num_items_in_batch=call.num_items,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            smoothing_variant=variant,
        )

    def finish(self, call: _Call, x: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
        """Set the loss of ``call`` (or, for TRL, its fused-head output fields) from the aligned hidden states."""
        out = self.token_losses(x, y, weight, bias, call)
        if not call.trl:
            call.loss = out
            return
        valid = y != self.ignore_index
        call.loss = reduce_loss(out, valid, "mean", call.num_items)
        call.metrics = trl_output_fields(x, y, valid, out, weight, bias, self.softcap, self.logit_scale)


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


class ModelPreHook:
    """Forward pre-hook of the patched model: takes the labels out of the call."""

    def __init__(self, state: PatchState) -> None:
        """A hook of the patch whose shared state is ``state``."""
        self.state = state

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Take the labels out of the call and arm a call record (``None``: the call is unchanged)."""
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
        base = unwrap_peft(module)
        if (
            is_encoder_decoder(base)
            and kwargs.get("decoder_input_ids") is None
            and kwargs.get("decoder_inputs_embeds") is None
        ):
            prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
            if prepare is None:
                raise ValueError(
                    f"{type(base).__name__} has no prepare_decoder_input_ids_from_labels: pass "
                    "decoder_input_ids together with labels"
                )
            kwargs["decoder_input_ids"] = prepare(labels=labels)
        extra = getattr(base, "final_logits_bias", None)
        call = _Call(
            labels,
            shift_labels,
            num_items,
            trl,
            armed=self.state.fused,
            extra_bias=extra if isinstance(extra, Tensor) else None,
        )
        call.kwargs = kwargs
        self.state.calls.append(call)
        return args, kwargs


class HeadPreHook:
    """Forward pre-hook of the output embedding: computes the fused loss from its input.

    It then lets the head project an empty slice of the time dimension.
    """

    def __init__(self, state: PatchState) -> None:
        """A hook of the patch whose shared state is ``state``."""
        self.state = state

    def __call__(self, head: nn.Module, args: tuple[Any, ...]) -> Any:
        """Compute the loss from the head's input, and skip the full logits where they are not needed."""
        calls = self.state.calls
        if not calls or not calls[-1].armed or calls[-1].done or not args or not isinstance(args[0], Tensor):
            return None
        call = calls[-1]
        call.done = True
        hidden = args[0]
        x, y = align_labels(hidden, call.labels, self.state.shift, call.shift_labels)
        check_aligned(x, y, "final hidden states")
        bias = getattr(head, "bias", None)
        if call.extra_bias is not None:
            extra = call.extra_bias.reshape(-1).to(device=hidden.device)
            bias = extra if bias is None else bias + extra
        self.state.finish(call, x, y, head.weight, bias)
        # a tensor-parallel head (DTensor weight) gets one position: DTensor cannot propagate its
        # sharding through the view of an empty (batch, 0, vocab) output (torch 2.13)
        keep = 1 if is_dtensor(head.weight) else 0
        return (hidden.narrow(-2, 0, keep), *args[1:]) if hidden.dim() >= 2 else (hidden[:keep], *args[1:])


class ModelPostHook:
    """Always-called forward hook of the patched model: puts the loss into the output."""

    def __init__(self, state: PatchState) -> None:
        """A hook of the patch whose shared state is ``state``."""
        self.state = state

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Put the loss (and TRL's fields) into the model output of the armed call."""
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
                    "was never called, so no loss was computed; use apply_scoring_rule(..., fused=False)"
                )
        else:
            logits = output.get("logits") if isinstance(output, Mapping) else output[0]
            x, y = align_labels(logits, call.labels, self.state.shift, call.shift_labels)
            check_aligned(x, y, "logits")
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
