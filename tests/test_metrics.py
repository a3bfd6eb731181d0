"""Teacher-forced metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from properlm.evaluation.calibration import calibration_bins, expected_calibration_error, reliability_diagram
from properlm.evaluation.metrics import MetricsAccumulator, token_level_outputs
from properlm.evaluation.temperature import TemperatureScan
from properlm.loss import token_scores

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


def _mean_log_prob64(z: torch.Tensor, y: torch.Tensor, t: float) -> float:
    """(1/N) sum_i log softmax(z_i / t)_{y_i}, in float64 from the stored logits."""
    return float(torch.log_softmax(z.double() / t, -1).gather(1, y[:, None]).mean())


def _reference_temperature(z: torch.Tensor, y: torch.Tensor) -> float:
    """The optimal T of the stored logits: golden-section search on log T in [0.05, 20], float64."""

    def f(u: float) -> float:
        return -_mean_log_prob64(z, y, math.exp(u))

    a, b = math.log(0.05), math.log(20.0)
    r = (math.sqrt(5) - 1) / 2
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    while b - a > 1e-9:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    return math.exp((a + b) / 2)


@pytest.mark.slow
def test_temperature_scan_recovers_the_true_temperature():
    logits, y = _overconfident()
    y[::7] = -100  # ignored positions take no part
    scan = TemperatureScan()
    for a in range(0, 4000, 1000):  # streaming equals one shot
        scan.update(logits[a : a + 1000], y[a : a + 1000])
    fit = scan.compute()
    assert scan.num_tokens == fit.num_tokens == int((y != -100).sum())
    assert abs(math.log(fit.temperature / 2.5)) < 0.1 and not fit.on_boundary
    one = MetricsAccumulator(["logarithmic"])
    one.update(logits, y)
    at_1 = one.compute()
    assert fit.grid_mean_log_prob > at_1.mean_log_prob and fit.grid_ece < at_1.ece / 3
    # the scan's values at its best grid T equal MetricsAccumulator with that temperature
    at_grid = MetricsAccumulator(["logarithmic"], temperature=fit.grid_temperature)
    at_grid.update(logits, y)
    m = at_grid.compute()
    assert m.mean_log_prob == pytest.approx(fit.grid_mean_log_prob, rel=1e-6)
    assert m.ece == pytest.approx(fit.grid_ece, rel=1e-6)
    assert m.accuracy == at_1.accuracy  # scaling keeps the ranking


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_temperature_scan_refines_between_grid_values(dtype, monkeypatch):
    """The fit is the optimum of a float64 reference that stores the logits, not the nearest grid value."""
    from properlm.evaluation import metrics

    grid = TemperatureScan().temperatures
    target = math.sqrt(grid[44] * grid[45])  # half-way (in log T) between two grid values
    z0, y = _overconfident(n=3000, V=12, sharpen=1.0, seed=3)
    z = (z0.double() * target / _reference_temperature(z0, y)).to(dtype)  # its optimum: T = target
    y[::9] = -100
    keep = y != -100
    z_kept, y_kept = z[keep], y[keep]
    t_ref = _reference_temperature(z_kept, y_kept)  # of the logits as the scan sees them
    assert abs(t_ref / target - 1) < 2e-2
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 12 * 333)  # several chunks per batch
    scan = TemperatureScan()
    for a in range(0, 3000, 1000):
        scan.update(z[a : a + 1000], y[a : a + 1000])
    fit = scan.compute()
    assert not fit.on_boundary and fit.grid_temperature in (grid[44], grid[45])
    assert abs(fit.temperature / t_ref - 1) < 1e-4  # refined
    assert abs(fit.grid_temperature / t_ref - 1) > 1e-2  # the grid alone is 2% off
    # L'(1/T) = mean(z_y - E_p[z]) at the grid, against float64
    for i in (0, 44, 80):
        p = torch.softmax(z_kept.double() / grid[i], -1)
        want = float((z_kept.double().gather(1, y_kept[:, None]).squeeze(1) - (p * z_kept.double()).sum(-1)).mean())
        assert fit.slopes[i] == pytest.approx(want, rel=1e-4, abs=1e-5)
    # between grid values the scan has measured nothing; one pass at T gives the exact values
    assert not fit.measured and math.isnan(fit.mean_log_prob) and math.isnan(fit.ece) and fit.bins == []
    acc = MetricsAccumulator(["logarithmic"], temperature=fit.temperature)
    for a in range(0, 3000, 1000):
        acc.update(z[a : a + 1000], y[a : a + 1000])
    done = fit.with_metrics(acc.compute(), fit.temperature)
    p = torch.softmax(z_kept.double() / fit.temperature, -1)
    assert done.measured and done.temperature == fit.temperature
    assert done.mean_log_prob == pytest.approx(_mean_log_prob64(z_kept, y_kept, fit.temperature), rel=1e-6)
    assert done.ece == pytest.approx(expected_calibration_error(p.amax(-1), p.argmax(-1) == y_kept), abs=1e-6)
    assert sum(b.count for b in done.bins) == fit.num_tokens
    # at the optimum: better than the best grid value, as good as the reference's optimum
    assert done.mean_log_prob > fit.grid_mean_log_prob
    assert done.mean_log_prob == pytest.approx(_mean_log_prob64(z_kept, y_kept, t_ref), abs=1e-7)
    with pytest.raises(ValueError, match="cannot complete a fit at temperature"):
        fit.with_metrics(acc.compute(), 1.0)
    with pytest.raises(ValueError, match="scored positions cannot complete a fit"):
        one = MetricsAccumulator(["logarithmic"], temperature=fit.temperature)
        one.update(z[:10], y[:10])
        fit.with_metrics(one.compute(), fit.temperature)


def test_temperature_scan_masked_vocabulary():
    """-inf logits (masked-out vocabulary) take no part: the fit equals that of the finite columns."""
    z, y = _overconfident(n=600, V=12, sharpen=1.7, seed=4)
    y = y.clamp(max=9)
    masked = z.clone()
    masked[:, 10:] = -math.inf  # columns 10 and 11 masked out
    a, b = TemperatureScan(), TemperatureScan()
    a.update(masked, y)
    b.update(z[:, :10].contiguous(), y)
    fa, fb = a.compute(), b.compute()
    assert all(math.isfinite(v) for v in fa.mean_log_probs + fa.slopes + fa.eces)
    assert fa.temperature == pytest.approx(fb.temperature, rel=1e-6)
    torch.testing.assert_close(torch.tensor(fa.slopes), torch.tensor(fb.slopes), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(fa.mean_log_probs), torch.tensor(fb.mean_log_probs), rtol=1e-6, atol=0)


def test_hermite_refinement_is_exact_on_cubics():
    from properlm.evaluation.temperature import _hermite_max

    def f(x):  # f'(x) = -(x - 0.37)(x + 1.5): a maximum at 0.37
        return -(x**3 / 3 + (1.5 - 0.37) * x**2 / 2 - 0.555 * x)

    def df(x):
        return -(x - 0.37) * (x + 1.5)

    for lo, hi in ((0.0, 1.0), (1.0, 0.0), (0.2, 0.5)):
        x, v = _hermite_max(lo, hi, f(lo), f(hi), df(lo), df(hi))
        assert x == pytest.approx(0.37, abs=1e-12) and v == pytest.approx(f(0.37), abs=1e-14)
    x, _ = _hermite_max(0.5, 1.0, f(0.5), f(1.0), df(0.5), df(1.0))  # decreasing on the segment: its start
    assert x == 0.5


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
    # at the grid's edge: no refinement (the optimum may lie beyond), values measured by the scan
    assert fit.temperature == fit.grid_temperature == 2.0 and fit.on_boundary and fit.measured
    assert fit.mean_log_prob == fit.grid_mean_log_prob == max(fit.mean_log_probs)
    assert fit.ece == fit.grid_ece and sum(b.count for b in fit.bins) == 500
    under = TemperatureScan(temperatures=[0.5, 1.0, 2.0])
    under.update(logits / 40, y)  # under-confident: the optimum T is below 0.5
    low = under.compute()
    assert low.temperature == 0.5 and low.on_boundary and low.measured
    single = TemperatureScan(temperatures=[1.3])  # nothing to refine between
    single.update(logits, y)
    one = single.compute()
    assert one.temperature == 1.3 and not one.on_boundary and one.measured
    assert one.mean_log_prob == pytest.approx(_mean_log_prob64(logits, y, 1.3), rel=1e-6)
    empty = TemperatureScan().compute()
    assert math.isnan(empty.temperature) and empty.num_tokens == 0 and not empty.measured
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            TemperatureScan(temperatures=[1.0, bad])
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            MetricsAccumulator(temperature=bad)
    with pytest.raises(ValueError, match="at least one"):
        TemperatureScan(temperatures=[])
    with pytest.raises(ValueError, match="shape mismatch"):
        TemperatureScan().update(logits, y[:-1])
