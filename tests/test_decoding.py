"""Scoring-rule beam search: the processor's values, and beam search that returns each
objective's own optimum on hand-built next-token distributions (checked by enumeration)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import GenerationMixin, LogitsProcessor, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from properlm.evaluation.decoding import ScoringRuleObjective, all_token_scores
from reference import naive_scores_all


class TableConfig(PretrainedConfig):
    model_type = "properlm-test-table"

    def __init__(self, vocab_size: int = 3, seed: int = 0, table: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.seed = seed
        self.table = table or {}


class TableLM(PreTrainedModel, GenerationMixin):
    """A causal "model" whose next-token logits are a fixed function of the whole prefix:
    ``table[prefix]`` (log-probabilities) where given, else seeded random logits."""

    config_class = TableConfig

    def __init__(self, config: TableConfig):
        super().__init__(config)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def next_logits(self, prefix: list[int]) -> torch.Tensor:
        key = ",".join(map(str, prefix))
        if key in self.config.table:
            return torch.log(torch.tensor(self.config.table[key], dtype=torch.float32))
        code = 0
        for t in prefix:
            code = code * 7 + int(t) + 1
        g = torch.Generator().manual_seed(self.config.seed * 100003 + code)
        return 2.0 * torch.randn(self.config.vocab_size, generator=g)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        B, L = input_ids.shape
        rows = []
        for b in range(B):
            start = 0 if attention_mask is None else int((attention_mask[b] == 0).sum())  # left padding
            ids = input_ids[b].tolist()
            rows.append(torch.stack([self.next_logits(ids[start : t + 1]) for t in range(L)]))
        return CausalLMOutput(logits=torch.stack(rows))

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def _model(**kw) -> TableLM:
    return TableLM(TableConfig(pad_token_id=0, bos_token_id=None, eos_token_id=None, **kw))


def _generate(model, prompt, rule, num_beams, steps, **kw):
    procs = kw.pop("logits_processor", [] if rule is None else [ScoringRuleObjective(rule)])
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        num_beams=num_beams,
        do_sample=False,
        max_new_tokens=steps,
        logits_processor=procs,
        use_cache=False,
        **kw,
    )
    return tuple(out[0, len(prompt) :].tolist())


def _brute_force(model, prompt, rule, steps):
    """The sequence of ``steps`` tokens with the largest summed token score (enumeration)."""
    best, best_seq = -math.inf, None
    for seq in itertools.product(range(model.config.vocab_size), repeat=steps):
        prefix, total = list(prompt), 0.0
        for t in seq:
            total += float(all_token_scores(model.next_logits(prefix)[None], rule)[0, t])
            prefix.append(t)
        if total > best:
            best, best_seq = total, seq
    return best_seq


# Hand-built: after the prompt [3], tokens 0 and 1 are nearly even; after 0 the next token
# is 0 with p 0.6 (one rival), after 1 it is 0 with p 0.55 (three small rivals).
# log:       (0, 0): log .52 + log .6  = -1.165 > (1, 0): log .48 + log .55 = -1.332
# spherical: (0, 0): .735 + .832 = 1.567 < (1, 0): .678 + .904 = 1.582
HAND_TABLE = {
    "3": [0.52, 0.48, 1e-6, 1e-6],
    "3,0": [0.6, 0.4, 1e-6, 1e-6],
    "3,1": [0.55, 0.15, 0.15, 0.15],
}


def test_processor_values_match_reference():
    g = torch.Generator().manual_seed(0)
    z = torch.log_softmax(3 * torch.randn(4, 11, generator=g, dtype=torch.float64), -1)
    p = torch.softmax(z, -1)
    for rule in ["brier", "spherical", "power:3", "pseudo-spherical:1.5", "power:1.5"]:
        got = ScoringRuleObjective(rule)(torch.zeros(4, 2, dtype=torch.long), z.float())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), naive_scores_all(p, rule), atol=2e-6, rtol=1e-5)
        # raw logits (greedy/sampling) give the same values: S depends on softmax only
        torch.testing.assert_close(all_token_scores(z.float() + 5.0, rule), got, atol=2e-6, rtol=1e-5)
    # subtract_max: the negative token loss
    got = ScoringRuleObjective("spherical", subtract_max=True)(None, z.float())
    torch.testing.assert_close(got.double(), naive_scores_all(p, "spherical") - 1, atol=2e-6, rtol=1e-5)


def test_logarithmic_is_identity():
    z = torch.log_softmax(torch.randn(3, 7), -1)
    assert ScoringRuleObjective("logarithmic")(None, z) is z
    assert ScoringRuleObjective("log")(None, z) is z


def test_minus_inf_stays_minus_inf():
    z = torch.log_softmax(torch.randn(2, 6), -1)
    z[0, 2] = -math.inf
    z[1, :] = -math.inf  # a row with nothing allowed
    for rule in ["spherical", "brier", "power:3", "pseudo-spherical:3"]:
        out = ScoringRuleObjective(rule)(None, z)
        assert out[0, 2] == -math.inf and bool(torch.isfinite(out[0, [0, 1, 3, 4, 5]]).all())
        assert bool((out[1] == -math.inf).all())
        assert not bool(out.isnan().any())


def test_bad_rule():
    with pytest.raises(ValueError, match="unknown scoring rule"):
        ScoringRuleObjective("nope")


def test_hand_built_log_and_spherical_prefer_different_beams():
    model = _model(vocab_size=4, table=HAND_TABLE)
    prompt = [3]
    best = {r: _brute_force(model, prompt, r, 2) for r in ("logarithmic", "spherical")}
    assert best["logarithmic"][:1] == (0,) and best["spherical"][:1] == (1,)
    for r in ("logarithmic", "spherical"):
        assert _generate(model, prompt, r, num_beams=2, steps=2) == best[r]
    # greedy search is the same for every rule
    assert _generate(model, prompt, "spherical", 1, 2) == _generate(model, prompt, None, 1, 2)


@pytest.mark.parametrize("seed", [2, 15])
def test_each_objective_returns_its_own_optimum(seed):
    model = _model(vocab_size=3, seed=seed)
    prompt, steps = [0], 3
    best = {r: _brute_force(model, prompt, r, steps) for r in ("logarithmic", "spherical", "brier")}
    assert best["logarithmic"] != best["spherical"]
    for r, b in best.items():
        # 9 beams keep every prefix of length 2: the search is exhaustive
        assert _generate(model, prompt, r, num_beams=9, steps=steps) == b
        assert _generate(model, prompt, r, num_beams=2, steps=steps) == b


def test_logarithmic_equals_ordinary_beam_search():
    model = TableLM(TableConfig(vocab_size=6, seed=3, pad_token_id=0, eos_token_id=5, bos_token_id=None))
    ids = torch.tensor([[1, 2], [0, 4]])  # second row left-padded
    mask = torch.tensor([[1, 1], [0, 1]])
    kw = dict(
        num_beams=3,
        do_sample=False,
        max_new_tokens=6,
        use_cache=False,
        num_return_sequences=3,
        return_dict_in_generate=True,
        output_scores=True,
        length_penalty=0.7,
    )
    plain = model.generate(ids, attention_mask=mask, **kw)
    ours = model.generate(ids, attention_mask=mask, logits_processor=[ScoringRuleObjective("logarithmic")], **kw)
    assert torch.equal(plain.sequences, ours.sequences)
    assert torch.equal(plain.sequences_scores, ours.sequences_scores)
    sph = model.generate(ids, attention_mask=mask, logits_processor=[ScoringRuleObjective("spherical")], **kw)
    assert bool((sph.sequences_scores >= 0).all())  # mean spherical scores: in [0, 1]


class _Forbid(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] = -math.inf
        return scores


def test_token_forbidden_by_an_earlier_processor_is_never_chosen():
    model = _model(vocab_size=4, table=HAND_TABLE)
    # spherical prefers (1, 0); forbidding token 1 must not turn its -inf into a score of 0
    assert _generate(model, [3], "spherical", 2, 2) == (1, 0)
    out = _generate(model, [3], None, 2, 2, logits_processor=[_Forbid(1), ScoringRuleObjective("spherical")])
    assert 1 not in out


class _ForbidAllAfter(LogitsProcessor):
    """Forbids every token after the prefix ``prefix`` (a dead end)."""

    def __init__(self, prefix: list[int]):
        self.prefix = prefix

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for row in range(input_ids.shape[0]):
            if input_ids[row].tolist() == self.prefix:
                scores[row] = -math.inf
        return scores


def test_dead_end_beam_is_dropped():
    model = _model(vocab_size=4, table=HAND_TABLE)
    for rule in ("logarithmic", "brier"):  # both prefer (0, 0) without the dead end
        assert _generate(model, [3], rule, 2, 2) == (0, 0)
        procs = [_ForbidAllAfter([3, 0]), ScoringRuleObjective(rule)]
        assert _generate(model, [3], None, 2, 2, logits_processor=procs)[0] == 1
