"""Temperature scaling: the scan that fits ``T`` for ``softmax(z / T)`` in one streaming pass.

:class:`TemperatureScan` streams the mean log score, its slope in ``1/T`` and the ECE of ``softmax(z / T)``
for a grid of ``T`` in one pass, takes the grid's best ``T`` and refines it between its neighbours to the
``T`` with the best log score (fit it on validation data);
``MetricsAccumulator(..., temperature=T)`` (:mod:`properlm.evaluation.metrics`) then scores ``softmax(z / T)``.
Scaling keeps the ranking of the tokens and changes only the confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from . import metrics as _metrics
from .calibration import DEFAULT_NUM_BINS, CalibrationBin, bin_index, bins_from_sums, check_bins, ece_from_sums
from .metrics import EvalMetrics, check_temperature, scored_rows

__all__ = ["DEFAULT_TEMPERATURES", "TemperatureFit", "TemperatureScan"]

#: temperatures scanned by :class:`TemperatureScan` by default: 81 values, log-spaced from 0.2 to 5
#: (neighbours 4% apart); the fit is refined between them
DEFAULT_TEMPERATURES: tuple[float, ...] = tuple(
    float(t) for t in torch.logspace(math.log10(0.2), math.log10(5.0), 81, dtype=torch.float64)
)

#: the most negative finite float32: a ``-inf`` logit (masked vocabulary) is clamped to it in the
#: scan, so that ``p_j z_j`` is ``0 * finite = 0`` there instead of ``0 * -inf = NaN``
_FLOAT32_MIN = torch.finfo(torch.float32).min


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
            raise ValueError(
                f"metrics at temperature {temperature!r} cannot complete a fit at temperature {self.temperature!r}"
            )
        if metrics.num_tokens != self.num_tokens:
            raise ValueError(
                f"metrics of {metrics.num_tokens} scored positions cannot complete a fit of "
                f"{self.num_tokens}: score the data the temperature was fitted on"
            )
        return replace(
            self, mean_log_prob=metrics.mean_log_prob, ece=metrics.ece, bins=list(metrics.bins), measured=True
        )

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

    def __init__(
        self,
        temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
        num_bins: int = DEFAULT_NUM_BINS,
        ignore_index: int = -100,
    ) -> None:
        if len(temperatures) == 0:
            raise ValueError("temperatures must hold at least one value")
        self.temperatures = sorted({check_temperature(t) for t in temperatures})
        self.num_bins = check_bins(num_bins)
        self.ignore_index = ignore_index
        k = len(self.temperatures)
        self._n = 0
        self._log_sums = torch.zeros(k, dtype=torch.float64)
        self._slope_sums = torch.zeros(k, dtype=torch.float64)
        self._bins = torch.zeros(k, 3, self.num_bins, dtype=torch.float64)  # count, confidence, correct

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Add the scored positions of one batch: ``logits (..., V)`` aligned with ``labels (...)``."""
        flat_z, flat_y, rows = scored_rows(logits, labels, self.ignore_index)
        step = max(1, _metrics.CHUNK_ELEMENTS // max(flat_z.shape[-1], 1))  # read at call time: patchable
        K, M = len(self.temperatures), self.num_bins
        with torch.no_grad():
            for start in range(0, rows.numel(), step):
                idx = rows[start : start + step]
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
                flat = (bin_index(conf_cpu, M) + torch.arange(K)[:, None] * M).reshape(-1)
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
        eces = [ece_from_sums(*tab) for tab in tables]
        best = max(range(K), key=lambda i: means[i])
        on_boundary = K > 1 and best in (0, K - 1)
        temperature = grid[best]
        if K > 1 and not on_boundary:
            temperature = self._refine(best, means, slopes)
        fit = TemperatureFit(
            temperature=temperature,
            mean_log_prob=nan,
            ece=nan,
            on_boundary=on_boundary,
            temperatures=grid,
            mean_log_probs=means,
            eces=eces,
            grid_temperature=grid[best],
            grid_mean_log_prob=means[best],
            grid_ece=eces[best],
            slopes=slopes,
            num_tokens=self._n,
        )
        if temperature == grid[best]:  # a grid value: the scan measured it
            fit = replace(
                fit, mean_log_prob=means[best], ece=eces[best], bins=bins_from_sums(*tables[best]), measured=True
            )
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
