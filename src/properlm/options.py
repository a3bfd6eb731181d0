r"""The options every loss takes, validated once, and the policies every path shares.

This is the leaf of the core: :mod:`properlm.loss`, :mod:`properlm.fused`, :mod:`properlm.distributed`,
:mod:`properlm.dtensor` and :mod:`properlm.compiled` import it, and it imports none of them (only
:mod:`properlm.rules`).

* :class:`LossOptions` -- the loss options (rule, smoothing, smoothing variant, ``ignore_index``, reduction,
  output-head transform) as one frozen object, validated when it is made. Every public loss builds one from its
  keyword arguments and hands it down to the path that computes it (unfused, fused chunked / Triton, the
  ``torch.library`` operator, vocabulary-parallel, ``DTensor``).
* :class:`LossModule` -- the base of the loss modules (:class:`properlm.ScoringRuleLoss`,
  :class:`properlm.LinearScoringRuleLoss`): it takes the options, holds them as one :class:`LossOptions` and reads
  and sets each of them as a property;
* :data:`OPTION_DOCS` -- the one description of each option; the docstrings of the losses show it
  (:func:`document_options`).
* validation of the options and the inputs (:func:`check_smoothing`, :func:`check_smoothing_variant`,
  :func:`check_reduction`, :func:`check_head_transform`, :func:`check_num_items`, :func:`validate_inputs`);
* the reductions (:data:`REDUCTIONS`, :func:`reduce_loss`);
* the dtype policy (:func:`compute_dtype`: float32 inside from any input dtype, float64 stays float64);
* chunk sizing (:data:`CHUNK_ELEMENTS`, :data:`BLOCK_ELEMENTS`, :func:`block_rows`, :func:`chunk_rows`,
  :func:`default_chunk_size`).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .rules import RuleLike, ScoringRule, get_rule

__all__ = [
    "BLOCK_ELEMENTS",
    "CHUNK_ELEMENTS",
    "CUDA_MIN_CHUNK_ELEMENTS",
    "MAX_CHUNK_ROWS",
    "MIN_CHUNK_ELEMENTS",
    "MIN_CHUNK_ROWS",
    "OPTION_DOCS",
    "REDUCTIONS",
    "SMOOTHING_VARIANTS",
    "LossModule",
    "LossOptions",
    "block_rows",
    "check_head_transform",
    "check_num_items",
    "check_reduction",
    "check_smoothing",
    "check_smoothing_variant",
    "chunk_rows",
    "compute_dtype",
    "default_chunk_size",
    "document_options",
    "fill_option_docs",
    "options_repr",
    "reduce_loss",
    "validate_inputs",
]

#: the values of ``reduction``
REDUCTIONS = ("mean", "sum", "none")
#: the forms of the masked-log term of score smoothing (see :func:`properlm.stats.smoothed_score`)
SMOOTHING_VARIANTS = ("paper", "gated", "none")

#: the one description of each loss option, shown in every docstring that lists the option
#: (:func:`document_options`)
OPTION_DOCS: dict[str, str] = {
    "rule": (
        'a spec string (``"logarithmic"``, ``"brier"``, ``"spherical"``, ``"pseudo-spherical:ALPHA"``, '
        '``"power:ALPHA"``, a mixture such as ``"0.5*logarithmic+0.5*spherical"``, or a registered name) or a '
        ":class:`~properlm.rules.ScoringRule`."
    ),
    "smoothing": (
        "score smoothing ``eps`` in ``[0, 1)``: ``S_eps = (1-eps) S(p, y) + (eps/V) sum_k S(p, k)``, plus for "
        "bounded rules ``(eps/V) sum_j 1[p_j < eps/V] log p_j`` (the masked-log term; see ``smoothing_variant``). "
        "``0``: no smoothing."
    ),
    "smoothing_variant": (
        "the form of the masked-log term of bounded rules (:data:`properlm.options.SMOOTHING_VARIANTS`): "
        '``"paper"`` (default, the paper\'s formula), ``"gated"`` (the term times '
        "``g = clamp((p_y - 1 + eps) / eps, 0, 1)``, a constant of the gradient: it acts only where the model is "
        "more confident than the smoothed optimum, which keeps it from flattening large vocabularies) or "
        '``"none"`` (no masked-log term). Every variant\'s expected smoothed score is maximised exactly at '
        "``(1 - eps) q + eps / V``; see :func:`properlm.stats.smoothed_score`. No effect on ``logarithmic`` or "
        'without smoothing. ``"paper"`` with a bounded rule at ``V >= 16384`` warns once '
        '(:func:`properlm.stats.warn_paper_smoothing`): it flattens large vocabularies; take ``"gated"``.'
    ),
    "ignore_index": "target value whose positions contribute neither loss nor gradient (default ``-100``).",
    "reduction": (
        '``"mean"`` (over non-ignored tokens, or ``sum / num_items_in_batch``; 1 if none), ``"sum"`` or '
        '``"none"`` (shape of ``target``, 0 at ignored positions).'
    ),
    "num_items_in_batch": (
        "the number of target tokens of the whole (accumulated) batch, as ``transformers.Trainer`` passes it "
        '(a positive int or a tensor); only used with ``reduction="mean"``.'
    ),
    "softcap": (
        "final-logit soft-capping ``c > 0`` (Gemma 2/3): the rule scores ``z'' = c tanh(z' / c)``. ``None``: no "
        "capping. The output-head transform is applied where each block, chunk, tile or shard of logits is formed, "
        "in the compute dtype (no transformed copy of the logits is kept); ``-inf`` logits stay ``-inf``. Value and "
        "gradients equal those of the loss of the transformed logits."
    ),
    "logit_scale": (
        "a logit multiplier ``s > 0`` applied first, ``z' = s z`` (Cohere's ``logit_scale``; Granite's "
        "``1 / logits_scaling``). ``None``: ``s = 1``."
    ),
}

_PLACEHOLDER = re.compile(r"^(?P<indent>[ ]*)(?P<head>\w+: )?\{(?P<name>\w+)\}(?P<tail>.*)$", re.MULTILINE)


def fill_option_docs(doc: str, width: int = 110) -> str:
    """``doc`` with each line ``NAME: {OPTION}`` (or ``{OPTION}`` alone) replaced by :data:`OPTION_DOCS` ``[OPTION]``.

    The text is wrapped to ``width`` columns, its continuation lines indented four spaces more than the line (the
    Google docstring layout of an ``Args`` entry); what follows the placeholder on its line is appended.
    """

    def fill(m: re.Match[str]) -> str:
        if m["name"] not in OPTION_DOCS:
            return m[0]
        indent, head = m["indent"], m["head"] or ""
        text = OPTION_DOCS[m["name"]] + m["tail"]
        return textwrap.fill(
            text,
            width=width,
            initial_indent=indent + head,
            subsequent_indent=indent + "    ",
            break_long_words=False,
            break_on_hyphens=False,
        )

    return _PLACEHOLDER.sub(fill, doc)


_F = TypeVar("_F", bound=Callable[..., Any])


def document_options(obj: _F) -> _F:
    """Decorator: fill the option placeholders of ``obj.__doc__`` (:func:`fill_option_docs`).

    So ``help()`` and the API reference (through the ``griffe`` extension ``docs/griffe_options.py``) show each
    option's one description. Returns ``obj``.
    """
    if obj.__doc__:
        obj.__doc__ = fill_option_docs(obj.__doc__)
    return obj


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses are computed in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def check_smoothing(smoothing: float) -> float:
    """``smoothing`` as a float in ``[0, 1)``, or ``ValueError``."""
    try:
        eps = float(smoothing)
    except (TypeError, ValueError):
        raise ValueError(f"smoothing must be a number in [0, 1), got {smoothing!r}") from None
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    return eps


def check_reduction(reduction: str) -> str:
    """``reduction`` if it is one of :data:`REDUCTIONS`, or ``ValueError``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    return reduction


def check_smoothing_variant(smoothing_variant: str) -> str:
    """``smoothing_variant`` if it is one of :data:`SMOOTHING_VARIANTS`, or ``ValueError``."""
    if not isinstance(smoothing_variant, str) or smoothing_variant not in SMOOTHING_VARIANTS:
        raise ValueError(
            f"smoothing_variant must be one of {', '.join(map(repr, SMOOTHING_VARIANTS))}, got {smoothing_variant!r}"
        )
    return smoothing_variant


def check_head_transform(softcap: float | None, logit_scale: float | None) -> tuple[float | None, float | None]:
    """``(softcap, logit_scale)`` as floats (``None`` stays ``None``), or ``ValueError``.

    Each must be ``None`` or a finite number ``> 0``.
    """
    out: list[float | None] = []
    for name, v in (("softcap", softcap), ("logit_scale", logit_scale)):
        if v is None:
            out.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be None or a finite number > 0, got {v!r}") from None
        if isinstance(v, bool) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"{name} must be None or a finite number > 0, got {v!r}")
        out.append(f)
    return out[0], out[1]


def check_num_items(reduction: str, num_items_in_batch: Any) -> None:
    """``ValueError`` for a number (not a tensor) ``num_items_in_batch <= 0`` with ``reduction="mean"``.

    The check :func:`reduce_loss` makes, for callers that reduce later (or never, with another reduction).
    """
    if (
        reduction == "mean"
        and num_items_in_batch is not None
        and not isinstance(num_items_in_batch, Tensor)
        and num_items_in_batch <= 0
    ):
        raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch}")


@dataclass(frozen=True)
class LossOptions:
    """The options of a scoring-rule loss, validated once, when the object is made.

    Every public loss (:func:`properlm.scoring_rule_loss`, :func:`properlm.fused_linear_scoring_rule_loss`, the
    vocabulary-parallel and ``DTensor`` losses, their ``nn.Module`` forms) builds one from its keyword arguments
    and passes it to the path that computes the loss; the autograd functions keep it for their backward pass.
    ``dataclasses.replace(options, smoothing=0.0)`` makes a validated copy.

    Attributes:
        rule: {rule} Kept as the :class:`~properlm.rules.ScoringRule` (:func:`properlm.get_rule` of it).
        smoothing: {smoothing} Kept as a float.
        ignore_index: {ignore_index}
        reduction: {reduction}
        softcap: {softcap} Kept as a float.
        logit_scale: {logit_scale} Kept as a float.
        smoothing_variant: {smoothing_variant}

    Raises:
        ValueError: naming the first invalid option of ``rule``, ``smoothing``, ``smoothing_variant``,
            ``reduction``, ``softcap``, ``logit_scale``.

    Example::

        >>> from properlm.options import LossOptions
        >>> opts = LossOptions("brier", smoothing=0.1, smoothing_variant="gated")
        >>> opts.rule.spec, opts.smoothing
        ('brier', 0.1)
    """

    rule: ScoringRule
    smoothing: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"
    softcap: float | None = None
    logit_scale: float | None = None
    smoothing_variant: str = "paper"

    def __init__(
        self,
        rule: RuleLike = "logarithmic",
        smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        *,
        softcap: float | None = None,
        logit_scale: float | None = None,
        smoothing_variant: str = "paper",
    ) -> None:
        rule_obj = get_rule(rule)
        eps = check_smoothing(smoothing)
        variant = check_smoothing_variant(smoothing_variant)
        check_reduction(reduction)
        cap, scale = check_head_transform(softcap, logit_scale)
        for name, value in (
            ("rule", rule_obj),
            ("smoothing", eps),
            ("ignore_index", ignore_index),
            ("reduction", reduction),
            ("softcap", cap),
            ("logit_scale", scale),
            ("smoothing_variant", variant),
        ):
            object.__setattr__(self, name, value)

    __hash__ = None  # type: ignore[assignment]  # a rule need not be hashable


document_options(LossOptions)


def options_repr(options: LossOptions, extra: str = "") -> str:
    """The ``extra_repr`` of a loss module with ``options``.

    Its rule, smoothing, ``ignore_index`` and reduction, then ``extra``, then the head transform and the smoothing
    variant where they are not the defaults.
    """
    head = "".join(
        f", {k}={v}" for k, v in (("softcap", options.softcap), ("logit_scale", options.logit_scale)) if v is not None
    )
    if options.smoothing_variant != "paper":
        head += f", smoothing_variant={options.smoothing_variant!r}"
    return (
        f"rule={options.rule.spec!r}, smoothing={options.smoothing}, ignore_index={options.ignore_index}, "
        f"reduction={options.reduction!r}{extra}{head}"
    )


def _option_property(name: str) -> property:
    """A property of a :class:`LossModule` that reads (and, validated, sets) the option ``name`` of its ``options``.

    Setting it replaces ``options`` with a validated copy (``dataclasses.replace``), so a module's options stay one
    valid :class:`LossOptions`.
    """

    def get(self: LossModule) -> Any:
        return getattr(self.options, name)

    def set_(self: LossModule, value: Any) -> None:
        self.options = replace(self.options, **{name: value})

    return property(get, set_, doc=f"The option ``{name}`` of ``options`` (:class:`LossOptions`).")


class LossModule(nn.Module):
    """Base of the loss modules: the options as one validated :class:`LossOptions`, each readable and settable.

    ``LossModule(rule, smoothing, ignore_index, reduction, *, softcap, logit_scale, smoothing_variant)`` takes the
    options as :class:`LossOptions` does, with the same defaults. :class:`properlm.ScoringRuleLoss` is this class with
    a ``forward``; :class:`properlm.LinearScoringRuleLoss` adds its own settings (``chunk_size``, ``impl``). A
    subclass's ``forward`` passes ``self.options`` to the path that computes the loss.

    Attributes:
        options: the validated :class:`LossOptions`; ``rule``, ``smoothing``, ``ignore_index``, ``reduction``,
            ``softcap``, ``logit_scale`` and ``smoothing_variant`` read them, and setting one of them replaces
            ``options`` with a validated copy (``ValueError`` for an invalid value, which leaves ``options`` as it
            was).

    Raises:
        ValueError: an invalid option, as :class:`LossOptions`.
    """

    options: LossOptions

    def __init__(
        self,
        rule: RuleLike = "logarithmic",
        smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        *,
        softcap: float | None = None,
        logit_scale: float | None = None,
        smoothing_variant: str = "paper",
    ) -> None:
        super().__init__()
        self.options = LossOptions(
            rule,
            smoothing,
            ignore_index,
            reduction,
            softcap=softcap,
            logit_scale=logit_scale,
            smoothing_variant=smoothing_variant,
        )

    rule = _option_property("rule")
    smoothing = _option_property("smoothing")
    ignore_index = _option_property("ignore_index")
    reduction = _option_property("reduction")
    softcap = _option_property("softcap")
    logit_scale = _option_property("logit_scale")
    smoothing_variant = _option_property("smoothing_variant")

    def extra_repr(self) -> str:
        """The settings, as shown in ``repr(module)`` (:func:`options_repr`)."""
        return options_repr(self.options)


def validate_inputs(
    logits_shape: torch.Size | tuple[int, ...],
    logits_dtype: torch.dtype,
    target: Tensor,
    ignore_index: int,
    vocab_size: int | None = None,
    what: str = "logits",
) -> None:
    """Raise ``ValueError`` for inputs that the losses cannot score.

    ``logits_shape`` is ``(..., V)`` and ``target`` must have shape ``(...)``, an integer
    dtype, and values in ``[0, V)`` or equal to ``ignore_index`` (``V = vocab_size`` when given;
    ``what`` names the logits in the messages). The values are not read under ``torch.compile``.
    """
    if not logits_dtype.is_floating_point:
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {logits_dtype}")
    if len(logits_shape) < 1:
        raise ValueError(f"{what} must have at least one dimension (the vocabulary), got a scalar")
    V = logits_shape[-1] if vocab_size is None else vocab_size
    if V < 1:
        raise ValueError(f"{what} has an empty vocabulary dimension (size 0)")
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a tensor of token ids, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(logits_shape[:-1]):
        raise ValueError(
            f"shape mismatch: {what} of shape {tuple(logits_shape)} (..., V) need target of shape "
            f"{tuple(logits_shape[:-1])}, got {tuple(target.shape)}"
        )
    # reading the targets would break a compiled graph: under torch.compile an out-of-range id
    # gives a NaN loss instead (see properlm.compiled)
    if target.numel() and not torch.compiler.is_compiling():
        bad = ((target < 0) | (target >= V)) & (target != ignore_index)
        if bool(bad.any()):
            first = target[bad][0].item()
            raise ValueError(
                f"target holds {int(bad.sum())} id(s) outside [0, {V}) (first: {first}); "
                f"only ignore_index={ignore_index} may fall outside the vocabulary"
            )


def reduce_loss(loss: Tensor, valid: Tensor, reduction: str, num_items_in_batch: Any = None) -> Tensor:
    """Reduce per-token losses ``loss`` (0 at ignored positions, mask ``valid``).

    ``"none"`` returns ``loss``, ``"sum"`` its sum; ``"mean"`` divides the sum by ``num_items_in_batch`` when given
    (as Hugging Face does under gradient accumulation) and otherwise by the number of valid tokens (1 if none).
    """
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            return total / num_items_in_batch.to(device=total.device, dtype=total.dtype)
        if num_items_in_batch <= 0:
            raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch}")
        return total / num_items_in_batch
    return total / valid.sum().clamp(min=1).to(total.dtype)


#: float32 elements of one chunk of logits rows (64 MiB), for callers that chunk by rows (the rows per chunk of the
#: vocabulary-parallel losses, :func:`chunk_rows`; the block of rows of the unfused loss on accelerators)
CHUNK_ELEMENTS = 1 << 24
#: elements of one block of rows for the elementwise work of the unfused loss on the CPU (stays in cache)
BLOCK_ELEMENTS = 1 << 20


def block_rows(vocab_size: int, device: torch.device) -> int:
    """Rows of one block of logits ``(rows, V)`` for the elementwise work of the unfused loss.

    Cache-sized on the CPU (:data:`BLOCK_ELEMENTS`), a large chunk on accelerators (:data:`CHUNK_ELEMENTS`; each
    block costs kernel launches there).
    """
    elements = BLOCK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS
    return max(1, elements // max(vocab_size, 1))


def chunk_rows(width: int) -> int:
    """Rows per chunk of logits ``width`` wide: ``CHUNK_ELEMENTS // width`` (at least 1).

    The vocabulary-parallel losses chunk the rows of a shard by it (``width``: the largest shard of the group for
    the fused one, so that the ranks agree). :data:`CHUNK_ELEMENTS` is read at each call.
    """
    return max(1, CHUNK_ELEMENTS // max(width, 1))


#: bounds on the default number of rows of one chunk of logits of the fused loss (:func:`default_chunk_size`)
MIN_CHUNK_ROWS = 64
MAX_CHUNK_ROWS = 4096
#: the default chunk of logits holds at least this many elements (64 MiB in float32), so
#: that the per-chunk matmuls (and their threads) stay efficient when the hidden input is small
MIN_CHUNK_ELEMENTS = 1 << 24
#: the same on CUDA (512 MiB of bfloat16 logit gradient for the Triton kernels)
CUDA_MIN_CHUNK_ELEMENTS = 1 << 28


def default_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int, cuda: bool = False) -> int:
    """Rows per chunk of the fused loss: a chunk of logits (``rows x V``) holds about as many elements as ``hidden``.

    That is ``rows ~ N H / V`` for hidden states ``N x H``, but at least ``MIN_CHUNK_ELEMENTS / V``
    (``CUDA_MIN_CHUNK_ELEMENTS / V`` on a GPU), at least ``MIN_CHUNK_ROWS``, at most ``MAX_CHUNK_ROWS``
    on the CPU, and never more than ``N``.

    On a GPU every chunk costs a pass over the ``V x H`` float32 gradient accumulator of the
    weight (2 GiB for 128k x 4k), as much memory traffic as the chunk's matmuls take time when
    a chunk has a few hundred rows, hence the larger minimum there."""
    v = max(vocab_size, 1)
    min_elements = CUDA_MIN_CHUNK_ELEMENTS if cuda else MIN_CHUNK_ELEMENTS
    rows = max(math.ceil(num_tokens * hidden_size / v), math.ceil(min_elements / v))
    rows = max(rows, MIN_CHUNK_ROWS)
    if not cuda:
        rows = min(rows, MAX_CHUNK_ROWS)
    return max(1, min(rows, num_tokens))
