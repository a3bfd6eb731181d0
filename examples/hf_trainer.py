"""Hugging Face `Trainer` with a scoring rule: `apply_scoring_rule` patches the model's loss.

After `apply_scoring_rule(model, rule)`, `model(..., labels=labels).loss` is the scoring-rule loss,
computed by the fused loss from the final hidden states and `lm_head` (the logits are never formed).
Anything that reads `outputs.loss` then trains with the rule: `Trainer`, accelerate, your own loop.
Gradient accumulation stays exact (`num_items_in_batch`). A tiny random Llama here; use
`AutoModelForCausalLM.from_pretrained(...)` for a real one.

    python examples/hf_trainer.py
"""

import tempfile

import torch
import transformers

import properlm

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


def example(i):  # a learnable sequence; causal LMs take labels = input_ids (the model shifts them)
    ids = (i + 3 * torch.arange(24)) % V
    return {"input_ids": ids, "labels": ids.clone()}


train_data = [example(i) for i in range(64)]

# patch before building the Trainer (it reads the model's loss settings when built)
handle = properlm.apply_scoring_rule(model, "brier", smoothing=0.1)

with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(
        output_dir=out,
        max_steps=4,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_data)
    trainer.train()

print("Brier losses:", [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h])
handle.set_rule("spherical")  # switch rules at any time (see rule_schedule.py)
handle.remove()  # the model's own cross-entropy again

# Alternative without patching: a loss function for Trainer(compute_loss_func=...) that scores the
# model's full logits:
#   from properlm.integrations.transformers import scoring_rule_loss_func
#   trainer = Trainer(model, args, train_dataset=train_data,
#                     compute_loss_func=scoring_rule_loss_func("brier", smoothing=0.1, model=model))
