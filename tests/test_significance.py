"""Did it help? The statistics of properlm.evaluation.significance and `properlm compare --baseline`."""

from __future__ import annotations

import json
import math
import os
import random

import pytest

from properlm.cli.main import main
from properlm.evaluation.comparison import (
    ComparisonError,
    compare_to_baseline,
    comparison_markdown,
    load_evaluated_run,
)
from properlm.evaluation.significance import (
    compare_seeds,
    mean_ci,
    mean_std,
    paired_bootstrap,
    paired_bootstrap_means,
    sign_test,
)
from properlm.evaluation.text_metrics import translation_metrics


def test_mean_ci_is_the_student_t_interval():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])  # s = 1, t_{0.975, 2} = 4.303
    assert m == 2.0 and (lo, hi) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    m, lo, hi = mean_ci([0.5, float("nan"), None, 1.5])  # NaN and None dropped: n = 2, t = 12.706
    assert m == 1.0 and hi - m == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2))
    assert math.isnan(mean_ci([4.0])[1]) and mean_std([4.0]) == (4.0, 0.0)
    big = [float(i % 7) for i in range(40)]  # beyond the table: 1.96
    m, s = mean_std(big)
    assert mean_ci(big)[2] == pytest.approx(m + 1.96 * s / math.sqrt(40))


def test_sign_test_is_exact():
    assert sign_test([0.1, 0.2, 0.3]) == pytest.approx(0.25)  # 3 seeds can never reach 0.05
    assert sign_test([1.0] * 6) == pytest.approx(2 / 64)
    assert sign_test([1.0] * 5 + [-1.0]) == pytest.approx(2 * 7 / 64)
    assert sign_test([1.0, 0.0, -1.0]) == 1.0 and sign_test([0.0]) == 1.0


def test_compare_seeds_pairs_by_position():
    c = compare_seeds([30.0, 31.0, 29.0], [30.5, 30.5, 30.0])
    assert c.deltas == pytest.approx((0.5, -0.5, 1.0)) and c.seeds_ahead == 2 and c.num_seeds == 3
    assert c.mean == pytest.approx(1 / 3) and c.ci95 == pytest.approx(mean_ci([0.5, -0.5, 1.0])[1:])
    assert c.to_dict()["deltas"] == list(c.deltas) and c.sign_test_p == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 baseline vs 3 system"):
        compare_seeds([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        compare_seeds([1.0, float("nan")], [1.0, 2.0])


def _sentences(n, seed):
    rng = random.Random(seed)
    words = "ein mann hund rot rennt der frau blau auto sitzt auf strasse".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) for _ in range(n)]


def test_paired_bootstrap_tells_a_real_difference_from_none():
    refs = _sentences(60, 0)
    noise = _sentences(60, 1)
    bad = [n if i % 2 else r for i, (r, n) in enumerate(zip(refs, noise))]  # half the sentences wrong
    good = [n if i % 10 == 0 else r for i, (r, n) in enumerate(zip(refs, noise))]
    out = paired_bootstrap(bad, {"good": good, "same": bad}, refs, n_samples=200)
    assert out["good"]["bleu_baseline"] == pytest.approx(translation_metrics(bad, refs)["bleu"])
    assert out["good"]["bleu"] == pytest.approx(translation_metrics(good, refs)["bleu"])
    assert out["good"]["bleu_p"] < 0.05 and out["good"]["chrf_p"] < 0.05
    assert out["same"]["bleu"] == out["same"]["bleu_baseline"] and out["same"]["bleu_p"] > 0.5
    with pytest.raises(ValueError, match="system: 59 hypotheses but 60 references"):
        paired_bootstrap(bad, {"system": good[:-1]}, refs)


def test_paired_bootstrap_means():
    base = [0.1 * (i % 5) for i in range(50)]
    assert paired_bootstrap_means(base, base, n_samples=100) == {"delta": 0.0, "ci95": [0.0, 0.0], "p": 1.0}
    up = paired_bootstrap_means(base, [b + 0.05 for b in base], n_samples=100)
    assert up["delta"] == pytest.approx(0.05) and up["p"] == pytest.approx(2 / 101)


# ---------------------------------------------------------------------------- properlm compare --baseline


def _evaluation(root, name, hyps, data, task="translation", max_examples=None, tf=None):
    """An output directory as `properlm evaluate` writes it (results.json with its settings, hypotheses.txt)."""
    out = os.path.join(root, name)
    os.makedirs(out)
    with open(os.path.join(out, "hypotheses.txt"), "w", encoding="utf-8") as f:
        f.write("".join(h + "\n" for h in hyps))
    settings = {
        "task": task,
        "target_lang": "de" if task == "translation" else None,
        "source_lang": None,
        "max_examples": max_examples,
        "data_file": None,
        "source_file": None,
        "target_file": None,
        **data,
    }
    results = {
        "kind": "properlm-evaluate",
        "settings": settings,
        "num_examples": len(hyps),
        "generation": {"bleu": 0.0},
        **({"teacher_forced": tf} if tf else {}),
    }
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)
    return out


@pytest.fixture
def translation_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refs = _sentences(40, 0)
    (tmp_path / "test.en").write_text("".join(f"source {i}\n" for i in range(40)), encoding="utf-8")
    (tmp_path / "test.de").write_text("".join(r + "\n" for r in refs), encoding="utf-8")
    data = {"source_file": "test.en", "target_file": "test.de"}  # relative, as evaluate was given them
    runs = {}
    for seed in (1, 2, 3):
        noise = _sentences(40, 10 + seed)
        runs[f"log{seed}"] = _evaluation(
            str(tmp_path), f"log{seed}", [n if i % 3 == 0 else r for i, (r, n) in enumerate(zip(refs, noise))], data
        )
        runs[f"sph{seed}"] = _evaluation(
            str(tmp_path), f"sph{seed}", [n if i % 8 == 0 else r for i, (r, n) in enumerate(zip(refs, noise))], data
        )
    return tmp_path, runs


def test_compare_baseline_over_seeds(translation_runs, capsys):
    tmp_path, runs = translation_runs
    argv = [
        "compare",
        "log=" + ",".join(runs[f"log{s}"] for s in (1, 2, 3)),
        "sph=" + ",".join(runs[f"sph{s}"] for s in (1, 2, 3)),
        "--baseline",
        "log",
        "--no-plot",
        "--bootstrap-samples",
        "100",
        "--output-json",
        "cmp.json",
        "--output-md",
        "cmp.md",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Against log (3 seeds" in out and "| sph | BLEU |" in out and "| sph | chrF |" in out
    result = json.loads((tmp_path / "cmp.json").read_text(encoding="utf-8"))
    bleu = result["systems"]["sph"]["metrics"]["bleu"]
    for seed, per in zip((1, 2, 3), bleu["per_seed"]):  # each seed's scores are evaluate's corpus BLEU
        hyp = {
            k: open(os.path.join(runs[f"{k}{seed}"], "hypotheses.txt"), encoding="utf-8").read().splitlines()
            for k in ("log", "sph")
        }
        refs = (tmp_path / "test.de").read_text(encoding="utf-8").splitlines()
        assert per["baseline"] == pytest.approx(translation_metrics(hyp["log"], refs, "de")["bleu"])
        assert per["system"] == pytest.approx(translation_metrics(hyp["sph"], refs, "de")["bleu"])
        assert per["delta"] > 0 and per["p"] < 0.05
    over = bleu["over_seeds"]
    assert over["seeds_ahead"] == 3 and over["sign_test_p"] == pytest.approx(0.25)
    assert over["mean"] == pytest.approx(sum(p["delta"] for p in bleu["per_seed"]) / 3)
    assert "Against log" in (tmp_path / "cmp.md").read_text(encoding="utf-8")


def test_compare_baseline_single_runs_say_one_seed_is_not_evidence(translation_runs, capsys):
    _, runs = translation_runs
    assert (
        main(
            [
                "compare",
                runs["log1"],
                runs["sph1"],
                "--baseline",
                runs["log1"],
                "--no-plot",
                "--bootstrap-samples",
                "50",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "(1 seed;" in out and "fewer than 3 seeds" in out and "sign test" not in out.split("Against")[1][:200]


def test_compare_baseline_refuses_what_it_cannot_pair(translation_runs, tmp_path, capsys):
    _, runs = translation_runs

    def error(*argv):
        assert main(["compare", *argv, "--no-plot"]) == 2
        return capsys.readouterr().err

    assert "--baseline 'nope' is none of the runs given; choose one of" in error(
        runs["log1"], runs["sph1"], "--baseline", "nope"
    )
    assert "sph has 1 evaluations but the baseline 2" in error(
        f"log={runs['log1']},{runs['log2']}", f"sph={runs['sph1']}", "--baseline", "log"
    )
    assert "is a directory; give a file name" in error(runs["log1"], "--output-json", str(tmp_path))
    assert "expected RUN_DIR or NAME=RUN_DIR" in error("log=", runs["sph1"], "--baseline", "log")
    other = _evaluation(
        str(tmp_path), "other", ["x"] * 40, {"source_file": "test.en", "target_file": "test.de"}, max_examples=None
    )
    (tmp_path / "short.de").write_text("x\n" * 39, encoding="utf-8")
    (tmp_path / "short.en").write_text("y\n" * 39, encoding="utf-8")
    short = _evaluation(str(tmp_path), "short", ["x"] * 39, {"source_file": "short.en", "target_file": "short.de"})
    assert "were not evaluated on the same examples" in error(runs["log1"], short, "--baseline", runs["log1"])
    # a run directory with two evaluations must be told which one
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.rename(other, run_dir / "eval_val")
    os.rename(runs["log3"], run_dir / "eval_test")
    assert "holds several evaluations (eval_test, eval_val): name the one" in error(
        str(run_dir), runs["sph1"], "--baseline", runs["sph1"]
    )
    (tmp_path / "lost.de").write_text("x\n" * 40, encoding="utf-8")
    lost = _evaluation(str(tmp_path), "lost", ["x"] * 40, {"source_file": "test.en", "target_file": "lost.de"})
    os.remove(tmp_path / "lost.de")
    assert "its data file 'lost.de' is not found" in error(lost, runs["sph1"], "--baseline", runs["sph1"])


def test_compare_baseline_on_summaries_uses_rouge(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summaries = _sentences(30, 3)
    with open("dev.jsonl", "w", encoding="utf-8") as f:
        for i, s in enumerate(summaries):
            f.write(json.dumps({"document": f"document {i} " + s, "summary": s}) + "\n")
    data = {"data_file": "dev.jsonl"}
    base = _evaluation(str(tmp_path), "base", ["meeting notes"] * 30, data, task="summarization")
    good = _evaluation(str(tmp_path), "good", summaries, data, task="summarization", max_examples=None)
    ev = load_evaluated_run(good)
    assert ev.task == "summarization" and ev.references == summaries
    result = compare_to_baseline([load_evaluated_run(base)], {"good": [ev]}, n_samples=50)
    metrics = result["systems"]["good"]["metrics"]
    assert list(metrics) == ["rouge1", "rouge2", "rougeL"]
    assert metrics["rouge1"]["per_seed"][0]["system"] == pytest.approx(100.0)
    assert metrics["rouge1"]["per_seed"][0]["delta"] > 50 and metrics["rouge1"]["per_seed"][0]["p"] < 0.1
    with pytest.raises(ComparisonError, match="no generated hypotheses"):
        os.remove(os.path.join(base, "hypotheses.txt"))
        load_evaluated_run(os.path.join(base, "results.json"))


def test_compare_baseline_refuses_pairs_of_different_training_seeds(translation_runs, tmp_path, capsys):
    """Groups are paired by position; when the models' runs name their seeds, a pair of two seeds is refused."""
    _, runs = translation_runs
    for name, seed in (("log1", 1), ("log2", 2), ("sph1", 1), ("sph2", 2)):
        run = tmp_path / f"train_{name}"
        (run / "final").mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"config": {"seed": seed}}), encoding="utf-8")
        res = json.loads(open(os.path.join(runs[name], "results.json"), encoding="utf-8").read())
        res["settings"]["model"] = str(run / "final")
        with open(os.path.join(runs[name], "results.json"), "w", encoding="utf-8") as f:
            json.dump(res, f)
    assert load_evaluated_run(runs["sph2"]).seed == 2 and load_evaluated_run(runs["log3"]).seed is None
    assert (
        main(
            [
                "compare",
                f"log={runs['log1']},{runs['log2']}",
                f"sph={runs['sph2']},{runs['sph1']}",
                "--baseline",
                "log",
                "--no-plot",
            ]
        )
        == 2
    )
    assert "(trained with seed 2) is paired with the baseline's" in capsys.readouterr().err
    assert (
        main(
            [
                "compare",
                f"log={runs['log1']},{runs['log2']}",
                f"sph={runs['sph1']},{runs['sph2']}",
                "--baseline",
                "log",
                "--no-plot",
                "--bootstrap-samples",
                "20",
                "--output-json",
                "o.json",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))["seeds"] == [1, 2]


def test_compare_baseline_compares_teacher_forced_scores_over_seeds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refs = _sentences(20, 0)
    (tmp_path / "t.en").write_text("s\n" * 20, encoding="utf-8")
    (tmp_path / "t.de").write_text("".join(r + "\n" for r in refs), encoding="utf-8")
    data = {"source_file": "t.en", "target_file": "t.de"}
    base, sph = [], []
    for seed, (b_ece, s_ece) in enumerate(((0.02, 0.30), (0.03, 0.33))):
        base.append(
            load_evaluated_run(
                _evaluation(
                    str(tmp_path),
                    f"b{seed}",
                    refs,
                    data,
                    tf={"mean_scores": {"logarithmic": -1.8, "spherical": 0.69}, "ece": b_ece},
                )
            )
        )
        sph.append(
            load_evaluated_run(
                _evaluation(
                    str(tmp_path),
                    f"s{seed}",
                    refs,
                    data,
                    tf={
                        "mean_scores": {"logarithmic": -2.4 + 0.1 * seed, "spherical": 0.70, "brier": 0.4},
                        "ece": s_ece,
                    },
                )
            )
        )
    result = compare_to_baseline(base, {"sph": sph}, n_samples=20)
    metrics = result["systems"]["sph"]["metrics"]
    assert list(metrics) == ["bleu", "chrf", "score logarithmic", "score spherical", "ece"]  # brier: one side only
    log = metrics["score logarithmic"]
    assert [p["delta"] for p in log["per_seed"]] == pytest.approx([-0.6, -0.5]) and log["per_seed"][0]["p"] is None
    assert metrics["ece"]["over_seeds"]["mean"] == pytest.approx(29.0)
    md = comparison_markdown(result, "log")
    assert "| sph | ECE % (lower is better) | 2.00, 3.00 | 30.00, 33.00 | +28.00, +30.00 |" in md
