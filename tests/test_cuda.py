"""The library on a CUDA GPU: the unfused loss, the Hugging Face integration (fused and unfused)
and the decoding objective give on the GPU what the float64 / CPU references give.

Skipped without a GPU (CI has none); run with ``pytest tests/test_cuda.py`` on a machine that has
one. The Triton kernels' own GPU checks are in ``tests/test_fused_triton.py`` (``-k cuda``).
"""

from __future__ import annotations

import pytest
import torch

from properlm import apply_scoring_rule, scoring_rule_loss
from properlm.evaluation.decoding import ScoringRuleObjective
from properlm.models import load_model_and_tokenizer
from reference import RULES, naive_loss, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WORDS = "zero one two three four five six seven eight nine".split()


def _logits(n: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g, dtype=torch.float64) * 3.0
    target = torch.randint(V, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.2] = -100
    return logits, target


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfused_loss_on_gpu_matches_float64(rule, smoothing, dtype):
    logits, target = _logits(64, 1003, seed=7)
    logits = logits.to(dtype).double()  # the exact values the GPU sees
    x = logits.to("cuda", dtype).requires_grad_(True)
    ours = scoring_rule_loss(x, target.cuda(), rule, smoothing=smoothing, reduction="none")
    assert ours.dtype == torch.float32 and ours.is_cuda
    x64 = logits.clone().requires_grad_(True)
    ref = naive_loss(x64, target, rule, smoothing, reduction="none")
    assert rel_err(ours, ref) < 1e-5
    w = torch.randn(ref.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad((ours * w.to("cuda", torch.float32)).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x64)
    # the gradient is returned in the input dtype: bfloat16 rounding (2^-8) bounds its error
    assert g.dtype == dtype and rel_err(g, g_ref) < (1e-5 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integration_fused_and_unfused_agree_on_gpu(dtype):
    model, _tok = load_model_and_tokenizer(
        init="tiny-gpt",
        train_texts=[" ".join(WORDS)] * 5,
        vocab_size=270,
        init_options={"hidden_size": 32, "num_layers": 1, "num_heads": 2},
    )
    model = model.to("cuda", dtype).eval()  # no dropout: both passes see the same network
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 270, (3, 12), generator=g).cuda()
    labels = ids.clone()
    labels[0, :4] = -100
    losses, grads = [], []
    for fused in (True, False):
        handle = apply_scoring_rule(model, "spherical", smoothing=0.1, fused=fused)
        model.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        losses.append(loss.detach().float())
        grads.append(model.get_output_embeddings().weight.grad.float().clone())
        handle.remove()
    assert torch.isfinite(losses[0])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(losses[0], losses[1]) < tol
    assert rel_err(grads[0], grads[1]) < tol


@pytest.mark.parametrize("rule", ["spherical", "brier", "pseudo-spherical:1.5"])
def test_decoding_objective_on_gpu_equals_cpu(rule):
    logits, _ = _logits(6, 501, seed=3)
    scores = torch.log_softmax(logits.float(), -1)
    proc = ScoringRuleObjective(rule)
    ids = torch.zeros(6, 1, dtype=torch.long)
    on_gpu = proc(ids.cuda(), scores.cuda())
    assert on_gpu.is_cuda
    assert rel_err(on_gpu, proc(ids, scores)) < 1e-5


def test_automatic_choice_of_fused_implementation():
    """Triton for 2-byte inputs (and float32 under TF32), the chunked torch path for exact float32:
    the faster of the two on an H100 (benchmarks/README.md)."""
    pytest.importorskip("triton")
    from properlm.fused.backends import select_backend
    from properlm.fused.chunked import TorchChunkBackend
    from properlm.fused.triton_kernels import TritonChunkBackend

    def pick(dtype):
        return select_backend(None, torch.zeros(2, 2, device="cuda", dtype=dtype), 2)

    assert isinstance(pick(torch.bfloat16), TritonChunkBackend)
    assert isinstance(pick(torch.float16), TritonChunkBackend)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert isinstance(pick(torch.float32), TorchChunkBackend)
        torch.backends.cuda.matmul.allow_tf32 = True
        assert isinstance(pick(torch.float32), TritonChunkBackend)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert isinstance(pick(torch.float64), TorchChunkBackend)
