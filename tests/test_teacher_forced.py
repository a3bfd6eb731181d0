"""The teacher-forced pass of decoder-only models forms logits only at the scored positions (a
pre-hook on the output head): the same metrics as the full logits, through each model's head
transform (Llama, Gemma 2 soft-capping, Cohere and Granite logit scaling); the kept hidden states
score the same positions at another temperature through the head alone, exactly as a second
pass; models whose head the hook does not see fall back to the full logits."""

from __future__ import annotations

import math

import pytest
import torch

from properlm.data import DataCollator, Example, tokenize_example
from properlm.evaluation import teacher_forced_metrics
from properlm.evaluation.metrics import MetricsAccumulator
from properlm.evaluation.teacher_forced import ScoredHiddenStates

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

RULES = ["logarithmic", "brier", "spherical"]
V = 96
WORDS = "the a cat dog house is small big old new red blue we go home sleeps drinks water".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return fast


def _model(kind: str):
    torch.manual_seed(0)
    common = {
        "vocab_size": V,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if kind == "gemma2":
        m = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0))
    elif kind == "cohere":
        m = transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=4.0))
    elif kind == "granite":
        m = transformers.GraniteForCausalLM(transformers.GraniteConfig(**common, logits_scaling=0.25))
    else:
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():  # logits far from uniform, so the rules and temperatures differ visibly
        m.get_output_embeddings().weight.mul_(8.0)
    return m.eval()


def _examples(n: int = 7) -> list[Example]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        src = " ".join(WORDS[j] for j in torch.randint(len(WORDS), (3 + i % 4,), generator=g).tolist())
        tgt = " ".join(WORDS[j] for j in torch.randint(len(WORDS), (2 + i % 3,), generator=g).tolist())
        out.append(Example(source=src, target=tgt, task="translation"))
    return out


def _saved_data(tmp_path, kind):
    """A tiny model of ``kind`` saved to ``tmp_path/m`` and its examples as parallel files:
    ``(model dir, source file, target file, tokenizer, examples)``."""
    model, tok, ex = _model(kind), _tokenizer(), _examples()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
    src.write_text("".join(e.source + "\n" for e in ex))
    tgt.write_text("".join(e.target + "\n" for e in ex))
    return tmp_path / "m", src, tgt, tok, ex


def _reference(model, tok, examples, temperature=1.0, batch_size=3):
    """The metrics from the full ``(B, T, V)`` logits, batched as the pass batches them."""
    feats = [tokenize_example(e, tok, seq2seq=False, max_length=64) for e in examples]
    order = sorted(range(len(feats)), key=lambda i: -len(feats[i]["input_ids"]))
    acc = MetricsAccumulator(RULES, temperature=temperature)
    collate = DataCollator(pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            b = collate([feats[i] for i in order[s : s + batch_size]])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            labels = torch.full_like(b["labels"], -100)
            labels[:, :-1] = b["labels"][:, 1:]
            acc.update(logits, labels)
    return acc.compute()


def _close(a, b, tol=1e-5):
    assert a.num_tokens == b.num_tokens
    for r in RULES:
        assert a.mean_scores[r] == pytest.approx(b.mean_scores[r], abs=tol), r
    assert a.mean_log_prob == pytest.approx(b.mean_log_prob, abs=tol)
    assert a.accuracy == b.accuracy and a.ece == pytest.approx(b.ece, abs=tol)
    assert [x.count for x in a.bins] == [x.count for x in b.bins]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gemma2", "cohere", "granite"])
def test_scored_positions_only_give_the_full_logits_metrics(kind, monkeypatch):
    model, tok, ex = _model(kind), _tokenizer(), _examples()
    ref = _reference(model, tok, ex)
    shapes = []
    update = MetricsAccumulator.update

    def spy(self, logits, labels):
        shapes.append((tuple(logits.shape), int((labels != -100).sum())))
        return update(self, logits, labels)

    monkeypatch.setattr(MetricsAccumulator, "update", spy)
    got = teacher_forced_metrics(model, tok, ex, RULES, max_length=64, batch_size=3)
    monkeypatch.undo()
    _close(got, ref)
    # the logits the accumulator saw: (N, V), N the scored positions of the batch (the prompt is not scored)
    assert [s[0] for s in shapes] == [(n, V) for _, n in shapes]
    feats = [tokenize_example(e, tok, seq2seq=False, max_length=64) for e in ex]
    assert sum(n for _, n in shapes) == ref.num_tokens < sum(len(f["input_ids"]) for f in feats)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gemma2", "cohere", "granite"])
def test_kept_hidden_states_score_another_temperature_as_a_second_pass(kind):
    model, tok, ex = _model(kind), _tokenizer(), _examples()
    store = ScoredHiddenStates()
    first = teacher_forced_metrics(model, tok, ex, RULES, max_length=64, batch_size=3, hidden_store=store)
    assert store.complete and store.num_tokens == first.num_tokens
    _close(store.metrics(RULES), first, tol=1e-6)
    for t in (0.5, 1.7):
        again = teacher_forced_metrics(model, tok, ex, RULES, max_length=64, batch_size=3, temperature=t)
        _close(store.metrics(RULES, temperature=t), again, tol=1e-5)
        _close(again, _reference(model, tok, ex, temperature=t))
    assert store.metrics(RULES, temperature=0.5).mean_log_prob != pytest.approx(first.mean_log_prob, abs=1e-3)


def test_a_head_the_hook_never_sees_falls_back_to_the_full_logits(monkeypatch):
    model, tok, ex = _model("llama"), _tokenizer(), _examples()
    ref = _reference(model, tok, ex)
    monkeypatch.setattr(model, "get_output_embeddings", lambda: torch.nn.Identity())  # never called
    store = ScoredHiddenStates()
    got = teacher_forced_metrics(model, tok, ex, RULES, max_length=64, batch_size=3, hidden_store=store)
    _close(got, ref)
    assert not store.complete and "did not see" in store.reason
    with pytest.raises(RuntimeError, match="not complete"):
        store.metrics(RULES)


def test_store_over_its_memory_cap_is_dropped_not_the_metrics():
    model, tok, ex = _model("llama"), _tokenizer(), _examples()
    store = ScoredHiddenStates(max_bytes=1000)
    got = teacher_forced_metrics(model, tok, ex, RULES, max_length=64, batch_size=3, hidden_store=store)
    _close(got, _reference(model, tok, ex))
    assert not store.complete and store.batches == [] and "max_bytes" in store.reason


@pytest.mark.slow
def test_fit_temperature_reads_the_fitted_metrics_off_the_first_pass(tmp_path):
    """``properlm evaluate --fit-temperature`` on a decoder-only model: the metrics at the fitted T
    come from the kept hidden states and equal a pass at that temperature."""
    from properlm.cli.main import main

    _, src, tgt, tok, ex = _saved_data(tmp_path, "gemma2")
    out = tmp_path / "fit"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "m"),
                "--source-file",
                str(src),
                "--target-file",
                str(tgt),
                "--no-generate",
                "--fit-temperature",
                "--batch-size",
                "3",
                "--max-length",
                "64",
                "--output-dir",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    import json

    fit = json.loads((out / "results.json").read_text())["temperature_fit"]
    assert fit["metrics_from"] == "the scored hidden states of the first pass"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    again = teacher_forced_metrics(
        loaded,
        tok,
        ex,
        ["logarithmic", "brier", "spherical"],
        max_length=64,
        batch_size=3,
        temperature=fit["temperature"],
    )
    assert math.isclose(fit["mean_scores"]["brier"], again.mean_scores["brier"], abs_tol=1e-5)
    assert math.isclose(fit["ece"], again.ece, abs_tol=1e-5)


# ---------------------------------------------------------------------- --bf16: mixed precision, float32 head


def test_mixed_precision_runs_the_body_in_bfloat16_and_the_head_in_float32():
    from properlm.evaluation import mixed_precision

    model = _model("gemma2")
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = (args[0].dtype, out.dtype)

        return hook

    handles = [
        model.model.layers[0].mlp.down_proj.register_forward_hook(record("body")),
        model.get_output_embeddings().register_forward_hook(record("head")),
    ]
    x = torch.randint(3, V, (2, 9))
    with torch.no_grad():
        full = model(input_ids=x).logits
        with mixed_precision(model):
            mixed = model(input_ids=x).logits
    for h in handles:
        h.remove()
    assert seen["body"] == (torch.bfloat16, torch.bfloat16)
    assert seen["head"] == (torch.float32, torch.float32) and mixed.dtype == torch.float32
    # bfloat16 body: close to float32, not equal; the soft-cap still bounds the logits
    assert 0 < (mixed - full).abs().max() < 0.15 and mixed.abs().max() <= 2.0
    with torch.no_grad():  # the hooks are gone and autocast is off after the block
        assert torch.equal(model(input_ids=x).logits, full)
    assert not torch.is_autocast_enabled("cpu")


def test_mixed_precision_leaves_autocast_even_when_the_head_raises():
    from properlm.evaluation import mixed_precision

    model = _model("llama")
    head = model.get_output_embeddings()
    boom = head.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), mixed_precision(model):
        model(input_ids=torch.randint(3, V, (1, 4)))
    boom.remove()
    assert not torch.is_autocast_enabled("cpu") and not head._forward_pre_hooks and not head._forward_hooks


@pytest.mark.slow
def test_evaluate_bf16_is_close_to_float32_and_says_so(tmp_path, capsys):
    import json

    from properlm.cli.main import main

    _, src, tgt, _, ex = _saved_data(tmp_path, "llama")
    base = [
        "evaluate",
        "--model",
        str(tmp_path / "m"),
        "--source-file",
        str(src),
        "--target-file",
        str(tgt),
        "--fit-temperature",
        "--batch-size",
        "3",
        "--max-length",
        "64",
        "--max-new-tokens",
        "4",
        "--no-progress",
    ]
    assert main([*base, "--output-dir", str(tmp_path / "fp32")]) == 0
    assert main([*base, "--bf16", "--output-dir", str(tmp_path / "bf16")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("fp32", "bf16"))
    assert b["settings"]["bf16"] is True and a["settings"]["bf16"] is False
    for r in RULES:
        assert b["teacher_forced"]["mean_scores"][r] == pytest.approx(a["teacher_forced"]["mean_scores"][r], abs=0.05)
    assert b["temperature_fit"]["temperature"] == pytest.approx(a["temperature_fit"]["temperature"], rel=0.1)
    assert len((tmp_path / "bf16" / "hypotheses.txt").read_text().splitlines()) == len(ex)
    capsys.readouterr()
    assert main([*base, "--bf16", "--dtype", "bfloat16", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--bf16 is mixed precision over float32 weights" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any work


@pytest.mark.slow
def test_a_peft_model_with_a_lora_head_scores_as_its_full_logits():
    peft = pytest.importorskip("peft")
    model = _model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config).eval()
    tok, ex = _tokenizer(), _examples()
    store = ScoredHiddenStates()
    got = teacher_forced_metrics(wrapped, tok, ex, RULES, max_length=64, batch_size=3, hidden_store=store)
    _close(got, _reference(wrapped, tok, ex))
    assert store.complete
    _close(store.metrics(RULES, temperature=1.3), _reference(wrapped, tok, ex, temperature=1.3))
