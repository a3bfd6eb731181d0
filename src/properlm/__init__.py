"""properlm: train and evaluate language-generation models with strictly proper scoring rules.

Rules beyond the logarithmic score: the Brier and spherical scores and the power and pseudo-spherical
families.

Shao, Meng, Liu, Zhou. "Language Generation with Strictly Proper Scoring Rules", ICML 2024.
"""

from .fused import LinearScoringRuleLoss, fused_linear_scoring_rule_loss
from .improper import IMPROPER_OBJECTIVES, DFTLoss, OneMinusPLoss, dft_loss, get_improper_objective, one_minus_p_loss
from .integrations.transformers import apply_improper_loss, apply_scoring_rule, remove_scoring_rule
from .loss import ScoringRuleLoss, scoring_rule_loss, sequence_scores, token_scores
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

__version__ = "0.2.0"

__all__ = [
    "IMPROPER_OBJECTIVES",
    "Brier",
    "DFTLoss",
    "LinearScoringRuleLoss",
    "Logarithmic",
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
