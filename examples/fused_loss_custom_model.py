"""The fused linear + scoring-rule loss in your own model: the `(tokens, V)` logits are never formed.

For large vocabularies the output layer's logits dominate training memory. Give
`properlm.fused_linear_scoring_rule_loss` (or the module `properlm.LinearScoringRuleLoss`) the final
hidden states and the output layer's weight `(V, H)` instead: it computes the loss and the gradients
chunk by chunk (Triton kernels for bf16/fp16 CUDA tensors), with the same value and gradients as the
loss on `hidden @ weight.T + bias`.

    python examples/fused_loss_custom_model.py
"""

import torch
from torch import nn

import properlm

torch.manual_seed(0)
V, H = 1000, 32


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.body = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.Linear(H, H))
        self.lm_head = nn.Linear(H, V, bias=False)
        self.loss_fn = properlm.LinearScoringRuleLoss("brier", smoothing=0.1)

    def forward(self, ids, labels=None):
        hidden = self.body(self.embed(ids))  # (batch, time, H)
        if labels is None:
            return self.lm_head(hidden)  # logits for generation / evaluation
        # the loss from hidden states and the head's weight: no logits tensor
        return self.loss_fn(hidden, self.lm_head.weight, labels)


model = TinyLM()
ids = torch.randint(V, (4, 16))
labels = torch.randint(V, (4, 16))
labels[:, :3] = -100

loss = model(ids, labels)
loss.backward()
fused_grad = model.lm_head.weight.grad.clone()

# the same value and gradient as the loss on materialised logits
model.zero_grad()
reference = properlm.scoring_rule_loss(model(ids), labels, rule="brier", smoothing=0.1)
reference.backward()
print(f"fused loss {loss.item():.6f}  materialised {reference.item():.6f}")
torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(fused_grad, model.lm_head.weight.grad, rtol=1e-4, atol=1e-7)
print("fused and materialised losses agree (value and gradient)")
