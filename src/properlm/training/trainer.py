"""The ``transformers.Trainer`` subclass of ``properlm train``.

``make_trainer_class`` builds it when ``transformers`` is imported: its evaluation reports every rule's mean token
score (:mod:`properlm.training.scores`) and its length-grouped sampler is
:class:`~properlm.training.sampler.EpochSeededLengthGroupedSampler`. Training itself is the ``Trainer``'s: the loss
is the patched model's own (:func:`properlm.integrations.transformers.apply_scoring_rule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

from ..evaluation.teacher_forced import capture_scored_rows
from ..models import is_seq2seq, unwrap_model
from .checkpoints import missing_weights
from .sampler import EpochSeededLengthGroupedSampler
from .scores import row_score_sums, score_sums


def make_trainer_class() -> type:
    """The ``Trainer`` subclass of ``properlm train`` (built on first use: transformers is imported lazily)."""
    from transformers import Trainer

    from ..improper import get_improper_objective
    from ..loss import scoring_rule_loss

    class ScoringRuleTrainer(Trainer):
        """``Trainer`` whose evaluation reports every rule's mean token score.

        ``prediction_step`` runs the model without labels (so the logits are materialised
        whatever loss patch is applied), computes the current training rule's loss on them
        with :func:`properlm.scoring_rule_loss` (or the improper objective's loss, with
        ``--improper-loss``), and returns per-sequence score sums
        ``(B, R)`` as predictions and token counts ``(B, 1)`` as labels, which
        :meth:`compute_score_metrics` turns into means over all held-out tokens.
        """

        properlm_rules: Sequence[str] = ()
        properlm_rule_at: Any = None
        properlm_smoothing: float = 0.0
        properlm_smoothing_variant: str = "paper"
        properlm_improper_loss: str | None = None

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            """The length-grouped sampler, made a function of (seed, epoch) so that resuming is exact.

            ``transformers``' ``LengthGroupedSampler`` draws each epoch's permutation from the global
            torch RNG, whose state at an epoch start depends on everything drawn before (dropout).
            A run resumed past its first epoch restores that RNG only after the permutation is
            drawn, so it saw another data order. :class:`EpochSeededLengthGroupedSampler` seeds
            each epoch from ``data_seed`` (or ``seed``) and the epoch, like accelerate's seedable
            random sampler does for the plain shuffle.
            """
            from transformers.trainer_pt_utils import LengthGroupedSampler

            sampler = super()._get_train_sampler(*args, **kwargs)
            if type(sampler) is LengthGroupedSampler:
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                sampler = EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
            return sampler

        def _issue_warnings_after_load(self, load_result: Any) -> None:
            """``Trainer``'s warnings after loading a checkpoint, without the alarm for tied weights.

            A checkpoint holds each tied parameter once, so loading it reports the embeddings and the
            output head tied to it as missing keys ("There were missing keys in the checkpoint model
            loaded: [...embed_tokens.weight, ... lm_head.weight]"), which reads as lost weights. When
            every missing key is of that kind (:func:`~properlm.training.checkpoints.missing_weights`),
            that warning is left out; any other missing key warns as before.
            """
            missing = list(load_result.missing_keys)
            ignored = set(getattr(self.model, "_keys_to_ignore_on_save", None) or ())
            if missing and set(missing) != ignored and not missing_weights(self.model, missing):
                load_result = SimpleNamespace(missing_keys=[], unexpected_keys=list(load_result.unexpected_keys))
            super()._issue_warnings_after_load(load_result)

        def prediction_step(
            self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
        ) -> tuple[Any, Any, Any]:
            inputs = self._prepare_inputs(inputs)
            labels = inputs["labels"]
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            base = unwrap_model(model)
            seq2seq = is_seq2seq(base)
            if seq2seq:
                fwd["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)
            # decoder-only: the head forms logits at the scored positions only (see
            # properlm.evaluation.teacher_forced); (B, T, V) over the prompts is never materialised
            with torch.no_grad(), capture_scored_rows(base, seq2seq) as hook, self.compute_loss_context_manager():
                shifted = None
                if hook is not None:
                    shifted = torch.full_like(labels, -100)
                    shifted[:, :-1] = labels[:, 1:]
                    hook.arm(shifted != -100)
                logits = model(**fwd).logits
                rows = None if hook is None else hook.rows(logits, "evaluation")
            counts = (labels[:, 0 if seq2seq else 1 :] != -100).sum(-1, keepdim=True).double()
            if rows is not None and shifted is not None:
                mask = shifted != -100
                targets = shifted[mask]
                seq = mask.nonzero()[:, 0]
                loss = self._properlm_eval_loss(rows, targets)
                return loss, row_score_sums(rows.detach(), targets, seq, labels.shape[0], self.properlm_rules), counts
            if not seq2seq:
                logits, labels = logits[:, :-1], labels[:, 1:]
            loss = self._properlm_eval_loss(logits, labels)
            return loss, score_sums(logits.detach(), labels, self.properlm_rules), counts

        def _properlm_eval_loss(self, logits: Any, labels: Any) -> Any:
            """The training objective's mean loss over the scored positions of ``logits (..., V)``."""
            if self.properlm_improper_loss is not None:  # the improper objective trained instead of a rule
                return get_improper_objective(self.properlm_improper_loss)(logits, labels).detach()
            rule = self.properlm_rule_at(self.state.global_step)
            return scoring_rule_loss(
                logits, labels, rule, self.properlm_smoothing, smoothing_variant=self.properlm_smoothing_variant
            ).detach()

    return ScoringRuleTrainer
