"""Did it help? The difference between two systems, over the examples of a test set and over seeds.

A training run is one draw of its seed: two runs that differ in the scoring rule also differ by
the luck of their initialisation, data order and dropout, and on our Multi30k study that luck
was as large as the effect. So a difference is reported at two levels:

Over the ``n`` examples of one test set (is this run's difference more than the test set's noise?),
``B`` resamples of ``n`` examples drawn with replacement, the same examples for both systems:

* :func:`paired_bootstrap`: sacrebleu's paired bootstrap (Koehn 2004, ``sacrebleu --paired-bs``,
  ``SACREBLEU_SEED``, default 12345) of corpus BLEU and chrF against a baseline: with
  ``D = |score_sys - score_base|`` on the test set and ``D*_b`` on resample ``b``,
  ``p = (1 + #{b : D*_b - mean_b' D*_b' > D}) / (B + 1)`` (``p = 1`` when ``D = 0``).
* :func:`paired_bootstrap_means`: the same for a mean per-example score (e.g. ROUGE F1): with
  ``d_i = system_i - baseline_i``, ``delta = mean_i d_i``, the 2.5% and 97.5% percentiles of the
  resampled means ``mean*_b`` and ``p = min(1, 2 (1 + #{b : mean*_b on the other side of 0 from
  delta, or at 0}) / (B + 1))`` (1 when ``delta = 0``).

Over seeds (is the difference more than the seed's luck?), for per-seed values ``x_1..x_n``
(``None`` and NaN dropped):

* :func:`mean_std`: ``m = sum_i x_i / n`` and ``s = sqrt(sum_i (x_i - m)^2 / (n - 1))`` (``s = 0``
  for ``n = 1``, both NaN for ``n = 0``).
* :func:`mean_ci`: ``m`` and its 95% Student-t interval ``m -+ t_{0.975, n-1} s / sqrt(n)`` (NaN for
  ``n < 2``).
* :func:`sign_test`: two-sided exact sign test of ``n`` nonzero differences of which ``k`` are
  positive, ``p = min(1, 2 P(X >= max(k, n - k)))``, ``X ~ Binomial(n, 1/2)``.
* :func:`compare_seeds`: all of these for paired per-seed values of a system and a baseline, as a
  :class:`SeedComparison` (``d_s = system_s - baseline_s``).

``properlm compare --baseline`` reports both levels for runs evaluated by ``properlm evaluate``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "SeedComparison",
    "compare_seeds",
    "mean_ci",
    "mean_std",
    "paired_bootstrap",
    "paired_bootstrap_means",
    "sign_test",
]

#: two-sided 95% quantiles t_{0.975, df} of Student's t, df = 1..30 (larger df: 1.96)
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for no values."""
    vals = _finite(values)
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def mean_ci(values: Sequence[float | None]) -> tuple[float, float, float]:
    """Mean and its 95% Student-t interval ``(mean, low, high)``.

    ``mean -+ t_{0.975, n-1} s / sqrt(n)``; the interval is ``(nan, nan)`` for fewer than 2 values.
    """
    vals = _finite(values)
    m, s = mean_std(vals)
    if len(vals) < 2:
        return m, math.nan, math.nan
    t = _T975[len(vals) - 2] if len(vals) - 1 <= len(_T975) else 1.96
    half = t * s / math.sqrt(len(vals))
    return m, m - half, m + half


def sign_test(values: Sequence[float]) -> float:
    """Two-sided exact sign test of "positive and negative differences are equally likely".

    ``min(1, 2 P(X >= max(k, n - k)))`` for ``X ~ Binomial(n, 1/2)``, ``k`` the positive values,
    zeros dropped; 1.0 for no nonzero value. With 3 seeds the smallest p is 0.25, with 6 it is
    0.031: a sign test needs about 6 seeds to say anything.
    """
    nonzero = [v for v in values if v != 0]
    n, k = len(nonzero), sum(v > 0 for v in nonzero)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(max(k, n - k), n + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class SeedComparison:
    """A system against a baseline over seeds (:func:`compare_seeds`).

    Attributes:
        deltas: per seed ``d_s = system_s - baseline_s``, in the order given.
        mean: ``mean_s d_s``.
        ci95: the 95% Student-t interval of ``mean`` (``(nan, nan)`` for one seed).
        seeds_ahead: how many ``d_s > 0``.
        sign_test_p: :func:`sign_test` of ``deltas``.
    """

    deltas: tuple[float, ...]
    mean: float
    ci95: tuple[float, float]
    seeds_ahead: int
    sign_test_p: float

    @property
    def num_seeds(self) -> int:
        """The number of seeds compared."""
        return len(self.deltas)

    def to_dict(self) -> dict[str, Any]:
        """The fields and ``num_seeds`` as JSON-ready values."""
        return {**asdict(self), "deltas": list(self.deltas), "ci95": list(self.ci95), "num_seeds": self.num_seeds}


def compare_seeds(baseline: Sequence[float], system: Sequence[float]) -> SeedComparison:
    """Compare paired per-seed values: ``system[s]`` and ``baseline[s]`` come from runs of seed ``s``.

    Returns a :class:`SeedComparison`. Raises ``ValueError`` unless both hold the same number (at least one) of
    finite values."""
    if len(baseline) != len(system) or not baseline:
        raise ValueError(f"paired per-seed values needed: {len(baseline)} baseline vs {len(system)} system values")
    if len(_finite(baseline)) != len(baseline) or len(_finite(system)) != len(system):
        raise ValueError("per-seed values must be finite numbers")
    deltas = tuple(float(s) - float(b) for b, s in zip(baseline, system))
    m, lo, hi = mean_ci(deltas)
    return SeedComparison(deltas, m, (lo, hi), sum(d > 0 for d in deltas), sign_test(deltas))


def paired_bootstrap(
    baseline: Sequence[str],
    systems: Mapping[str, Sequence[str]],
    references: Sequence[str],
    *,
    target_lang: str | None = None,
    n_samples: int = 1000,
) -> dict[str, dict[str, float]]:
    """Paired bootstrap of corpus BLEU and chrF of each system against ``baseline``.

    ``sacrebleu``'s ``PairedTest``, as ``sacrebleu --paired-bs``.

    Args:
        baseline: ``n`` hypotheses of the baseline system.
        systems: name -> ``n`` hypotheses, in the same example order.
        references: the ``n`` references (one each).
        target_lang: picks sacrebleu's BLEU tokenizer
            (:func:`~properlm.evaluation.text_metrics.bleu_metric`; ``None``: 13a).
        n_samples: bootstrap resamples ``B``.

    Returns ``{name: {"bleu", "bleu_baseline", "bleu_p", "chrf", "chrf_baseline", "chrf_p"}}``; the
    p-value is the probability under resampling that a difference as large arises by chance. It is
    sacrebleu's, except that a system scoring exactly the baseline's score gets ``p = 1`` (sacrebleu,
    following multeval, gives it the smallest p, ``1 / (B + 1)``).
    """
    from sacrebleu.metrics import CHRF
    from sacrebleu.significance import PairedTest

    from .text_metrics import bleu_metric, one_line

    n = len(references)
    if n == 0:
        raise ValueError("no references to score")
    for name, hyps in [("baseline", baseline), *systems.items()]:
        if len(hyps) != n:
            raise ValueError(f"{name}: {len(hyps)} hypotheses but {n} references")
    metrics = {"BLEU": bleu_metric(target_lang), "chrF": CHRF()}
    named: list[tuple[str, Sequence[str]]] = [("baseline", [one_line(h) for h in baseline])]
    named += [(k, [one_line(h) for h in v]) for k, v in systems.items()]
    test = PairedTest(named, metrics, [[one_line(r) for r in references]], test_type="bs", n_samples=n_samples)
    scores: Any = test()[1]  # {metric name: [Result of the baseline, of each system]}
    chrf_key = next(k for k in scores if k.startswith("chrF"))  # sacrebleu names it "chrF2" (beta = 2)
    out: dict[str, dict[str, float]] = {}
    for i, (name, _) in enumerate(named[1:], start=1):
        row: dict[str, float] = {}
        for key, metric in (("bleu", "BLEU"), ("chrf", chrf_key)):
            base, system = scores[metric][0].score, scores[metric][i].score
            # sacrebleu (after multeval) gives a zero difference its smallest p; no difference is no evidence
            row.update(
                {key: system, f"{key}_baseline": base, f"{key}_p": 1.0 if system == base else scores[metric][i].p_value}
            )
        out[name] = row
    return out


def paired_bootstrap_means(
    baseline: Sequence[float], system: Sequence[float], *, n_samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Paired bootstrap over examples of a mean per-example score (e.g. ROUGE F1).

    With per-example differences ``d_i = system_i - baseline_i`` (``n`` examples), each of
    ``n_samples`` resamples draws ``n`` examples with replacement and takes the mean of their ``d``.
    Returns ``{"delta": mean(d), "ci95": [2.5%, 97.5%] percentiles of the resampled means, "p": two-sided
    p}`` with ``p = min(1, 2 (1 + #{resampled means on the other side of 0 from delta, or at 0}) /
    (n_samples + 1))`` (1.0 when ``delta`` is 0): small when the difference keeps its sign under
    resampling.
    """
    import numpy as np

    if len(baseline) != len(system) or not baseline:
        raise ValueError(f"paired scores needed: {len(baseline)} baseline vs {len(system)} system values")
    d = np.asarray(system, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    delta = float(d.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(n_samples)
    for start in range(0, n_samples, 100):  # 100 resamples at a time: n x 100 indices in memory
        k = min(100, n_samples - start)
        means[start : start + k] = d[rng.integers(0, len(d), size=(k, len(d)))].mean(axis=1)
    if delta == 0:
        p = 1.0
    else:
        other = int((means <= 0).sum()) if delta > 0 else int((means >= 0).sum())
        p = min(1.0, 2 * (1 + other) / (n_samples + 1))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"delta": delta, "ci95": [float(lo), float(hi)], "p": p}
