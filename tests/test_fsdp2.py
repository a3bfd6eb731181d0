"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with a model patched by ``apply_scoring_rule``:
CPU, gloo, 2 ranks in one spawn.

A tiny Llama is sharded per decoder layer and at the root; each rank runs its own batch (data
parallel). The loss of each rank equals that of the unsharded model on the same batch, and the
gathered gradients (``full_tensor()`` of the sharded DTensor gradients, which FSDP averages over
the ranks) equal the gradient of the mean of the per-batch losses of one process, for the fused
and the unfused patch, two rules and smoothing. The workers record their failures in a file that
the test reads, so a failing comparison never leaves a rank waiting in a collective.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import properlm
from _multiprocess import Checker, run_ranks
from properlm.dtensor import is_dtensor

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

WORLD = 2
#: (rule, smoothing, fused, tied embeddings, lm_head its own FSDP unit)
CASES = [
    ("brier", 0.1, True, False, False),
    ("brier", 0.1, False, False, False),
    ("spherical", 0.1, True, False, False),
    ("spherical", 0.0, False, False, False),
    ("spherical", 0.1, True, True, False),
    ("brier", 0.1, True, False, True),
    ("spherical", 0.1, False, False, True),
]
TOL = 1e-5


def _tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=301,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def _batch(rank: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(vocab, (2, 10), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # an unscored prompt
    return ids, labels


def _case(failures: list[str], rank: int, rule: str, eps: float, fused: bool, tied: bool, head_unit: bool) -> int:
    from torch.distributed.fsdp import fully_shard

    tag = f"{rule} eps={eps} fused={fused} tied={tied} head_unit={head_unit} rank={rank}"
    base = _tiny_llama(tied)
    ref = copy.deepcopy(base)
    properlm.apply_scoring_rule(ref, rule, smoothing=eps, fused=fused)
    ref_losses = []
    for r in range(WORLD):
        ids, labels = _batch(r, 301)
        ref_losses.append(ref(input_ids=ids, labels=labels).loss)
    (sum(ref_losses) / WORLD).backward()

    model = copy.deepcopy(base)
    properlm.apply_scoring_rule(model, rule, smoothing=eps, fused=fused)
    for layer in model.model.layers:
        fully_shard(layer)
    if head_unit:  # the head its own FSDP unit: resharded after forward, gathered again for backward
        fully_shard(model.lm_head)
    fully_shard(model)
    seen: list[bool] = []  # whether the head's weight is a (sharded) DTensor when the head runs
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(is_dtensor(m.weight)))
    ids, labels = _batch(rank, 301)
    out = model(input_ids=ids, labels=labels)
    if seen != [False]:
        failures.append(f"{tag}: lm_head.weight is a DTensor inside the forward pass: {seen}")
    if fused and out.logits.shape[1] != 0:
        failures.append(f"{tag}: the fused patch returned logits of shape {tuple(out.logits.shape)}")
    out.loss.backward()
    if not is_dtensor(model.lm_head.weight):
        failures.append(f"{tag}: lm_head.weight is not sharded after the backward pass")
    checks = 1
    try:
        torch.testing.assert_close(out.loss.detach(), ref_losses[rank].detach(), rtol=TOL, atol=TOL)
    except AssertionError as exc:
        failures.append(f"{tag} loss: {exc}")
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        checks += 1
        if p.grad is None or ref_grads[name] is None:
            failures.append(
                f"{tag} {name}: gradient missing (FSDP {p.grad is None}, reference {ref_grads[name] is None})"
            )
            continue
        grad = p.grad.full_tensor()
        scale = float(ref_grads[name].abs().max())
        try:
            torch.testing.assert_close(grad, ref_grads[name], rtol=TOL, atol=TOL * max(scale, 1e-3))
        except AssertionError as exc:
            failures.append(f"{tag} grad {name}: {exc}")
    return checks


def _worker(chk: Checker, rank: int) -> None:
    for case in CASES:
        chk.count += _case(chk.failures, rank, *case)


def test_fully_shard_matches_one_process(tmp_path: Path) -> None:
    failures, counts = run_ranks(tmp_path, _worker, WORLD)
    assert not failures, f"{len(failures)} failure(s):\n" + "\n".join(failures[:20])
    assert min(counts) >= len(CASES) * 20, f"the ranks ran only {counts} checks"
