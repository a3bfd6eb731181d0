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

:class:`MetricsAccumulator` streams over batches and keeps only float64 sums (per-rule score
sums, token and correct counts, and three numbers per bin), so its result does not depend
on how the data were split into batches (up to float rounding).

The calibration (ECE, bins, reliability diagram) is computed by :mod:`properlm.evaluation.calibration`, and
temperature scaling fitted by :mod:`properlm.evaluation.temperature`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..rules import RuleLike, ScoringRule, get_rule
from ..stats import rule_scores
from .calibration import DEFAULT_NUM_BINS, CalibrationBin, bin_sums, bins_from_sums, check_bins, ece_from_sums

__all__ = [
    "EvalMetrics",
    "MetricsAccumulator",
    "check_temperature",
    "perplexity",
    "token_level_outputs",
]


#: float32 elements of one chunk of logits rows (64 MiB)
CHUNK_ELEMENTS = 1 << 24

_LOG = get_rule("logarithmic")


def _unique_rules(rules: Sequence[RuleLike]) -> list[ScoringRule]:
    out: list[ScoringRule] = []
    for r in rules:
        obj = get_rule(r)
        if obj not in out:
            out.append(obj)
    return out


def scored_rows(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
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
            raise ValueError(
                f"labels hold ids outside [0, {V}) (first: {int(flat_y[rows][bad][0])}) "
                f"that are not ignore_index={ignore_index}"
            )
    return flat_z, flat_y, rows


def token_level_outputs(
    logits: Tensor, labels: Tensor, rules: Sequence[RuleLike], ignore_index: int = -100, temperature: float = 1.0
) -> dict[str, Tensor]:
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
    flat_z, flat_y, rows = scored_rows(logits, labels, ignore_index)
    V = flat_z.shape[-1]
    keys = [f"score:{r.spec}" for r in rule_objs]
    parts: dict[str, list[Tensor]] = {k: [] for k in [*keys, "log_prob", "confidence", "correct"]}
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    with torch.no_grad():
        for start in range(0, rows.numel(), step):
            idx = rows[start : start + step]
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
        mean_target_prob: ``(1/N) sum_i p_i(y_i)``, the mean probability of the reference token (how strong
            the model's prior on the targets is).
        target_prob_above_half: fraction of positions with ``p_i(y_i) > 0.5``.
        ece: expected calibration error of the top-1 token.
        mce: maximum calibration error, ``max_b |acc(B_b) - conf(B_b)|`` over non-empty bins.
        bins: the reliability table.
    """

    num_tokens: int
    mean_scores: dict[str, float]
    mean_log_prob: float
    perplexity: float
    accuracy: float
    mean_target_prob: float
    target_prob_above_half: float
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

    def __init__(
        self,
        rules: Sequence[RuleLike] = ("logarithmic", "brier", "spherical"),
        num_bins: int = DEFAULT_NUM_BINS,
        ignore_index: int = -100,
        temperature: float = 1.0,
    ) -> None:
        self.rules = _unique_rules(rules)
        if not self.rules:
            raise ValueError("rules must name at least one scoring rule")
        self.num_bins = check_bins(num_bins)
        self.ignore_index = ignore_index
        self.temperature = check_temperature(temperature)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._n = 0
        self._score_sums = {r.spec: 0.0 for r in self.rules}
        self._log_sum = 0.0
        self._prob_sum = 0.0
        self._above_half = 0
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
        self._prob_sum += float(out["log_prob"].double().exp().sum())
        self._above_half += int((out["log_prob"] > -math.log(2.0)).sum())
        self._correct += int(out["correct"].sum())
        count, conf_sum, corr_sum = bin_sums(out["confidence"].cpu(), out["correct"].cpu(), self.num_bins)
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
        bins = bins_from_sums(count, conf, corr)
        gaps = [abs(b.gap) for b in bins if b.gap is not None]
        mean_log = self._log_sum / n if n else nan
        return EvalMetrics(
            num_tokens=n,
            mean_scores={k: (v / n if n else nan) for k, v in self._score_sums.items()},
            mean_log_prob=mean_log,
            perplexity=perplexity(mean_log) if n else nan,
            accuracy=self._correct / n if n else nan,
            mean_target_prob=self._prob_sum / n if n else nan,
            target_prob_above_half=self._above_half / n if n else nan,
            ece=ece_from_sums(count, conf, corr),
            mce=max(gaps) if gaps else nan,
            bins=bins,
        )


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float if it is positive and finite, else ``ValueError``."""
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t
