"""Data parallel training (DDP) with a scoring rule, launched with torchrun.

Each process scores its share of the global batch. To get the gradient of the loss averaged over
*all* target tokens of the global batch (what one process would compute on the whole batch), divide
each rank's summed loss by the global token count, `num_items_in_batch` (as Hugging Face `Trainer`
does), and multiply by the world size, because DDP averages the gradients of the ranks.
`properlm train` does all of this for you (`torchrun ... -m properlm.cli.main train ...`).

    torchrun --nproc_per_node 2 examples/torchrun_data_parallel.py     # gloo on CPU, nccl on GPUs
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import properlm

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
V, H = 64, 32

torch.manual_seed(0)  # the same initial weights on every rank
model = nn.Sequential(nn.Embedding(V, H), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, V)).to(device)
model = DistributedDataParallel(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

for step in range(5):
    g = torch.Generator().manual_seed(step)  # the global batch, the same on every rank
    tokens = (torch.randint(V, (8, 1), generator=g) + 7 * torch.arange(17)) % V
    labels = tokens[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=g) < 0.2] = -100  # some positions without a loss
    mine = slice(rank * 8 // world, (rank + 1) * 8 // world)  # this rank's rows
    inputs, labels = tokens[mine, :-1].to(device), labels[mine].to(device)

    num_items = (labels != -100).sum()
    dist.all_reduce(num_items)  # target tokens of the whole global batch
    loss = properlm.scoring_rule_loss(
        model(inputs), labels, rule="brier", smoothing=0.1, num_items_in_batch=num_items
    )  # sum over my tokens / global count
    optimizer.zero_grad()
    (loss * world).backward()  # DDP averages over ranks: undo the 1/world
    optimizer.step()
    total = loss.detach().clone()
    dist.all_reduce(total)  # the global batch's mean loss
    if rank == 0:
        print(f"step {step}  brier loss of the global batch {total.item():.4f}")

# DDP keeps the replicas identical
w = model.module[-1].weight.detach().clone()
gathered = [torch.empty_like(w) for _ in range(world)]
dist.all_gather(gathered, w)
assert all(torch.equal(gathered[0], x) for x in gathered)
if rank == 0:
    print(f"{world} processes, replicas identical after training")
dist.destroy_process_group()
