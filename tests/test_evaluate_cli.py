"""`properlm evaluate`, `compare`, `generate`: metrics against hand-computed values and tiny
models end to end."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from properlm.cli.main import build_parser, main
from properlm.evaluation.text_metrics import generation_metrics, summarization_metrics, translation_metrics

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

SRC = ["das haus ist klein", "der hund ist gross", "die katze schläft", "ich trinke wasser", "wir gehen nach hause"]
TGT = ["the house is small", "the dog is big", "the cat sleeps", "i drink water", "we go home"]


def test_bleu_by_hand():
    # hypothesis/reference of 6 tokens each (brevity penalty 1); clipped n-gram precisions
    # 5/6, 3/5, 2/4, 1/3, so BLEU = 100 * (5/6 * 3/5 * 1/2 * 1/3) ** (1/4)
    m = translation_metrics(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert m["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25, abs=1e-9)
    assert "nrefs:1" in m["bleu_signature"] and "tok:13a" in m["bleu_signature"]
    assert "version:" in m["chrf_signature"]
    assert translation_metrics(["a b c d"], ["a b c d"])["chrf"] == pytest.approx(100.0)
    assert "tok:zh" in translation_metrics(["猫坐在垫子上"], ["猫坐在垫子上"], target_lang="zh")["bleu_signature"]
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        translation_metrics(["a", "b"], ["a"])


def test_rouge_by_hand():
    m = summarization_metrics(["the cat sat"], ["the cat sat on the mat"])
    assert m["rouge1"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)  # P = 3/3, R = 3/6
    assert m["rouge2"] == pytest.approx(100 * 2 * 1 * 0.4 / 1.4)  # P = 2/2, R = 2/5
    assert m["rougeL"] == pytest.approx(m["rouge1"])  # LCS = 3
    both = generation_metrics("instruction", ["the cat sat"], ["the cat sat on the mat"])
    assert both["rouge1"] == pytest.approx(m["rouge1"]) and "bleu" in both and "chrf" in both
    with pytest.raises(ValueError, match="unknown task"):
        generation_metrics("poetry", ["a"], ["a"])


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny Llama-style decoder and a tiny BART, with a BPE tokenizer trained on a few sentences."""
    from properlm.models import load_model_and_tokenizer

    root = tmp_path_factory.mktemp("models")
    paths = {}
    for init in ("tiny-gpt", "tiny-seq2seq"):
        model, tok = load_model_and_tokenizer(
            init=init,
            train_texts=SRC + TGT,
            vocab_size=300,
            seed=0,
            init_options={"hidden_size": 32, "num_layers": 1, "num_heads": 2},
        )
        model.save_pretrained(root / init)
        tok.save_pretrained(root / init)
        paths[init] = str(root / init)
    return paths


@pytest.fixture
def parallel(tmp_path):
    src, tgt = tmp_path / "test.de", tmp_path / "test.en"
    src.write_text("\n".join(SRC) + "\n", encoding="utf-8")
    tgt.write_text("\n".join(TGT) + "\n", encoding="utf-8")
    return str(src), str(tgt)


def test_evaluate_end_to_end_decoder_only(tiny_models, parallel, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(
        [
            "evaluate",
            "--model",
            tiny_models["tiny-gpt"],
            "--source-file",
            parallel[0],
            "--target-file",
            parallel[1],
            "--target-lang",
            "en",
            "--rules",
            "logarithmic,brier,spherical,power:3",
            "--objective",
            "spherical",
            "--num-beams",
            "2",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "2",
            "--max-examples",
            "4",
            "--output-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| perplexity" in stdout and "| BLEU" in stdout and "BLEU signature: nrefs:1" in stdout
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "properlm-evaluate" and res["num_examples"] == 4 and res["num_examples_in_data"] == 5
    tf = res["teacher_forced"]
    assert set(tf["mean_scores"]) == {"logarithmic", "brier", "spherical", "power:3"}
    assert tf["perplexity"] == pytest.approx(math.exp(-tf["mean_log_prob"]))
    assert sum(b["count"] for b in tf["bins"]) == tf["num_tokens"] > 0 and len(tf["bins"]) == 15
    assert 0 <= tf["ece"] <= 1 and 0 <= tf["token_accuracy"] <= 1
    gen = res["generation"]
    assert gen["objective"] == "spherical" and "bleu" in gen and "chrf" in gen
    assert res["settings"]["task"] == "translation" and res["settings"]["num_beams"] == 2
    assert len((out / "hypotheses.txt").read_text(encoding="utf-8").splitlines()) == 4
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_end_to_end_seq2seq_summarization(tiny_models, tmp_path, capsys):
    data = tmp_path / "summ.jsonl"
    data.write_text(
        "".join(json.dumps({"document": s + " and " + t, "summary": t}) + "\n" for s, t in zip(SRC[:3], TGT[:3])),
        encoding="utf-8",
    )
    out = tmp_path / "eval"
    rc = main(
        [
            "evaluate",
            "--model",
            tiny_models["tiny-seq2seq"],
            "--data-file",
            str(data),
            "--max-new-tokens",
            "3",
            "--output-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["seq2seq"] is True and res["settings"]["task"] == "summarization"
    assert {"rouge1", "rouge2", "rougeL"} <= set(res["generation"])
    assert "| ROUGE-L" in capsys.readouterr().out


def test_teacher_forced_perplexity_matches_model_loss(tiny_models, parallel):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from properlm.data import DataCollator, load_examples, tokenize_example
    from properlm.evaluation import teacher_forced_metrics

    model = AutoModelForCausalLM.from_pretrained(tiny_models["tiny-gpt"])
    tok = AutoTokenizer.from_pretrained(tiny_models["tiny-gpt"])
    ex = load_examples(None, source_file=parallel[0], target_file=parallel[1])[:3]
    m = teacher_forced_metrics(model, tok, ex, ["logarithmic", "brier"], max_length=64, batch_size=2)
    batch = DataCollator(tok.pad_token_id)([tokenize_example(e, tok, seq2seq=False, max_length=64) for e in ex])
    with torch.no_grad():
        loss = model(**batch).loss  # mean cross-entropy over the label tokens of the batch
    assert m.mean_log_prob == pytest.approx(-float(loss), abs=1e-4)
    assert m.num_tokens == int((batch["labels"][:, 1:] != -100).sum())


def test_fit_temperature_then_apply_it(tiny_models, parallel, tmp_path, capsys):
    base = [
        "evaluate",
        "--model",
        tiny_models["tiny-seq2seq"],
        "--source-file",
        parallel[0],
        "--target-file",
        parallel[1],
        "--no-generate",
        "--no-progress",
    ]
    assert main([*base, "--fit-temperature", "--output-dir", str(tmp_path / "fit")]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "fit" / "results.json").read_text())
    fit = res["temperature_fit"]
    grid = fit["temperatures"]
    assert len(grid) == 81 and not fit["on_boundary"] and fit["measured"]
    # the grid's best value, then the fit refined between its neighbours
    k = grid.index(fit["grid_temperature"])
    assert fit["grid_mean_log_prob"] == max(fit["mean_log_probs"]) >= res["teacher_forced"]["mean_log_prob"] - 1e-6
    assert grid[k - 1] < fit["temperature"] < grid[k + 1] and fit["temperature"] != fit["grid_temperature"]
    assert "| fitted temperature" in out and f"refined from the grid's {fit['grid_temperature']:.4f}" in out
    # measured at the fitted T by a second pass: at least as good as the best grid value
    assert fit["mean_log_prob"] >= fit["grid_mean_log_prob"] - 1e-7
    assert sum(b["count"] for b in fit["bins"]) == fit["num_tokens"] == res["teacher_forced"]["num_tokens"]
    assert fit["mean_scores"]["logarithmic"] == pytest.approx(fit["mean_log_prob"], rel=1e-6)
    assert os.path.isfile(res["files"]["reliability_diagram_fitted"])
    assert "teacher_forced_at_fitted_temperature" in res["seconds"]
    # applying the fitted T gives exactly the fit's metrics
    t = fit["temperature"]
    assert main([*base, "--temperature", repr(t), "--output-dir", str(tmp_path / "apply")]) == 0
    assert "| temperature (scores, ECE)" in capsys.readouterr().out
    tf = json.loads((tmp_path / "apply" / "results.json").read_text())["teacher_forced"]
    assert tf["temperature"] == t
    assert tf["mean_log_prob"] == fit["mean_log_prob"] and tf["ece"] == fit["ece"]
    assert [b["count"] for b in tf["bins"]] == [b["count"] for b in fit["bins"]]
    # the fitted T is the optimum of the stored logits, in float64: bisection on the slope
    # dL/dbeta = mean(z_y - E_p[z]), decreasing in beta = 1/T
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from properlm.data import DataCollator, load_examples, tokenize_example

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_models["tiny-seq2seq"])
    tok = AutoTokenizer.from_pretrained(tiny_models["tiny-seq2seq"])
    ex = load_examples(None, source_file=parallel[0], target_file=parallel[1])
    batch = DataCollator(tok.pad_token_id)([tokenize_example(e, tok, seq2seq=True, max_length=64) for e in ex])
    with torch.no_grad():
        logits = model(**batch).logits.double()
    keep = batch["labels"] != -100
    z, y = logits[keep], batch["labels"][keep]
    assert len(y) == fit["num_tokens"]
    lo, hi = 0.05, 20.0
    for _ in range(100):
        beta = (lo + hi) / 2
        slope = float((z.gather(1, y[:, None]).squeeze(1) - (torch.softmax(beta * z, -1) * z).sum(-1)).mean())
        lo, hi = (beta, hi) if slope > 0 else (lo, beta)
    t_ref = 2 / (lo + hi)
    assert abs(t / t_ref - 1) < 1e-3 < abs(fit["grid_temperature"] / t_ref - 1)
    want = float(torch.log_softmax(z / t, -1).gather(1, y[:, None]).mean())
    assert fit["mean_log_prob"] == pytest.approx(want, rel=1e-6)


def test_markdown_table_temperature_fit_rows():
    from properlm.evaluation import markdown_table

    tf = {
        "num_tokens": 10,
        "perplexity": 2.0,
        "token_accuracy": 0.5,
        "ece": 0.1,
        "num_bins": 15,
        "temperature": 1.0,
        "mean_scores": {},
    }
    refined = {
        "temperature": 0.93771,
        "grid_temperature": 0.9227,
        "on_boundary": False,
        "mean_log_prob": -1.5,
        "ece": 0.02,
    }
    table = markdown_table({"num_examples": 3, "teacher_forced": tf, "temperature_fit": refined})
    assert "| 0.9377 (refined from the grid's 0.9227) |" in table and "| -1.5000 |" in table
    edge = {**refined, "temperature": 5.0, "grid_temperature": 5.0, "on_boundary": True}
    assert "5.0000 (grid edge: the optimum may lie beyond)" in markdown_table(
        {"num_examples": 3, "teacher_forced": tf, "temperature_fit": edge}
    )
    # results.json written before the refinement (no grid_temperature) still print
    old = {"temperature": 0.9227, "on_boundary": False, "mean_log_prob": -1.5, "ece": 0.02}
    assert "| 0.9227 |" in markdown_table({"num_examples": 3, "teacher_forced": tf, "temperature_fit": old})


def test_markdown_table_shows_the_prior_on_the_targets():
    from properlm.evaluation import markdown_table

    tf = {"num_tokens": 10, "perplexity": 2.0, "token_accuracy": 0.5, "ece": 0.1, "num_bins": 15, "mean_scores": {}}
    assert "mean p(target" not in markdown_table({"num_examples": 3, "teacher_forced": tf})  # older results.json
    table = markdown_table(
        {"num_examples": 3, "teacher_forced": {**tf, "mean_target_prob": 0.4351, "target_prob_above_half": 0.4229}}
    )
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    names = [r[0] for r in rows]
    assert dict(rows)["mean p(target token)"] == "0.435" and dict(rows)["targets with p > 0.5 (%)"] == "42.3"
    assert names.index("token accuracy (%)") + 1 == names.index("mean p(target token)")


def test_bad_data_line_is_reported_before_loading(tiny_models, tmp_path, capsys, monkeypatch):
    import properlm.models

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded for bad data")

    monkeypatch.setattr(properlm.models, "load_model_and_tokenizer", boom)
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "say hi", "output": "hi"}\n{"instruction": "say bye"}\n', encoding="utf-8")
    rc = main(
        ["evaluate", "--model", tiny_models["tiny-gpt"], "--data-file", str(data), "--output-dir", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.jsonl line 2" in err and "'output'" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rules", "logarithmic,nope"], "--rules: unknown scoring rule 'nope'"),
        (["--objective", "spherical"], "only changes beam search"),
        (["--num-beams", "0"], "--num-beams must be a positive integer"),
        (["--max-examples", "0"], "--max-examples must be positive"),
        (["--dtype", "float32", "--device", "nodevice"], "--device"),
        (["--temperature", "0"], "--temperature must be a positive finite number"),
        (["--temperature", "nan"], "--temperature must be a positive finite number"),
    ],
)
def test_bad_options(tiny_models, parallel, tmp_path, capsys, extra, message):
    rc = main(
        [
            "evaluate",
            "--model",
            tiny_models["tiny-gpt"],
            "--source-file",
            parallel[0],
            "--target-file",
            parallel[1],
            "--output-dir",
            str(tmp_path / "o"),
            *extra,
        ]
    )
    assert rc == 2
    assert message in capsys.readouterr().err


def test_missing_model_and_train_results_dir(parallel, tmp_path, capsys):
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "nope"),
                "--source-file",
                parallel[0],
                "--target-file",
                parallel[1],
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"config": {}, "train": {}}))
    (run / "config.json").write_text("{}")
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(run),
                "--source-file",
                parallel[0],
                "--target-file",
                parallel[1],
                "--output-dir",
                str(run),
            ]
        )
        == 2
    )
    assert "already holds a results.json" in capsys.readouterr().err


def _fake_train_run(path, rule, losses):
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for i, loss in enumerate(losses, 1):
            f.write(
                json.dumps({"step": 10 * i, "epoch": i / 10, "rule": rule if i < 3 else "brier", "loss": loss}) + "\n"
            )
        f.write(
            json.dumps(
                {
                    "step": 10 * len(losses),
                    "rule": "brier",
                    "eval_loss": losses[-1] + 0.1,
                    "eval_score_spherical": 0.3,
                    "eval_runtime": 1.0,
                }
            )
            + "\n"
        )
    (path / "results.json").write_text(
        json.dumps(
            {
                "config": {"rule": rule},
                "rule_stages": [[rule, 20], ["brier", 20]],
                "global_step": 10 * len(losses),
                "train": {"train_loss": losses[-1], "train_runtime": 3.0},
                "eval": {"eval_loss": losses[-1] + 0.1, "eval_score_spherical": 0.3, "eval_runtime": 1.0},
            }
        )
    )


def _table_lines(out: str) -> list[list[str]]:
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in out.splitlines() if ln.startswith("| ")]


def test_compare_two_runs(tmp_path, capsys):
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    _fake_train_run(a, "logarithmic", [3.0, 2.5, 2.2, 2.0])
    _fake_train_run(b, "spherical", [0.9, 0.8, 0.7, 0.65])
    (b / "eval").mkdir()
    (b / "eval" / "results.json").write_text(
        json.dumps(
            {
                "kind": "properlm-evaluate",
                "num_examples": 5,
                "settings": {"task": "translation", "num_beams": 4},
                "teacher_forced": {
                    "perplexity": 7.5,
                    "token_accuracy": 0.4,
                    "ece": 0.05,
                    "mean_scores": {"brier": 0.2},
                },
                "generation": {"objective": "spherical", "bleu": 12.5, "chrf": 30.0},
            }
        )
    )
    png, md = tmp_path / "curves.png", tmp_path / "table.md"
    assert main(["compare", str(a), str(b), "--plot", str(png), "--output-md", str(md)]) == 0
    out = capsys.readouterr().out
    rows = _table_lines(out)
    header = rows[0]
    assert header[:3] == ["run", "split", "train rule"]
    for col in ("steps", "train loss", "S spherical", "ppl", "ECE %", "BLEU", "chrF", "S brier"):
        assert col in header, col
    assert not [c for c in header if c.startswith("eval_")]  # raw Trainer keys stay in the JSON
    cell = {(r[0], r[1]): dict(zip(header, r)) for r in rows[1:]}
    # a's validation row; b's validation row and its labelled evaluation folder
    assert set(cell) == {(str(a), "validation"), (str(b), "validation"), (str(b), "eval")}
    assert cell[(str(a), "validation")]["train rule"] == "logarithmic:20,brier:20"
    assert cell[(str(a), "validation")]["S spherical"] == "0.3000"
    assert cell[(str(b), "eval")]["BLEU"] == "12.50" and cell[(str(b), "eval")]["decoding"] == "beam 4, spherical"
    assert cell[(str(b), "eval")]["ECE %"] == "5.00" and cell[(str(b), "validation")]["BLEU"] == "-"
    assert png.read_bytes()[:4] == b"\x89PNG" and md.read_text().startswith("| run")


def test_compare_names_rows_keeps_units_and_writes_every_figure(tmp_path, capsys):
    """Rows carry the names given (NAME=DIR, #i for seeds), BLEU has two decimals in every row, --output-json
    holds the raw figures, and a directory as an output file is one clear error before any work."""
    runs = []
    for name, bleu in (("log", 0.09925), ("sph", 2.515)):
        d = tmp_path / name
        _fake_train_run(d, "logarithmic", [3.0, 2.5])
        (d / "test").mkdir()
        (d / "test" / "results.json").write_text(
            json.dumps(
                {
                    "kind": "properlm-evaluate",
                    "num_examples": 3,
                    "settings": {"num_beams": 1},
                    "teacher_forced": {"perplexity": 12460.3, "mean_scores": {"logarithmic": -9.43}},
                    "generation": {"bleu": bleu, "chrf": 10.0},
                }
            )
        )
        runs.append(d)
    js = tmp_path / "all.json"
    argv = ["compare", f"log={runs[0]}", f"sph={runs[1]}", "--no-plot", "--output-json", str(js)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = _table_lines(out)
    header = rows[0]
    cell = {(r[0], r[1]): dict(zip(header, r)) for r in rows[1:]}
    assert cell[("log", "test")]["BLEU"] == "0.10" and cell[("sph", "test")]["BLEU"] == "2.52"
    assert cell[("log", "test")]["ppl"] == "12,460.30" and cell[("log", "test")]["log score"] == "-9.4300"
    assert f"every figure: {js}" in out
    saved = json.loads(js.read_text())
    assert [r["run"] for r in saved["runs"]] == ["log", "log", "sph", "sph"]
    assert saved["runs"][0]["train_results"]["eval"]["eval_loss"] == 2.6  # the raw keys are kept there
    # seeds of one configuration: NAME #i
    assert main(["compare", f"cfg={runs[0]},{runs[1]}", "--no-plot"]) == 0
    assert {r[0] for r in _table_lines(capsys.readouterr().out)[1:]} == {"cfg #1", "cfg #2"}
    for option in ("--output-json", "--output-md", "--plot"):
        assert main(["compare", str(runs[0]), option, str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"{option} {str(tmp_path)!r} is a directory; give a file name" in err and "Traceback" not in err


def test_compare_plot_has_a_panel_per_quantity_and_says_its_file(tmp_path, capsys):
    """A log-score loss and a spherical loss are not one quantity: each rule's loss gets its own panel; --plot
    without an extension writes NAME.png and says so."""
    from properlm.evaluation.curves import curve_panels
    from properlm.evaluation.run_records import load_runs

    a, b = tmp_path / "a", tmp_path / "b"
    _fake_train_run(a, "logarithmic", [3.0, 2.5, 2.2])
    _fake_train_run(b, "spherical", [0.9, 0.8, 0.7])
    panels = curve_panels(load_runs([str(a), str(b)]))
    assert ("loss", "logarithmic") in panels and ("loss", "spherical") in panels and ("loss", "brier") in panels
    assert ("eval_score_spherical", None) in panels and ("eval_loss", "brier") in panels
    assert main(["compare", str(a), str(b), "--plot", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"training curves: {tmp_path / 'out.png'}" in out and (tmp_path / "out.png").is_file()


def test_compare_errors(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing"), "--no-plot"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty"), "--no-plot"]) == 2
    assert "holds no results.json" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{oops\n')
    assert main(["compare", str(bad), "--no-plot"]) == 2
    assert "metrics.jsonl line 2" in capsys.readouterr().err


def test_generate_from_file(tiny_models, tmp_path, capsys):
    inp, out = tmp_path / "in.txt", tmp_path / "out.txt"
    inp.write_text("das haus ist klein\nich trinke wasser\nder hund\n", encoding="utf-8")
    rc = main(
        [
            "generate",
            "--model",
            tiny_models["tiny-seq2seq"],
            "--input",
            str(inp),
            "--output",
            str(out),
            "--task",
            "translation",
            "--num-beams",
            "2",
            "--objective",
            "brier",
            "--max-new-tokens",
            "3",
            "--batch-size",
            "2",
        ]
    )
    assert rc == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3
    inp.write_text("a\n\nb\n", encoding="utf-8")
    assert main(["generate", "--model", tiny_models["tiny-seq2seq"], "--input", str(inp)]) == 2
    assert "line 2: empty line" in capsys.readouterr().err


def test_generate_bf16_runs_under_mixed_precision(tiny_models, tmp_path, capsys, monkeypatch):
    """``generate --bf16``: decoding inside :func:`properlm.evaluation.mixed_precision` (the body's matrix
    products in bfloat16); with half-precision weights it is refused before loading anything."""
    import properlm.evaluation.precision as precision

    entered = []
    real = precision.mixed_precision

    def spy(model, *a, **k):
        entered.append(type(model).__name__)
        return real(model, *a, **k)

    monkeypatch.setattr(precision, "mixed_precision", spy)
    inp, out = tmp_path / "in.txt", tmp_path / "out.txt"
    inp.write_text("das haus ist klein\nich trinke wasser\n", encoding="utf-8")
    base = [
        "generate",
        "--model",
        tiny_models["tiny-gpt"],
        "--input",
        str(inp),
        "--task",
        "translation",
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
    ]
    assert main([*base, "--output", str(out), "--bf16"]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2 and len(entered) == 1
    capsys.readouterr()
    assert main([*base, "--bf16", "--dtype", "bfloat16"]) == 2
    assert "already half precision" in capsys.readouterr().err and len(entered) == 1


@pytest.mark.parametrize("command", ["evaluate", "generate", "compare"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: properlm " + command in text


def test_multi_reference_rouge_by_hand():
    from importlib.metadata import version

    from properlm.evaluation.text_metrics import rouge_per_example

    # per example and ROUGE type the best F1 over the references: ROUGE-1 from the first, ROUGE-2 from the second
    hyp, refs = "a b c d", ["d c b a", "a b x y"]
    per = rouge_per_example([hyp], [refs])
    assert per["rouge1"] == [pytest.approx(1.0)] and per["rouge2"] == [pytest.approx(1 / 3)]
    m = summarization_metrics(
        [hyp, "the cat sat"],
        ["d c b a", "the dog ran"],
        multi_references=[refs, ["the dog ran", "the cat sat on the mat"]],
    )
    assert m["rouge1"] == pytest.approx(100 * (1.0 + 1 / 3) / 2)  # against the first reference only
    assert m["rouge1_multi"] == pytest.approx(100 * (1.0 + 2 * 1 * 0.5 / 1.5) / 2)
    assert m["rouge2_multi"] == pytest.approx(100 * (1 / 3 + 2 * 1 * 0.4 / 1.4) / 2)
    assert m["num_references"] == 2 and m["rouge_version"] == version("rouge-score")
    assert f"rouge-score {m['rouge_version']}" in m["rouge_settings"]
    assert "best over each example's references" in m["rouge_multi_settings"]
    assert "rouge1_multi" not in summarization_metrics(["a"], ["a"])
    with pytest.raises(ValueError, match="example 0 has no reference"):
        rouge_per_example(["a"], [[]])


def _write_emails(path, n, annotations=False, long_every=3):
    """Summarization rows; every ``long_every``-th document is about 1,500 characters (past the
    64 positions of the model below, and past the tokenizer's model_max_length of 1024 tokens)."""
    rows = []
    for i in range(n):
        subject = f"{WORDS_SUBJ[i % len(WORDS_SUBJ)]} meeting"
        body = f"please come to the {subject} on day {i % 7} thanks"
        if i % long_every == 0:
            body = " ".join([body] * 30)
        row = {"document": body, "summary": subject}
        if annotations:
            row["annotations"] = [f"{subject} today", "meeting"]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


WORDS_SUBJ = ["budget", "gas", "power", "legal", "trading"]


@pytest.fixture(scope="module")
def short_position_run(tmp_path_factory):
    """`properlm train --init tiny-seq2seq --max-length 64 --max-source-length 40`: a model with 64 positions."""
    from properlm.training import make_config, run_training

    root = tmp_path_factory.mktemp("summ")
    train = _write_emails(root / "train.jsonl", 24)
    cfg = make_config(
        {
            "init": "tiny-seq2seq",
            "train_file": train,
            "vocab_size": 300,
            "hidden_size": 16,
            "num_layers": 1,
            "num_heads": 2,
            "max_length": 64,
            "max_source_length": 40,
            "max_steps": 2,
            "save_steps": 2,
            "per_device_train_batch_size": 4,
            "output_dir": str(root / "run"),
            "progress_bar": False,
            "tensorboard": False,
            "logging_steps": 1,
        }
    )
    run_training(cfg, quiet=True)
    dev = _write_emails(root / "dev.jsonl", 6, annotations=True)
    return str(root / "run"), dev


def test_evaluate_takes_the_truncation_of_the_training_run(short_position_run, tmp_path, capsys):
    """Regression: a tiny-seq2seq trained with --max-length 64 has 64 positions; evaluate's old default
    --max-length 512 indexed past Marian's position table (IndexError). Now it cuts as training did."""
    from properlm.models import TRAINING_RECORD

    run, dev = short_position_run
    record = json.loads(open(f"{run}/final/{TRAINING_RECORD}").read())
    assert record == {"max_length": 64, "max_source_length": 40, "task": "summarization", "seq2seq": True}
    assert json.loads(open(f"{run}/checkpoint-2/{TRAINING_RECORD}").read()) == record
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--model",
                f"{run}/final",
                "--data-file",
                dev,
                "--num-beams",
                "2",
                "--max-new-tokens",
                "4",
                "--output-dir",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    cut = res["truncation"]
    assert res["settings"]["max_length"] == 64 and res["settings"]["max_source_length"] == 40
    assert cut["model_max_positions"] == 64 and cut["position_key"] == "max_position_embeddings"
    assert cut["max_length_from"].startswith("training run") and TRAINING_RECORD in cut["max_length_from"]
    assert cut["num_sources_cut"] == 2 and cut["num_prompts_over_max_length"] == 0  # docs 0 and 3 are long
    assert "| max length (tokens)" in stdout and "2 of 6 sources cut" in stdout
    gen = res["generation"]
    assert {"rouge1", "rouge1_multi", "rouge2_multi", "rougeL_multi"} <= set(gen) and gen["num_references"] == 3
    assert gen["rouge1_multi"] >= gen["rouge1"] - 1e-9 and "ROUGE multi-reference signature" in stdout
    assert "rouge-score" in gen["rouge_settings"]
    # a shorter --max-length is taken and said to differ from training's; without a source cut, the
    # long documents are cut at --max-length
    assert (
        main(
            [
                "evaluate",
                "--model",
                f"{run}/final",
                "--data-file",
                dev,
                "--max-length",
                "32",
                "--max-source-length",
                "1000",
                "--no-generate",
                "--output-dir",
                str(tmp_path / "e2"),
                "--no-progress",
            ]
        )
        == 0
    )
    cut = json.loads((tmp_path / "e2" / "results.json").read_text())["truncation"]
    assert cut["max_length"] == 32 and cut["max_length_from"] == "--max-length (training used 64)"
    assert cut["num_sources_cut"] == 0 and cut["num_prompts_over_max_length"] == 2
    # a run made before the record existed: the run's results.json tells the lengths
    os.remove(f"{run}/checkpoint-2/{TRAINING_RECORD}")
    assert (
        main(
            [
                "evaluate",
                "--model",
                f"{run}/checkpoint-2",
                "--data-file",
                dev,
                "--no-generate",
                "--output-dir",
                str(tmp_path / "e3"),
                "--no-progress",
            ]
        )
        == 0
    )
    cut = json.loads((tmp_path / "e3" / "results.json").read_text())["truncation"]
    assert cut["max_length"] == 64 and cut["max_source_length"] == 40 and "results.json" in cut["max_length_from"]


def test_too_long_for_the_model_is_refused_before_reading_data(short_position_run, tmp_path, capsys, monkeypatch):
    import properlm.data

    run, dev = short_position_run

    def boom(*a, **k):
        raise AssertionError("no data may be read for a length the model cannot take")

    monkeypatch.setattr(properlm.data, "load_examples", boom)
    assert (
        main(
            [
                "evaluate",
                "--model",
                f"{run}/final",
                "--data-file",
                dev,
                "--max-length",
                "512",
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--max-length 512 exceeds the 64 positions the model takes (max_position_embeddings" in err
    assert "use --max-length 64 or less (leave it out to use the training run's 64)" in err
    assert (
        main(
            [
                "evaluate",
                "--model",
                f"{run}/final",
                "--data-file",
                dev,
                "--max-new-tokens",
                "100",
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--max-new-tokens 100 exceeds the 64 decoder positions" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # generate: the same refusal before the input is read, and the training run's lengths by default
    inp = tmp_path / "in.txt"
    inp.write_text(" ".join(["please come to the gas meeting"] * 40) + "\nthe budget\n", encoding="utf-8")
    assert (
        main(["generate", "--model", f"{run}/final", "--input", str(tmp_path / "missing.txt"), "--max-length", "65"])
        == 2
    )
    assert "--max-length 65 exceeds the 64 positions" in capsys.readouterr().err
    out = tmp_path / "out.txt"
    assert (
        main(
            [
                "generate",
                "--model",
                f"{run}/final",
                "--task",
                "summarization",
                "--input",
                str(inp),
                "--output",
                str(out),
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert "sources at 40 tokens (training run" in capsys.readouterr().err
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2


def test_train_refuses_a_length_beyond_the_model(tiny_models, tmp_path, capsys):
    cfg_path = os.path.join(tiny_models["tiny-seq2seq"], "config.json")
    limit = json.loads(open(cfg_path).read())["max_position_embeddings"]
    data = _write_emails(tmp_path / "t.jsonl", 4)
    assert (
        main(
            [
                "train",
                "--model",
                tiny_models["tiny-seq2seq"],
                "--train-file",
                data,
                "--max-length",
                str(limit + 1),
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert f"--max-length {limit + 1} exceeds the {limit} positions" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--init",
                "tiny-seq2seq",
                "--train-file",
                data,
                "--max-source-length",
                "0",
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--max-source-length must be positive" in capsys.readouterr().err


def test_no_generate_warns_about_the_decoding_options(parallel, tmp_path):
    """With --no-generate the decoding options change nothing: validate_settings warns and names them; without
    them (the calibration runs of the benchmark studies) nothing warns."""
    import warnings

    from properlm.evaluation import EvalSettings, validate_settings

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")
    base = {
        "model": str(model),
        "source_file": parallel[0],
        "target_file": parallel[1],
        "generate": False,
        "output_dir": str(tmp_path / "o"),
    }
    with pytest.warns(
        UserWarning,
        match=r"--num-beams 4, --objective spherical, --max-new-tokens-ratio 1\.0: no "
        r"effect with --no-generate",
    ):
        validate_settings(EvalSettings(**base, num_beams=4, objective="spherical", max_new_tokens_ratio=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_settings(
            EvalSettings(
                **base, fit_temperature=True, max_length=64, batch_size=4, dtype="float32", device="cpu", progress=False
            )
        )
        validate_settings(EvalSettings(**{**base, "generate": True}, num_beams=4, objective="spherical"))
        validate_settings(EvalSettings(**base, num_beams=4), warn=False)


def test_a_training_output_dir_as_model_points_to_its_model(parallel, tmp_path, capsys):
    """`--model runs/NAME` (the output directory of `properlm train`) names the model inside it, in evaluate, generate
    and train."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}", encoding="utf-8")
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(run),
                "--source-file",
                parallel[0],
                "--target-file",
                parallel[1],
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "holds no config.json" in err and f"pass the model it saved, --model {run / 'final'}" in err
    assert main(["generate", "--model", str(run), "--input", parallel[0]]) == 2
    assert f"--model {run / 'final'}" in capsys.readouterr().err
    # train fine-tunes from --model: the same check (properlm.models.check_model_source), the same hint
    assert (
        main(
            [
                "train",
                "--model",
                str(run),
                "--source-file",
                parallel[0],
                "--target-file",
                parallel[1],
                "--output-dir",
                str(tmp_path / "t"),
            ]
        )
        == 2
    )
    assert f"--model {run / 'final'}" in capsys.readouterr().err


def test_generate_warns_about_language_names_without_translation(tmp_path):
    """--source-lang/--target-lang go into --task translation prompts only; with another --task they warn."""
    import warnings

    from properlm.cli import generate

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")
    args = build_parser().parse_args(["generate", "--model", str(model), "--source-lang", "German"])
    with pytest.warns(UserWarning, match="--source-lang German: no effect with --task raw"):
        generate._validate(args)
    args = build_parser().parse_args(
        [
            "generate",
            "--model",
            str(model),
            "--task",
            "translation",
            "--source-lang",
            "German",
            "--target-lang",
            "English",
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate._validate(args)


def test_compare_writes_the_table_into_a_new_directory(tmp_path, capsys):
    """--output-md in a directory that does not exist yet is created, as --plot's is (it was a traceback)."""
    run = tmp_path / "run"
    _fake_train_run(run, "logarithmic", [3.0, 2.5])
    md = tmp_path / "report" / "table.md"
    assert main(["compare", str(run), "--no-plot", "--output-md", str(md)]) == 0
    assert md.read_text(encoding="utf-8").startswith("| run")


def test_generate_refuses_an_output_it_cannot_write_before_loading(tmp_path, capsys):
    """--output in a missing directory (or a directory) is refused before the model is loaded and the inputs
    decoded, not with a traceback after them."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")
    inp = tmp_path / "in.txt"
    inp.write_text("a\n", encoding="utf-8")
    for output, message in [(tmp_path / "nope" / "out.txt", "does not exist"), (tmp_path, "a directory, not a file")]:
        assert main(["generate", "--model", str(model), "--input", str(inp), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert f"--output {str(output)!r}: " in err and message in err


def test_generate_says_what_it_cut_only_when_it_cut(tiny_models, tmp_path, capsys):
    """No truncation line on a run that cuts nothing; with a long input, how many inputs were cut."""
    inp = tmp_path / "in.txt"
    inp.write_text("das haus\nich trinke wasser\n", encoding="utf-8")
    common = [
        "generate",
        "--model",
        tiny_models["tiny-seq2seq"],
        "--input",
        str(inp),
        "--output",
        str(tmp_path / "out.txt"),
        "--task",
        "translation",
        "--max-new-tokens",
        "2",
    ]
    assert main(common) == 0
    assert "cut" not in capsys.readouterr().err
    inp.write_text("das haus\n" + " ".join(["wasser"] * 40) + "\n", encoding="utf-8")
    assert main([*common, "--max-length", "8"]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 input(s) cut: prompts at 8 tokens (max length 8: --max-length)" in err


def test_evaluate_table_counts_prompts_cut_at_max_length():
    from properlm.evaluation.report import markdown_table

    results = {
        "num_examples": 10,
        "teacher_forced": {
            "num_tokens": 5,
            "perplexity": 2.0,
            "token_accuracy": 0.5,
            "ece": 0.1,
            "num_bins": 15,
            "mean_scores": {},
        },
        "truncation": {
            "max_length": 64,
            "max_length_from": "--max-length",
            "max_source_length": None,
            "num_sources_cut": 0,
            "num_prompts_over_max_length": 3,
        },
    }
    table = markdown_table(results)
    assert "| prompts cut at max length | 3 of 10 examples" in table
    results["truncation"]["num_prompts_over_max_length"] = 0
    assert "prompts cut" not in markdown_table(results)


def test_bf16_on_a_cpu_without_native_bf16_runs_its_products_in_float32_and_says_so(
    tiny_models, tmp_path, monkeypatch, parallel
):
    """--bf16 where the CPU has no native bfloat16 matrix multiply (the capability check mocked): train, evaluate
    and generate say before the work that the products run in float32, record it in results.json, and their
    bfloat16 matrix products do run under the float32 mode; a CPU with native bf16 stays silent and native."""
    import json
    import warnings

    import torch

    from properlm.evaluation import precision

    seen: list[str] = []
    real = precision._Bf16MatmulsInFloat32.__torch_dispatch__

    def spy(self, func, types, args=(), kwargs=None):
        if func in precision.BF16_MATMUL_OPS and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args
        ):
            seen.append(str(func))
        return real(self, func, types, args, kwargs)

    monkeypatch.setattr(precision._Bf16MatmulsInFloat32, "__torch_dispatch__", spy)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    message = precision.emulated_bf16_warning("cpu", "training")
    assert message is not None and "float32 products of the bfloat16 operands" in message and "drop --bf16" in message
    assert torch.backends.cpu.get_cpu_capability() in message
    assert precision.emulated_bf16_warning(torch.device("meta")) is None
    assert precision.bf16_matmul_mode("cpu") == "float32"
    from properlm.evaluation.settings import EvalSettings, validate_settings

    settings = EvalSettings(
        model=tiny_models["tiny-gpt"],
        source_file=parallel[0],
        target_file=parallel[1],
        device="cpu",
        bf16=True,
        output_dir=str(tmp_path / "e"),
    )
    with pytest.warns(UserWarning, match="no native bfloat16 matrix multiply"):
        validate_settings(settings)
    evaluate = [
        "evaluate",
        "--model",
        tiny_models["tiny-gpt"],
        "--source-file",
        parallel[0],
        "--target-file",
        parallel[1],
        "--device",
        "cpu",
        "--bf16",
        "--max-new-tokens",
        "2",
        "--output-dir",
        str(tmp_path / "e"),
    ]
    with pytest.warns(UserWarning, match="drop --bf16 to run evaluate in float32"):
        assert main(evaluate) == 0
    assert json.loads((tmp_path / "e" / "results.json").read_text())["bf16_matmuls"] == "float32"
    assert seen, "evaluate --bf16 ran no bfloat16 product in float32"
    seen.clear()
    inp = tmp_path / "in.txt"
    inp.write_text("das haus\n", encoding="utf-8")
    gen = [
        "generate",
        "--model",
        tiny_models["tiny-gpt"],
        "--input",
        str(inp),
        "--output",
        str(tmp_path / "o.txt"),
        "--task",
        "translation",
        "--max-new-tokens",
        "1",
        "--device",
        "cpu",
        "--bf16",
    ]
    with pytest.warns(UserWarning, match="drop --bf16 to run generate in float32"):
        assert main(gen) == 0
    assert seen
    seen.clear()
    train = [
        "train",
        "--init",
        "tiny-gpt",
        "--source-file",
        parallel[0],
        "--target-file",
        parallel[1],
        "--vocab-size",
        "260",
        "--hidden-size",
        "16",
        "--num-layers",
        "1",
        "--num-heads",
        "2",
        "--max-steps",
        "1",
        "--bf16",
        "--output-dir",
        str(tmp_path / "t"),
        "--no-tensorboard",
        "--no-progress-bar",
    ]
    with pytest.warns(UserWarning, match="drop --bf16 to run training in float32"):
        assert main(train) == 0
    assert json.loads((tmp_path / "t" / "results.json").read_text())["bf16_matmuls"] == "float32"
    assert any("mm" in op for op in seen), seen
    seen.clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert precision.emulated_bf16_warning("cpu") is None and precision.bf16_matmul_mode("cpu") == "native"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        validate_settings(settings)


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--train-file", "data.jsonl"],
        ["evaluate", "--data-file", "data.jsonl", "--output-dir", "eval"],
        ["generate", "--input", "data.jsonl"],
    ],
)
def test_a_mistyped_model_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, capsys, command):
    """`--model runs/smol` (a typo: `runs/` exists here) used to be taken as a hub id: half a minute of retries,
    then "Check your internet connection". A path-like --model that does not exist is now one line, exit 2,
    before anything is loaded; a near name in its directory is suggested."""
    import properlm.models as modeling

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "small").mkdir(parents=True)
    (tmp_path / "data.jsonl").write_text(
        '{"instruction": "Say one.", "input": "", "output": "one"}\n', encoding="utf-8"
    )

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(modeling, "load_model_and_tokenizer", no_loading)
    monkeypatch.setattr(modeling, "model_config_dict", no_loading)
    monkeypatch.setattr("properlm.cli.generate.load_model_and_tokenizer", no_loading)
    assert main([*command, "--model", "runs/smol"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"properlm {command[0]}: error: model directory 'runs/smol' does not exist (did you mean 'runs/small'?)"
    ]
    assert main([*command, "--model", str(tmp_path / "runs" / "gone" / "final")]) == 2
    assert "does not exist" in capsys.readouterr().err
    from properlm.models import looks_like_a_path

    assert looks_like_a_path("runs/smol") and looks_like_a_path("./smol") and looks_like_a_path("a/b/c")
    assert not looks_like_a_path("HuggingFaceTB/SmolLM2-135M") and not looks_like_a_path("gpt2")


def test_generate_from_a_terminal_says_how_the_input_ends(tiny_models, tmp_path, monkeypatch, capsys):
    """Reading stdin from a terminal, generate says that it waits for lines ending with Ctrl-D; from a pipe it
    says nothing."""
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    argv = [
        "generate",
        "--model",
        tiny_models["tiny-gpt"],
        "--task",
        "translation",
        "--max-new-tokens",
        "1",
        "--output",
        str(tmp_path / "out.txt"),
    ]
    monkeypatch.setattr("sys.stdin", Terminal("das haus\n"))
    assert main(argv) == 0
    assert "end with Ctrl-D" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("das haus\n"))
    assert main(argv) == 0
    assert "Ctrl-D" not in capsys.readouterr().err
