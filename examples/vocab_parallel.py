"""Vocabulary-parallel loss: the output layer is split over the vocabulary across ranks.

With tensor parallelism each rank holds rows `[start, start + size)` of the output layer's weight,
so each has only its slice of the logits. The vocabulary-parallel losses exchange a few numbers per
token (the per-token statistics every rule is built from) instead of gathering the logits, and
each rank gets the gradient of its own shard. `properlm.dtensor` takes DTensors sharded with
`Shard(-1)` directly (PyTorch tensor parallelism).

    torchrun --nproc_per_node 2 examples/vocab_parallel.py
"""

import torch
import torch.distributed as dist

import properlm
from properlm.distributed import (
    fused_linear_vocab_parallel_scoring_rule_loss,
    vocab_parallel_scoring_rule_loss,
    vocab_shard,
)

dist.init_process_group("gloo")  # nccl on GPUs
rank = dist.get_rank()
V, H, N = 1000, 32, 48

torch.manual_seed(0)  # the same full tensors on every rank, for the check
full_weight = torch.randn(V, H) / H**0.5
hidden = torch.randn(N, H)  # replicated over the tensor-parallel group
labels = torch.randint(V, (N,))
labels[:5] = -100

start, size = vocab_shard(V)  # this rank's rows, in rank order
weight = full_weight[start : start + size].clone().requires_grad_(True)

# 1. this rank's logits, materialised (N, size)
loss = vocab_parallel_scoring_rule_loss(hidden @ weight.T, labels, rule="spherical", smoothing=0.1)
loss.backward()

# 2. fused: the shard's logits are formed chunk by chunk and never stored
w2 = weight.detach().clone().requires_grad_(True)
fused = fused_linear_vocab_parallel_scoring_rule_loss(hidden, w2, labels, rule="spherical", smoothing=0.1)
fused.backward()

# both equal the loss of the whole logits on one process, and each rank holds its shard's gradient
w_ref = full_weight.clone().requires_grad_(True)
reference = properlm.scoring_rule_loss(hidden @ w_ref.T, labels, rule="spherical", smoothing=0.1)
reference.backward()
for x in (loss, fused):
    torch.testing.assert_close(x, reference, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(weight.grad, w_ref.grad[start : start + size], rtol=1e-4, atol=1e-7)
torch.testing.assert_close(w2.grad, w_ref.grad[start : start + size], rtol=1e-4, atol=1e-7)
print(
    f"rank {rank}: ids [{start}, {start + size}), loss {loss.item():.6f} = fused {fused.item():.6f} "
    f"= one process {reference.item():.6f}"
)
dist.destroy_process_group()
