"""properlm: train and evaluate language-generation models with strictly proper scoring
rules beyond the logarithmic score (Brier, spherical, power and pseudo-spherical families).

Shao, Meng, Liu, Zhou. "Language Generation with Strictly Proper Scoring Rules", ICML 2024.
"""

from .loss import ScoringRuleLoss, scoring_rule_loss, sequence_scores, token_scores
from .rules import (
    Brier,
    Logarithmic,
    PseudoSpherical,
    Power,
    ScoringRule,
    Spherical,
    available_rules,
    get_rule,
    register_rule,
)

__version__ = "0.1.0"

__all__ = [
    "ScoringRule",
    "Logarithmic",
    "Brier",
    "Spherical",
    "PseudoSpherical",
    "Power",
    "register_rule",
    "get_rule",
    "available_rules",
    "scoring_rule_loss",
    "ScoringRuleLoss",
    "token_scores",
    "sequence_scores",
]
