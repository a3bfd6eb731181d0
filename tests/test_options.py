"""properlm.options: the loss options validated once, their one description in every docstring, the shared policies."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import properlm
from properlm.distributed import fused_linear_vocab_parallel_scoring_rule_loss, vocab_parallel_scoring_rule_loss
from properlm.options import (
    OPTION_DOCS,
    LossModule,
    LossOptions,
    block_rows,
    chunk_rows,
    compute_dtype,
    fill_option_docs,
)


def test_options_are_validated_once_and_kept_normalised():
    opts = LossOptions("brier", 0.1, reduction="sum", softcap=5, smoothing_variant="gated")
    assert opts.rule == properlm.get_rule("brier") and opts.smoothing == 0.1 and opts.softcap == 5.0
    assert isinstance(opts.softcap, float) and opts.ignore_index == -100 and opts.logit_scale is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.smoothing = 0.2  # type: ignore[misc]
    assert dataclasses.replace(opts, smoothing=0.0).smoothing == 0.0
    for kwargs, match in [
        ({"rule": "nope"}, "unknown scoring rule"),
        ({"smoothing": 1.5}, "smoothing must be in"),
        ({"smoothing_variant": "x"}, "smoothing_variant must be one of"),
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"softcap": 0}, "softcap must be None or a finite number > 0"),
        ({"logit_scale": float("inf")}, "logit_scale must be None"),
    ]:
        with pytest.raises(ValueError, match=match):
            LossOptions(**kwargs)
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(opts, **kwargs)


def test_modules_hold_one_options_object_and_setting_an_option_validates():
    crit = properlm.ScoringRuleLoss("spherical", 0.1)
    assert crit.options == LossOptions("spherical", 0.1) and crit.rule.spec == "spherical"
    crit.smoothing = 0.2
    assert crit.options.smoothing == 0.2
    with pytest.raises(ValueError, match="reduction must be one of"):
        crit.reduction = "avg"
    fused = properlm.LinearScoringRuleLoss("brier", chunk_size=3)
    fused.smoothing_variant = "gated"
    assert fused.options.smoothing_variant == "gated" and "smoothing_variant='gated'" in repr(fused)
    assert isinstance(crit, LossModule) and isinstance(fused, LossModule)
    with pytest.raises(ValueError, match="softcap must be None"):
        fused.softcap = -1.0
    assert fused.options == LossOptions("brier", smoothing_variant="gated")  # a failed set keeps the options


#: every public entry point that takes the loss options as separate arguments
ENTRY_POINTS = [
    properlm.scoring_rule_loss,
    properlm.ScoringRuleLoss,
    properlm.fused_linear_scoring_rule_loss,
    properlm.LinearScoringRuleLoss,
    LossModule,
    vocab_parallel_scoring_rule_loss,
    fused_linear_vocab_parallel_scoring_rule_loss,
]


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda fn: fn.__name__)
def test_every_entry_point_takes_the_options_as_loss_options_does(fn):
    """The option parameters of each entry point are those of ``LossOptions``: same kind (the head transform and the
    smoothing variant keyword-only), same default, same order."""
    want = inspect.signature(LossOptions).parameters
    have = inspect.signature(fn).parameters
    assert [n for n in have if n in want] == list(want)
    for name, p in want.items():
        assert (have[name].kind, have[name].default) == (p.kind, p.default), name


@pytest.mark.parametrize(
    "fn",
    [
        properlm.scoring_rule_loss,
        properlm.ScoringRuleLoss,
        properlm.fused_linear_scoring_rule_loss,
        properlm.LinearScoringRuleLoss,
        LossOptions,
    ],
)
def test_every_docstring_shows_the_one_description_of_each_option(fn):
    doc = fn.__doc__
    assert "{smoothing}" not in doc and "{rule}" not in doc
    for name in ("rule", "smoothing", "smoothing_variant", "softcap"):
        assert fill_option_docs(f"    {name}: {{{name}}}").split(": ", 1)[1][:40] in doc
    assert OPTION_DOCS["ignore_index"] in doc


def test_fill_option_docs_indents_and_keeps_other_braces():
    out = fill_option_docs("Args:\n    smoothing: {smoothing} More.\n    lse: ``{c: LSE}``\n", width=60)
    lines = out.splitlines()
    assert lines[1].startswith("    smoothing: score smoothing") and all(
        ln.startswith("        ") for ln in lines[2:-1]
    )
    assert lines[-2].endswith("More.") and lines[-1] == "    lse: ``{c: LSE}``"


def test_dtype_policy_and_chunk_sizes():
    assert compute_dtype(torch.bfloat16) == compute_dtype(torch.float16) == torch.float32
    assert compute_dtype(torch.float64) == torch.float64
    assert block_rows(1000, torch.device("cpu")) == (1 << 20) // 1000
    assert chunk_rows(0) == 1 << 24 and chunk_rows(1 << 30) == 1
