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
  ``per[protocol][seed][key]``: the paired differences are ``d_s = per[p][s][key] - per[baseline][s][key]``;
  :func:`numeric_values` the numbers among ``per_seed[seed][key]``.

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
* :func:`paired_bootstrap_metric`: one of them by metric name: BLEU / chrF (the first), ROUGE F1
  (``rouge1``, ``rouge2``, ``rougeL``; ``_multi``: against all references; the second, in points).

Over models (pairs ``(x_i, y_i)``, ``i = 1..n``):

* :func:`kendall_tau`: Kendall's tau-b, ``(C - D) / sqrt((C + D + T_x) (C + D + T_y))`` with ``C``
  / ``D`` the concordant / discordant pairs ``i < j``, ``T_x`` / ``T_y`` those tied in ``x`` only /
  ``y`` only (pairs tied in both left out); NaN when the denominator is 0.
* :func:`kendall_tau_interval`: tau and a 95% percentile bootstrap interval over ``B`` resamples of
  the ``n`` pairs: of the ``B'`` non-NaN resampled taus sorted ``t_(0) <= ... <= t_(B'-1)``,
  ``[t_(floor(0.025 (B' - 1))), t_(ceil(0.975 (B' - 1)))]``.

Pure functions (``sacrebleu`` and ``numpy`` imported when called): the one statistics module of the studies.
:func:`mean_std`, :func:`mean_ci`, :func:`sign_test`, :func:`paired_bootstrap` and
:func:`paired_bootstrap_means` are :mod:`properlm.evaluation.significance`'s (the library's
``properlm compare --baseline`` reports the same figures).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# the statistics a user of properlm gets too (``properlm compare --baseline``): one implementation
from properlm.evaluation.significance import mean_ci, mean_std, paired_bootstrap, paired_bootstrap_means, sign_test

__all__ = [
    "fmt_ci",
    "fmt_mean_std",
    "kendall_tau",
    "kendall_tau_interval",
    "mean_ci",
    "mean_std",
    "numeric_values",
    "paired_bootstrap",
    "paired_bootstrap_means",
    "paired_bootstrap_metric",
    "seed_differences",
    "seed_values",
    "sign_test",
]


def fmt_mean_std(values: Sequence[float], digits: int = 2, scale: float = 1.0) -> str:
    """``"m ± s"`` over seeds (``"m"`` for one value, ``"-"`` for none)."""
    vals = [float(v) * scale for v in values if v is not None]
    if not vals:
        return "-"
    m, s = mean_std(vals)
    return f"{m:.{digits}f}" if len(vals) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


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


def kendall_tau_interval(
    x: Sequence[float], y: Sequence[float], n_samples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
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


def seed_values(per: dict[str, dict[int, dict[str, Any]]], protocol: str, key: str) -> list[Any]:
    """``per[protocol][seed][key]`` over the seeds that have it (not ``None``)."""
    return [r[key] for r in per.get(protocol, {}).values() if r.get(key) is not None]


def numeric_values(per_seed: dict[Any, dict[str, Any]], key: str) -> list[float]:
    """``per_seed[seed][key]`` over the seeds where it is a number."""
    return [r[key] for r in per_seed.values() if isinstance(r.get(key), (int, float))]


def paired_bootstrap_metric(
    metric: str, base: list[str], system: list[str], refs: tuple[list[str], list[list[str]]], n_samples: int
) -> dict[str, Any]:
    """Paired bootstrap over examples of one metric: sacrebleu's (:func:`paired_bootstrap`) for ``bleu`` /
    ``chrf``, the mean per-example F1's (:func:`paired_bootstrap_means`, in points) for ROUGE (``refs``: the
    single references and the lists of all references; ``_multi``: against all). ``{"delta", "p"}``."""
    if metric in ("bleu", "chrf"):
        bs = paired_bootstrap(base, {"s": system}, refs[0], n_samples=n_samples)["s"]
        return {"delta": bs[metric] - bs[f"{metric}_baseline"], "p": bs[f"{metric}_p"]}
    from properlm.evaluation.text_metrics import rouge_per_example

    kind = metric.replace("_multi", "")
    r = refs[1] if metric.endswith("_multi") else refs[0]
    a, b = rouge_per_example(base, r)[kind], rouge_per_example(system, r)[kind]
    bs = paired_bootstrap_means(a, b, n_samples=n_samples)
    return {"delta": 100 * bs["delta"], "p": bs["p"]}


def seed_differences(
    per: dict[str, dict[int, dict[str, Any]]], protocol: str, key: str, seeds: Sequence[int], baseline: str = "a"
) -> tuple[list[int], list[float]]:
    """The seeds (of ``seeds``) where both ``protocol`` and ``baseline`` have ``key``, and per seed the
    difference ``per[protocol][seed][key] - per[baseline][seed][key]``."""
    both = [
        s
        for s in seeds
        if per[protocol].get(s, {}).get(key) is not None and per[baseline].get(s, {}).get(key) is not None
    ]
    return both, [per[protocol][s][key] - per[baseline][s][key] for s in both]


def fmt_ci(m: float, lo: float, hi: float, digits: int = 2, *, missing: str | None = None) -> str:
    """``"+m [+lo, +hi]"``, or ``"+m"`` when the interval is NaN (fewer than two seeds); ``missing``
    (when given) instead of ``"+nan"`` when the mean itself is NaN (no seeds)."""
    if missing is not None and m != m:
        return missing
    return f"{m:+.{digits}f}" if lo != lo else f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
