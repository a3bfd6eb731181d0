"""TRL's `SFTTrainer` with a scoring rule: patch `trainer.model` after building the trainer.

`SFTTrainer` computes the loss through the model (TRL's fused head protocol included), so
`apply_scoring_rule` takes over: the loss on the completion tokens is the scoring rule's, and TRL's
metrics (token accuracy, entropy) still work. A tiny random Llama and a word-level tokenizer here;
use `SFTTrainer(model="HuggingFaceTB/SmolLM2-135M-Instruct", ...)` or your own for real runs.

    python examples/trl_sft.py
"""

import tempfile

import datasets
import torch
import transformers
import trl
from tokenizers import Tokenizer, models, pre_tokenizers

import properlm

torch.manual_seed(0)
words = "zero one two three four five six seven eight nine".split()
vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words, "plus", "is"])}
backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
)

config = transformers.LlamaConfig(
    vocab_size=len(vocab),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    eos_token_id=1,
)
model = transformers.LlamaForCausalLM(config)

# prompt-completion data: SFTTrainer puts the loss on the completion only
rows = [
    {"prompt": f"{words[a]} plus {words[b]} is", "completion": f" {words[(a + b) % 10]}"}
    for a in range(10)
    for b in range(4)
]

with tempfile.TemporaryDirectory() as out:
    args = trl.SFTConfig(
        output_dir=out,
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        max_length=32,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )
    handle = properlm.apply_scoring_rule(trainer.model, "spherical", smoothing=0.1)
    trainer.train()
    handle.remove()

print("spherical losses:", [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h])
