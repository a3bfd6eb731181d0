"""Statistics of the reproduction benchmarks (``reproduce_mt.py``, ``reproduce_summ.py``, ``reproduce_llm.py``).

Over seeds (a seed, a whole training run, is the unit of evidence), for values ``x_1..x_n`` (``None``
and NaN dropped):

* :func:`mean_std`: ``m = sum_i x_i / n`` and the sample standard deviation
  ``s = sqrt(sum_i (x_i - m)^2 / (n - 1))`` (``s = 0`` for ``n = 1``; both NaN for ``n = 0``);
  :func:`fmt_mean_std` writes ``"m ± s"``.
* :func:`mean_ci`: ``m`` and its 95% Student-t interval ``m -+ t_{0.975, n-1} s / sqrt(n)``
  (``t`` from a table for ``n - 1 <= 30`` degrees of freedom, 1.96 beyond; NaN for ``n < 2``);
  :func:`fmt_ci` writes ``"+m [+lo, +hi]"``.
* :func:`sign_test`: two-sided exact sign test of per-seed differences, with ``n`` nonzero
  differences of which ``k`` are positive: ``p = min(1, 2 P(X >= max(k, n - k)))``,
  ``X ~ Binomial(n, 1/2)``, i.e. ``P(X >= j) = sum_{i >= j} C(n, i) / 2^n``.
* :func:`seed_values` and :func:`seed_differences` pick those values out of
  ``per[protocol][seed][key]``: the paired differences are ``d_s = per[p][s][key] - per[baseline][s][key]``.

Over the sentences or documents of a test set (the per-seed evidence), ``B`` resamples of ``n``
items drawn with replacement, the same items for both systems:

* :func:`paired_bootstrap`: sacrebleu's paired bootstrap (Koehn 2004, ``sacrebleu --paired-bs``;
  ``SACREBLEU_SEED``, default 12345) of corpus BLEU and chrF2 against a baseline: with
  ``D = |score_sys - score_base|`` on the test set and ``D*_b`` the same on resample ``b``,
  ``p = (1 + #{b : D*_b - mean_b' D*_b' > D}) / (B + 1)``.
* :func:`paired_bootstrap_means`: the same for a mean per-document score (e.g. ROUGE F1), with
  ``d_i = system_i - baseline_i``: ``delta = mean_i d_i``, the 2.5% and 97.5% percentiles of the
  resampled means ``mean*_b``, and ``p = min(1, 2 (1 + #{b : mean*_b on the other side of 0 from
  delta, or at 0}) / (B + 1))`` (1 when ``delta = 0``).

Over models (pairs ``(x_i, y_i)``, ``i = 1..n``):

* :func:`kendall_tau`: Kendall's tau-b, ``(C - D) / sqrt((C + D + T_x) (C + D + T_y))`` with ``C``
  / ``D`` the concordant / discordant pairs ``i < j``, ``T_x`` / ``T_y`` those tied in ``x`` only /
  ``y`` only (pairs tied in both left out); NaN when the denominator is 0.
* :func:`kendall_tau_interval`: tau and a 95% percentile bootstrap interval over ``B`` resamples of
  the ``n`` pairs: of the ``B'`` non-NaN resampled taus sorted ``t_(0) <= ... <= t_(B'-1)``,
  ``[t_(floor(0.025 (B' - 1))), t_(ceil(0.975 (B' - 1)))]``.

Pure functions (``sacrebleu`` and ``numpy`` imported when called); :mod:`_runner` re-exports them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["fmt_ci", "fmt_mean_std", "kendall_tau", "kendall_tau_interval", "mean_ci", "mean_std", "paired_bootstrap",
           "paired_bootstrap_means", "seed_differences", "seed_values", "sign_test"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for no values."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def fmt_mean_std(values: Sequence[float], digits: int = 2, scale: float = 1.0) -> str:
    """``"m ± s"`` over seeds (``"m"`` for one value, ``"-"`` for none)."""
    vals = [float(v) * scale for v in values if v is not None]
    if not vals:
        return "-"
    m, s = mean_std(vals)
    return f"{m:.{digits}f}" if len(vals) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def paired_bootstrap(baseline: Sequence[str], systems: dict[str, Sequence[str]], references: Sequence[str],
                     *, n_samples: int = 1000, tokenize: str | None = None) -> dict[str, dict[str, Any]]:
    """Paired bootstrap resampling (Koehn 2004, as in ``sacrebleu --paired-bs``) of BLEU and
    chrF of each system against ``baseline``: ``{system: {"bleu": score, "bleu_p": p, "chrf": ...}}``.
    The p-value is the probability, under resampling, that the difference is not real."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    metrics = {"BLEU": BLEU(tokenize=tokenize) if tokenize else BLEU(), "chrF": CHRF()}
    named = [("baseline", list(baseline))] + [(k, list(v)) for k, v in systems.items()]
    test = PairedTest(named, metrics, [list(references)], test_type="bs", n_samples=n_samples)
    _, scores = test()
    chrf_key = next(k for k in scores if k.startswith("chrF"))  # sacrebleu names it "chrF2" (beta = 2)
    out: dict[str, dict[str, Any]] = {}
    for i, (name, _) in enumerate(named[1:], start=1):
        out[name] = {"bleu": scores["BLEU"][i].score, "bleu_p": scores["BLEU"][i].p_value,
                     "chrf": scores[chrf_key][i].score, "chrf_p": scores[chrf_key][i].p_value}
    return out


#: two-sided 95% quantiles t_{0.975, df} of Student's t, df = 1..30 (larger df: 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and its 95% Student-t interval ``(mean, low, high)`` over seeds:
    ``mean -+ t_{0.975, n-1} s / sqrt(n)``; the interval is ``(nan, nan)`` for fewer than 2 values."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    m, s = mean_std(vals)
    if len(vals) < 2:
        return m, math.nan, math.nan
    t = _T975[len(vals) - 2] if len(vals) - 1 <= len(_T975) else 1.96
    half = t * s / math.sqrt(len(vals))
    return m, m - half, m + half


def sign_test(values: Sequence[float]) -> float:
    """Two-sided exact sign test of "positive and negative differences are equally likely":
    ``min(1, 2 P(X >= max(k, n - k)))`` for ``X ~ Binomial(n, 1/2)``, ``k`` the positive values,
    zeros dropped; 1.0 for no nonzero value."""
    nonzero = [v for v in values if v != 0]
    n, k = len(nonzero), sum(v > 0 for v in nonzero)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(max(k, n - k), n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of paired values (ties in either variable corrected for); NaN when
    either variable is constant."""
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else math.nan


def kendall_tau_interval(x: Sequence[float], y: Sequence[float], n_samples: int = 1000,
                         seed: int = 0) -> tuple[float, float, float]:
    """Kendall's tau and a 95% percentile bootstrap interval, resampling the models (pairs)."""
    import random

    rng = random.Random(seed)
    tau = kendall_tau(x, y)
    n = len(x)
    draws = []
    for _ in range(n_samples):
        idx = [rng.randrange(n) for _ in range(n)]
        t = kendall_tau([x[i] for i in idx], [y[i] for i in idx])
        if not math.isnan(t):
            draws.append(t)
    if not draws:
        return tau, math.nan, math.nan
    draws.sort()
    return tau, draws[int(0.025 * (len(draws) - 1))], draws[math.ceil(0.975 * (len(draws) - 1))]


def paired_bootstrap_means(baseline: Sequence[float], system: Sequence[float], *, n_samples: int = 1000,
                           seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap over documents of a mean per-document score (e.g. ROUGE F1).

    With per-document differences ``d_i = system_i - baseline_i`` (``n`` documents), each of
    ``n_samples`` resamples draws ``n`` documents with replacement and takes the mean of their
    ``d``. Returns ``{"delta": mean(d), "ci95": [2.5%, 97.5%] percentiles of the resampled means,
    "p": two-sided p}`` with ``p = min(1, 2 (1 + #{resampled means on the other side of 0 from delta,
    or at 0}) / (n_samples + 1))`` (1.0 when ``delta`` is 0): small when the difference keeps its
    sign under resampling.
    """
    import numpy as np

    if len(baseline) != len(system) or not baseline:
        raise ValueError(f"paired scores needed: {len(baseline)} baseline vs {len(system)} system values")
    d = np.asarray(system, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    delta = float(d.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(n_samples)
    for start in range(0, n_samples, 100):  # 100 resamples at a time: n_docs x 100 indices in memory
        k = min(100, n_samples - start)
        means[start:start + k] = d[rng.integers(0, len(d), size=(k, len(d)))].mean(axis=1)
    if delta == 0:
        p = 1.0
    else:
        other = int((means <= 0).sum()) if delta > 0 else int((means >= 0).sum())
        p = min(1.0, 2 * (1 + other) / (n_samples + 1))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"delta": delta, "ci95": [float(lo), float(hi)], "p": p}


def seed_values(per: dict[str, dict[int, dict[str, Any]]], protocol: str, key: str) -> list[Any]:
    """``per[protocol][seed][key]`` over the seeds that have it (not ``None``)."""
    return [r[key] for r in per.get(protocol, {}).values() if r.get(key) is not None]


def seed_differences(per: dict[str, dict[int, dict[str, Any]]], protocol: str, key: str, seeds: Sequence[int],
                     baseline: str = "a") -> tuple[list[int], list[float]]:
    """The seeds (of ``seeds``) where both ``protocol`` and ``baseline`` have ``key``, and per seed the
    difference ``per[protocol][seed][key] - per[baseline][seed][key]``."""
    both = [s for s in seeds if per[protocol].get(s, {}).get(key) is not None
            and per[baseline].get(s, {}).get(key) is not None]
    return both, [per[protocol][s][key] - per[baseline][s][key] for s in both]


def fmt_ci(m: float, lo: float, hi: float, digits: int = 2, *, missing: str | None = None) -> str:
    """``"+m [+lo, +hi]"``, or ``"+m"`` when the interval is NaN (fewer than two seeds); ``missing``
    (when given) instead of ``"+nan"`` when the mean itself is NaN (no seeds)."""
    if missing is not None and m != m:
        return missing
    return f"{m:+.{digits}f}" if lo != lo else f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
