"""TRL's fused-head protocol: the metric fields of ``FusedCausalLMOutput`` for a scoring-rule loss.

``SFTTrainer`` (TRL >= 1) calls ``model(..., labels=..., fused_lm_head=True)``; the patched model answers with
``log_probs`` minus the per-token loss and the ``entropy`` / ``is_top1`` of its own distribution
(:mod:`properlm.integrations.transformers.hooks` builds the output).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...stats import head_transform_

#: float32 elements of one chunk of logits for the TRL metrics (entropy, top-1)
_METRIC_CHUNK_ELEMENTS = 1 << 24


def trl_output_fields(
    x: Tensor,
    y: Tensor,
    valid: Tensor,
    token_loss: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> dict[str, Tensor]:
    """Fields of TRL's ``FusedCausalLMOutput``.

    ``log_probs`` is minus the per-token loss, so TRL's ``-log_probs.sum() / num_items`` is the
    scoring-rule loss; ``entropy`` and ``is_top1`` of the model distribution are computed without
    gradient in row chunks.
    """
    with torch.no_grad():
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.reshape(-1)
        n = x2.shape[0]
        entropy = torch.zeros(n, dtype=torch.float32, device=x.device)
        top1 = torch.zeros(n, dtype=torch.bool, device=x.device)
        V = weight.shape[0] if weight is not None else x.shape[-1]
        step = max(1, _METRIC_CHUNK_ELEMENTS // max(V, 1))
        for start in range(0, n, step):
            rows = x2[start : start + step]
            z = (nn.functional.linear(rows, weight, bias) if weight is not None else rows).float()
            if weight is not None:  # the model's own logits: its head transform
                z = head_transform_(z, softcap, logit_scale)
            logp = torch.log_softmax(z, dim=-1)
            entropy[start : start + step] = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
            top1[start : start + step] = z.argmax(-1) == y2[start : start + step]
        flat_valid = valid.reshape(-1)
        entropy = torch.where(flat_valid, entropy, 0.0).view(y.shape)
        top1 = (top1 & flat_valid).view(y.shape)
    return {"log_probs": -token_loss, "entropy": entropy, "is_top1": top1, "label_mask": valid}
