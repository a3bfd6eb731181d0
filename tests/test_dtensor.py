"""Tensor parallelism through PyTorch's DTensor: the losses on vocabulary-sharded ``DTensor``\\ s,
and a tiny Llama parallelised with ``torch.distributed.tensor.parallel`` (CPU, gloo, 2 ranks).

One spawn of 2 processes runs every case; the workers record their failures in a file that
the test reads (a failing comparison never leaves a rank waiting in a collective). Losses and
gradients are compared with the float64 reference of ``tests/reference.py`` on the full tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import properlm
from _multiprocess import Checker, run_ranks
from properlm.dtensor import is_dtensor
from reference import naive_loss

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

WORLD = 2
RULES = ["logarithmic", "brier", "spherical", "power:3", "pseudo-spherical:1.5"]
REDUCTIONS = ["mean", "sum", "none"]
#: float32 results against the float64 reference
RTOL = 2e-5


def _backward(loss: torch.Tensor, seed: int) -> None:
    """``loss`` (a DTensor or a tensor) times fixed weights, summed, backward."""
    w = torch.rand(tuple(loss.shape), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    if is_dtensor(loss):
        from torch.distributed.tensor import distribute_tensor

        w = distribute_tensor(w.float(), loss.device_mesh, loss.placements)
    (loss * w.to(loss.dtype)).sum().backward()


def _is_replicated(t: object) -> bool:
    return is_dtensor(t) and all(p.is_replicate() for p in t.placements)


# --------------------------------------------------------------------------- loss cases


def _logits_case(
    chk: Checker, mesh, rank: int, seed: int, V: int, rule: str, eps: float, reduction: str, dtensor_target: bool
) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(seed)
    full = torch.randn(3, 5, V, generator=g) * 3
    target = torch.randint(V, (3, 5), generator=g)
    target.view(-1)[::4] = -100
    ref_z = full.double().requires_grad_()
    ref = naive_loss(ref_z, target, rule, eps, reduction=reduction)
    _backward(ref, seed)

    z = distribute_tensor(full.clone(), mesh, [Shard(-1)]).requires_grad_()
    y = distribute_tensor(target, mesh, [Replicate()]) if dtensor_target else target
    loss = properlm.scoring_rule_loss(z, y, rule, eps, reduction=reduction)
    tag = f"logits {rule} eps={eps} {reduction} V={V} dtarget={dtensor_target} rank={rank}"
    chk.true(f"{tag}: loss is a replicated DTensor, got {type(loss).__name__}", _is_replicated(loss))
    chk.true(f"{tag}: loss shape {tuple(loss.shape)}", tuple(loss.shape) == tuple(ref.shape))
    _backward(loss, seed)
    chk.close(f"{tag} loss", loss.full_tensor(), ref)
    chk.true(
        f"{tag}: grad placements {z.grad.placements}",
        is_dtensor(z.grad) and z.grad.placements == z.placements and z.placements[0].is_shard(dim=z.dim() - 1),
    )
    chk.close(f"{tag} grad", z.grad.full_tensor(), ref_z.grad)
    # the local gradient is the rank's slice of the reference gradient (torch.chunk layout)
    local = ref_z.grad.chunk(WORLD, dim=-1)[rank]
    chk.close(f"{tag} local grad", z.grad.to_local(), local)


def _fused_case(
    chk: Checker,
    mesh,
    rank: int,
    seed: int,
    V: int,
    rule: str,
    eps: float,
    reduction: str,
    use_bias: bool,
    hidden_placement: str,
) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    H = 6
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 6, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g)
    target = torch.randint(V, (2, 6), generator=g)
    target.view(-1)[1::5] = -100
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    ref = naive_loss(
        F.linear(leaves[0], leaves[1], leaves[2] if use_bias else None), target, rule, eps, reduction=reduction
    )
    _backward(ref, seed)

    if hidden_placement == "plain":
        h = hidden.clone().requires_grad_()
    else:
        h = distribute_tensor(hidden.clone(), mesh, [Replicate() if hidden_placement == "replicate" else Shard(1)])
        h.requires_grad_()
    w = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
    b = distribute_tensor(bias.clone(), mesh, [Shard(0)]).requires_grad_() if use_bias else None
    loss = properlm.fused_linear_scoring_rule_loss(
        h, w, target, rule, bias=b, smoothing=eps, reduction=reduction, chunk_size=5
    )
    tag = f"fused {rule} eps={eps} {reduction} V={V} bias={use_bias} hidden={hidden_placement} rank={rank}"
    chk.true(f"{tag}: loss is a replicated DTensor", _is_replicated(loss))
    _backward(loss, seed)
    chk.close(f"{tag} loss", loss.full_tensor(), ref)
    chk.close(f"{tag} grad hidden", h.grad if hidden_placement == "plain" else h.grad.full_tensor(), leaves[0].grad)
    chk.true(f"{tag}: grad weight placements", tuple(w.grad.placements) == (Shard(0),))
    chk.close(f"{tag} grad weight", w.grad.full_tensor(), leaves[1].grad)
    if use_bias:
        chk.close(f"{tag} grad bias", b.grad.full_tensor(), leaves[2].grad)


def _head_transform_case(chk: Checker, mesh, rank: int, seed: int, rule: str) -> None:
    """``softcap`` and ``logit_scale`` go through to the vocabulary-parallel losses: the loss of
    ``c tanh(s z / c)``."""
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(seed)
    V, H, cap, scale = 13, 6, 4.0, 1.5
    hidden, weight = torch.randn(10, H, generator=g), torch.randn(V, H, generator=g)
    target = torch.randint(V, (10,), generator=g)
    target[::3] = -100
    leaves = [t.double().requires_grad_() for t in (hidden, weight)]
    z = F.linear(*leaves)
    z.retain_grad()
    ref = naive_loss(cap * torch.tanh(scale * z / cap), target, rule, 0.1)
    ref.backward()
    tag = f"softcap {rule} rank={rank}"
    zd = distribute_tensor(F.linear(hidden, weight), mesh, [Shard(-1)]).requires_grad_()
    loss = properlm.scoring_rule_loss(zd, target, rule, 0.1, softcap=cap, logit_scale=scale)
    loss.backward()
    chk.close(f"{tag} loss", loss.full_tensor(), ref)
    chk.close(f"{tag} grad", zd.grad.full_tensor(), z.grad)
    h = hidden.clone().requires_grad_()
    w = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
    fused = properlm.fused_linear_scoring_rule_loss(h, w, target, rule, smoothing=0.1, softcap=cap, logit_scale=scale)
    fused.backward()
    chk.close(f"{tag} fused loss", fused.full_tensor(), ref)
    chk.close(f"{tag} fused grad hidden", h.grad, leaves[0].grad)
    chk.close(f"{tag} fused grad weight", w.grad.full_tensor(), leaves[1].grad)


def _error_cases(chk: Checker, mesh) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    full = torch.randn(4, 7, generator=g)
    target = torch.randint(7, (4,), generator=g)
    rep = distribute_tensor(full, mesh, [Replicate()])
    chk.raises("replicated logits", lambda: properlm.scoring_rule_loss(rep, target), "sharded over the vocabulary")
    rows = distribute_tensor(full, mesh, [Shard(0)])
    chk.raises("logits sharded on tokens", lambda: properlm.scoring_rule_loss(rows, target), "Shard(-1)")
    cols = distribute_tensor(full, mesh, [Shard(-1)])
    bad = target.clone()
    bad[0] = 7
    chk.raises("target out of range", lambda: properlm.scoring_rule_loss(cols, bad), "[0, 7)")
    chk.raises("bad rule", lambda: properlm.scoring_rule_loss(cols, target, "nope"), "unknown scoring rule")
    w = distribute_tensor(torch.randn(7, 3), mesh, [Shard(1)])
    chk.raises(
        "weight sharded on H", lambda: properlm.fused_linear_scoring_rule_loss(torch.randn(4, 3), w, target), "Shard(0)"
    )


# --------------------------------------------------------------------------- tensor-parallel Llama


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=301,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def _batches(steps: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(vocab, (2, 12), generator=g)
        target = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)  # next token; the last is not scored
        target[0, :3] = -100  # a prompt that is not scored
        out.append((ids, target))
    return out


def _train(model, batches, step_loss) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for ids, target in batches:
        loss = step_loss(model, ids, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float((loss.full_tensor() if is_dtensor(loss) else loss).detach()))
    return losses


def _tp_llama_case(chk: Checker, mesh, rank: int) -> None:
    """TP = 2 as torchtitan writes it: attention and MLP column- then row-parallel, the head
    column-parallel with DTensor logits; 4 SGD steps of the spherical loss with smoothing."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    batches = _batches(4, 301)
    ref_model = _tiny_llama()

    def ref_loss(model, ids, target):
        return properlm.scoring_rule_loss(model(input_ids=ids).logits, target, "spherical", 0.1)

    ref_losses = _train(ref_model, batches, ref_loss)

    model = _tiny_llama()
    for layer in model.model.layers:
        parallelize_module(
            layer,
            mesh,
            {
                "self_attn.q_proj": ColwiseParallel(),
                "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(),
                "self_attn.o_proj": RowwiseParallel(),
                "mlp.gate_proj": ColwiseParallel(),
                "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel(),
            },
        )
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})

    seen: list[object] = []

    def tp_loss(model, ids, target):
        logits = model(input_ids=ids).logits
        seen.append(logits)
        return properlm.scoring_rule_loss(logits, target, "spherical", 0.1)

    tp_losses = _train(model, batches, tp_loss)
    chk.true(
        f"TP logits are DTensors sharded on the vocabulary: {type(seen[0]).__name__}",
        is_dtensor(seen[0]) and seen[0].placements[0].is_shard(dim=seen[0].dim() - 1),
    )
    chk.close(f"TP losses rank={rank}", torch.tensor(tp_losses), torch.tensor(ref_losses), rtol=1e-5)
    chk.true(f"TP loss decreases {tp_losses}", tp_losses[-1] < tp_losses[0])
    ref_state = ref_model.state_dict()
    for name, p in model.state_dict().items():
        full = p.full_tensor() if is_dtensor(p) else p
        chk.close(f"TP state {name} rank={rank}", full, ref_state[name], rtol=1e-4)
    # the fused loss on the column-parallel head's DTensor weight: equal to the unfused loss on its logits
    ids, target = batches[0]
    hidden = model.model(input_ids=ids).last_hidden_state
    fused = properlm.fused_linear_scoring_rule_loss(hidden, model.lm_head.weight, target, "brier", smoothing=0.1)
    unfused = properlm.scoring_rule_loss(model.lm_head(hidden), target, "brier", 0.1)
    chk.close(f"TP fused head rank={rank}", fused.full_tensor(), unfused.full_tensor(), rtol=1e-5)
    # apply_scoring_rule on the parallelised model: its fused head pre-hook sees the DTensor weight
    labels = ids.clone()
    labels[0, :3] = -100
    for fused_patch in (True, False):
        ref_handle = properlm.apply_scoring_rule(ref_model, "brier", smoothing=0.1, fused=fused_patch)
        tp_handle = properlm.apply_scoring_rule(model, "brier", smoothing=0.1, fused=fused_patch)
        ref_out = ref_model(input_ids=ids, labels=labels).loss
        tp_out = model(input_ids=ids, labels=labels).loss
        tp_out.backward()
        ref_out.backward()
        chk.true(f"patched TP loss is a DTensor (fused={fused_patch})", is_dtensor(tp_out))
        chk.close(f"patched TP loss fused={fused_patch} rank={rank}", tp_out.full_tensor(), ref_out, rtol=1e-5)
        chk.close(
            f"patched TP grad lm_head fused={fused_patch} rank={rank}",
            model.lm_head.weight.grad.full_tensor(),
            ref_model.lm_head.weight.grad,
            rtol=1e-4,
        )
        model.zero_grad()
        ref_model.zero_grad()
        ref_handle.remove()
        tp_handle.remove()


# --------------------------------------------------------------------------- driver


def _worker(chk: Checker, rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    seed = 0
    for i, rule in enumerate(RULES):
        for eps in (0.0, 0.1):
            for j, reduction in enumerate(REDUCTIONS):
                seed += 1
                V = (13, 8, 301)[(i + j) % 3]  # uneven (7 | 6), even, and 151 | 150
                _logits_case(chk, mesh, rank, seed, V, rule, eps, reduction, dtensor_target=(seed % 2 == 0))
        seed += 1
        _fused_case(
            chk,
            mesh,
            rank,
            seed,
            11,
            rule,
            0.1,
            REDUCTIONS[i % 3],
            use_bias=i % 2 == 0,
            hidden_placement=("plain", "replicate", "seq")[i % 3],
        )
        seed += 1
        _fused_case(chk, mesh, rank, seed, 8, rule, 0.0, "mean", use_bias=True, hidden_placement="plain")
    for rule in ("brier", "spherical", "logarithmic"):
        seed += 1
        _head_transform_case(chk, mesh, rank, seed, rule)
    _error_cases(chk, mesh)
    _tp_llama_case(chk, mesh, rank)


def test_dtensor_losses_and_tensor_parallel_llama(tmp_path: Path) -> None:
    """Vocabulary-sharded DTensor logits and weights (uneven shards, ignored tokens, every rule,
    smoothing, every reduction) equal the float64 reference in loss and gradients, with the
    gradients' placements those of the inputs; a TP = 2 Llama trained 4 steps matches one process."""
    failures, counts = run_ranks(tmp_path, _worker, WORLD, checker=Checker(rtol=RTOL, float64=True))
    assert not failures, f"{len(failures)} failure(s):\n" + "\n".join(failures[:20])
    assert min(counts) > 250, f"the ranks ran only {counts} checks"


def test_is_dtensor_without_import() -> None:
    assert not is_dtensor(torch.zeros(2))
    assert not is_dtensor(None)


@pytest.mark.parametrize("fn", ["scoring_rule_loss", "fused_linear_scoring_rule_loss"])
def test_plain_tensors_unchanged(fn: str) -> None:
    """No process group needed for plain tensors: the dispatch branch is not taken."""
    if fn == "scoring_rule_loss":
        loss = properlm.scoring_rule_loss(torch.randn(3, 5), torch.tensor([0, 1, 2]), "brier")
    else:
        loss = properlm.fused_linear_scoring_rule_loss(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]))
    assert type(loss) is torch.Tensor and loss.dim() == 0
