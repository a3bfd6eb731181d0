"""Fused output layer + scoring-rule loss that never materialises the full ``(N, V)`` logits.

* :func:`fused_linear_scoring_rule_loss` / :class:`LinearScoringRuleLoss` -- the entry points
  (:mod:`properlm.fused.loss`);
* :mod:`properlm.fused.chunked` -- token-chunked PyTorch implementation (any device);
* :mod:`properlm.fused.triton_kernels` -- Triton kernels for CUDA (``pip install properlm[triton]``);
* :mod:`properlm.fused.backends` -- the choice between them;
* :mod:`properlm.fused.op` -- the ``torch.library`` operator that ``torch.compile`` calls.

:func:`default_chunk_size` is :func:`properlm.options.default_chunk_size`.
"""

from ..options import default_chunk_size
from .loss import LinearScoringRuleLoss, fused_linear_scoring_rule_loss, triton_is_available

__all__ = ["LinearScoringRuleLoss", "default_chunk_size", "fused_linear_scoring_rule_loss", "triton_is_available"]
