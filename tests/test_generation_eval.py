"""Decoding by source length: :func:`properlm.evaluation.generation.decode_prompts` batches prompts of
similar length, caps each batch's new tokens at ``ceil(ratio * longest source + offset)`` and
returns the hypotheses in input order; ``properlm evaluate --max-new-tokens-ratio`` /
``--also-temperature`` end to end on a tiny random model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from properlm.cli.main import main
from properlm.evaluation.generation import decode_prompts, decode_prompts_with_stats, new_token_cap

PAD, EOS = 0, 1


class _Config:
    is_encoder_decoder = False


class EchoModel(torch.nn.Module):
    """A stand-in decoder-only model: each row generates its prompt's last token again and again
    (so a hypothesis names its prompt), and stops with EOS after one token when that token is
    odd; finished rows are padded, as ``generate`` does. Records every call's arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.config = _Config()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append(
            {
                "rows": input_ids.shape[0],
                "width": input_ids.shape[1],
                "max_new_tokens": max_new_tokens,
                "lengths": attention_mask.sum(1).tolist(),
            }
        )
        assert bool((attention_mask[:, -1] == 1).all()), "decoder-only prompts must be left padded"
        new = []
        for row in input_ids:
            tok = int(row[-1])
            out = [tok] * max_new_tokens
            if tok % 2 == 1 and max_new_tokens > 1:
                out = [tok, EOS] + [PAD] * (max_new_tokens - 2)
            new.append(out)
        return torch.cat([input_ids, torch.tensor(new, dtype=torch.long)], dim=1)


class EchoTokenizer:
    pad_token_id, eos_token_id = PAD, EOS

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in r if not (skip_special_tokens and int(t) in (PAD, EOS))) for r in rows]


def test_new_token_cap_by_hand():
    assert new_token_cap([3, 7, 5], 64) == 64  # no ratio: only max_new_tokens
    assert new_token_cap([3, 7, 5], 64, ratio=1.5, offset=2) == math.ceil(1.5 * 7 + 2) == 13
    assert new_token_cap([30], 20, ratio=1.0, offset=4) == 20  # max_new_tokens still bounds it
    assert new_token_cap([0], 20, ratio=0.5) == 1  # at least one token


def test_batches_stop_at_the_cap_and_come_back_in_input_order():
    model, tok = EchoModel(), EchoTokenizer()
    # prompt i ends with its own token id 10 + 2i (even: never stops); source lengths differ from prompt lengths
    lengths = [3, 9, 5, 7, 2, 8]
    prompts = [[5] * (n - 1) + [10 + 2 * i] for i, n in enumerate(lengths)]
    sources = [n - 1 for n in lengths]
    hyps, stats = decode_prompts_with_stats(
        model,
        tok,
        prompts,
        batch_size=2,
        max_new_tokens=50,
        max_new_tokens_ratio=0.5,
        max_new_tokens_offset=1,
        source_lengths=sources,
    )
    # batches of similar length, longest first: prompts (1, 5), (3, 2), (0, 4)
    assert [c["lengths"] for c in model.calls] == [[9, 8], [7, 5], [3, 2]]
    expected_caps = [math.ceil(0.5 * max(sources[a], sources[b]) + 1) for a, b in ((1, 5), (3, 2), (0, 4))]
    assert [c["max_new_tokens"] for c in model.calls] == expected_caps == [5, 4, 2]
    # every hypothesis is its own prompt's token, as many times as its batch's cap, in input order
    cap_of = {1: 5, 5: 5, 3: 4, 2: 4, 0: 2, 4: 2}
    assert hyps == [" ".join([str(10 + 2 * i)] * cap_of[i]) for i in range(len(prompts))]
    assert stats.caps == [cap_of[i] for i in range(len(prompts))]
    assert stats.at_cap == [True] * len(prompts)
    assert stats.to_dict()["num_at_cap"] == 6 and stats.to_dict()["max_cap"] == 5
    # without a ratio every batch may use max_new_tokens; the plain function returns the same order
    model.calls.clear()
    assert decode_prompts(model, tok, prompts, batch_size=4, max_new_tokens=3) == [
        " ".join([str(10 + 2 * i)] * 3) for i in range(len(prompts))
    ]
    assert [c["max_new_tokens"] for c in model.calls] == [3, 3]


def test_hypotheses_that_end_with_eos_are_not_at_the_cap():
    model, tok = EchoModel(), EchoTokenizer()
    prompts = [[4, 7], [4, 4, 8], [9]]  # 7 and 9 stop with EOS after one token
    hyps, stats = decode_prompts_with_stats(model, tok, prompts, batch_size=3, max_new_tokens=6)
    assert hyps == ["7", "8 8 8 8 8 8", "9"]
    assert stats.at_cap == [False, True, False] and stats.caps == [6, 6, 6]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens_ratio": 0.0}, "max_new_tokens_ratio must be a positive finite number"),
        ({"max_new_tokens_ratio": float("inf")}, "max_new_tokens_ratio must be a positive finite number"),
        ({"max_new_tokens_offset": 3}, "max_new_tokens_offset .3. only applies with max_new_tokens_ratio"),
        ({"max_new_tokens_ratio": 1.0, "max_new_tokens_offset": -1}, "max_new_tokens_offset must be a non-negative"),
        ({"max_new_tokens_ratio": 1.0, "source_lengths": [1]}, "source_lengths has 1 entries but there are 2 prompts"),
    ],
)
def test_bad_cap_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        decode_prompts(EchoModel(), EchoTokenizer(), [[2], [3]], **kwargs)


# ------------------------------------------------------------------------------ the CLI end to end

SRC = ["das haus ist klein", "der hund ist sehr sehr gross", "die katze", "ich trinke wasser und saft"]
TGT = ["the house is small", "the dog is very very big", "the cat", "i drink water and juice"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from properlm.models import load_model_and_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    model, tok = load_model_and_tokenizer(
        init="tiny-gpt",
        train_texts=SRC + TGT,
        vocab_size=300,
        seed=0,
        init_options={"hidden_size": 16, "num_layers": 1, "num_heads": 2},
    )
    model.save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    src, tgt = root / "s.de", root / "s.en"
    src.write_text("\n".join(SRC) + "\n", encoding="utf-8")
    tgt.write_text("\n".join(TGT) + "\n", encoding="utf-8")
    return str(root / "m"), str(src), str(tgt)


@pytest.mark.slow
def test_evaluate_caps_by_source_length_and_scores_two_temperatures(tiny, tmp_path, capsys):
    from transformers import AutoTokenizer

    model, src, tgt = tiny
    base = [
        "evaluate",
        "--model",
        model,
        "--source-file",
        src,
        "--target-file",
        tgt,
        "--batch-size",
        "2",
        "--max-length",
        "64",
        "--no-progress",
    ]
    assert (
        main(
            [
                *base,
                "--max-new-tokens",
                "40",
                "--max-new-tokens-ratio",
                "0.5",
                "--max-new-tokens-offset",
                "1",
                "--also-temperature",
                "2.0",
                "--output-dir",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| new-token cap" in out and "| ECE at T=2.000 (%)" in out
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    cap = res["generation"]["new_token_cap"]
    tok = AutoTokenizer.from_pretrained(model)
    n_src = sorted((len(tok(s, add_special_tokens=False)["input_ids"]) for s in SRC), reverse=True)
    # two batches (longest prompts first): caps ceil(0.5 * longest source + 1), far below --max-new-tokens
    caps = [math.ceil(0.5 * n_src[0] + 1), math.ceil(0.5 * n_src[2] + 1)]
    assert cap["max_cap"] == max(caps) and cap["min_cap"] == min(caps) < 40
    assert cap["mean_cap"] == pytest.approx(sum(caps) / 2) and cap["ratio"] == 0.5 and cap["offset"] == 1
    assert res["settings"]["max_new_tokens_ratio"] == 0.5 and res["settings"]["also_temperature"] == 2.0
    hyps = (tmp_path / "a" / "hypotheses.txt").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 4
    for h in hyps:  # no hypothesis is longer than the largest cap
        assert len(tok(h, add_special_tokens=False)["input_ids"]) <= max(caps) + 1
    # the second temperature matches a run at --temperature 2, and T = 1 stays as it was
    assert main([*base, "--no-generate", "--temperature", "2.0", "--output-dir", str(tmp_path / "t2")]) == 0
    assert main([*base, "--no-generate", "--output-dir", str(tmp_path / "t1")]) == 0
    t2 = json.loads((tmp_path / "t2" / "results.json").read_text())["teacher_forced"]
    t1 = json.loads((tmp_path / "t1" / "results.json").read_text())["teacher_forced"]
    scaled = res["teacher_forced_scaled"]
    assert scaled["temperature"] == 2.0
    for key in ("mean_log_prob", "ece", "token_accuracy"):
        assert scaled[key] == pytest.approx(t2[key], rel=1e-5, abs=1e-7)
        assert res["teacher_forced"][key] == pytest.approx(t1[key], rel=1e-5, abs=1e-7)
    assert scaled["mean_scores"] == pytest.approx(t2["mean_scores"], rel=1e-5)
    assert scaled["mean_log_prob"] != pytest.approx(t1["mean_log_prob"], rel=1e-3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-new-tokens-offset", "5"], "--max-new-tokens-offset 5 needs --max-new-tokens-ratio"),
        (["--max-new-tokens-ratio", "-1"], "--max-new-tokens-ratio must be a positive finite number"),
        (["--max-new-tokens-ratio", "1", "--max-new-tokens-offset", "-2"], "--max-new-tokens-offset must be a non-neg"),
        (["--also-temperature", "0"], "--also-temperature must be a positive finite number"),
    ],
)
def test_bad_cap_and_temperature_options(tiny, tmp_path, capsys, extra, message):
    model, src, tgt = tiny
    assert (
        main(
            [
                "evaluate",
                "--model",
                model,
                "--source-file",
                src,
                "--target-file",
                tgt,
                "--output-dir",
                str(tmp_path / "o"),
                *extra,
            ]
        )
        == 2
    )
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_generate_with_a_cap_keeps_the_input_order(tiny, tmp_path, capsys):
    model, _, _ = tiny
    inp, out = tmp_path / "in.txt", tmp_path / "out.txt"
    inp.write_text("\n".join(SRC) + "\n", encoding="utf-8")
    common = [
        "generate",
        "--model",
        model,
        "--input",
        str(inp),
        "--task",
        "translation",
        "--max-new-tokens",
        "6",
        "--max-length",
        "64",
    ]
    assert main([*common, "--output", str(out), "--batch-size", "1"]) == 0
    one_by_one = out.read_text(encoding="utf-8").splitlines()
    assert main([*common, "--output", str(out), "--batch-size", "1", "--max-new-tokens-ratio", "10"]) == 0
    assert out.read_text(encoding="utf-8").splitlines() == one_by_one  # a cap above 6 changes nothing
    # cap ceil(0.01 * L + 2) = 3 tokens: greedy search gives the first 3 of the 6 tokens of each input
    assert (
        main(
            [
                *common,
                "--output",
                str(out),
                "--batch-size",
                "1",
                "--max-new-tokens-ratio",
                "0.01",
                "--max-new-tokens-offset",
                "2",
            ]
        )
        == 0
    )
    capped = out.read_text(encoding="utf-8").splitlines()
    assert len(capped) == 4 and capped != one_by_one
    for full, short in zip(one_by_one, capped):
        assert full.startswith(short)
    assert main([*common, "--max-new-tokens-offset", "2"]) == 2
    assert "needs --max-new-tokens-ratio" in capsys.readouterr().err
