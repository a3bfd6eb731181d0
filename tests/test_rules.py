"""Rule objects: parsing, registry, user-defined rules, statistics formulas."""

from __future__ import annotations

import pytest
import torch

import properlm
from properlm.rules import Brier, Logarithmic, PseudoSpherical, ScoringRule, Spherical
from reference import naive_loss


def test_get_rule_specs_and_aliases():
    assert isinstance(properlm.get_rule("log"), Logarithmic)
    assert isinstance(properlm.get_rule("Logarithmic"), Logarithmic)
    assert isinstance(properlm.get_rule("quadratic"), Brier)
    assert isinstance(properlm.get_rule("spherical"), Spherical)
    r = properlm.get_rule("power:3")
    assert r.alpha == 3.0 and r.spec == "power:3"
    assert properlm.get_rule("pseudo-spherical:1.5").spec == "pseudo-spherical:1.5"
    assert properlm.get_rule(r) is r
    assert properlm.get_rule("power:3") == r and hash(properlm.get_rule("power:3")) == hash(r)
    assert repr(r) == "Power('power:3')"


def test_available_rules_and_s_max():
    names = properlm.available_rules()
    for n in ("logarithmic", "brier", "spherical", "pseudo-spherical", "power"):
        assert n in names
    assert properlm.get_rule("log").s_max == 0
    for n in ("brier", "spherical", "power:3", "pseudo-spherical:3"):
        assert properlm.get_rule(n).s_max == 1


def test_errors():
    with pytest.raises(ValueError, match="known rules: .*brier"):
        properlm.get_rule("hinge")
    with pytest.raises(ValueError, match="alpha > 1"):
        properlm.get_rule("power:1")
    with pytest.raises(ValueError, match="alpha > 1"):
        PseudoSpherical(0.9)
    with pytest.raises(ValueError, match="wrong number of parameters"):
        properlm.get_rule("spherical:3")
    with pytest.raises(ValueError, match="spec string or a ScoringRule"):
        properlm.get_rule(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        properlm.register_rule("x")(int)  # type: ignore[arg-type]


def test_user_defined_rule_works_everywhere():
    @properlm.register_rule("test-half-brier", aliases=("thb",))
    class HalfBrier(ScoringRule):
        """Brier / 2: still strictly proper; s_max = 1/2."""

        s_max = 0.5

        def score_scales(self):
            return (1.0, 2.0)

        def mean_score_scales(self):
            return (1.0, 2.0)

        def score(self, z_y, lse):
            return Brier().score(z_y, lse) / 2

        def mean_score(self, lse, sum_z, num_classes):
            return Brier().mean_score(lse, sum_z, num_classes) / 2

    assert "test-half-brier" in properlm.available_rules()
    logits = torch.randn(4, 9, requires_grad=True)
    target = torch.randint(9, (4,))
    ours = properlm.scoring_rule_loss(logits, target, "thb", reduction="none")
    torch.testing.assert_close(ours.double(), naive_loss(logits.detach(), target, "brier", reduction="none") / 2)
    ours.sum().backward()
    assert logits.grad is not None


def test_rule_without_mean_score_rejects_smoothing():
    @properlm.register_rule("test-no-mean")
    class NoMean(ScoringRule):
        def score_scales(self):
            return (2.0,)

        def score(self, z_y, lse):
            return torch.exp(z_y - lse[2.0] / 2)

    logits, target = torch.randn(3, 5), torch.randint(5, (3,))
    properlm.scoring_rule_loss(logits, target, "test-no-mean")
    with pytest.raises(NotImplementedError, match="smoothing"):
        properlm.scoring_rule_loss(logits, target, "test-no-mean", smoothing=0.1)


def test_scores_broadcast_over_vocabulary():
    """score(z, lse[..., None]) gives S(p, k) for every k: what decoding uses."""
    z = torch.randn(2, 6, dtype=torch.float64)
    p = torch.softmax(z, -1)
    lse = {c: torch.logsumexp(c * z, -1, keepdim=True) for c in (1.0, 2.0)}
    torch.testing.assert_close(Spherical().score(z, lse), p / p.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(Brier().score(z, lse), 2 * p - (p**2).sum(-1, keepdim=True))


def test_scales():
    assert properlm.get_rule("spherical").scales() == (2.0,)
    assert properlm.get_rule("spherical").scales(0.1) == (1.0, 2.0)
    assert properlm.get_rule("pseudo-spherical:1.5").scales(0.1) == (0.5, 1.0, 1.5)
    assert properlm.get_rule("power:3").scales(0.1) == (1.0, 2.0, 3.0)
    assert properlm.get_rule("log").scales(0.1) == (1.0,)


def test_rule_spec_errors_say_what_each_rule_takes():
    """'spherical:2' used to leak "Spherical.__init__() takes 1 positional argument but 2 were given", and a typo
    ('brie') got no suggestion. Now the message says that spherical takes no parameter, lists the rules that take
    one, and suggests the nearest name."""
    with pytest.raises(ValueError) as exc:
        properlm.get_rule("spherical:2")
    message = str(exc.value)
    assert "spherical takes no parameter" in message and "positional argument" not in message
    assert "the rules that take a parameter: power:ALPHA, pseudo-spherical:ALPHA" in message
    with pytest.raises(ValueError, match=r"power takes one parameter \(power:ALPHA\)"):
        properlm.get_rule("power:2,3")
    with pytest.raises(ValueError, match=r"unknown scoring rule 'brie' \(did you mean 'brier'\?\); known rules"):
        properlm.get_rule("brie")
    with pytest.raises(ValueError, match=r"\(did you mean 'pseudospherical'\?\)"):
        properlm.get_rule("pseudosphericl:3")
    assert properlm.get_rule("power").spec == "power:2" and properlm.get_rule("pseudo-spherical:3").params() == (3.0,)
