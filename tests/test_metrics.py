"""Teacher-forced metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from properlm.loss import token_scores
from properlm.metrics import (
    MetricsAccumulator,
    TemperatureScan,
    calibration_bins,
    expected_calibration_error,
    reliability_diagram,
    token_level_outputs,
)

# 5 predictions: bins of width 1/15, right-closed: 0.9, 0.92 -> bin 13; 0.3, 0.31 -> bin 4; 0.62 -> bin 9
CONF = torch.tensor([0.9, 0.92, 0.3, 0.31, 0.62], dtype=torch.float64)
CORRECT = torch.tensor([True, False, False, True, True])


def test_ece_by_hand():
    # bin 13: acc 1/2, conf 0.91 -> |gap| 0.41 (2 of 5); bin 4: acc 1/2, conf 0.305 -> 0.195 (2 of 5);
    # bin 9: acc 1, conf 0.62 -> 0.38 (1 of 5)
    expected = 0.4 * 0.41 + 0.4 * 0.195 + 0.2 * 0.38
    assert expected_calibration_error(CONF, CORRECT) == pytest.approx(0.318, abs=1e-12)
    assert expected_calibration_error(CONF, CORRECT) == pytest.approx(expected, abs=1e-12)
    # one bin: |mean correct - mean conf|
    assert expected_calibration_error(CONF, CORRECT, num_bins=1) == pytest.approx(abs(0.6 - 0.61), abs=1e-12)


def test_bin_table_by_hand():
    table = calibration_bins(CONF, CORRECT)
    assert len(table) == 15
    assert [b.count for b in table] == [0, 0, 0, 0, 2, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0]
    assert table[4].lower == pytest.approx(4 / 15) and table[4].upper == pytest.approx(5 / 15)
    assert table[4].confidence == pytest.approx(0.305) and table[4].accuracy == pytest.approx(0.5)
    assert table[9].confidence == pytest.approx(0.62) and table[9].accuracy == 1.0
    assert table[9].gap == pytest.approx(0.38)
    assert table[13].confidence == pytest.approx(0.91) and table[13].accuracy == 0.5
    assert table[0].confidence is None and table[0].accuracy is None and table[0].gap is None


def test_bin_edges_are_right_closed():
    conf = torch.tensor([0.0, 1.0, 1 / 15, 0.5], dtype=torch.float64)
    table = calibration_bins(conf, torch.tensor([True, True, False, False]))
    assert table[0].count == 2  # 0 and exactly 1/15 fall in (0, 1/15] (0 joins the first bin)
    assert table[14].count == 1  # 1.0
    assert table[7].count == 1  # 0.5 in (7/15, 8/15]


def test_bad_calibration_inputs():
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(CONF, CORRECT, num_bins=0)
    with pytest.raises(ValueError, match="shape"):
        expected_calibration_error(CONF, CORRECT[:3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(torch.tensor([1.5]), torch.tensor([True]))
    assert math.isnan(expected_calibration_error(torch.zeros(0), torch.zeros(0, dtype=torch.bool)))


def _fixed_output():
    """Two scored positions of a fixed model output (and one ignored), as (1, 3, V) logits."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.15, 0.75], [0.2, 0.2, 0.6]], dtype=torch.float64)
    logits = (torch.log(p) + 1.7).float()[None]  # any shift: softmax recovers p
    labels = torch.tensor([[0, 1, -100]])
    return logits, labels


def test_mean_scores_of_fixed_output_by_hand():
    logits, labels = _fixed_output()
    acc = MetricsAccumulator(["brier", "spherical", "power:3", "logarithmic"])
    acc.update(logits, labels)
    m = acc.compute()
    assert m.num_tokens == 2
    # Brier 2 p_y - sum p^2: 1.0 - 0.38 = 0.62 and 0.3 - 0.595 = -0.295
    assert m.mean_scores["brier"] == pytest.approx((0.62 - 0.295) / 2, abs=1e-6)
    # spherical p_y / ||p||
    assert m.mean_scores["spherical"] == pytest.approx((0.5 / math.sqrt(0.38) + 0.15 / math.sqrt(0.595)) / 2, abs=1e-6)
    # power:3 3 p_y^2 - 2 sum p^3: 0.75 - 0.32 = 0.43 and 0.0675 - 0.8525 = -0.785
    assert m.mean_scores["power:3"] == pytest.approx((0.43 - 0.785) / 2, abs=1e-6)
    assert m.mean_scores["logarithmic"] == pytest.approx((math.log(0.5) + math.log(0.15)) / 2, abs=1e-6)
    assert m.mean_log_prob == pytest.approx((math.log(0.5) + math.log(0.15)) / 2, abs=1e-6)
    assert m.perplexity == pytest.approx(1 / math.sqrt(0.5 * 0.15), rel=1e-6)
    assert m.accuracy == 0.5  # argmax 0 == 0; argmax 2 != 1
    # confidences 0.5 (bin 7, correct) and 0.75 (bin 11, wrong): ECE = (0.5 + 0.75) / 2
    assert m.ece == pytest.approx(0.625, abs=1e-6)
    assert m.mce == pytest.approx(0.75, abs=1e-6)
    assert [b.count for b in m.bins if b.count] == [1, 1]
    assert m.bins[7].count == 1 and m.bins[11].count == 1


def test_accumulator_over_batches_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 9, 50, generator=g)
    labels = torch.randint(0, 50, (6, 9), generator=g)
    labels[torch.rand(6, 9, generator=g) < 0.3] = -100
    logits[0, 0, 5] = -math.inf  # a masked vocabulary entry
    rules = ["logarithmic", "brier", "spherical", "power:3", "pseudo-spherical:1.5"]
    one = MetricsAccumulator(rules)
    one.update(logits, labels)
    streamed = MetricsAccumulator(rules)
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):
        streamed.update(logits[sl], labels[sl])
    a, b = one.compute(), streamed.compute()
    assert a.num_tokens == b.num_tokens == int((labels != -100).sum())
    for k in a.mean_scores:
        assert b.mean_scores[k] == pytest.approx(a.mean_scores[k], abs=1e-12)
        # the same numbers as the core's token_scores
        ref = token_scores(logits, labels, k).sum() / a.num_tokens
        assert a.mean_scores[k] == pytest.approx(float(ref), abs=1e-5)
    assert b.ece == pytest.approx(a.ece, abs=1e-12)
    assert b.accuracy == a.accuracy and b.perplexity == pytest.approx(a.perplexity, rel=1e-12)
    assert [x.count for x in a.bins] == [x.count for x in b.bins]
    assert all(math.isfinite(v) for v in a.mean_scores.values())
    # ECE of the streamed sums equals the functional ECE of the per-token outputs
    out = token_level_outputs(logits, labels, rules)
    assert a.ece == pytest.approx(expected_calibration_error(out["confidence"], out["correct"]), abs=1e-12)


def test_accumulator_errors_and_empty():
    with pytest.raises(ValueError, match="unknown scoring rule"):
        MetricsAccumulator(["nope"])
    acc = MetricsAccumulator(["spherical"])
    with pytest.raises(ValueError, match="shape mismatch"):
        acc.update(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        acc.update(torch.zeros(2, 5), torch.tensor([1, 7]))
    acc.update(torch.zeros(2, 5), torch.tensor([-100, -100]))
    m = acc.compute()
    assert m.num_tokens == 0 and math.isnan(m.ece) and math.isnan(m.mean_scores["spherical"])


def test_reliability_diagram_png(tmp_path):
    path = reliability_diagram(calibration_bins(CONF, CORRECT), tmp_path / "sub" / "rel.png", ece=0.318)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_label_on_masked_entry():
    logits = torch.tensor([[0.0, 1.0, -math.inf], [2.0, 0.0, 0.0]])
    acc = MetricsAccumulator(["logarithmic", "spherical"])
    acc.update(logits, torch.tensor([2, 0]))
    m = acc.compute()
    assert m.mean_log_prob == -math.inf and m.perplexity == math.inf
    ref = float(token_scores(logits[1:], torch.tensor([0]), "spherical")) / 2
    assert m.mean_scores["spherical"] == pytest.approx(ref)
    assert math.isfinite(m.ece) and sum(b.count for b in m.bins) == 2


# ---------------------------------------------------------------------------- temperature scaling
def _overconfident(n=4000, V=12, sharpen=2.5, seed=0):
    """Labels drawn from softmax(z0); the model reports sharpen * z0 (over-confident by T = sharpen)."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, V, generator=g, dtype=torch.float64) * 1.5
    y = torch.multinomial(torch.softmax(z0, -1), 1, generator=g).squeeze(1)
    return (z0 * sharpen).float(), y


def test_temperature_scan_recovers_the_true_temperature():
    logits, y = _overconfident()
    y[::7] = -100  # ignored positions take no part
    scan = TemperatureScan()
    for a in range(0, 4000, 1000):  # streaming equals one shot
        scan.update(logits[a:a + 1000], y[a:a + 1000])
    fit = scan.compute()
    assert scan.num_tokens == int((y != -100).sum())
    assert abs(math.log(fit.temperature / 2.5)) < 0.1 and not fit.on_boundary
    one = MetricsAccumulator(["logarithmic"])
    one.update(logits, y)
    at_1 = one.compute()
    assert fit.mean_log_prob > at_1.mean_log_prob and fit.ece < at_1.ece / 3
    # the scan's value at its T equals MetricsAccumulator with that temperature
    scaled = MetricsAccumulator(["logarithmic"], temperature=fit.temperature)
    scaled.update(logits, y)
    m = scaled.compute()
    assert m.mean_log_prob == pytest.approx(fit.mean_log_prob, rel=1e-6)
    assert m.ece == pytest.approx(fit.ece, rel=1e-6)
    assert m.accuracy == at_1.accuracy  # scaling keeps the ranking


def test_token_level_outputs_temperature_scales_each_chunk():
    """temperature=T scores softmax(z / T) from any input dtype, as dividing the float32 logits first."""
    logits, y = _overconfident(n=300, V=50)
    y[::5] = -100
    for dtype in (torch.float32, torch.bfloat16):
        z = logits.to(dtype)
        got = token_level_outputs(z, y, ["brier", "spherical"], temperature=1.7)
        want = token_level_outputs(z.float() / 1.7, y, ["brier", "spherical"])
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


def test_temperature_scan_boundary_and_errors():
    logits, y = _overconfident(n=500, sharpen=8.0)
    scan = TemperatureScan(temperatures=[0.5, 1.0, 2.0])
    scan.update(logits, y)
    fit = scan.compute()
    assert fit.temperature == 2.0 and fit.on_boundary
    assert math.isnan(TemperatureScan().compute().temperature)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            TemperatureScan(temperatures=[1.0, bad])
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            MetricsAccumulator(temperature=bad)
    with pytest.raises(ValueError, match="at least one"):
        TemperatureScan(temperatures=[])
    with pytest.raises(ValueError, match="shape mismatch"):
        TemperatureScan().update(logits, y[:-1])
