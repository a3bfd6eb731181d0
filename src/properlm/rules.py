"""Strictly proper scoring rules written as functions of per-token log-sum-exps.

For logits ``z`` of one position (length ``V``), ``p = softmax(z)`` and the observed
token ``y``, every rule here is a closed-form function of a few statistics:

* ``z_y``: the target's logit;
* ``L_c = LSE(c z) = log sum_j exp(c z_j)`` for the scales ``c`` the rule names;
* ``sum_z``: the sum of the (finite) logits, for the logarithmic smoothing term;
* ``V``: the number of finite logits (entries of ``-inf`` have ``p = 0`` and do not count).

A rule object states which scales it needs and gives two formulas, both elementwise and
broadcastable, so the same object serves the unfused loss, the fused chunked and Triton
losses, the vocabulary-parallel loss, evaluation and decoding:

* :meth:`ScoringRule.score` -- ``S(p, y)`` from ``z_y`` and the ``L_c``;
* :meth:`ScoringRule.mean_score` -- ``(1/V) sum_k S(p, k)``, the score-smoothing term.

Higher scores are better. ``s_max`` is the largest score a rule can give (reached by a
one-hot forecast of ``y``), so ``s_max - S >= 0`` is a loss.

======================  =========================  ====================================================
rule                    scales                     score S(p, y)
======================  =========================  ====================================================
logarithmic             1                          z_y - L_1
brier                   1, 2                       2 exp(z_y - L_1) - exp(L_2 - 2 L_1)
spherical               2                          exp(z_y - L_2 / 2)
pseudo-spherical:a      a                          exp((a-1) z_y - (a-1)/a L_a)
power:a                 1, a                       a exp((a-1)(z_y - L_1)) - (a-1) exp(L_a - a L_1)
======================  =========================  ====================================================

Mixtures: ``"W1*RULE1+W2*RULE2[+...]"`` (positive weights, any spec as a component, ``W*``
may be left out for a weight of 1), e.g. ``"0.5*logarithmic+0.5*spherical"`` or
``"logarithmic+0.1*power:3"``, or :class:`Mixture` directly. A mixture's score is the weighted
sum of its components' scores, so it is strictly proper (a positive combination of strictly
proper rules), it needs the union of their scales (one statistics pass serves all of them),
and every path (unfused, fused, Triton, vocabulary-parallel, evaluation, decoding) takes it.

New rules: subclass :class:`ScoringRule` and decorate it with :func:`register_rule`.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

__all__ = [
    "Brier",
    "Logarithmic",
    "Mixture",
    "Power",
    "PseudoSpherical",
    "RuleLike",
    "ScoringRule",
    "Spherical",
    "available_rules",
    "get_rule",
    "register_rule",
]

_REGISTRY: dict[str, type[ScoringRule]] = {}
_ALIASES: dict[str, str] = {}

LSEs = Mapping[float, Tensor]


class ScoringRule:
    """A strictly proper scoring rule as a function of per-token statistics.

    Subclasses set :attr:`name`, implement :meth:`score`, :meth:`mean_score`,
    :meth:`score_scales` and :meth:`mean_score_scales`, and may take numeric parameters
    in ``__init__`` (given in a spec string as ``"name:1.5"`` or ``"name:1.5,2"``).

    Attributes:
        name: registry name, as used in spec strings.
        s_max: the maximum score (0 for logarithmic, 1 for the bounded rules).
        masked_log_smoothing: add the masked logarithmic term
            ``(eps/V) sum_j 1[p_j < eps/V] log p_j`` when smoothing (bounded rules).
        uses_logit_sum: :meth:`mean_score` reads ``sum_z``.
    """

    name: ClassVar[str] = ""
    s_max: float = 1.0
    masked_log_smoothing: bool = True
    uses_logit_sum: bool = False

    @property
    def masked_log_weight(self) -> float:
        """Weight of the masked-log term in the smoothed score.

        1 for a rule with :attr:`masked_log_smoothing`, 0 otherwise (a :class:`Mixture`: the total weight
        of its components that have the term).
        """
        return 1.0 if self.masked_log_smoothing else 0.0

    def score_scales(self) -> tuple[float, ...]:
        """Scales ``c`` whose ``L_c`` :meth:`score` reads."""
        raise NotImplementedError

    def mean_score_scales(self) -> tuple[float, ...]:
        """Scales ``c`` whose ``L_c`` :meth:`mean_score` reads."""
        raise NotImplementedError(f"rule {self.spec!r} defines no mean_score, so it cannot be used with smoothing > 0")

    def score(self, z_y: Tensor, lse: LSEs) -> Tensor:
        """``S(p, y)`` from the target logit ``z_y`` and ``lse[c] = LSE(c z)``.

        All tensors broadcast: ``z_y`` of shape ``(N,)`` with ``lse[c]`` of shape ``(N,)``
        gives one score per token, ``z`` of shape ``(N, V)`` with ``lse[c]`` of shape
        ``(N, 1)`` gives ``S(p, k)`` for every ``k``.
        """
        raise NotImplementedError

    def mean_score(self, lse: LSEs, sum_z: Tensor | None, num_classes: Tensor) -> Tensor:
        """``(1/V) sum_k S(p, k)`` over the ``V = num_classes`` finite logits."""
        raise NotImplementedError(f"rule {self.spec!r} defines no mean_score, so it cannot be used with smoothing > 0")

    # ------------------------------------------------------------------ helpers
    def scales(self, smoothing: float = 0.0) -> tuple[float, ...]:
        """All scales needed for the (smoothed) score, sorted, without duplicates."""
        needed = set(self.score_scales())
        if smoothing > 0:
            needed.update(self.mean_score_scales())
            if self.masked_log_smoothing:
                needed.add(1.0)
        return tuple(sorted(float(c) for c in needed))

    def params(self) -> tuple[float, ...]:
        """Numeric parameters, in spec order (empty for parameter-free rules)."""
        return ()

    @property
    def spec(self) -> str:
        """The spec string that :func:`get_rule` turns back into this rule."""
        ps = self.params()
        if not ps:
            return self.name
        return self.name + ":" + ",".join(_fmt(p) for p in ps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ScoringRule) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _check_alpha(rule: str, alpha: float) -> float:
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 1:
        raise ValueError(f"rule {rule!r} needs a finite alpha > 1, got alpha={alpha}")
    return alpha


R = TypeVar("R", bound=type[ScoringRule])


def register_rule(name: str, *, aliases: Sequence[str] = ()) -> Callable[[R], R]:
    """Class decorator that registers a :class:`ScoringRule` under ``name`` (and aliases).

    Example::

        @properlm.register_rule("my-log")
        class MyLog(properlm.rules.Logarithmic):
            pass

        properlm.get_rule("my-log")
    """

    def deco(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, ScoringRule)):
            raise TypeError(f"register_rule expects a ScoringRule subclass, got {cls!r}")
        key = name.lower()
        for n in (key, *(a.lower() for a in aliases)):
            if ":" in n or not n:
                raise ValueError(f"invalid rule name {n!r}: names are non-empty and have no ':'")
        cls.name = key
        _REGISTRY[key] = cls
        for a in aliases:
            _ALIASES[a.lower()] = key
        return cls

    return deco


def available_rules() -> list[str]:
    """Registered rule names (aliases not included), e.g. ``['brier', 'logarithmic', ...]``."""
    return sorted(_REGISTRY)


RuleLike = str | ScoringRule


def get_rule(rule: RuleLike) -> ScoringRule:
    """Return the rule object for a spec string such as ``"spherical"`` or ``"power:3"``.

    A :class:`ScoringRule` instance is returned unchanged. Raises ``ValueError`` naming
    the known rules for an unknown name, and for bad parameters.
    """
    if isinstance(rule, ScoringRule):
        return rule
    if not isinstance(rule, str):
        raise ValueError(
            f"rule must be a spec string or a ScoringRule, got {type(rule).__name__}; "
            f"known rules: {', '.join(available_rules())}"
        )
    spec = rule.strip().lower()
    if "+" in spec or "*" in spec:
        return _parse_mixture(rule)
    name, _, arg = spec.partition(":")
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        aliases = ", ".join(f"{a} (= {t})" for a, t in sorted(_ALIASES.items()))
        close = difflib.get_close_matches(name, [*_REGISTRY, *_ALIASES], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown scoring rule {rule!r}{hint}; known rules: {', '.join(available_rules())}; "
            f"aliases: {aliases}; parameterised rules take ':ALPHA', e.g. 'power:3'"
        )
    cls = _REGISTRY[name]
    args: list[float] = []
    if arg:
        for part in arg.split(","):
            try:
                args.append(float(part))
            except ValueError:
                raise ValueError(
                    f"rule {rule!r}: parameter {part!r} is not a number (expected e.g. '{name}:1.5')"
                ) from None
    try:
        return cls(*args)
    except TypeError as exc:  # the count is checked only here: the happy path stays traceable (torch.compile)
        _check_parameter_count(rule, name, len(args))
        raise ValueError(f"rule {rule!r}: wrong number of parameters for {name!r} ({exc})") from None


def _parameters(name: str) -> list[inspect.Parameter] | None:
    """The numeric parameters a registered rule's constructor takes, in spec order (``None``: any number)."""
    try:
        params = list(inspect.signature(_REGISTRY[name]).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p for p in params if p.kind in kinds]


def _usage(name: str) -> str:
    """``"power:ALPHA"``: a registered rule's spec with its parameters named."""
    params = _parameters(name) or []
    return name + (":" + ",".join(p.name.upper() for p in params) if params else "")


def _check_parameter_count(rule: str, name: str, given: int) -> None:
    """Raise ``ValueError`` when ``rule`` gives the registered rule ``name`` too many or too few parameters.

    The message says what ``name`` takes and lists the rules that take parameters (``power:ALPHA``, ...).
    """
    params = _parameters(name)
    if params is None:
        return
    required = sum(p.default is inspect.Parameter.empty for p in params)
    if required <= given <= len(params):
        return
    if not params:
        takes = f"{name} takes no parameter (write {name!r})"
    elif len(params) == 1:
        takes = f"{name} takes one parameter ({_usage(name)})"
    else:
        count = f"{required} to {len(params)}" if required < len(params) else str(len(params))
        takes = f"{name} takes {count} parameters ({_usage(name)})"
    with_params = [_usage(n) for n in available_rules() if _parameters(n)]
    raise ValueError(
        f"rule {rule!r}: wrong number of parameters: {takes}; the rules that take a parameter: {', '.join(with_params)}"
    )


# ---------------------------------------------------------------------- the rules


@register_rule("logarithmic", aliases=("log", "logarithm", "cross-entropy"))
class Logarithmic(ScoringRule):
    """Logarithmic score ``S = log p_y = z_y - L_1``; its loss is cross-entropy."""

    s_max = 0.0
    masked_log_smoothing = False
    uses_logit_sum = True

    def score_scales(self) -> tuple[float, ...]:
        """``(1,)``: ``L_1``."""
        return (1.0,)

    def mean_score_scales(self) -> tuple[float, ...]:
        """``(1,)``: ``L_1`` (and ``sum_z``)."""
        return (1.0,)

    def score(self, z_y: Tensor, lse: LSEs) -> Tensor:
        """``log p_y = z_y - L_1``."""
        return z_y - lse[1.0]

    def mean_score(self, lse: LSEs, sum_z: Tensor | None, num_classes: Tensor) -> Tensor:
        """``(1/V) sum_k log p_k = sum_z / V - L_1``."""
        assert sum_z is not None
        return sum_z / num_classes - lse[1.0]


@register_rule("brier", aliases=("quadratic",))
class Brier(ScoringRule):
    """Brier (quadratic) score ``S = 2 p_y - sum_j p_j^2``.

    With ``sum_j p_j^2 = exp(L_2 - 2 L_1)``. Equal to ``power:2``.
    """

    def score_scales(self) -> tuple[float, ...]:
        """``(1, 2)``: ``L_1`` and ``L_2``."""
        return (1.0, 2.0)

    def mean_score_scales(self) -> tuple[float, ...]:
        """``(1, 2)``: ``L_1`` and ``L_2``."""
        return (1.0, 2.0)

    def score(self, z_y: Tensor, lse: LSEs) -> Tensor:
        """``2 exp(z_y - L_1) - exp(L_2 - 2 L_1)``."""
        return 2 * torch.exp(z_y - lse[1.0]) - torch.exp(lse[2.0] - 2 * lse[1.0])

    def mean_score(self, lse: LSEs, sum_z: Tensor | None, num_classes: Tensor) -> Tensor:
        """``2 / V - exp(L_2 - 2 L_1)``."""
        return 2 / num_classes - torch.exp(lse[2.0] - 2 * lse[1.0])


@register_rule("pseudo-spherical", aliases=("pseudospherical",))
class PseudoSpherical(ScoringRule):
    """Pseudo-spherical score ``S = (p_y / ||p||_a)^(a-1) = exp((a-1) z_y - (a-1)/a L_a)``.

    Smoothing term: ``(1/V) sum_k S(p, k) = exp(L_(a-1) - (a-1)/a L_a) / V``.
    ``alpha = 2`` is :class:`Spherical`.
    """

    def __init__(self, alpha: float = 2.0) -> None:
        self.alpha = _check_alpha(self.name, alpha)

    def params(self) -> tuple[float, ...]:
        """``(alpha,)``."""
        return (self.alpha,)

    def score_scales(self) -> tuple[float, ...]:
        """``(alpha,)``: ``L_alpha``."""
        return (self.alpha,)

    def mean_score_scales(self) -> tuple[float, ...]:
        """``(alpha - 1, alpha)``."""
        return (self.alpha - 1, self.alpha)

    def _log_norm(self, lse: LSEs) -> Tensor:
        a = self.alpha
        return (a - 1) / a * lse[a]

    def score(self, z_y: Tensor, lse: LSEs) -> Tensor:
        """``exp((a-1) z_y - (a-1)/a L_a)``."""
        return torch.exp((self.alpha - 1) * z_y - self._log_norm(lse))

    def mean_score(self, lse: LSEs, sum_z: Tensor | None, num_classes: Tensor) -> Tensor:
        """``exp(L_(a-1) - (a-1)/a L_a) / V``."""
        return torch.exp(lse[self.alpha - 1] - self._log_norm(lse)) / num_classes


@register_rule("spherical")
class Spherical(PseudoSpherical):
    """Spherical score ``S = p_y / ||p||_2 = exp(z_y - L_2 / 2)``."""

    def __init__(self) -> None:
        super().__init__(2.0)

    def params(self) -> tuple[float, ...]:
        """``()``: the spec is ``"spherical"``."""
        return ()


@register_rule("power")
class Power(ScoringRule):
    """Power score ``S = a p_y^(a-1) - (a-1) sum_j p_j^a = a exp((a-1)(z_y - L_1)) - (a-1) exp(L_a - a L_1)``.

    Smoothing term: ``(a/V) exp(L_(a-1) - (a-1) L_1) - (a-1) exp(L_a - a L_1)``.
    ``alpha = 2`` is :class:`Brier`.
    """

    def __init__(self, alpha: float = 2.0) -> None:
        self.alpha = _check_alpha(self.name, alpha)

    def params(self) -> tuple[float, ...]:
        """``(alpha,)``."""
        return (self.alpha,)

    def score_scales(self) -> tuple[float, ...]:
        """``(1, alpha)``."""
        return (1.0, self.alpha)

    def mean_score_scales(self) -> tuple[float, ...]:
        """``(1, alpha - 1, alpha)``."""
        return (1.0, self.alpha - 1, self.alpha)

    def _sum_pa(self, lse: LSEs) -> Tensor:
        a = self.alpha
        return torch.exp(lse[a] - a * lse[1.0])

    def score(self, z_y: Tensor, lse: LSEs) -> Tensor:
        """``a exp((a-1)(z_y - L_1)) - (a-1) exp(L_a - a L_1)``."""
        a = self.alpha
        return a * torch.exp((a - 1) * (z_y - lse[1.0])) - (a - 1) * self._sum_pa(lse)

    def mean_score(self, lse: LSEs, sum_z: Tensor | None, num_classes: Tensor) -> Tensor:
        """``(a/V) exp(L_(a-1) - (a-1) L_1) - (a-1) exp(L_a - a L_1)``."""
        a = self.alpha
        return a / num_classes * torch.exp(lse[a - 1] - (a - 1) * lse[1.0]) - (a - 1) * self._sum_pa(lse)


# ---------------------------------------------------------------------- mixtures


class Mixture(ScoringRule):
    r"""A positive combination of scoring rules, ``S(p, y) = sum_i w_i S_i(p, y)``, ``w_i > 0``.

    Strictly proper when every component is (the expected score is the same combination of
    expected scores, each maximised only at ``p = q``). Its statistics are the union of the
    components' scales, so one pass over the logits serves every component:

    * ``score = sum_i w_i S_i``, ``mean_score = sum_i w_i (1/V) sum_k S_i(p, k)``,
      ``s_max = sum_i w_i s_max_i``;
    * smoothing is that of each component, weighted: ``S_eps = sum_i w_i S_i,eps``, so the
      masked-log term ``(eps/V) sum_(p_j < eps/V) log p_j`` enters with weight
      ``sum_(i bounded) w_i`` (:attr:`masked_log_weight`; the components with the term, i.e.
      all but the logarithmic score). Its smoothed optimum is therefore the components' one,
      ``(1 - eps) q + eps / V``.

    Nested mixtures are flattened. ``Mixture([(0.5, "logarithmic"), (0.5, "spherical")])`` has
    the spec ``"0.5*logarithmic+0.5*spherical"``.

    Args:
        components: ``(weight, rule)`` pairs; a rule is a spec string or a :class:`ScoringRule`.
    """

    name = "mixture"

    def __init__(self, components: Sequence[tuple[float, RuleLike]]) -> None:
        flat: list[tuple[float, ScoringRule]] = []
        if isinstance(components, (str, ScoringRule)) or not components:
            raise ValueError(f"Mixture needs a non-empty sequence of (weight, rule) pairs, got {components!r}")
        for i, item in enumerate(components, start=1):
            try:
                w, r = item
            except (TypeError, ValueError):
                raise ValueError(f"Mixture component {i}: expected a (weight, rule) pair, got {item!r}") from None
            w = _check_weight(w, f"Mixture component {i}")
            rule = get_rule(r)
            if isinstance(rule, Mixture):
                flat.extend((w * cw, cr) for cw, cr in rule.components)
            else:
                flat.append((w, rule))
        self.components: tuple[tuple[float, ScoringRule], ...] = tuple(flat)
        self.s_max = sum(w * r.s_max for w, r in flat)
        self.masked_log_smoothing = any(r.masked_log_smoothing for _, r in flat)
        self.uses_logit_sum = any(r.uses_logit_sum for _, r in flat)

    @property
    def masked_log_weight(self) -> float:
        """``sum_i w_i`` over the components with the masked-log term (the bounded ones)."""
        return sum(w * r.masked_log_weight for w, r in self.components)

    def score_scales(self) -> tuple[float, ...]:
        """The union of the components' :meth:`~ScoringRule.score_scales`."""
        return tuple(sorted({float(c) for _, r in self.components for c in r.score_scales()}))

    def mean_score_scales(self) -> tuple[float, ...]:
        """The union of the components' :meth:`~ScoringRule.mean_score_scales`."""
        return tuple(sorted({float(c) for _, r in self.components for c in r.mean_score_scales()}))

    def scales(self, smoothing: float = 0.0) -> tuple[float, ...]:
        """The union of the components' :meth:`~ScoringRule.scales`."""
        return tuple(sorted({float(c) for _, r in self.components for c in r.scales(smoothing)}))

    def score(self, z_y: Tensor, lse: LSEs) -> Tensor:
        """``sum_i w_i S_i(p, y)``."""
        out = None
        for w, r in self.components:
            t = w * r.score(z_y, lse)
            out = t if out is None else out + t
        assert out is not None
        return out

    def mean_score(self, lse: LSEs, sum_z: Tensor | None, num_classes: Tensor) -> Tensor:
        """``sum_i w_i (1/V) sum_k S_i(p, k)``."""
        out = None
        for w, r in self.components:
            t = w * r.mean_score(lse, sum_z, num_classes)
            out = t if out is None else out + t
        assert out is not None
        return out

    @property
    def spec(self) -> str:
        """``"W1*RULE1+W2*RULE2..."`` (a weight of 1 left out)."""
        return "+".join(r.spec if w == 1.0 else f"{_fmt(w)}*{r.spec}" for w, r in self.components)


def _check_weight(w: object, where: str) -> float:
    try:
        weight = float(w)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: the weight must be a number, got {w!r}") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{where}: the weight must be a positive finite number, got {w!r}")
    return weight


def _split_terms(spec: str) -> list[str]:
    """Split a mixture spec at its ``+`` signs, except those of a number's exponent (``1e+3``)."""
    parts: list[str] = []
    for piece in spec.split("+"):
        if (
            parts
            and len(parts[-1]) >= 2
            and parts[-1][-1] in "eE"
            and parts[-1][-2].isdigit()
            and piece[:1].isdigit()
            and "*" not in parts[-1]
        ):
            parts[-1] += "+" + piece
        else:
            parts.append(piece)
    return parts


def _parse_mixture(text: str) -> Mixture:
    """``"W1*RULE1+W2*RULE2"`` -> :class:`Mixture`, with a ``ValueError`` naming the bad term."""
    example = "e.g. '0.5*logarithmic+0.5*spherical'"
    comps: list[tuple[float, ScoringRule]] = []
    for i, term in enumerate(_split_terms(text.strip()), start=1):
        term = term.strip()
        where = f"mixture {text!r}, term {i} ({term!r})"
        if not term:
            raise ValueError(f"mixture {text!r}: term {i} is empty (terms are 'WEIGHT*RULE' joined by '+', {example})")
        weight_text, star, rule_text = term.partition("*")
        if not star:
            weight_text, rule_text = "1", term
        if not weight_text.strip():
            raise ValueError(f"{where}: missing weight before '*' ({example})")
        if not rule_text.strip():
            raise ValueError(f"{where}: missing rule after '*' ({example})")
        if "*" in rule_text:
            raise ValueError(f"{where}: one '*' per term ({example})")
        w = _check_weight(weight_text.strip(), where)
        try:
            rule = get_rule(rule_text.strip())
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        comps.append((w, rule))
    return Mixture(comps)
