"""``properlm demo`` (run with tiny sizes) and its data set."""

from __future__ import annotations

import json
import os

import pytest

from properlm.cli.demo_data import make_number_dataset, number_to_words, write_parallel
from properlm.cli.main import main

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "n, words",
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (40, "forty"),
        (21, "twenty-one"),
        (100, "one hundred"),
        (105, "one hundred five"),
        (4721, "four thousand seven hundred twenty-one"),
        (10000, "ten thousand"),
        (100005, "one hundred thousand five"),
        (999999, "nine hundred ninety-nine thousand nine hundred ninety-nine"),
        (2000001, "two million one"),
    ],
)
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_number_dataset(tmp_path):
    train, test = make_number_dataset(300, 50, seed=1, max_digits=4)
    assert len(train) == 300 and len(test) == 50
    assert not {s for s, _ in train} & {s for s, _ in test}
    assert all(number_to_words(int(s)) == w for s, w in train + test)
    assert (train, test) == make_number_dataset(300, 50, seed=1, max_digits=4)
    assert max(len(s) for s, _ in train) == 4
    src, _tgt = write_parallel(test, str(tmp_path), "test")
    with open(src, encoding="utf-8") as f:
        assert f.read().splitlines() == [s for s, _ in test]
    with pytest.raises(ValueError, match="distinct numbers"):
        make_number_dataset(40, 20, max_digits=2)


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--output-dir",
        str(out),
        "--steps",
        "12",
        "--finetune-steps",
        "6",
        "--train-size",
        "120",
        "--test-size",
        "16",
        "--hidden-size",
        "16",
        "--num-layers",
        "1",
        "--batch-size",
        "16",
        "--max-digits",
        "3",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("logarithmic (pre-trained)", "+ logarithmic", "+ brier", "+ spherical", "exact match", "BLEU"):
        assert name in printed
    with open(out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    rows = results["rows"]
    assert [r["name"] for r in rows] == ["logarithmic (pre-trained)", "+ logarithmic", "+ brier", "+ spherical"]
    assert [r["steps"] for r in rows] == [12, 18, 18, 18]
    for r in rows:
        assert 0.0 <= r["exact_match"] <= 1.0 and 0.0 <= r["bleu"] <= 100.0
        assert r["score_logarithmic"] < 0 and 0 < r["score_spherical"] <= 1 and r["score_brier"] <= 1
    with open(out / "loss_curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.md").read_text(encoding="utf-8").startswith("| model |")
    # each fine-tuning run resumed from the pre-training checkpoint and switched rule there
    for rule in ("brier", "spherical"):
        with open(out / f"finetune_{rule}" / "metrics.jsonl", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        losses = [r for r in records if "loss" in r]
        assert losses and all(r["step"] > 12 and r["rule"] == rule for r in losses)
        with open(out / f"finetune_{rule}" / "results.json", encoding="utf-8") as f:
            assert json.load(f)["resumed_from"].endswith("checkpoint-12")
    assert os.path.isdir(out / "finetune_logarithmic" / "final")


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--steps", "0"]) == 2
    assert "--steps must be positive" in capsys.readouterr().err
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--max-digits", "12"]) == 2
    assert "--max-digits must be at most 9" in capsys.readouterr().err
