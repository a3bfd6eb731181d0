"""Teacher-forced evaluation metrics: rule scores, perplexity, accuracy and calibration.

The mean token score of every scoring rule, the perplexity, the token accuracy and the calibration of
the top-1 token (ECE, bin table, reliability diagram).

For each scored position (label ``y`` not equal to ``ignore_index``) with logits ``z`` of
length ``V`` and ``p = softmax(z)``:

* the token score ``S(p, y)`` of every requested rule, evaluated through the rule objects
  (:func:`properlm.stats.compute_stats` once per chunk of rows with the union of the scales
  of all rules, then :func:`properlm.stats.smoothed_score` with smoothing 0 per rule);
* ``log p_y`` (the logarithmic score), always, for the perplexity ``exp(-mean log p_y)``;
* the top-1 prediction ``argmax_k z_k`` and its confidence ``max_k p_k``.

Expected calibration error with ``M`` equal-width bins ``B_b = ((b-1)/M, b/M]`` (confidence
0 falls in the first bin)::

    ECE = sum_b (|B_b| / N) |acc(B_b) - conf(B_b)|
        = (1/N) sum_b |sum_{i in B_b} correct_i - sum_{i in B_b} conf_i|

:class:`MetricsAccumulator` streams over batches and keeps only float64 sums (per-rule score
sums, token and correct counts, and three numbers per bin), so its result does not depend
on how the data were split into batches (up to float rounding).

Temperature scaling: :class:`TemperatureScan` streams the mean log score, its slope in ``1/T``
and the ECE of ``softmax(z / T)`` for a grid of ``T`` in one pass, takes the grid's best ``T`` and
refines it between its neighbours to the ``T`` with the best log score (fit it on validation data);
``MetricsAccumulator(..., temperature=T)`` then scores ``softmax(z / T)``. Scaling keeps the ranking
of the tokens and changes only the confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .rules import RuleLike, ScoringRule, get_rule
from .stats import rule_scores

__all__ = [
    "DEFAULT_NUM_BINS",
    "DEFAULT_TEMPERATURES",
    "CalibrationBin",
    "EvalMetrics",
    "MetricsAccumulator",
    "TemperatureFit",
    "TemperatureScan",
    "calibration_bins",
    "check_temperature",
    "expected_calibration_error",
    "perplexity",
    "reliability_diagram",
    "token_level_outputs",
]

#: equal-width confidence bins of the expected calibration error
DEFAULT_NUM_BINS = 15

#: float32 elements of one chunk of logits rows (64 MiB)
_CHUNK_ELEMENTS = 1 << 24

_LOG = get_rule("logarithmic")


def _unique_rules(rules: Sequence[RuleLike]) -> list[ScoringRule]:
    out: list[ScoringRule] = []
    for r in rules:
        obj = get_rule(r)
        if obj not in out:
            out.append(obj)
    return out


def _scored_rows(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits (M, V), labels (M,), indices of the scored rows)`` after checking shapes and ids."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"shape mismatch: logits of shape {tuple(logits.shape)} (..., V) need labels of shape "
            f"{tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    V = logits.shape[-1]
    flat_z = logits.reshape(-1, V)
    flat_y = labels.reshape(-1)
    rows = (flat_y != ignore_index).nonzero().squeeze(1)
    if rows.numel():
        bad = (flat_y[rows] < 0) | (flat_y[rows] >= V)
        if bool(bad.any()):
            raise ValueError(f"labels hold ids outside [0, {V}) (first: {int(flat_y[rows][bad][0])}) "
                             f"that are not ignore_index={ignore_index}")
    return flat_z, flat_y, rows


def token_level_outputs(logits: Tensor, labels: Tensor, rules: Sequence[RuleLike], ignore_index: int = -100,
                        temperature: float = 1.0) -> dict[str, Tensor]:
    """Per-token scores, predictions and confidences of ``p = softmax(logits / temperature)``.

    Only the scored positions are returned.

    Args:
        logits: ``(..., V)`` logits, already aligned with ``labels`` (for a causal LM, shift
            first: ``logits[:, :-1]`` against ``labels[:, 1:]``); computed in float32.
        labels: ``(...)`` token ids, ``ignore_index`` where nothing is scored.
        rules: rule specs or objects.
        ignore_index: label value of unscored positions.
        temperature: positive ``T`` of temperature scaling (applied chunk by chunk in float32,
            never to a copy of the whole ``logits``).

    Returns:
        A dict of 1-D tensors over the ``N`` scored positions (row-major order):
        ``"score:<spec>"`` (float32 ``S(p, y)`` per rule), ``"log_prob"`` (``log p_y``),
        ``"confidence"`` (``max_k p_k``), ``"correct"`` (bool, ``argmax_k z_k == y``).
    """
    rule_objs = _unique_rules(rules)
    flat_z, flat_y, rows = _scored_rows(logits, labels, ignore_index)
    V = flat_z.shape[-1]
    keys = [f"score:{r.spec}" for r in rule_objs]
    parts: dict[str, list[Tensor]] = {k: [] for k in [*keys, "log_prob", "confidence", "correct"]}
    step = max(1, _CHUNK_ELEMENTS // max(V, 1))
    with torch.no_grad():
        for start in range(0, rows.numel(), step):
            idx = rows[start:start + step]
            z = flat_z[idx].float()
            if temperature != 1.0:
                z = z / temperature
            y = flat_y[idx]
            scores, stats = rule_scores(z, y, [*rule_objs, _LOG])
            for j, key in enumerate(keys):
                parts[key].append(scores[:, j])
            parts["log_prob"].append(scores[:, -1])
            # the statistics are of z - max z: log p_top = (z_top - max z) - lse[1] = -lse[1]
            parts["confidence"].append(torch.exp(-stats.lse[1.0]))
            parts["correct"].append(z.argmax(dim=-1) == y)
    out: dict[str, Tensor] = {}
    for k, v in parts.items():
        if v:
            out[k] = torch.cat(v)
        else:
            out[k] = torch.zeros(0, dtype=torch.bool if k == "correct" else torch.float32, device=logits.device)
    return out


@dataclass
class CalibrationBin:
    """One equal-width confidence bin ``(lower, upper]``."""

    lower: float
    upper: float
    count: int
    confidence: float | None  # mean confidence of the bin, None when empty
    accuracy: float | None  # fraction correct, None when empty
    gap: float | None  # accuracy - confidence


def _bin_index(confidence: Tensor, num_bins: int) -> Tensor:
    """Bin ``b`` (0-based) of ``((b)/M, (b+1)/M]``; confidence 0 goes to bin 0."""
    idx = torch.ceil(confidence.double() * num_bins).long() - 1
    return idx.clamp_(0, num_bins - 1)


def _check_bins(num_bins: int) -> int:
    if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    return num_bins


def _bins_from_sums(count: Sequence[float], conf_sum: Sequence[float], correct_sum: Sequence[float]
                    ) -> list[CalibrationBin]:
    M = len(count)
    table = []
    for b in range(M):
        n = int(count[b])
        conf = conf_sum[b] / n if n else None
        acc = correct_sum[b] / n if n else None
        gap = None if conf is None or acc is None else acc - conf
        table.append(CalibrationBin(b / M, (b + 1) / M, n, conf, acc, gap))
    return table


def _ece_from_sums(count: Sequence[float], conf_sum: Sequence[float], correct_sum: Sequence[float]) -> float:
    total = float(sum(count))
    if total == 0:
        return float("nan")
    return sum(abs(c - s) for c, s in zip(correct_sum, conf_sum)) / total


def _bin_sums(confidence: Tensor, correct: Tensor, num_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    idx = _bin_index(confidence, num_bins)
    count = torch.bincount(idx, minlength=num_bins).double()
    conf_sum = torch.bincount(idx, weights=confidence.double(), minlength=num_bins)
    corr_sum = torch.bincount(idx, weights=correct.double(), minlength=num_bins)
    return count, conf_sum, corr_sum


def _check_calibration_inputs(confidence: Tensor, correct: Tensor) -> None:
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence {tuple(confidence.shape)} and correct {tuple(correct.shape)} differ in shape")
    if confidence.numel() and bool(((confidence < 0) | (confidence > 1) | confidence.isnan()).any()):
        raise ValueError("confidence must lie in [0, 1]")


def calibration_bins(confidence: Tensor, correct: Tensor, num_bins: int = DEFAULT_NUM_BINS) -> list[CalibrationBin]:
    """The reliability table: ``num_bins`` equal-width bins of ``confidence``.

    ``confidence`` has any shape and values in ``[0, 1]``; each bin has its count, mean confidence and
    accuracy of ``correct``.
    """
    _check_bins(num_bins)
    _check_calibration_inputs(confidence, correct)
    sums = _bin_sums(confidence.reshape(-1), correct.reshape(-1), num_bins)
    return _bins_from_sums(*(s.tolist() for s in sums))


def expected_calibration_error(confidence: Tensor, correct: Tensor, num_bins: int = DEFAULT_NUM_BINS) -> float:
    """``ECE = sum_b (|B_b|/N) |acc(B_b) - conf(B_b)|`` over ``num_bins`` equal-width bins.

    ``confidence`` and ``correct`` have the same shape (flattened); NaN for no predictions.
    """
    _check_bins(num_bins)
    _check_calibration_inputs(confidence, correct)
    sums = _bin_sums(confidence.reshape(-1), correct.reshape(-1), num_bins)
    return _ece_from_sums(*(s.tolist() for s in sums))


def perplexity(mean_log_prob: float) -> float:
    """``exp(-mean log p_y)``; ``inf`` when it overflows."""
    try:
        return math.exp(-mean_log_prob)
    except OverflowError:
        return math.inf


@dataclass
class EvalMetrics:
    """Aggregated teacher-forced metrics (see :class:`MetricsAccumulator`).

    Attributes:
        num_tokens: scored positions ``N``.
        mean_scores: ``{rule spec: (1/N) sum_i S(p_i, y_i)}`` (higher is better).
        mean_log_prob: ``(1/N) sum_i log p_i(y_i)``.
        perplexity: ``exp(-mean_log_prob)``.
        accuracy: fraction of positions whose top-1 token is the label.
        ece: expected calibration error of the top-1 token.
        mce: maximum calibration error, ``max_b |acc(B_b) - conf(B_b)|`` over non-empty bins.
        bins: the reliability table.
    """

    num_tokens: int
    mean_scores: dict[str, float]
    mean_log_prob: float
    perplexity: float
    accuracy: float
    ece: float
    mce: float
    bins: list[CalibrationBin] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The metrics as a JSON-ready dict (bins included)."""
        return asdict(self)


class MetricsAccumulator:
    """Streams teacher-forced metrics over batches.

    Example::

        acc = MetricsAccumulator(["logarithmic", "brier", "spherical", "power:3"])
        for batch in loader:
            logits = model(**batch).logits
            acc.update(logits[:, :-1], batch["labels"][:, 1:])
        metrics = acc.compute()   # EvalMetrics

    Args:
        rules: rule specs or objects whose mean token score is reported.
        num_bins: equal-width confidence bins of the ECE (default 15).
        ignore_index: label value of unscored positions.
        temperature: score ``softmax(z / T)`` instead of ``softmax(z)`` (temperature scaling,
            e.g. with a ``T`` fitted on validation data by :class:`TemperatureScan`).
    """

    def __init__(self, rules: Sequence[RuleLike] = ("logarithmic", "brier", "spherical"),
                 num_bins: int = DEFAULT_NUM_BINS, ignore_index: int = -100, temperature: float = 1.0) -> None:
        self.rules = _unique_rules(rules)
        if not self.rules:
            raise ValueError("rules must name at least one scoring rule")
        self.num_bins = _check_bins(num_bins)
        self.ignore_index = ignore_index
        self.temperature = check_temperature(temperature)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._n = 0
        self._score_sums = {r.spec: 0.0 for r in self.rules}
        self._log_sum = 0.0
        self._correct = 0
        self._count = torch.zeros(self.num_bins, dtype=torch.float64)
        self._conf_sum = torch.zeros(self.num_bins, dtype=torch.float64)
        self._corr_sum = torch.zeros(self.num_bins, dtype=torch.float64)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Add the scored positions of one batch: ``logits (..., V)`` aligned with ``labels (...)``."""
        out = token_level_outputs(logits, labels, self.rules, self.ignore_index, self.temperature)
        n = int(out["correct"].numel())
        if n == 0:
            return
        self._n += n
        for r in self.rules:
            self._score_sums[r.spec] += float(out[f"score:{r.spec}"].double().sum())
        self._log_sum += float(out["log_prob"].double().sum())
        self._correct += int(out["correct"].sum())
        count, conf_sum, corr_sum = _bin_sums(out["confidence"].cpu(), out["correct"].cpu(), self.num_bins)
        self._count += count
        self._conf_sum += conf_sum
        self._corr_sum += corr_sum

    @property
    def num_tokens(self) -> int:
        """Scored positions seen so far."""
        return self._n

    def compute(self) -> EvalMetrics:
        """The metrics of everything seen since construction or :meth:`reset`."""
        n = self._n
        nan = float("nan")
        count, conf, corr = self._count.tolist(), self._conf_sum.tolist(), self._corr_sum.tolist()
        bins = _bins_from_sums(count, conf, corr)
        gaps = [abs(b.gap) for b in bins if b.gap is not None]
        mean_log = self._log_sum / n if n else nan
        return EvalMetrics(
            num_tokens=n,
            mean_scores={k: (v / n if n else nan) for k, v in self._score_sums.items()},
            mean_log_prob=mean_log,
            perplexity=perplexity(mean_log) if n else nan,
            accuracy=self._correct / n if n else nan,
            ece=_ece_from_sums(count, conf, corr),
            mce=max(gaps) if gaps else nan,
            bins=bins,
        )


#: temperatures scanned by :class:`TemperatureScan` by default: 81 values, log-spaced from 0.2 to 5
#: (neighbours 4% apart); the fit is refined between them
DEFAULT_TEMPERATURES: tuple[float, ...] = tuple(
    float(t) for t in torch.logspace(math.log10(0.2), math.log10(5.0), 81, dtype=torch.float64))

#: the most negative finite float32: a ``-inf`` logit (masked vocabulary) is clamped to it in the
#: scan, so that ``p_j z_j`` is ``0 * finite = 0`` there instead of ``0 * -inf = NaN``
_FLOAT32_MIN = torch.finfo(torch.float32).min


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float if it is positive and finite, else ``ValueError``."""
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


@dataclass
class TemperatureFit:
    """What :meth:`TemperatureScan.compute` finds: the temperature, and the grid it was refined from.

    With ``beta = 1/T``, the fit maximises the mean log score
    ``L(beta) = (1/N) sum_i log softmax(beta z_i)_{y_i}`` (temperature scaling, Guo et al. 2017).

    Attributes:
        temperature: the fitted ``T``, the one to use (``MetricsAccumulator(temperature=...)``,
            ``properlm evaluate --temperature``): the maximiser of ``L``, found between the best
            grid value and its two neighbours (see :class:`TemperatureScan`); the best grid value
            itself when ``on_boundary`` or when the grid holds one value.
        mean_log_prob: ``L`` at ``temperature``. ``ece``: the top-1 ECE at ``temperature``.
            ``bins``: the reliability table at ``temperature``. All three are measured values, never
            interpolated: a scan knows them only when ``temperature`` is a grid value
            (``measured`` true); otherwise they are NaN (``bins`` empty) until
            :meth:`with_metrics` fills them from a second pass over the same data at ``temperature``
            (``properlm evaluate --fit-temperature`` does that pass).
        on_boundary: the best grid value is the grid's smallest or largest (the optimum may lie
            beyond it: widen the grid); no refinement is done then.
        temperatures: the grid, ascending. ``mean_log_probs`` and ``eces``: ``L`` and the ECE at each
            grid value. ``slopes``: ``dL/dbeta = (1/N) sum_i (z_{i,y_i} - E_{p_i}[z_i])`` at each.
        grid_temperature: the best grid value (the fit before refinement);
            ``grid_mean_log_prob`` and ``grid_ece``: ``L`` and the ECE at it.
        num_tokens: scored positions ``N`` of the scan.
        measured: whether ``mean_log_prob``, ``ece`` and ``bins`` hold the values at ``temperature``.
    """

    temperature: float
    mean_log_prob: float
    ece: float
    on_boundary: bool
    temperatures: list[float]
    mean_log_probs: list[float]
    eces: list[float]
    grid_temperature: float = math.nan
    grid_mean_log_prob: float = math.nan
    grid_ece: float = math.nan
    slopes: list[float] = field(default_factory=list)
    num_tokens: int = 0
    bins: list[CalibrationBin] = field(default_factory=list)
    measured: bool = False

    def with_metrics(self, metrics: EvalMetrics, temperature: float) -> TemperatureFit:
        """This fit with ``mean_log_prob``, ``ece`` and ``bins`` taken from ``metrics``.

        ``metrics`` must come from a :class:`MetricsAccumulator` with ``temperature=fit.temperature``
        that scored the same data as the scan; ``temperature`` is that accumulator's temperature,
        and both it and the token count are checked.
        """
        if temperature != self.temperature:
            raise ValueError(f"metrics at temperature {temperature!r} cannot complete a fit at "
                             f"temperature {self.temperature!r}")
        if metrics.num_tokens != self.num_tokens:
            raise ValueError(f"metrics of {metrics.num_tokens} scored positions cannot complete a fit of "
                             f"{self.num_tokens}: score the data the temperature was fitted on")
        return replace(self, mean_log_prob=metrics.mean_log_prob, ece=metrics.ece, bins=list(metrics.bins),
                       measured=True)

    def to_dict(self) -> dict[str, Any]:
        """The fit and the whole scan as a JSON-ready dict."""
        return asdict(self)


def _hermite_max(b0: float, b1: float, f0: float, f1: float, d0: float, d1: float) -> tuple[float, float]:
    """``(x, p(x))`` maximising the cubic Hermite interpolant ``p`` on the segment from ``b0`` to ``b1``.

    ``p`` matches the values ``f0, f1`` and derivatives ``d0, d1`` at the ends; with ``x = b0 + t h``
    (``h = b1 - b0``, ``t`` in ``[0, 1]``), ``dp/dt = A t^2 + B t + C`` with ``A = 3a + 3b - 6D``,
    ``B = 6D - 4a - 2b``, ``C = a`` (``a = h d0``, ``b = h d1``, ``D = f1 - f0``); the candidates are
    the ends and its roots inside the segment.
    """
    h = b1 - b0
    a, b, D = h * d0, h * d1, f1 - f0

    def p(t: float) -> float:
        return f0 + a * t + (3 * D - 2 * a - b) * t * t + (a + b - 2 * D) * t * t * t

    A, B, C = 3 * a + 3 * b - 6 * D, 6 * D - 4 * a - 2 * b, a
    roots: list[float] = []
    if A != 0:
        disc = B * B - 4 * A * C
        if disc >= 0:
            q = -0.5 * (B + math.copysign(math.sqrt(disc), B))  # no cancellation (Numerical Recipes 5.6)
            roots = [q / A] + ([C / q] if q != 0 else [])
    elif B != 0:
        roots = [-C / B]
    t = max([0.0, 1.0, *(r for r in roots if 0 < r < 1)], key=p)
    return b0 + t * h, p(t)


class TemperatureScan:
    """Fits temperature scaling in one streaming pass: the ``T`` maximising the mean log score.

    For logits ``z_i`` (length ``V``) and labels ``y_i`` of ``N`` scored positions, and ``beta = 1/T``,

        L(beta)   = (1/N) sum_i [beta z_{i,y_i} - log sum_j exp(beta z_{i,j})]
        L'(beta)  = (1/N) sum_i (z_{i,y_i} - E_{p_i}[z_i]),      p_i = softmax(beta z_i)
        L''(beta) = -(1/N) sum_i Var_{p_i}[z_i] <= 0

    ``log sum_j exp(beta z_j)`` is convex in ``beta`` (its second derivative is the variance of ``z``
    under ``softmax(beta z)``) and ``beta z_y`` is linear, so ``L`` is concave in ``beta``
    (strictly, unless every row's logits are all equal): it has a single maximum, and if the grid
    value ``beta_k`` is the best of the grid, the maximum lies between its neighbours
    ``beta_{k-1}`` and ``beta_{k+1}``.

    The pass accumulates, for every grid ``T``, ``L``, ``L'`` and the ECE's bin sums (float64 sums
    only, like :class:`MetricsAccumulator`; no logits are kept). :meth:`compute` takes the grid's
    best ``T`` and, unless it is the grid's first or last value, maximises the cubic Hermite
    interpolant of ``L`` (through ``L`` and ``L'`` at both ends) on each of the two segments to its
    neighbours: exact when ``L`` is a cubic in ``beta``; on the default grid (4% steps) the
    interpolation puts ``T`` within about ``1e-5`` relative of the optimum, where the grid alone is
    up to 2% off and a parabola through three grid values of ``L`` about ``1e-4`` to ``1e-3``. The
    float32 arithmetic of the pass adds a relative error of the order of ``1e-7 / |beta^2 L''|``, which
    matters only for an almost flat ``L`` (a nearly uniform model). At the grid's edge
    (``on_boundary``) no refinement is done: the optimum may lie beyond it. The mean log score and
    ECE at a refined ``T`` (between grid values) need a second pass over the data
    (:meth:`TemperatureFit.with_metrics`): they are not smooth enough in ``T`` (the ECE is
    piecewise) to be interpolated exactly, and the logits are not kept.

    Fit ``T`` on validation data, then evaluate the test data with
    ``MetricsAccumulator(..., temperature=fit.temperature)`` (``properlm evaluate
    --fit-temperature`` and ``--temperature``). Scaling by ``T`` keeps the ranking of the tokens
    (accuracy, greedy and beam decoding with the log objective per step) and changes only the
    confidence.

    Cost: per grid value about five elementwise passes over the logits (a scale, an ``exp``, two
    sums, a product), computed in float32 from any input dtype.

    Args:
        temperatures: the grid (positive, finite; default :data:`DEFAULT_TEMPERATURES`).
        num_bins: equal-width confidence bins of the ECE.
        ignore_index: label value of unscored positions.
    """

    def __init__(self, temperatures: Sequence[float] = DEFAULT_TEMPERATURES, num_bins: int = DEFAULT_NUM_BINS,
                 ignore_index: int = -100) -> None:
        if len(temperatures) == 0:
            raise ValueError("temperatures must hold at least one value")
        self.temperatures = sorted({check_temperature(t) for t in temperatures})
        self.num_bins = _check_bins(num_bins)
        self.ignore_index = ignore_index
        k = len(self.temperatures)
        self._n = 0
        self._log_sums = torch.zeros(k, dtype=torch.float64)
        self._slope_sums = torch.zeros(k, dtype=torch.float64)
        self._bins = torch.zeros(k, 3, self.num_bins, dtype=torch.float64)  # count, confidence, correct

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Add the scored positions of one batch: ``logits (..., V)`` aligned with ``labels (...)``."""
        flat_z, flat_y, rows = _scored_rows(logits, labels, self.ignore_index)
        step = max(1, _CHUNK_ELEMENTS // max(flat_z.shape[-1], 1))
        K, M = len(self.temperatures), self.num_bins
        with torch.no_grad():
            for start in range(0, rows.numel(), step):
                idx = rows[start:start + step]
                zc = flat_z[idx].float()  # a copy (index selection), shifted in place
                y = flat_y[idx]
                n = int(idx.numel())
                zc.sub_(zc.amax(dim=-1, keepdim=True))  # z - max z: max 0, so that 1 <= sum_j e_j <= V
                zy = zc.gather(1, y[:, None]).squeeze(1)
                correct = (zc.argmax(dim=-1) == y).cpu()
                zc.clamp_(min=_FLOAT32_MIN)
                buf = torch.empty_like(zc)
                sums = torch.empty(2, K, dtype=torch.float64, device=zc.device)
                conf = torch.empty(K, n, dtype=torch.float32, device=zc.device)
                for k, t in enumerate(self.temperatures):
                    beta = 1.0 / t
                    e = torch.mul(zc, beta, out=buf).exp_()  # e_j = exp(beta (z_j - max z))
                    s = e.sum(dim=-1)
                    sums[0, k] = (beta * zy - s.log()).sum(dtype=torch.float64)  # log p_y
                    sums[1, k] = (zy - e.mul_(zc).sum(dim=-1) / s).sum(dtype=torch.float64)  # z_y - E_p[z]
                    torch.reciprocal(s, out=conf[k])  # top-1 probability exp(0) / s
                self._n += n
                self._log_sums += sums[0].cpu()
                self._slope_sums += sums[1].cpu()
                # the bin sums of all K temperatures by one bincount over K * M bins, on the CPU
                # (deterministic); confidence as in MetricsAccumulator
                conf_cpu = conf.cpu()
                flat = (_bin_index(conf_cpu, M) + torch.arange(K)[:, None] * M).reshape(-1)
                count = torch.bincount(flat, minlength=K * M).double()
                conf_sum = torch.bincount(flat, weights=conf_cpu.reshape(-1).double(), minlength=K * M)
                corr_sum = torch.bincount(flat, weights=correct.double().repeat(K), minlength=K * M)
                self._bins += torch.stack([count, conf_sum, corr_sum]).reshape(3, K, M).transpose(0, 1)

    @property
    def num_tokens(self) -> int:
        """Scored positions seen so far."""
        return self._n

    def compute(self) -> TemperatureFit:
        """The fitted temperature, refined between grid values (NaN fields before any scored position)."""
        nan = float("nan")
        K = len(self.temperatures)
        grid = list(self.temperatures)
        if self._n == 0:
            return TemperatureFit(nan, nan, nan, False, grid, [nan] * K, [nan] * K, slopes=[nan] * K)
        means = (self._log_sums / self._n).tolist()
        slopes = (self._slope_sums / self._n).tolist()
        tables = [[b.tolist() for b in self._bins[i]] for i in range(K)]
        eces = [_ece_from_sums(*tab) for tab in tables]
        best = max(range(K), key=lambda i: means[i])
        on_boundary = K > 1 and best in (0, K - 1)
        temperature = grid[best]
        if K > 1 and not on_boundary:
            temperature = self._refine(best, means, slopes)
        fit = TemperatureFit(temperature=temperature, mean_log_prob=nan, ece=nan, on_boundary=on_boundary,
                             temperatures=grid, mean_log_probs=means, eces=eces, grid_temperature=grid[best],
                             grid_mean_log_prob=means[best], grid_ece=eces[best], slopes=slopes,
                             num_tokens=self._n)
        if temperature == grid[best]:  # a grid value: the scan measured it
            fit = replace(fit, mean_log_prob=means[best], ece=eces[best], bins=_bins_from_sums(*tables[best]),
                          measured=True)
        return fit

    def _refine(self, best: int, means: list[float], slopes: list[float]) -> float:
        """The ``T`` maximising the Hermite interpolant of ``L(beta)`` next to the interior grid value ``best``."""
        t = self.temperatures
        near = (best - 1, best, best + 1)
        if not all(math.isfinite(means[i]) and math.isfinite(slopes[i]) for i in near):
            return t[best]
        b = 1.0 / t[best]
        x, value = b, means[best]
        for j in (best - 1, best + 1):
            xj, vj = _hermite_max(b, 1.0 / t[j], means[best], means[j], slopes[best], slopes[j])
            if vj > value:
                x, value = xj, vj
        if x == b:
            return t[best]
        return min(max(1.0 / x, t[best - 1]), t[best + 1])  # within the neighbours' bracket despite rounding


def reliability_diagram(bins: Sequence[CalibrationBin], path: str | Path, title: str | None = None,
                        ece: float | None = None) -> Path:
    """Write a reliability diagram as a PNG, using matplotlib's Agg backend.

    Accuracy per confidence bin against the diagonal, with the share of tokens per bin below.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lowers = [b.lower for b in bins]
    width = [b.upper - b.lower for b in bins]
    acc = [b.accuracy if b.accuracy is not None else 0.0 for b in bins]
    conf = [b.confidence if b.confidence is not None else (b.lower + b.upper) / 2 for b in bins]
    total = max(1, sum(b.count for b in bins))
    share = [b.count / total for b in bins]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    try:
        ax.bar(lowers, acc, width=width, align="edge", edgecolor="black", color="tab:blue", label="accuracy")
        gap_lo = [min(a, c) for a, c in zip(acc, conf)]
        gap_h = [abs(a - c) if b.count else 0.0 for a, c, b in zip(acc, conf, bins)]
        ax.bar(lowers, gap_h, bottom=gap_lo, width=width, align="edge", color="tab:red", alpha=0.3,
               edgecolor="tab:red", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_ylim(0, 1)
        ax.set_xlim(0, 1)
        ax.set_ylabel("accuracy of top-1 token")
        heading = title or "Reliability diagram"
        if ece is not None and math.isfinite(ece):
            heading += f" (ECE {100 * ece:.2f}%)"
        ax.set_title(heading)
        ax.legend(loc="upper left", fontsize=8)
        ax2.bar(lowers, share, width=width, align="edge", edgecolor="black", color="tab:gray")
        ax2.set_xlabel("confidence of top-1 token")
        ax2.set_ylabel("share of tokens")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
