"""An interrupted decoding resumes from its journal with the uninterrupted run's hypotheses, bit for bit.

`properlm evaluate` on an LLM decodes for tens of minutes; a kill used to lose all of it.
"""

from __future__ import annotations

import json
import os

import pytest

from properlm.cli.main import main
from properlm.evaluation.generation import decode_prompts_with_stats
from properlm.evaluation.journal import JOURNAL_KIND, DecodeJournal, model_fingerprint

SRC = [
    "das haus ist klein",
    "der hund ist gross",
    "die katze schläft",
    "ich trinke wasser",
    "wir gehen nach hause",
    "das ist gut",
    "der tag ist lang",
    "ich bin hier",
    "wir sind da",
    "es regnet heute",
]
TGT = [
    "the house is small",
    "the dog is big",
    "the cat sleeps",
    "i drink water",
    "we go home",
    "that is good",
    "the day is long",
    "i am here",
    "we are there",
    "it rains today",
]


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from properlm.models import load_model_and_tokenizer

    root = tmp_path_factory.mktemp("journal")
    model, tok = load_model_and_tokenizer(
        init="tiny-gpt",
        train_texts=SRC + TGT,
        vocab_size=300,
        seed=0,
        init_options={"hidden_size": 32, "num_layers": 1, "num_heads": 2},
    )
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    src, tgt = root / "test.de", root / "test.en"
    src.write_text("\n".join(SRC) + "\n", encoding="utf-8")
    tgt.write_text("\n".join(TGT) + "\n", encoding="utf-8")
    return model, tok, str(root / "model"), str(src), str(tgt)


def _prompts(tok):
    return [tok(s)["input_ids"] for s in SRC]


def _decode(model, tok, prompts, journal=None, progress=None, **kw):
    opts = {
        "num_beams": 2,
        "max_new_tokens": 6,
        "batch_size": 3,
        "max_new_tokens_ratio": 1.0,
        "max_new_tokens_offset": 1,
        **kw,
    }
    return decode_prompts_with_stats(model, tok, prompts, journal=journal, progress=progress, **opts)


def _stop_after(batches):
    seen = []

    def progress(n):
        seen.append(n)
        if len(seen) == batches:
            raise Interrupt

    return progress


def _counting(model, monkeypatch):
    calls = []
    real = model.generate

    def generate(*a, **k):
        calls.append(k["input_ids"].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(model, "generate", generate)
    return calls


@pytest.mark.slow
def test_an_interrupted_decoding_resumes_with_the_same_hypotheses(tiny, tmp_path, monkeypatch):
    model, tok, path, _, _ = tiny
    prompts = _prompts(tok)
    hyps, stats = _decode(model, tok, prompts)
    jpath = tmp_path / "journal.jsonl"
    with pytest.raises(Interrupt):
        _decode(model, tok, prompts, journal=DecodeJournal(jpath, key=model_fingerprint(path)), progress=_stop_after(2))
    lines = jpath.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["kind"] == JOURNAL_KIND and len(lines) == 3  # header and two batches of 3
    calls = _counting(model, monkeypatch)
    journal = DecodeJournal(jpath, key=model_fingerprint(path))
    resumed, resumed_stats = _decode(model, tok, prompts, journal=journal)
    assert calls == [3, 1]  # 10 prompts in batches of 3: only the last two batches decoded again
    assert journal.resumed == 6 and not journal.discarded
    assert resumed == hyps and resumed_stats == stats
    journal.finish()
    assert not jpath.exists()


@pytest.mark.slow
def test_a_line_cut_short_by_a_kill_is_decoded_again(tiny, tmp_path, monkeypatch):
    model, tok, _, _, _ = tiny
    prompts = _prompts(tok)
    hyps, _ = _decode(model, tok, prompts)
    jpath = tmp_path / "journal.jsonl"
    with pytest.raises(Interrupt):
        _decode(model, tok, prompts, journal=DecodeJournal(jpath, key="k"), progress=_stop_after(3))
    text = jpath.read_text(encoding="utf-8")
    jpath.write_text(text[: len(text) - 25], encoding="utf-8")  # the third batch's line, cut in the middle
    calls = _counting(model, monkeypatch)
    journal = DecodeJournal(jpath, key="k")
    assert _decode(model, tok, prompts, journal=journal)[0] == hyps
    assert calls == [3, 1] and journal.resumed == 6
    # the journal was rewritten whole: every line parses, and a second resume takes all four batches
    assert all(json.loads(line) for line in jpath.read_text(encoding="utf-8").splitlines())
    calls.clear()
    assert _decode(model, tok, prompts, journal=DecodeJournal(jpath, key="k"))[0] == hyps and calls == []


@pytest.mark.slow
@pytest.mark.parametrize("change", ["settings", "prompts", "model"])
def test_a_journal_of_another_decoding_is_never_mixed_in(tiny, tmp_path, monkeypatch, change):
    model, tok, _, _, _ = tiny
    prompts = _prompts(tok)
    jpath = tmp_path / "journal.jsonl"
    with pytest.raises(Interrupt):
        _decode(model, tok, prompts, journal=DecodeJournal(jpath, key="model-1"), progress=_stop_after(2))
    kw, key = {}, "model-1"
    if change == "settings":
        kw = {"num_beams": 1}
    elif change == "prompts":
        prompts = [[*p, 5] for p in prompts]
    else:
        key = "model-2"
    expected, _ = _decode(model, tok, prompts, **kw)
    calls = _counting(model, monkeypatch)
    journal = DecodeJournal(jpath, key=key)
    assert _decode(model, tok, prompts, journal=journal, **kw)[0] == expected
    assert len(calls) == 4 and journal.discarded and journal.resumed == 0


def test_model_fingerprint_follows_the_weights_not_what_is_written_beside_them(tiny, tmp_path):
    import shutil

    _, _, path, _, _ = tiny
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    before = model_fingerprint(str(copy))
    assert any(name == "model.safetensors" for name, _, _ in before["files"])
    (copy / "results.json").write_text("{}", encoding="utf-8")  # an evaluation writing into the model dir
    assert model_fingerprint(str(copy)) == before
    weights = copy / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # retrained in place
    assert model_fingerprint(str(copy)) != before


def test_model_fingerprint_of_an_adapter_follows_its_base_model(tiny, tmp_path):
    """A LoRA adapter is decoded merged into its base model: retraining the base in place (same adapter files)
    must change the fingerprint, so that a journal of the old base is not resumed."""
    import shutil

    _, _, path, _, _ = tiny
    base = tmp_path / "base"
    shutil.copytree(path, base)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "../base"}), encoding="utf-8")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    before = model_fingerprint(str(adapter))
    assert before["base"]["model"] == str(base) and before["base"]["files"]
    assert [name for name, _, _ in before["files"]] == ["adapter_config.json", "adapter_model.safetensors"]
    weights = base / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # base retrained
    assert model_fingerprint(str(adapter)) != before
    (adapter / "properlm_base.json").write_text(json.dumps({"gguf_file": "model.gguf"}), encoding="utf-8")
    assert model_fingerprint(str(adapter))["base"]["gguf_file"] == "model.gguf"


@pytest.mark.slow
def test_evaluate_resumes_an_interrupted_decoding(tiny, tmp_path, monkeypatch, capsys):
    """`properlm evaluate` killed while decoding, run again with the same command: the hypotheses decoded before
    the kill are taken from OUTPUT_DIR/decode_journal.jsonl, the results equal an uninterrupted run's, and the
    journal is removed."""
    import properlm.evaluation.run as run_module

    _, _, path, src, tgt = tiny
    cmd = [
        "evaluate",
        "--model",
        path,
        "--source-file",
        src,
        "--target-file",
        tgt,
        "--num-beams",
        "2",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "3",
        "--rules",
        "logarithmic",
    ]
    assert main([*cmd, "--output-dir", str(tmp_path / "whole"), "--no-progress"]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text(encoding="utf-8"))
    assert whole["generation"]["resumed_hypotheses"] == 0

    real_tqdm = run_module.progress_bar

    class Bar:
        def __init__(self, total, desc, enabled):
            self.desc, self.n = desc, 0

        def update(self, n):
            self.n += 1
            if self.desc == "decoding" and self.n == 2:
                raise Interrupt

        def close(self):
            pass

    monkeypatch.setattr(run_module, "progress_bar", Bar)
    out = tmp_path / "killed"
    with pytest.raises(Interrupt):
        main([*cmd, "--output-dir", str(out)])
    assert (out / run_module.DECODE_JOURNAL).is_file() and not (out / "results.json").exists()
    monkeypatch.setattr(run_module, "progress_bar", real_tqdm)
    capsys.readouterr()
    assert main([*cmd, "--output-dir", str(out)]) == 0
    assert "6 hypotheses from the interrupted decoding" in capsys.readouterr().err
    resumed = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert resumed["generation"]["resumed_hypotheses"] == 6
    assert not (out / run_module.DECODE_JOURNAL).exists()
    assert (out / "hypotheses.txt").read_text(encoding="utf-8") == (tmp_path / "whole" / "hypotheses.txt").read_text(
        encoding="utf-8"
    )
    assert (resumed["generation"]["bleu"], resumed["generation"]["chrf"]) == (
        whole["generation"]["bleu"],
        whole["generation"]["chrf"],
    )
    assert resumed["generation"]["new_token_cap"]["num_at_cap"] == whole["generation"]["new_token_cap"]["num_at_cap"]


@pytest.mark.slow
def test_generate_resumes_into_its_output_file(tiny, tmp_path, monkeypatch, capsys):
    """`properlm generate --output FILE` killed while decoding: FILE.journal.jsonl keeps the finished batches and
    the same command decodes only the rest; the output equals an uninterrupted run's and the journal goes."""
    import properlm.evaluation.generation as generation
    from properlm.cli.generate import JOURNAL_SUFFIX

    _, _, path, src, _ = tiny
    cmd = [
        "generate",
        "--model",
        path,
        "--input",
        src,
        "--task",
        "translation",
        "--num-beams",
        "2",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "3",
    ]
    assert main([*cmd, "--output", str(tmp_path / "whole.txt")]) == 0
    out = tmp_path / "out.txt"
    real = generation.new_token_cap
    calls = []

    def stop_at_third(*a, **k):  # called once per decoded batch, before it is decoded
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt
        return real(*a, **k)

    monkeypatch.setattr(generation, "new_token_cap", stop_at_third)
    with pytest.raises(Interrupt):
        main([*cmd, "--output", str(out)])
    journal = tmp_path / ("out.txt" + JOURNAL_SUFFIX)
    assert journal.is_file() and not out.exists() and len(journal.read_text().splitlines()) == 3
    calls.clear()
    monkeypatch.setattr(generation, "new_token_cap", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    capsys.readouterr()
    assert main([*cmd, "--output", str(out)]) == 0
    assert len(calls) == 2 and "6 of 10 outputs from the interrupted run's journal" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == (tmp_path / "whole.txt").read_text(encoding="utf-8")
    assert not journal.exists()


@pytest.mark.slow
def test_ctrl_c_in_evaluate_and_generate_says_what_was_kept(tiny, tmp_path, monkeypatch, capsys):
    """Ctrl-C while decoding used to print a KeyboardInterrupt traceback. Now one line says how many outputs the
    journal keeps and which command continues from them; the exit status is 130."""
    import properlm.evaluation.generation as generation

    _, _, path, src, tgt = tiny
    real = generation.new_token_cap
    calls = []

    def ctrl_c_at_third(*a, **k):  # called once per decoded batch, before it is decoded
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(generation, "new_token_cap", ctrl_c_at_third)
    out = tmp_path / "out.txt"
    gen = [
        "generate",
        "--model",
        path,
        "--input",
        src,
        "--task",
        "translation",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "3",
    ]
    capsys.readouterr()
    assert main([*gen, "--output", str(out)]) == 130
    err = capsys.readouterr().err
    assert (
        f"properlm generate: interrupted; 6 decoded outputs saved in {out}.journal.jsonl; the same command "
        f"continues: properlm {' '.join(gen)} --output {out}" in err
    )
    calls.clear()
    assert main([*gen, "--output", "-"]) == 130
    assert "properlm generate: interrupted; nothing was saved (with --output FILE" in capsys.readouterr().err
    calls.clear()
    ev = [
        "evaluate",
        "--model",
        path,
        "--source-file",
        src,
        "--target-file",
        tgt,
        "--max-new-tokens",
        "6",
        "--batch-size",
        "3",
        "--rules",
        "logarithmic",
        "--no-progress",
        "--output-dir",
        str(tmp_path / "ev"),
    ]
    assert main(ev) == 130
    err = capsys.readouterr().err
    assert (
        f"properlm evaluate: interrupted; 6 decoded outputs saved in {tmp_path / 'ev' / 'decode_journal.jsonl'}" in err
        and err.rstrip().endswith(f"the same command continues: properlm {' '.join(ev)}")
    )
    calls.clear()
    calls.extend([1, 1])  # Ctrl-C before the first batch
    assert main([*ev[:-1], str(tmp_path / "ev2")]) == 130
    assert (
        "properlm evaluate: interrupted before any output was decoded, so nothing was saved; run it again: "
        "properlm evaluate" in capsys.readouterr().err
    )
