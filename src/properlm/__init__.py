"""properlm: train and evaluate language-generation models with strictly proper scoring
rules beyond the logarithmic score (Brier, spherical, power and pseudo-spherical families).

Shao, Meng, Liu, Zhou. "Language Generation with Strictly Proper Scoring Rules", ICML 2024.
"""

from .fused import LinearScoringRuleLoss, fused_linear_scoring_rule_loss
from .integrations.transformers import apply_scoring_rule, remove_scoring_rule
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
    "Brier",
    "LinearScoringRuleLoss",
    "Logarithmic",
    "Mixture",
    "Power",
    "PseudoSpherical",
    "ScoringRule",
    "ScoringRuleLoss",
    "Spherical",
    "apply_scoring_rule",
    "available_rules",
    "fused_linear_scoring_rule_loss",
    "get_rule",
    "register_rule",
    "remove_scoring_rule",
    "scoring_rule_loss",
    "sequence_scores",
    "token_scores",
]
