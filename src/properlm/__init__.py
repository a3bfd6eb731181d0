"""properlm: train and evaluate language-generation models with strictly proper scoring rules.

Rules beyond the logarithmic score: the Brier and spherical scores and the power and pseudo-spherical
families. Shao, Meng, Liu, Zhou. "Language Generation with Strictly Proper Scoring Rules", ICML 2024.

The core (imports nothing of the application):

* :mod:`~properlm.rules`, :mod:`~properlm.stats`, :mod:`~properlm.loss` -- the rules, their per-token statistics, the
  losses on logits; :mod:`~properlm.options` -- the loss options, checked once; :mod:`~properlm.fused` -- the loss of
  an output layer without its logits; :mod:`~properlm.distributed`, :mod:`~properlm.dtensor` -- vocabulary-parallel
  forms; :mod:`~properlm.compiled` -- the ``torch.compile`` forms; :mod:`~properlm.improper` -- improper baselines.

The application (builds on the core):

* :mod:`~properlm.models` -- loading models and tokenizers; :mod:`~properlm.data` -- data files, prompts, batches;
* :mod:`~properlm.training` -- ``properlm train``; :mod:`~properlm.evaluation` -- ``properlm evaluate`` and the
  comparison of runs; :mod:`~properlm.integrations` -- Hugging Face ``transformers``, PEFT, TRL;
  :mod:`~properlm.cli` -- the command line.

One line per module: [the package layout](#package-layout); start at
[getting started](../getting-started.md).
"""

from .fused import LinearScoringRuleLoss, fused_linear_scoring_rule_loss
from .improper import IMPROPER_OBJECTIVES, DFTLoss, OneMinusPLoss, dft_loss, get_improper_objective, one_minus_p_loss
from .integrations.transformers import apply_improper_loss, apply_scoring_rule, remove_scoring_rule
from .loss import ScoringRuleLoss, scoring_rule_loss, sequence_scores, token_scores
from .options import LossOptions
from .rules import (
    Brier,
    Logarithmic,
    Mixture,
    Power,
    PseudoSpherical,
    ScoringRule,
    Spherical,
    available_rules,
    get_rule,
    register_rule,
)

__version__ = "0.3.0"

__all__ = [
    "IMPROPER_OBJECTIVES",
    "Brier",
    "DFTLoss",
    "LinearScoringRuleLoss",
    "Logarithmic",
    "LossOptions",
    "Mixture",
    "OneMinusPLoss",
    "Power",
    "PseudoSpherical",
    "ScoringRule",
    "ScoringRuleLoss",
    "Spherical",
    "apply_improper_loss",
    "apply_scoring_rule",
    "available_rules",
    "dft_loss",
    "fused_linear_scoring_rule_loss",
    "get_improper_objective",
    "get_rule",
    "one_minus_p_loss",
    "register_rule",
    "remove_scoring_rule",
    "scoring_rule_loss",
    "sequence_scores",
    "token_scores",
]
