r"""Train Hugging Face models with a scoring rule instead of cross-entropy.

Two ways in, both exact under gradient accumulation (they divide by ``num_items_in_batch``):

1. :func:`scoring_rule_loss_func` -- a loss for ``transformers.Trainer(compute_loss_func=...)``.
   It scores the model's full logits with :func:`properlm.scoring_rule_loss`::

       loss_func = scoring_rule_loss_func("spherical", smoothing=0.1, model=model)
       trainer = Trainer(model=model, args=args, train_dataset=ds, compute_loss_func=loss_func)

2. :func:`apply_scoring_rule` -- patches the model so that ``model(..., labels=labels)`` returns
   the scoring-rule loss computed by the fused linear loss
   (:func:`properlm.fused.fused_linear_scoring_rule_loss`) straight from the final hidden
   states and the output-embedding weight: the ``(batch, time, vocab)`` logits are never
   built. Any training loop that reads ``outputs.loss`` (``Trainer``, TRL's ``SFTTrainer``,
   accelerate, a hand-written loop) then trains with the rule::

       handle = apply_scoring_rule(model, "brier", smoothing=0.1)
       Trainer(model=model, args=args, train_dataset=ds).train()
       handle.remove()            # or remove_scoring_rule(model): the model's own loss again

   :func:`apply_improper_loss` installs the same patch with an improper baseline objective
   (:mod:`properlm.improper`: DFT or ``1 - p``) in place of the rule.

Alignment of labels and predictions. Causal LMs predict token ``t+1`` at position ``t``:
the loss pairs ``hidden[..., :-1, :]`` (or ``logits[..., :-1, :]``) with ``labels[..., 1:]``, as
``transformers.loss.loss_utils.ForCausalLMLoss`` does. Encoder-decoder models
(``config.is_encoder_decoder``) feed right-shifted labels to the decoder, so ``labels`` are
already aligned with the decoder outputs and nothing is shifted. A pre-shifted ``shift_labels``
tensor passed to the model (context-parallel collators) is used as is.

How the patch works. :func:`apply_scoring_rule` registers three hooks and changes nothing
else (no parameter, buffer or state-dict key; the hooks are plain picklable objects): see
:mod:`~properlm.integrations.transformers.hooks`.

``Trainer`` reads two things off the model when it is built, so patch before building it: the
patch sets ``accepts_loss_kwargs = True`` (the pre-hook consumes ``num_items_in_batch``) and, for
causal models whose ``loss_type`` is None (GPT-2), ``loss_type = "ForCausalLM"`` so that
``num_items_in_batch`` counts ``labels[..., 1:]``; both are restored by :meth:`ScoringRuleHandle.remove`.

TRL. ``SFTTrainer`` (TRL >= 1) computes its loss from ``model(..., labels=..., fused_lm_head=True)``
(its own fused NLL head). The pre-hook takes over such calls too: it returns TRL's
``FusedCausalLMOutput`` with ``loss`` the scoring-rule loss, ``log_probs`` minus the per-token
loss (so TRL's ``-log_probs.sum() / num_items_in_batch`` is the scoring-rule loss), and
``entropy`` / ``is_top1`` of the model for TRL's metrics. Patch ``trainer.model`` after building
the ``SFTTrainer`` (or the model before, when you wrap it with PEFT yourself).

During a call with labels in fused mode ``outputs.logits`` is therefore an empty tensor of
shape ``(..., 0, vocab)`` (``(..., 1, vocab)`` for a tensor-parallel head whose weight is a
``DTensor``; its loss is then the vocabulary-parallel loss of :mod:`properlm.dtensor`); call the
model without labels to get logits (generation and evaluation do). With ``fused=False`` the model
computes its full logits and the loss is
:func:`properlm.scoring_rule_loss` on them: use it for heads the fused loss cannot express
(a PEFT-wrapped head).

Output heads of today's models. Some models transform ``hidden @ W.T`` after the output
embedding (Gemma 2/3's soft-cap, Cohere's and Granite's logit scales); the fused loss applies the same
transform, read off the model's config: see :mod:`~properlm.integrations.transformers.heads`.

Modules, one job each:

* :mod:`~properlm.integrations.transformers.loss_func` -- way 1, the loss for ``Trainer(compute_loss_func=...)``;
* :mod:`~properlm.integrations.transformers.patch` -- way 2, :func:`apply_scoring_rule`,
  :func:`apply_improper_loss`, :func:`remove_scoring_rule`;
* :mod:`~properlm.integrations.transformers.handle` -- :class:`ScoringRuleHandle`, the handle of a patch;
* :mod:`~properlm.integrations.transformers.hooks` -- the three hooks of a patch and the loss of a call;
* :mod:`~properlm.integrations.transformers.heads` -- soft-caps and logit scales of output heads;
* :mod:`~properlm.integrations.transformers.trl_metrics` -- the metric fields of TRL's fused-head output;
* :mod:`~properlm.integrations.transformers.introspection` -- what is read off a model (config, PEFT base, head);
* :mod:`~properlm.integrations.transformers.alignment` -- how labels pair with predictions.

The package exports the public names of those modules.
"""

from __future__ import annotations

from .handle import ScoringRuleHandle
from .loss_func import ScoringRuleLossFunc, scoring_rule_loss_func
from .patch import apply_improper_loss, apply_scoring_rule, is_scoring_rule_applied, remove_scoring_rule

__all__ = [
    "ScoringRuleHandle",
    "ScoringRuleLossFunc",
    "apply_improper_loss",
    "apply_scoring_rule",
    "is_scoring_rule_applied",
    "remove_scoring_rule",
    "scoring_rule_loss_func",
]
