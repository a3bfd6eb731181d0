"""Summarisation: an encoder-decoder trained with the log score, switched to spherical, scored with ROUGE.

The paper's switch, as benchmarks/reproduce_summ.py measures it on AESLC email -> subject line
(benchmarks/RESULTS.md): train with the log score, then continue for the last fifth of the steps with
the spherical score. Here it is with the Python API on made-up emails (JSONL records with ``document``, ``summary`` and,
optionally, ``annotations``: further human summaries):

* ``properlm.data`` reads the records (errors name file and line) and cuts each document to its
  first ``MAX_SOURCE_LENGTH`` tokens, the same cut for training and decoding;
* ``apply_scoring_rule`` + ``RuleScheduleCallback`` switch the rule inside a ``Seq2SeqTrainer``;
* ``decode_prompts`` runs beam search (``objective="spherical"``: the scoring-rule beam objective);
* ``summarization_metrics`` gives ROUGE-1/2/L F1 (rouge-score, Porter stemmer), and with the
  annotations multi-reference ROUGE (per document the best F1 over its references).

With a pretrained summariser replace the tiny model by ``AutoModelForSeq2SeqLM.from_pretrained(...)``
and its tokenizer. The same on the command line::

    properlm train --init tiny-seq2seq --train-file train.jsonl --max-source-length 192 \\
        --schedule logarithmic:5000,spherical:1250 --smoothing 0 --output-dir run
    properlm evaluate --model run/final --data-file dev.jsonl --num-beams 4

    python examples/summarisation.py
"""

import json
import os
import random
import tempfile

import torch
import transformers

import properlm
from properlm.data import DataCollator, encode_prompt, load_examples, tokenize_examples
from properlm.evaluation.generation import decode_prompts
from properlm.evaluation.text_metrics import summarization_metrics
from properlm.integrations.schedule import RuleSchedule, RuleScheduleCallback
from properlm.models import load_model_and_tokenizer

MAX_SOURCE_LENGTH = 24  # tokens of each document kept, in training and in decoding alike
MAX_LENGTH = MAX_SOURCE_LENGTH + 1  # + the encoder's EOS; also the cap on a summary's tokens

rng = random.Random(0)
topics = ["gas", "power", "budget", "legal", "trading", "meeting"]
filler = "please review the attached file thanks call me today about the numbers for next week".split()


def email(topic: str) -> dict:
    body = " ".join([topic, *rng.choices(filler, k=rng.randint(5, 25)), topic, "report"])
    return {"document": body, "summary": f"{topic} report", "annotations": [f"{topic} update", f"the {topic} report"]}


with tempfile.TemporaryDirectory() as work:
    paths = {}
    for split, n in (("train", 192), ("dev", 24)):
        paths[split] = os.path.join(work, f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(email(rng.choice(topics))) + "\n" for _ in range(n))
    train, dev = load_examples(paths["train"]), load_examples(paths["dev"])
    print(f"task: {train[0].task}; {len(train)} training and {len(dev)} dev emails")

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(
        init="tiny-seq2seq",
        train_texts=[t for e in train for t in (e.source, e.target)],
        vocab_size=500,
        init_options={
            "hidden_size": 64,
            "num_layers": 1,
            "num_heads": 4,
            "ffn_size": 128,
            "dropout": 0.0,
            "max_positions": MAX_LENGTH,
        },
    )
    features = tokenize_examples(
        train, tokenizer, seq2seq=True, max_length=MAX_LENGTH, max_source_length=MAX_SOURCE_LENGTH
    )

    schedule = RuleSchedule.parse("logarithmic:40,spherical:10")  # the switch at step 40 of 50
    handle = properlm.apply_scoring_rule(model, schedule.rule_at(0))
    callback = RuleScheduleCallback(schedule, handle)
    args = transformers.Seq2SeqTrainingArguments(
        output_dir=os.path.join(work, "run"),
        max_steps=schedule.total_steps,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        warmup_steps=5,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = transformers.Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=features,
        callbacks=[callback],
        data_collator=DataCollator(pad_token_id=tokenizer.pad_token_id),
    )
    trainer.train()
    handle.remove()
    print("switches (step, rule):", callback.switches)
    for record in trainer.state.log_history:
        if "loss" in record:
            print(f"step {record['step']:>2}  {record['rule']:<12} loss {record['loss']:.4f}")

    model.eval()
    prompts = [
        encode_prompt(e, tokenizer, seq2seq=True, max_length=MAX_LENGTH, max_source_length=MAX_SOURCE_LENGTH)
        for e in dev
    ]
    refs = [e.target for e in dev]
    for objective in ("logarithmic", "spherical"):
        hyps = decode_prompts(
            model, tokenizer, prompts, num_beams=4, max_new_tokens=12, batch_size=8, objective=objective
        )
        rouge = summarization_metrics(hyps, refs, multi_references=[e.references for e in dev])
        print(
            f"beam 4, {objective} objective: ROUGE-1 {rouge['rouge1']:.1f}  ROUGE-2 {rouge['rouge2']:.1f}  "
            f"ROUGE-L {rouge['rougeL']:.1f}  multi-reference ROUGE-1 {rouge['rouge1_multi']:.1f}  "
            f"({rouge['rouge_settings']})"
        )
    print(f"first dev email: {dev[0].source[:60]}... -> {hyps[0]!r} (reference {refs[0]!r})")
