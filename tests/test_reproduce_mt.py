"""End-to-end test of benchmarks/reproduce_mt.py on tiny generated data with a tiny model:
every protocol trains and evaluates, the branches start from (a)'s step-T1 checkpoint, the
report is written, and a rerun skips every finished step."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

import _runner
import _stats
import reproduce_mt

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

WORDS_EN = ["a", "man", "dog", "red", "runs", "the", "woman", "blue", "car", "sits", "on", "street"]
WORDS_DE = ["ein", "mann", "hund", "rot", "rennt", "der", "frau", "blau", "auto", "sitzt", "auf", "strasse"]


def _write_data(root: str) -> None:
    rng = random.Random(0)
    sizes = {"train": 48, "val": 6, "test_2016_flickr": 6}
    for stem, n in sizes.items():
        en, de = [], []
        for _ in range(n):
            idx = [rng.randrange(len(WORDS_EN)) for _ in range(rng.randint(2, 5))]
            en.append(" ".join(WORDS_EN[i] for i in idx))
            de.append(" ".join(WORDS_DE[i] for i in idx))
        for lang, lines in (("en", en), ("de", de)):
            with open(os.path.join(root, f"{stem}.{lang}"), "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")


TINY = [
    "--seeds",
    "3",
    "--arm-seeds",
    "3",
    "--t1",
    "4",
    "--t2",
    "2",
    "--save-every",
    "2",
    "--eval-every",
    "2",
    "--warmup-steps",
    "2",
    "--batch-size",
    "8",
    "--vocab-size",
    "300",
    "--hidden-size",
    "16",
    "--num-layers",
    "1",
    "--num-heads",
    "2",
    "--ffn-size",
    "32",
    "--max-length",
    "12",
    "--num-beams",
    "2",
    "--eval-batch-size",
    "6",
    "--bootstrap-samples",
    "20",
]


@pytest.fixture
def in_process(monkeypatch):
    monkeypatch.setattr(_runner, "IN_PROCESS", True)


def test_reproduce_mt_end_to_end_and_resume(tmp_path, capsys, in_process):
    data, work = str(tmp_path / "data"), str(tmp_path / "work")
    os.makedirs(data)
    _write_data(data)
    extra = ["--extra-test", f"held={data}/val.en,{data}/val.de"]
    every = ["--protocols", ",".join(reproduce_mt.PROTOCOLS)]
    assert reproduce_mt.main([data, "--work-dir", work, *TINY, *every, *extra]) == 0
    out = capsys.readouterr().out

    # every protocol has a row with one seed; the report and the curves exist
    md = open(os.path.join(work, "results.md"), encoding="utf-8").read()
    for label in (protocol.label for protocol in reproduce_mt.PROTOCOLS.values()):
        assert f"| {label} | 1 |" in md
    assert os.path.getsize(os.path.join(work, "training_curves.png")) > 0
    summary = json.load(open(os.path.join(work, "results.json"), encoding="utf-8"))
    row_b = summary["per_seed"]["b"]["3"]
    assert {"bleu_val_logarithmic", "bleu_test_spherical", "score_brier_test", "ece_test"} <= set(row_b)
    assert {"b_test", "c_val", "e_test", "g_val", "j_test", "k_test", "b_held", "j_held"} <= set(summary["comparisons"])
    cmp_b = summary["comparisons"]["b_held"]
    assert cmp_b["seeds"] == [3] and 0 <= cmp_b["sign_test_p"] <= 1 and len(cmp_b["bootstrap_p"]) == 1
    # the new arms switched to their rules from (a)'s checkpoint; the mixture from scratch ran alone
    for p, rule in (("f", "power:1.5"), ("i", "pseudo-spherical:3"), ("j", "0.5*logarithmic+0.5*spherical")):
        res = json.load(open(os.path.join(work, "seed3", p, "results.json"), encoding="utf-8"))
        assert res["rule_stages"] == [["logarithmic", 4], [rule, 2]] and res["resumed_from"].endswith("checkpoint-4")
    res_k = json.load(open(os.path.join(work, "seed3", "k", "results.json"), encoding="utf-8"))
    assert res_k["rule_stages"] == [["0.5*logarithmic+0.5*spherical", 6]]
    # every model scored under every rule on val; rank correlations over the 11 finals + (a)'s checkpoint-T1
    assert set(reproduce_mt.SCORE_RULES) <= {k[len("tf_val_") :] for k in row_b if k.startswith("tf_val_")}
    assert len(summary["models"]) == 12 and "seed3/a/checkpoint-4" in {m["model"] for m in summary["models"]}
    assert {"logarithmic", "spherical", "ece"} <= set(summary["correlations"])
    assert all(-1 <= c["tau"] <= 1 or c["tau"] != c["tau"] for c in summary["correlations"].values())
    assert os.path.getsize(os.path.join(work, "bleu_vs_scores.png")) > 0
    assert "Kendall's tau" in md and "sign test p" in md
    # temperature scaling: T fitted on val, the test metrics at that T
    assert {"temperature", "ece_test_scaled", "score_brier_test_scaled"} <= set(row_b)
    fit = json.load(open(os.path.join(work, "seed3", "b", "calib_val_fit", "results.json"), encoding="utf-8"))
    scaled = json.load(open(os.path.join(work, "seed3", "b", "calib_test_scaled", "results.json"), encoding="utf-8"))
    assert scaled["teacher_forced"]["temperature"] == fit["temperature_fit"]["temperature"] == row_b["temperature"]
    assert "Temperature scaling" in md

    # the branch trained T1 steps of log (copied from a), then T2 of Brier, from a's checkpoint
    res_b = json.load(open(os.path.join(work, "seed3", "b", "results.json"), encoding="utf-8"))
    assert res_b["rule_stages"] == [["logarithmic", 4], ["brier", 2]]
    assert res_b["resumed_from"].endswith("checkpoint-4")
    assert res_b["global_step"] == 6
    log_a = [json.loads(x) for x in open(os.path.join(work, "seed3", "a", "metrics.jsonl"), encoding="utf-8")]
    log_b = [json.loads(x) for x in open(os.path.join(work, "seed3", "b", "metrics.jsonl"), encoding="utf-8")]
    assert [r for r in log_b if r["step"] <= 4] == [r for r in log_a if r["step"] <= 4]
    assert {r["rule"] for r in log_b if r["step"] > 4} == {"brier"}
    # both continue from the same state, so they differ only after the switch
    assert [r.get("eval_score_brier") for r in log_b if r["step"] == 6 and "eval_score_brier" in r] != [
        r.get("eval_score_brier") for r in log_a if r["step"] == 6 and "eval_score_brier" in r
    ]
    assert "[run ]" in out

    # a rerun skips every finished step and rebuilds the same report
    assert reproduce_mt.main([data, "--work-dir", work, *TINY, *every, *extra]) == 0
    out = capsys.readouterr().out
    # per protocol: train, calibration (2), val scores, the extra test, the log-beam decodings (2);
    # a, b, c also decode with the spherical beam (2); a decodes its checkpoint-T1
    n = len(reproduce_mt.PROTOCOLS)
    assert "[run ]" not in out and out.count("[skip]") == n * 7 + 3 * 2 + 1
    assert open(os.path.join(work, "results.md"), encoding="utf-8").read() == md


def test_reproduce_mt_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="lacks train.en"):
        reproduce_mt.main([str(tmp_path), "--work-dir", str(tmp_path / "w")])
    _write_data(str(tmp_path))
    with pytest.raises(SystemExit, match="allowed values are a, b, c, d, e, f, g, h, i, j, k"):
        reproduce_mt.main([str(tmp_path), "--protocols", "a,x"])
    with pytest.raises(SystemExit, match="include a"):
        reproduce_mt.main([str(tmp_path), "--protocols", "b"])
    with pytest.raises(SystemExit, match="multiple of --save-every"):
        reproduce_mt.main([str(tmp_path), "--t1", "10", "--save-every", "3"])
    with pytest.raises(SystemExit, match="must be among --seeds"):
        reproduce_mt.main([str(tmp_path), "--seeds", "1,2", "--arm-seeds", "3"])
    with pytest.raises(SystemExit, match="expected NAME=SOURCE_FILE,REFERENCE_FILE"):
        reproduce_mt.main([str(tmp_path), "--extra-test", "held"])
    with pytest.raises(SystemExit, match="no such file"):
        reproduce_mt.main([str(tmp_path), "--extra-test", f"held={tmp_path}/nope.en,{tmp_path}/val.de"])
    with pytest.raises(SystemExit, match="differ in line count"):
        reproduce_mt.main([str(tmp_path), "--extra-test", f"held={tmp_path}/val.en,{tmp_path}/train.de"])


def test_seed_level_statistics():
    m, lo, hi = _stats.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and abs(hi - 2.0 - 4.303 * 1.0 / 3**0.5) < 1e-9 and abs((m - lo) - (hi - m)) < 1e-12
    assert _stats.mean_ci([1.0])[1] != _stats.mean_ci([1.0])[1]  # NaN interval for one seed
    assert _stats.sign_test([1, 2, 3]) == 0.25 and _stats.sign_test([1, -1]) == 1.0
    assert _stats.sign_test([0.5] * 6) == 2 / 64 and _stats.sign_test([0, 0]) == 1.0
    assert _stats.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert _stats.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert abs(_stats.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) - 4 / 6) < 1e-12
    tau, lo, hi = _stats.kendall_tau_interval(
        list(range(30)), [x + (7 if x % 5 == 0 else 0) for x in range(30)], n_samples=200
    )
    assert lo <= tau <= hi and 0.5 < tau < 1


def test_reuse_continues_shorter_runs_exactly(tmp_path, capsys, in_process):
    from safetensors.torch import load_file

    data = str(tmp_path / "data")
    os.makedirs(data)
    _write_data(data)
    short, long_, fresh = (str(tmp_path / n) for n in ("short", "long", "fresh"))
    drop = {i + k for i, a in enumerate(TINY) if a in ("--t1", "--t2") for k in (0, 1)}
    base = [a for i, a in enumerate(TINY) if i not in drop]
    assert reproduce_mt.main([data, "--work-dir", short, "--protocols", "a,e", "--t1", "4", "--t2", "2", *base]) == 0
    # the same work directory refuses other settings
    with pytest.raises(SystemExit, match="other settings"):
        reproduce_mt.main([data, "--work-dir", short, "--protocols", "a", "--t1", "6", "--t2", "2", *base])
    # ... and will not report them under other settings either (the report names T1 and T2)
    with pytest.raises(SystemExit, match="'t1': \\(4, 6\\)"):
        reproduce_mt.main([data, "--work-dir", short, "--report-only", "--t1", "6", "--t2", "2", *base])
    # lengthen stage 1 to T1=6: (a) continues from the short run's checkpoint-6 (its last), (e) likewise
    argv = ["--protocols", "a,e", "--t1", "6", "--t2", "2", *base]
    assert reproduce_mt.main([data, "--work-dir", long_, "--reuse", short, *argv]) == 0
    assert "[reuse] seed 3 a: continuing" in capsys.readouterr().out
    res = json.load(open(os.path.join(long_, "seed3", "a", "results.json"), encoding="utf-8"))
    assert res["resumed_from"].endswith("checkpoint-6") and res["global_step"] == 8
    # ... and ends where a run of T=8 from scratch ends (schedule and data order do not depend on T)
    assert reproduce_mt.main([data, "--work-dir", fresh, *argv]) == 0
    w_long = load_file(os.path.join(long_, "seed3", "a", "final", "model.safetensors"))
    w_fresh = load_file(os.path.join(fresh, "seed3", "a", "final", "model.safetensors"))
    for name, t in w_fresh.items():
        torch.testing.assert_close(w_long[name], t, rtol=1e-5, atol=1e-6, msg=name)
    # runs made with another trajectory cannot be reused
    with pytest.raises(SystemExit, match="used other settings"):
        reproduce_mt.main([data, "--work-dir", str(tmp_path / "x"), "--reuse", short, *argv[:-2], "--ffn-size", "64"])


def test_further_seeds_start_with_their_longest_runs(tmp_path):
    """Seeds beyond the first three: every (a) run is queued before their branches and evaluations, so with
    --jobs 2 the last seed's 12,500-step stage 1 does not wait behind the earlier seeds' short work."""
    _write_data(str(tmp_path))
    args = reproduce_mt.build_parser().parse_args(
        [str(tmp_path), "--work-dir", str(tmp_path / "w"), "--protocols", "a,b,c,f", "--dry-run"]
    )
    reproduce_mt.check_args(args)
    names = [s.name for s in reproduce_mt.plan(args)]
    later_a = [names.index(f"train {s}a") for s in (4, 5, 6)]
    assert later_a == sorted(later_a) and later_a[-1] < names.index("train 4b")
    assert names.index("train 3f") < later_a[0]  # the first three seeds and their arms keep their priority
    assert names.index("train 1a") < names.index("eval 1a val logarithmic") < names.index("train 1b")
