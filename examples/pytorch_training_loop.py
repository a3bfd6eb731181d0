"""Train a language model with a strictly proper scoring rule in a plain PyTorch loop.

`properlm.scoring_rule_loss` is a drop-in replacement for `F.cross_entropy`: logits `(..., V)`,
targets `(...)`, `-100` marks positions without a loss. Here a tiny GRU language model learns to
continue a repeating token pattern with the spherical score and score smoothing.

    python examples/pytorch_training_loop.py
"""

import torch
from torch import nn

import properlm

torch.manual_seed(0)
V, H = 64, 32  # vocabulary and hidden size of a tiny model


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.rnn = nn.GRU(H, H, batch_first=True)
        self.head = nn.Linear(H, V)

    def forward(self, ids):  # (batch, time) -> logits (batch, time, V)
        return self.head(self.rnn(self.embed(ids))[0])


model = TinyLM()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
# the loss as a module; the functional form is properlm.scoring_rule_loss(logits, target, rule=..., ...)
loss_fn = properlm.ScoringRuleLoss("spherical", smoothing=0.1)

for step in range(20):
    start = torch.randint(V, (8, 1))
    tokens = (start + 3 * torch.arange(25)) % V  # a sequence the model can learn: +3 each step
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[:, :4] = -100  # e.g. prompt tokens: no loss there
    loss = loss_fn(model(inputs), labels)  # mean of S_max - S over the scored tokens
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  spherical loss {loss.item():.4f}")

# the unsmoothed score of each token (0 at ignored positions), e.g. for evaluation
with torch.no_grad():
    scores = properlm.token_scores(model(inputs), labels, rule="spherical")
print(f"mean spherical score of the scored tokens: {scores[labels != -100].mean().item():.3f} (1 is perfect)")
