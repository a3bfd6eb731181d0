"""LoRA fine-tuning (PEFT) with a scoring rule.

`apply_scoring_rule` works on a PEFT model like on the base model: only the LoRA adapters train, and
the loss is the fused scoring-rule loss (the output head stays frozen and unwrapped, so it fuses;
with `modules_to_save=["lm_head"]` or LoRA on `lm_head` pass `fused=False`). Any loop that reads
`outputs.loss` works; a plain one here (with `Trainer`, see hf_trainer.py).

    python examples/lora_peft.py
"""

import peft
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
base = transformers.LlamaForCausalLM(config)  # a pretrained model in real use

lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
model = peft.get_peft_model(base, lora)
model.print_trainable_parameters()

handle = properlm.apply_scoring_rule(model, "spherical", smoothing=0.1)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
for step in range(8):
    ids = (torch.randint(V, (8, 1)) + 5 * torch.arange(20)) % V
    loss = model(input_ids=ids, labels=ids).loss  # the spherical loss of the LoRA model
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}  spherical loss {loss.item():.4f}")
handle.remove()
# model.save_pretrained(DIR) writes the adapter only, as usual with PEFT
