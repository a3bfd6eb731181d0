"""Data formats, their validation (file, line, field in every error), prompts, tokenisation."""

from __future__ import annotations

import json
import os

import pytest
import torch

from properlm.data import (
    IGNORE_INDEX,
    DataCollator,
    DataError,
    Example,
    build_prompt,
    detect_task,
    encode_prompt,
    load_examples,
    split_validation,
    tokenize_example,
    tokenize_examples,
    truncate_source,
)
from properlm.models import train_bpe_tokenizer

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "output": "hello"},
    {"instruction": "Name a colour.", "input": "", "output": "blue"},
]
SUMMARIES = [
    {"document": "The cat sat on the mat all day long.", "summary": "A cat sat."},
    {"document": "It rained in the city for a week.", "summary": "Rain."},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def causal_tok():
    texts = [v for r in ALPACA + SUMMARIES for v in r.values()] + ["one two three", "un deux trois"] * 10
    return train_bpe_tokenizer(texts, vocab_size=300, kind="causal")


@pytest.fixture(scope="module")
def seq2seq_tok():
    texts = [v for r in ALPACA + SUMMARIES for v in r.values()] + ["one two three", "un deux trois"] * 10
    return train_bpe_tokenizer(texts, vocab_size=300, kind="seq2seq")


# ---------------------------------------------------------------------- reading valid files


def test_instruction_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    examples = load_examples(path)
    assert [e.task for e in examples] == ["instruction"] * 3
    assert examples[0].source == "Add the numbers.\n\n2 and 3"
    assert examples[1].source == "Say hello."
    assert examples[2].source == "Name a colour."
    assert [e.target for e in examples] == ["5", "hello", "blue"]
    assert examples[1].fields["input"] == ""
    assert examples[2].location.endswith("train.jsonl line 3")


def test_instruction_json_array_keeps_line_numbers(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in ALPACA) + "\n]\n", encoding="utf-8")
    examples = load_examples(path)
    assert [e.target for e in examples] == ["5", "hello", "blue"]
    assert [e.location.rsplit(" ", 1)[1] for e in examples] == ["2", "3", "4"]
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c"}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json line 3: field 'output' is missing"):
        load_examples(bad)


def test_summarization_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "sum.jsonl", SUMMARIES)
    assert detect_task(path) == "summarization"
    examples = load_examples(path)
    assert examples[1].source == SUMMARIES[1]["document"] and examples[1].target == "Rain."
    assert examples[0].task == "summarization"


def test_summarization_annotations_are_further_references(tmp_path):
    rows = [{**SUMMARIES[0], "id": "x1", "annotations": ["Cat on mat.", "The cat"]}, SUMMARIES[1]]
    examples = load_examples(write_jsonl(tmp_path / "dev.jsonl", rows))
    assert examples[0].references == ("A cat sat.", "Cat on mat.", "The cat")
    assert examples[0].fields["annotations"] == ("Cat on mat.", "The cat")
    assert examples[1].references == ("Rain.",) and "annotations" not in examples[1].fields
    assert Example("s", "t", "translation").references == ("t",)


def test_parallel_files(tmp_path):
    (tmp_path / "a.src").write_text("one two\nthree\n", encoding="utf-8")
    (tmp_path / "a.tgt").write_text("un deux\ntrois\n", encoding="utf-8")
    examples = load_examples(
        source_file=tmp_path / "a.src", target_file=tmp_path / "a.tgt", source_lang="English", target_lang="French"
    )
    assert [(e.source, e.target) for e in examples] == [("one two", "un deux"), ("three", "trois")]
    assert examples[0].task == "translation" and examples[0].fields["target_lang"] == "French"


# ---------------------------------------------------------------------- malformed files


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"instruction": "x"}', r"line 2: field 'output' is missing"),
        ('{"output": "x"}', r"line 2: field 'instruction' is missing"),
        ('{"instruction": "x", "output": 5}', r"line 2: field 'output' must be a string, got int"),
        ('{"instruction": "x", "input": [1], "output": "y"}', r"line 2: field 'input' must be a string, got list"),
        ('{"instruction": "x", "output": "  "}', r"line 2: field 'output' is empty"),
        ('{"instruction": "x", "output": "y"', r"line 2: not valid JSON"),
        ('["x", "y"]', r"line 2: expected a JSON object"),
        ("", r"line 2: empty line"),
    ],
)
def test_malformed_instruction_jsonl(tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n" + line + "\n" + json.dumps(ALPACA[1]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="train.jsonl " + message):
        load_examples(path, task="instruction")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"document": "d"}, "field 'summary' is missing"),
        ({"summary": "s"}, "field 'document' is missing"),
        ({"document": "d", "summary": None}, "field 'summary' must be a string, got NoneType"),
        (
            {"document": "d", "summary": "s", "annotations": "t"},
            "field 'annotations' must be a list of strings, got str",
        ),
        ({"document": "d", "summary": "s", "annotations": ["t", 3]}, "field 'annotations' item 2 must be a string"),
        ({"document": "d", "summary": "s", "annotations": ["t", " "]}, "field 'annotations' item 2 is empty"),
    ],
)
def test_malformed_summarization(tmp_path, record, message):
    path = write_jsonl(tmp_path / "sum.jsonl", [SUMMARIES[0], SUMMARIES[1], record])
    with pytest.raises(DataError, match=f"sum.jsonl line 3: {message}"):
        load_examples(path)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(ALPACA[0]).encode() + b'\n{"instruction": "\xff", "output": "y"}\n')
    with pytest.raises(DataError, match="train.jsonl line 2: not valid UTF-8"):
        load_examples(path)


def test_malformed_parallel(tmp_path):
    (tmp_path / "s.txt").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "t.txt").write_text("x\ny\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"source and target files have different numbers of lines \(3 vs 2\)"):
        load_examples(source_file=tmp_path / "s.txt", target_file=tmp_path / "t.txt")
    (tmp_path / "t.txt").write_text("x\n \nz\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"t.txt line 2: empty line"):
        load_examples(source_file=tmp_path / "s.txt", target_file=tmp_path / "t.txt")
    with pytest.raises(DataError, match="needs both --source-file and --target-file"):
        load_examples(source_file=tmp_path / "s.txt")
    with pytest.raises(DataError, match="does not exist"):
        load_examples(source_file=tmp_path / "s.txt", target_file=tmp_path / "missing.txt")


def test_unknown_format_and_empty(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="x.jsonl line 1: cannot tell the data format"):
        load_examples(path)
    empty = tmp_path / "e.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="contains no records"):
        load_examples(empty)
    with pytest.raises(DataError, match="unknown task"):
        load_examples(path, task="poetry")


def test_split_validation_is_deterministic():
    examples = [Example(str(i), str(i), "translation") for i in range(20)]
    train, val = split_validation(examples, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert {e.source for e in train} | {e.source for e in val} == {str(i) for i in range(20)}
    assert split_validation(examples, 0.25, seed=3)[1] == val


# ---------------------------------------------------------------------- prompts and tokens


def test_causal_tokenisation_masks_prompt(causal_tok):
    ex = Example("Say hello.", "hello", "instruction", {"instruction": "Say hello.", "input": "", "output": "hello"})
    prompt = build_prompt(ex, causal_tok)
    assert prompt.endswith("### Response:\n") and "Say hello." in prompt
    out = tokenize_example(ex, causal_tok, seq2seq=False, max_length=512)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels) == len(out["attention_mask"])
    n_prompt = len(encode_prompt(ex, causal_tok))
    assert ids[0] == causal_tok.bos_token_id
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == causal_tok.eos_token_id
    assert causal_tok.decode(ids[n_prompt:-1]) == "hello"


def test_causal_truncation_keeps_target(causal_tok):
    ex = Example("word " * 200, "one two three", "summarization", {"document": "word " * 200, "summary": "x"})
    out = tokenize_example(ex, causal_tok, seq2seq=False, max_length=32)
    assert len(out["input_ids"]) == 32
    n_target = sum(1 for t in out["labels"] if t != IGNORE_INDEX)
    assert n_target == len(causal_tok("one two three", add_special_tokens=False)["input_ids"]) + 1


def test_truncate_source_cuts_the_text_before_the_template(causal_tok, seq2seq_tok):
    doc = " ".join(f"the cat sat on mat {i}" for i in range(200))  # > 1024 tokens: past model_max_length
    ex = Example(doc, "A cat sat.", "summarization", {"document": doc, "summary": "A cat sat."})
    assert truncate_source(ex, causal_tok, None) is ex
    short = Example("one two", "un", "translation", {"source": "one two"})
    assert truncate_source(short, causal_tok, 50) is short
    causal_tok.deprecation_warnings.clear()
    cut = truncate_source(ex, causal_tok, 40)
    # the too-long warning of transformers is not raised: properlm cuts the ids itself
    assert "sequence-length-is-longer-than-the-specified-maximum" not in causal_tok.deprecation_warnings
    assert doc.startswith(cut.source) and cut.fields["document"] == cut.source and cut.target == ex.target
    n = len(causal_tok(cut.source, add_special_tokens=False)["input_ids"])
    assert 36 <= n <= 40
    # decoder-only: the template around the document stays whole; the target is untouched
    prompt = encode_prompt(ex, causal_tok, max_source_length=40)
    assert prompt == encode_prompt(cut, causal_tok)
    assert causal_tok.decode(prompt, skip_special_tokens=True).endswith("\n\nSummary:\n")
    feats = tokenize_example(ex, causal_tok, seq2seq=False, max_length=512, max_source_length=40)
    assert feats["input_ids"][: len(prompt)] == prompt
    assert feats["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    # seq2seq: the encoder input is the cut document and still ends with EOS
    enc = tokenize_example(ex, seq2seq_tok, seq2seq=True, max_length=512, max_source_length=25)
    assert enc["input_ids"][-1] == seq2seq_tok.eos_token_id and len(enc["input_ids"]) <= 26
    assert doc.startswith(seq2seq_tok.decode(enc["input_ids"], skip_special_tokens=True))
    # an instruction record: its input is cut, the instruction stays
    inst = Example(
        "Summarise.\n\n" + doc, "x", "instruction", {"instruction": "Summarise.", "input": doc, "output": "x"}
    )
    cut_inst = truncate_source(inst, causal_tok, 10)
    assert cut_inst.fields["instruction"] == "Summarise." and doc.startswith(cut_inst.fields["input"])
    assert cut_inst.source == "Summarise.\n\n" + cut_inst.fields["input"]
    with pytest.raises(ValueError, match="max_source_length must be a positive integer"):
        truncate_source(ex, causal_tok, 0)


def test_seq2seq_tokenisation(seq2seq_tok):
    ex = Example("one two three", "un deux trois", "translation")
    out = tokenize_example(ex, seq2seq_tok, seq2seq=True, max_length=64)
    assert out["input_ids"][-1] == seq2seq_tok.eos_token_id
    assert out["labels"][-1] == seq2seq_tok.eos_token_id
    assert seq2seq_tok.decode(out["labels"], skip_special_tokens=True) == "un deux trois"
    assert seq2seq_tok.decode(out["input_ids"], skip_special_tokens=True) == "one two three"
    assert IGNORE_INDEX not in out["labels"]
    short = tokenize_example(ex, seq2seq_tok, seq2seq=True, max_length=2)
    assert len(short["input_ids"]) == 2 and len(short["labels"]) == 2


def test_translation_prompt_and_chat_template(causal_tok):
    ex = Example("one", "un", "translation", {"source_lang": "English", "target_lang": "French"})
    assert build_prompt(ex, causal_tok) == "Translate from English to French:\none\nFrench:\n"
    assert build_prompt(ex, causal_tok, seq2seq=True) == "one"

    class ChatTok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return f"<user>{messages[0]['content']}</user><assistant>"

    inst = Example("Say hi.", "hi", "instruction", {"instruction": "Say hi.", "input": ""})
    assert build_prompt(inst, ChatTok()) == "<user>Say hi.</user><assistant>"


@pytest.mark.slow
def test_tokenize_examples_and_collator(causal_tok):
    examples = [Example("one", "un deux", "translation"), Example("one two three", "un", "translation")]
    ds = tokenize_examples(examples, causal_tok, seq2seq=False, max_length=64)
    assert ds.column_names == ["input_ids", "attention_mask", "labels"] and len(ds) == 2
    batch = DataCollator(causal_tok.pad_token_id)([ds[0], ds[1]])
    lengths = [len(ds[0]["input_ids"]), len(ds[1]["input_ids"])]
    assert batch["input_ids"].shape == (2, max(lengths)) and batch["input_ids"].dtype == torch.long
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, min(lengths) :] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, min(lengths) :] == 0).all()
    assert (batch["input_ids"][short, min(lengths) :] == causal_tok.pad_token_id).all()
    assert batch["attention_mask"].sum().item() == sum(lengths)


def test_chat_template_prompt_is_masked(causal_tok):
    import copy

    tok = copy.deepcopy(causal_tok)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    ex = Example("Say hello.", "hello", "instruction", {"instruction": "Say hello.", "input": "", "output": "hello"})
    assert build_prompt(ex, tok) == "<|user|>Say hello.\n<|assistant|>"
    out = tokenize_example(ex, tok, seq2seq=False, max_length=128)
    prompt = encode_prompt(ex, tok)
    assert prompt == tok("<|user|>Say hello.\n<|assistant|>", add_special_tokens=False)["input_ids"]
    assert out["input_ids"][: len(prompt)] == prompt
    assert out["labels"] == [IGNORE_INDEX] * len(prompt) + out["input_ids"][len(prompt) :]
    assert tok.decode(out["input_ids"][len(prompt) :], skip_special_tokens=True) == "hello"


def test_text_files_may_end_in_blank_lines_as_jsonl_may(tmp_path):
    """A trailing blank line ends a text file as it may end a JSONL file; one before the last sentence is an
    error naming its line; a directory is named as one."""
    (tmp_path / "s.txt").write_text("a\nb\n\n", encoding="utf-8")
    (tmp_path / "t.txt").write_text("x\ny\n\n\n", encoding="utf-8")
    examples = load_examples(source_file=tmp_path / "s.txt", target_file=tmp_path / "t.txt")
    assert [(e.source, e.target) for e in examples] == [("a", "x"), ("b", "y")]
    (tmp_path / "s.txt").write_text("a\n\n", encoding="utf-8")
    (tmp_path / "t.txt").write_text("x\n\ny\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"different numbers of lines \(1 vs 3\)"):
        load_examples(source_file=tmp_path / "s.txt", target_file=tmp_path / "t.txt")
    (tmp_path / "s.txt").write_text("a\n\nb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"s.txt line 2: empty line"):
        load_examples(source_file=tmp_path / "s.txt", target_file=tmp_path / "t.txt")
    with pytest.raises(DataError, match="is a directory, not a file"):
        load_examples(source_file=tmp_path, target_file=tmp_path / "t.txt")


def test_a_pipe_is_read_as_a_text_file(tmp_path):
    """The shell's ``--target-file <(command)`` hands over a pipe (/dev/fd/N): it is read, not refused as
    missing, by the library and by train's and evaluate's checks."""
    import threading

    from properlm.evaluation.settings import EvalSettings, validate_settings
    from properlm.training import TrainConfig, validate_config

    fifo = tmp_path / "targets"
    os.mkfifo(fifo)
    (tmp_path / "s.txt").write_text("a\nb\n", encoding="utf-8")

    def write() -> None:
        with open(fifo, "w", encoding="utf-8") as f:
            f.write("x\ny\n")

    writer = threading.Thread(target=write)
    writer.start()
    examples = load_examples(source_file=tmp_path / "s.txt", target_file=fifo)
    writer.join(timeout=10)
    assert [e.target for e in examples] == ["x", "y"]
    validate_config(
        TrainConfig(
            init="tiny-gpt",
            source_file=str(tmp_path / "s.txt"),
            target_file=str(fifo),
            output_dir=str(tmp_path / "run"),
        ),
        warn=False,
    )
    validate_settings(
        EvalSettings(
            model=str(tmp_path),
            source_file=str(tmp_path / "s.txt"),
            target_file=str(fifo),
            output_dir=str(tmp_path / "e"),
        ),
        check_model=False,
        warn=False,
    )
