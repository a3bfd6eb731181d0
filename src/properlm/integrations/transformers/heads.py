"""Output heads: the transform of ``hidden @ W.T`` the fused loss must apply, and whether it can.

Output heads of today's models. Some models transform ``hidden @ W.T`` after the output
embedding; the fused loss applies the same transform to each chunk of logits (``softcap`` and
``logit_scale`` of :func:`properlm.fused.fused_linear_scoring_rule_loss`), read off the (text)
config: ``final_logit_softcapping`` ``c`` (Gemma 2/3: ``c tanh(z / c)``), ``logit_scale`` (Cohere:
``s z``), ``logits_scaling`` (Granite: ``z / s``), ``output_multiplier`` and ``lm_head_multiplier``
(``s z``, before any soft-cap). A setting counts only where the model's code reads it (the source
of its class and bases mentions the attribute): Llama ignores a ``final_logit_softcapping`` put
into its config, and Gemma 3's multimodal model does not soft-cap with its text config's.

``head_transform`` reads ``(softcap, logit_scale)`` off the config as :data:`_HEAD_TRANSFORM_CONFIG` says, and
``check_fusable`` refuses heads whose weight alone does not give the logits (PEFT-wrapped, no 2-D weight).
"""

from __future__ import annotations

import inspect
import re

from torch import Tensor, nn

from ...options import check_head_transform
from .introspection import text_config_of, unwrap_peft

#: config attributes of heads whose logits are a transform of ``hidden @ W.T + b``, and how the
#: models apply them (``transformers`` modeling code): the fused loss applies the same transform
_HEAD_TRANSFORM_CONFIG = {
    "final_logit_softcapping": "softcap",  # Gemma 2/3, T5Gemma, Nanochat, ...: c tanh(z / c)
    "logit_scale": "multiply",  # Cohere, Cohere 2: z * s
    "output_multiplier": "multiply",  # MuseGlimmer / MuseSpark: z * s, then the soft-cap
    "lm_head_multiplier": "multiply",  # Falcon-H1: z * s
    "logits_scaling": "divide",  # Granite, GraniteMoE: z / s
}


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
        if (
            mod == "builtins"
            or mod.startswith("torch")
            or (mod.startswith("transformers.") and not mod.startswith("transformers.models."))
        ):
            continue
        src = _class_source(cls)
        if src is not None:
            sources.append(src)
    word = re.compile(rf"\b{re.escape(attr)}\b")
    return not sources or any(word.search(src) for src in sources)


def head_transform(model: nn.Module) -> tuple[float | None, float | None]:
    """``(softcap, logit_scale)`` of the model's output head from its (text) config.

    Read as :data:`_HEAD_TRANSFORM_CONFIG` says; ``ValueError`` for a value the fused loss cannot express.
    """
    base = unwrap_peft(model)
    config = text_config_of(base)
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
                "is not a finite number > 0; use apply_scoring_rule(..., fused=False)"
            )
        if kind == "softcap":
            softcap = v
        else:
            scale = scale * v if kind == "multiply" else scale / v
    return softcap, (None if scale == 1.0 else scale)


def check_fusable(model: nn.Module, head: nn.Module) -> None:
    """Raise ``ValueError`` when ``head`` cannot be fused (a PEFT-wrapped head, or no 2-D weight)."""
    if hasattr(head, "base_layer") or hasattr(head, "original_module") or hasattr(head, "lora_A"):
        raise ValueError(
            f"apply_scoring_rule(fused=True): the output embedding is wrapped by PEFT ({type(head).__name__}); "
            "its weight alone does not give the logits. Use fused=False, or leave lm_head out of the adapter"
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"apply_scoring_rule(fused=True): the output embedding {type(head).__name__} has no 2-D "
            "weight (vocab, hidden); use fused=False"
        )
