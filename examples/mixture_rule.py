"""A mixture of scoring rules, `W1*R1 + W2*R2`: strictly proper when every component is.

Write it as a spec string (`"0.5*logarithmic+0.5*spherical"`, accepted wherever a rule is) or build
`properlm.Mixture([(weight, rule), ...])`. One pass over the logits computes the statistics of every
component, so a mixture costs about as much as its most expensive component, on every path
(unfused, fused, vocabulary-parallel, evaluation).

    python examples/mixture_rule.py
"""

import torch

import properlm

torch.manual_seed(0)
logits = torch.randn(8, 12, 50, requires_grad=True)
labels = torch.randint(50, (8, 12))

mix = properlm.Mixture([(0.5, "logarithmic"), (0.5, "spherical")])
print(f"rule {mix.spec!r}, S_max = {mix.s_max}")
assert properlm.get_rule("0.5*logarithmic+0.5*spherical").spec == mix.spec

# without smoothing the mixture's loss is the weighted sum of its components' losses
loss = properlm.scoring_rule_loss(logits, labels, rule=mix)
parts = [w * properlm.scoring_rule_loss(logits, labels, rule=r) for w, r in mix.components]
print(f"mixture loss {loss.item():.6f} = sum of weighted component losses {sum(parts).item():.6f}")
torch.testing.assert_close(loss, sum(parts))
loss.backward()

# with smoothing each component is smoothed as on its own (the masked-log term gets the weight of
# the bounded components, here 0.5), and the fused loss takes the spec string like any rule
hidden, weight = torch.randn(96, 16), torch.randn(50, 16)
fused = properlm.fused_linear_scoring_rule_loss(
    hidden, weight, labels.reshape(-1), rule="0.5*logarithmic+0.5*spherical", smoothing=0.1
)
print(f"fused mixture loss with smoothing 0.1: {fused.item():.4f}")
