"""Teacher-forced evaluation with several rules, calibration (ECE) and temperature scaling.

`MetricsAccumulator` streams batches of logits and reports each rule's mean token score, the log
score / perplexity, accuracy and the expected calibration error of the top-1 token.
`TemperatureScan` fits one temperature `T` on validation data in one pass over a grid; scoring
`softmax(z / T)` on the test data then removes a model's over- or under-confidence (the spherical
score's fine-tuned models end under-confident). From the command line: `properlm evaluate
--fit-temperature` on validation data, then `--temperature T`.

Here the "model" is a fixed random head whose logits are 2.5x too sharp: labels are drawn from
softmax(z / 2.5), so the fitted temperature is close to 2.5.

    python examples/evaluation_calibration.py [OUT_DIR]     # OUT_DIR: where reliability.png goes
"""

import sys
from pathlib import Path

import torch

from properlm.evaluation.calibration import reliability_diagram
from properlm.evaluation.metrics import MetricsAccumulator
from properlm.evaluation.temperature import TemperatureScan

torch.manual_seed(0)
V, H, TRUE_T = 50, 16, 2.5
head = torch.randn(V, H)


def batches(n_batches, seed):  # (logits, labels) of an over-confident model
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        hidden = torch.randn(8, 32, H, generator=g)
        logits = hidden @ head.T  # (batch, time, V)
        labels = torch.multinomial(torch.softmax(logits / TRUE_T, -1).reshape(-1, V), 1, generator=g)
        yield logits, labels.reshape(8, 32)


rules = ["logarithmic", "brier", "spherical", "0.5*logarithmic+0.5*spherical"]
before = MetricsAccumulator(rules)
for logits, labels in batches(6, seed=1):  # test data
    before.update(logits, labels)  # logits aligned with labels
m = before.compute()
print(f"test, T = 1:    ECE {100 * m.ece:5.2f}%  log score {m.mean_log_prob:.3f}  accuracy {m.accuracy:.3f}")
print("  mean scores:", {k: round(v, 4) for k, v in m.mean_scores.items()})

scan = TemperatureScan()  # 81 temperatures from 0.2 to 5
for logits, labels in batches(6, seed=2):  # validation data
    scan.update(logits, labels)
fit = scan.compute()  # the optimum, refined between grid values
val = MetricsAccumulator(["logarithmic"], temperature=fit.temperature)
for logits, labels in batches(6, seed=2):  # one more pass: exact metrics at T
    val.update(logits, labels)
fit = fit.with_metrics(val.compute(), fit.temperature)
print(
    f"fitted on validation: T = {fit.temperature:.3f} (grid {fit.grid_temperature:.3f}; "
    f"validation ECE {100 * fit.ece:.2f}%)"
)

after = MetricsAccumulator(rules, temperature=fit.temperature)
for logits, labels in batches(6, seed=1):
    after.update(logits, labels)
m2 = after.compute()
print(
    f"test, T = {fit.temperature:.2f}: ECE {100 * m2.ece:5.2f}%  log score {m2.mean_log_prob:.3f}  "
    f"accuracy {m2.accuracy:.3f} (temperature keeps the ranking)"
)
assert m2.ece < m.ece and abs(m2.accuracy - m.accuracy) < 1e-12

if len(sys.argv) > 1:
    path = reliability_diagram(m2.bins, Path(sys.argv[1]) / "reliability.png", title="after scaling", ece=m2.ece)
    print(f"wrote {path}")
