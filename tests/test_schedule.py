"""Rule schedules and the Trainer callback that follows them."""

from __future__ import annotations

import pytest
import torch

from properlm.integrations.schedule import RuleSchedule, RuleScheduleCallback
from properlm.rules import get_rule


def test_parse_stages_and_boundaries():
    s = RuleSchedule.parse("logarithmic:13000,brier:5000")
    assert [(r.spec, n) for r, n in s.stages] == [("logarithmic", 13000), ("brier", 5000)]
    assert s.total_steps == 18000
    assert s.boundaries == (0, 13000)
    assert s.rule_at(0).spec == "logarithmic"
    assert s.rule_at(12999).spec == "logarithmic"
    assert s.rule_at(13000).spec == "brier"
    assert s.rule_at(17999).spec == "brier"
    assert s.rule_at(10**9).spec == "brier"  # past the end: the last stage goes on
    assert s.stage_at(13000) == 1
    assert RuleSchedule.parse(s.spec) == s
    assert len(s) == 2


def test_parse_rules_with_parameters():
    s = RuleSchedule.parse(" power:3:10 , pseudo-spherical:1.5@20,spherical:5")
    assert [(r, n) for r, n in s.stages] == [
        (get_rule("power:3"), 10),
        (get_rule("pseudo-spherical:1.5"), 20),
        (get_rule("spherical"), 5),
    ]
    assert RuleSchedule.parse(s.spec) == s


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("logarithmic:13000,bogus:5", r"stage 2 \('bogus:5'\).*bogus"),
        ("logarithmic:13000,brier:0", r"stage 2 \('brier:0'\).*positive"),
        ("logarithmic:13000,brier:-3", r"stage 2 \('brier:-3'\).*positive"),
        ("logarithmic:abc,brier:5", r"stage 1 \('logarithmic:abc'\).*positive integer"),
        ("brier", r"stage 1 \('brier'\).*rule:steps"),
        ("logarithmic:10,,brier:5", r"stage 2 is empty"),
        ("logarithmic:10,brier:1.5", r"stage 2.*brier:1.5.*not an integer"),
        ("", r"non-empty"),
        (":10", r"stage 1.*missing rule"),
        ("power:0.5:10", r"stage 1 \('power:0.5:10'\)"),
    ],
)
def test_parse_errors_name_the_stage(text, match):
    with pytest.raises(ValueError, match=match):
        RuleSchedule.parse(text)


def test_constructor_validates():
    assert RuleSchedule.from_stages([("brier", 3), (get_rule("spherical"), 2)]).total_steps == 5
    with pytest.raises(ValueError, match="stage 2"):
        RuleSchedule.from_stages([("brier", 3), ("spherical", 0)])
    with pytest.raises(ValueError, match="at least one stage"):
        RuleSchedule(())
    with pytest.raises(ValueError, match="non-negative"):
        RuleSchedule.single("brier").rule_at(-1)


class _Target:
    def __init__(self):
        self.rule = get_rule("logarithmic")
        self.smoothing = 0.0

    def set_rule(self, rule, smoothing=None):
        self.rule = get_rule(rule)
        if smoothing is not None:
            self.smoothing = smoothing


class _State:
    def __init__(self):
        self.global_step = 0
        self.log_history = []


def test_callback_switches_at_boundaries_without_trainer():
    target = _Target()
    cb = RuleScheduleCallback("brier:3,spherical:2", target, smoothing=0.1)
    state = _State()
    cb.on_train_begin(None, state, None)
    seen = []
    for step in range(7):
        state.global_step = step
        cb.on_step_begin(None, state, None)
        seen.append(target.rule.spec)
    assert seen == ["brier"] * 3 + ["spherical"] * 4
    assert target.smoothing == 0.1
    assert cb.switches == [(0, "brier"), (3, "spherical")]
    state.global_step = 3  # the log after step 3 completed: step index 2 ran with brier
    state.log_history.append({"loss": 1.0, "step": 3})
    logs = {"loss": 1.0}
    cb.on_log(None, state, None, logs=logs)
    assert logs["rule"] == "brier" and logs["rule_stage"] == 0
    assert state.log_history[-1]["rule"] == "brier"


def test_callback_rejects_bad_target():
    with pytest.raises(ValueError, match="set_rule"):
        RuleScheduleCallback("brier:3", object())


@pytest.mark.slow
def test_callback_in_trainer_switches_rule_at_the_right_step(tmp_path):
    transformers = pytest.importorskip("transformers")
    from properlm.integrations.transformers import apply_scoring_rule

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    model = transformers.LlamaForCausalLM(cfg)
    handle = apply_scoring_rule(model, "logarithmic")
    data = [{"input_ids": torch.randint(50, (6,)).tolist()} for _ in range(16)]
    for row in data:
        row["labels"] = list(row["input_ids"])
    trainer_ref = {}
    used: list[tuple[int, str]] = []

    def record(module, args, kwargs):
        if kwargs.get("labels") is not None and module.training:
            used.append((trainer_ref["t"].state.global_step, handle.rule.spec))

    model.register_forward_pre_hook(record, with_kwargs=True, prepend=True)
    cb = RuleScheduleCallback("brier:3,spherical:2", handle)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer_ref["t"] = trainer
    trainer.train()
    # two micro-batches per optimizer step, step k sees global_step == k
    assert [s for s, _ in used] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [r for _, r in used] == ["brier"] * 6 + ["spherical"] * 6
    logged = [(h["step"], h["rule"]) for h in trainer.state.log_history if "loss" in h]
    assert logged == [(1, "brier"), (2, "brier"), (3, "brier"), (4, "spherical"), (5, "spherical"), (6, "spherical")]
