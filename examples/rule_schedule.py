"""The paper's recipe: train with the logarithmic score, then switch to a bounded rule.

Shao et al. (2024) fine-tune a model trained with the log score (cross-entropy) with the Brier or
spherical score for the last steps. `RuleScheduleCallback` switches the rule of an
`apply_scoring_rule` handle (or of a `scoring_rule_loss_func`) at stage boundaries; the optimizer
and the learning-rate schedule carry on. On the command line:
`properlm train ... --schedule logarithmic:13000,brier:5000`.

    python examples/rule_schedule.py
"""

import tempfile

import torch
import transformers

import properlm
from properlm.integrations.schedule import RuleSchedule, RuleScheduleCallback

torch.manual_seed(0)
V = 64
config = transformers.LlamaConfig(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
model = transformers.LlamaForCausalLM(config)
train_data = [
    {"input_ids": (i + 3 * torch.arange(24)) % V, "labels": (i + 3 * torch.arange(24)) % V} for i in range(64)
]

schedule = RuleSchedule.parse("logarithmic:4,brier:2")  # 4 steps of log score, then 2 of Brier
handle = properlm.apply_scoring_rule(model, schedule.rule_at(0))
callback = RuleScheduleCallback(schedule, handle, smoothing=0.1)

with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(
        output_dir=out,
        max_steps=schedule.total_steps,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_data, callbacks=[callback])
    trainer.train()

print("switches (step, rule):", callback.switches)
for record in trainer.state.log_history:
    if "loss" in record:  # every log record names the rule of its step
        print(f"step {record['step']}  {record['rule']:<12} loss {record['loss']:.4f}")
handle.remove()
