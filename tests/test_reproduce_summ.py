"""End-to-end test of benchmarks/reproduce_summ.py on tiny generated email data with a tiny model:
(a), (b), (c) train and evaluate (ROUGE single- and multi-reference, token scores, ECE, both beam
objectives), the branches start from (a)'s step-T1 checkpoint, every run holds out the same slice
of train, a rerun skips every finished step, and --test-file scores the final models later
without retraining."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import _runner  # noqa: E402
import reproduce_summ  # noqa: E402

TOPICS = ["gas", "power", "budget", "legal", "trading", "meeting"]
FILLER = ["please", "review", "the", "attached", "file", "thanks", "call", "me", "today", "about"]


def _rows(n: int, rng: random.Random, annotations: bool) -> list[dict]:
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        body = " ".join([topic] + [rng.choice(FILLER) for _ in range(rng.randint(4, 30))] + [topic, "report"])
        row = {"id": f"x{i}", "document": body, "summary": f"{topic} report"}
        if annotations:
            row["annotations"] = [f"{topic} update", "report", f"the {topic}"]
        rows.append(row)
    return rows


def _write(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _write_data(root: str) -> str:
    rng = random.Random(0)
    _write(os.path.join(root, "train.jsonl"), _rows(48, rng, False))
    _write(os.path.join(root, "dev.jsonl"), _rows(6, rng, True))
    return _write(os.path.join(root, "extra_emails.jsonl"), _rows(5, rng, False))


TINY = ["--seeds", "3", "--t1", "4", "--t2", "2", "--save-every", "2", "--eval-every", "2", "--warmup-steps", "2",
        "--batch-size", "8", "--vocab-size", "300", "--hidden-size", "16", "--num-layers", "1", "--num-heads", "2",
        "--ffn-size", "32", "--max-source-length", "24", "--heldout-fraction", "0.1", "--num-beams", "2",
        "--max-new-tokens", "4", "--eval-batch-size", "6", "--bootstrap-samples", "20"]


@pytest.fixture
def in_process(monkeypatch):
    monkeypatch.setattr(_runner, "IN_PROCESS", True)


def _json(*parts: str) -> dict:
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


def test_reproduce_summ_end_to_end_resume_and_later_test_file(tmp_path, capsys, in_process):
    data, work = str(tmp_path / "data"), str(tmp_path / "work")
    os.makedirs(data)
    extra = _write_data(data)
    assert reproduce_summ.main([data, "--work-dir", work, *TINY]) == 0
    assert "[run ]" in capsys.readouterr().out

    md = open(os.path.join(work, "results.md"), encoding="utf-8").read()
    for label, _ in reproduce_summ.PROTOCOLS.values():
        assert f"| {label} | 1 |" in md
    assert "R-L multi" in md and "best over each example's references" in md and "sign test p" in md
    assert os.path.getsize(os.path.join(work, "training_curves.png")) > 0
    summary = _json(work, "results.json")
    row_b = summary["per_seed"]["b"]["3"]
    assert {"rouge1_dev_logarithmic", "rougeL_multi_dev_logarithmic", "rouge2_dev_spherical",
            "rougeL_multi_dev_spherical", "score_logarithmic_dev", "score_brier_dev", "score_spherical_dev",
            "ece_dev"} <= set(row_b)
    assert row_b["rouge1_multi_dev_logarithmic"] >= row_b["rouge1_dev_logarithmic"] - 1e-9
    assert "rouge-score" in row_b["rouge_settings"]
    for p in ("b", "c"):
        for name in ("rouge1", "rouge2", "rougeL", "rouge1_multi", "rougeL_multi"):
            cmp = summary["comparisons"][f"{p}_dev_{name}"]
            assert cmp["seeds"] == [3] and 0 <= cmp["sign_test_p"] <= 1
            assert len(cmp["bootstrap"]) == 1 and 0 < cmp["bootstrap"][0]["p"] <= 1
            assert cmp["delta"][0] == pytest.approx(summary["per_seed"][p]["3"][f"{name}_dev_logarithmic"]
                                                    - summary["per_seed"]["a"]["3"][f"{name}_dev_logarithmic"])
            # the bootstrap's document-level mean difference is the ROUGE difference itself
            assert cmp["bootstrap"][0]["delta"] == pytest.approx(cmp["delta"][0], abs=1e-9)
    assert summary["checkpoint_t1"]["3"]["rouge1"] is not None

    # the branches trained T1 steps of log (copied from a), then T2 of their rule, from a's checkpoint
    res = {p: _json(work, "seed3", p, "results.json") for p in "abc"}
    assert res["b"]["rule_stages"] == [["logarithmic", 4], ["brier", 2]]
    assert res["c"]["rule_stages"] == [["logarithmic", 4], ["spherical", 2]]
    assert res["b"]["resumed_from"].endswith("checkpoint-4") and res["c"]["global_step"] == 6
    log_a, log_b = (_runner.read_log(os.path.join(work, "seed3", p, "metrics.jsonl")) for p in "ab")
    assert [r for r in log_b if r["step"] <= 4] == [r for r in log_a if r["step"] <= 4]
    assert {r["rule"] for r in log_b if r["step"] > 4} == {"brier"}
    # every run holds out the same slice of train (5 of 48) and cuts documents at 24 tokens, as evaluate does
    assert {r["num_validation_examples"] for r in res.values()} == {5}
    assert res["a"]["config"]["validation_seed"] == 0 and res["a"]["config"]["max_source_length"] == 24
    ev = _json(work, "seed3", "b", "eval_dev_beam_logarithmic", "results.json")
    assert ev["truncation"]["max_source_length"] == 24 and ev["truncation"]["max_length"] == 25
    assert ev["truncation"]["max_source_length_from"].startswith("training run")
    assert ev["truncation"]["num_sources_cut"] >= 1
    assert os.path.isfile(os.path.join(work, "seed3", "c", "final", "model.safetensors"))

    # a rerun skips every finished step and rebuilds the same report
    assert reproduce_summ.main([data, "--work-dir", work, *TINY]) == 0
    out = capsys.readouterr().out
    assert "[run ]" not in out and out.count("[skip]") == 3 + 3 * 2 + 1  # trains, dev decodings, a's checkpoint
    assert open(os.path.join(work, "results.md"), encoding="utf-8").read() == md

    # --test-file later: only the new decodings run; the final models are reused
    assert reproduce_summ.main([data, "--work-dir", work, *TINY, "--test-file", extra]) == 0
    out = capsys.readouterr().out
    assert out.count("[run ]") == 3 and "train ..." not in out
    summary = _json(work, "results.json")
    assert "rouge1_extra_emails_logarithmic" in summary["per_seed"]["a"]["3"]
    assert "b_extra_emails_rougeL" in summary["comparisons"]
    assert "b_extra_emails_rougeL_multi" not in summary["comparisons"]  # that file has no annotations
    assert f"--test-file {extra}" in open(os.path.join(work, "results.md"), encoding="utf-8").read()


def test_reproduce_summ_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="lacks train.jsonl, dev.jsonl"):
        reproduce_summ.main([str(tmp_path), "--work-dir", str(tmp_path / "w")])
    _write_data(str(tmp_path))
    with pytest.raises(SystemExit, match="allowed values are a, b, c"):
        reproduce_summ.main([str(tmp_path), "--protocols", "a,d"])
    with pytest.raises(SystemExit, match="include a"):
        reproduce_summ.main([str(tmp_path), "--protocols", "b"])
    with pytest.raises(SystemExit, match="multiple of --save-every"):
        reproduce_summ.main([str(tmp_path), "--t1", "10", "--save-every", "3"])
    with pytest.raises(SystemExit, match="no such file"):
        reproduce_summ.main([str(tmp_path), "--test-file", str(tmp_path / "nope.jsonl")])
    with pytest.raises(SystemExit, match="the name 'dev' is taken"):
        reproduce_summ.main([str(tmp_path), "--test-file", str(tmp_path / "dev.jsonl")])
    with pytest.raises(SystemExit, match="exceeds the model's 17 positions"):
        reproduce_summ.main([str(tmp_path), "--max-source-length", "16", "--max-new-tokens", "20"])
    with pytest.raises(SystemExit, match="--smoothing must be in"):
        reproduce_summ.main([str(tmp_path), "--smoothing", "1"])


def test_paired_bootstrap_means():
    base = [0.1 * (i % 7) for i in range(200)]
    same = _runner.paired_bootstrap_means(base, base, n_samples=200)
    assert same["delta"] == 0 and same["p"] == 1.0
    gain = [0.05 + 0.01 * (i % 3) for i in range(200)]
    better = _runner.paired_bootstrap_means(base, [b + g for b, g in zip(base, gain)], n_samples=200)
    assert better["delta"] == pytest.approx(sum(gain) / 200) and better["p"] == pytest.approx(2 / 201)
    assert better["ci95"][0] <= better["delta"] <= better["ci95"][1]
    noisy = [b + (0.3 if i % 2 else -0.3) for i, b in enumerate(base)]  # mean difference 0 +- noise
    assert _runner.paired_bootstrap_means(base, noisy, n_samples=200)["p"] > 0.5
    worse = _runner.paired_bootstrap_means(base, [b - 0.05 for b in base], n_samples=100)
    assert worse["delta"] < 0 and worse["p"] == pytest.approx(2 / 101)
    with pytest.raises(ValueError, match="paired scores needed"):
        _runner.paired_bootstrap_means([1.0], [1.0, 2.0])
