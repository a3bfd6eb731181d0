"""Fused output layer + scoring-rule loss that never materialises the full ``(N, V)`` logits.

* :func:`fused_linear_scoring_rule_loss` / :class:`LinearScoringRuleLoss` -- the entry points;
* :mod:`properlm.fused.chunked` -- token-chunked PyTorch implementation (any device);
* :mod:`properlm.fused.triton_kernels` -- Triton kernels for CUDA (``pip install properlm[triton]``).
"""

from .chunked import default_chunk_size
from .dispatch import LinearScoringRuleLoss, fused_linear_scoring_rule_loss, triton_is_available

__all__ = ["LinearScoringRuleLoss", "default_chunk_size", "fused_linear_scoring_rule_loss", "triton_is_available"]
