"""Calibration of the top-1 token: equal-width confidence bins, the ECE and the reliability diagram.

Expected calibration error with ``M`` equal-width bins ``B_b = ((b-1)/M, b/M]`` (confidence
0 falls in the first bin)::

    ECE = sum_b (|B_b| / N) |acc(B_b) - conf(B_b)|
        = (1/N) sum_b |sum_{i in B_b} correct_i - sum_{i in B_b} conf_i|

The bins are kept as float64 sums (count, confidence sum, correct sum per bin), which
:class:`~properlm.evaluation.metrics.MetricsAccumulator` and
:class:`~properlm.evaluation.temperature.TemperatureScan` stream over batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_NUM_BINS",
    "CalibrationBin",
    "calibration_bins",
    "expected_calibration_error",
    "reliability_diagram",
]

#: equal-width confidence bins of the expected calibration error
DEFAULT_NUM_BINS = 15


@dataclass
class CalibrationBin:
    """One equal-width confidence bin ``(lower, upper]``."""

    lower: float
    upper: float
    count: int
    confidence: float | None  # mean confidence of the bin, None when empty
    accuracy: float | None  # fraction correct, None when empty
    gap: float | None  # accuracy - confidence


def bin_index(confidence: Tensor, num_bins: int) -> Tensor:
    """Bin ``b`` (0-based) of ``((b)/M, (b+1)/M]``; confidence 0 goes to bin 0."""
    idx = torch.ceil(confidence.double() * num_bins).long() - 1
    return idx.clamp_(0, num_bins - 1)


def check_bins(num_bins: int) -> int:
    if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    return num_bins


def bins_from_sums(
    count: Sequence[float], conf_sum: Sequence[float], correct_sum: Sequence[float]
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


def ece_from_sums(count: Sequence[float], conf_sum: Sequence[float], correct_sum: Sequence[float]) -> float:
    total = float(sum(count))
    if total == 0:
        return float("nan")
    return sum(abs(c - s) for c, s in zip(correct_sum, conf_sum)) / total


def bin_sums(confidence: Tensor, correct: Tensor, num_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    idx = bin_index(confidence, num_bins)
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
    check_bins(num_bins)
    _check_calibration_inputs(confidence, correct)
    sums = bin_sums(confidence.reshape(-1), correct.reshape(-1), num_bins)
    return bins_from_sums(*(s.tolist() for s in sums))


def expected_calibration_error(confidence: Tensor, correct: Tensor, num_bins: int = DEFAULT_NUM_BINS) -> float:
    """``ECE = sum_b (|B_b|/N) |acc(B_b) - conf(B_b)|`` over ``num_bins`` equal-width bins.

    ``confidence`` and ``correct`` have the same shape (flattened); NaN for no predictions.
    """
    check_bins(num_bins)
    _check_calibration_inputs(confidence, correct)
    sums = bin_sums(confidence.reshape(-1), correct.reshape(-1), num_bins)
    return ece_from_sums(*(s.tolist() for s in sums))


def reliability_diagram(
    bins: Sequence[CalibrationBin], path: str | Path, title: str | None = None, ece: float | None = None
) -> Path:
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
        ax.bar(
            lowers,
            gap_h,
            bottom=gap_lo,
            width=width,
            align="edge",
            color="tab:red",
            alpha=0.3,
            edgecolor="tab:red",
            label="gap to confidence",
        )
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
