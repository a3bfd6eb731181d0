"""``benchmarks/reproduce_instruct.py`` on tiny generated data with a tiny random Llama (no GGUF): an end-to-end
run (in process) with the switch and DFT arms and an extra summarization test, resumption and the report; the
data slices; argument errors; the precision fallback."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys

import pytest

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "reproduce_instruct.py")
WORDS = "the a house cat dog tree city water sun moon good small big old new is".split()
WORDS_DE = "der die das haus katze hund baum stadt wasser sonne mond gut klein gross alt neu".split()
NEWS = ("news-test2008", "newstest2009", "newstest2010", "newstest2011", "newstest2012", "newstest2013", "newstest2014")
SMALL = [
    "--dev-examples",
    "6",
    "--decode-examples",
    "3",
    "--fit-examples",
    "4",
    "--val-examples",
    "2",
    "--test-examples",
    "3",
    "--summ-examples",
    "3",
    "--prior-examples",
    "3",
    "--summ-source-tokens",
    "16",
    "--max-length",
    "64",
]


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_instruct", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_instruct"] = module
    spec.loader.exec_module(module)
    return module


def _text(rng: random.Random, words: list[str], lo: int = 3, hi: int = 7) -> str:
    return " ".join(rng.choices(words, k=rng.randint(lo, hi)))


def _write_jsonl(path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_data_root(root, seed: int = 0) -> list[str]:
    """A tiny ``../shared/data``: alpaca/ (one record with an empty output, as the real sample has two),
    newstest-de-en/ and aeslc/; returns every text written (to train a tokenizer on)."""
    rng = random.Random(seed)
    texts: list[str] = []
    os.makedirs(os.path.join(root, "alpaca"))
    rows = [
        {"instruction": _text(rng, WORDS), "input": _text(rng, WORDS) if i % 2 else "", "output": _text(rng, WORDS)}
        for i in range(24)
    ]
    rows[5]["output"] = ""
    _write_jsonl(os.path.join(root, "alpaca", "train.jsonl"), rows)
    texts += [r[k] for r in rows for k in ("instruction", "input", "output") if r[k]]
    news = os.path.join(root, "newstest-de-en")
    os.makedirs(news)
    for name in NEWS:
        pairs = [(_text(rng, WORDS_DE), _text(rng, WORDS)) for _ in range(6)]
        for lang, col in (("de", 0), ("en", 1)):
            with open(os.path.join(news, f"{name}.{lang}"), "w", encoding="utf-8") as f:
                f.writelines(p[col] + "\n" for p in pairs)
        texts += [t for p in pairs for t in p]
    os.makedirs(os.path.join(root, "aeslc"))
    for split, n in (("train", 8), ("dev", 6)):
        recs = [
            {"id": f"{split}{i}", "document": _text(rng, WORDS, 8, 30), "summary": _text(rng, WORDS, 2, 4)}
            for i in range(n)
        ]
        if split == "dev":
            for r in recs:
                r["annotations"] = [_text(rng, WORDS, 2, 4) for _ in range(3)]
        _write_jsonl(os.path.join(root, "aeslc", f"{split}.jsonl"), recs)
        texts += [r["document"] for r in recs] + [r["summary"] for r in recs]
    return texts


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture
def in_process(script, monkeypatch):
    """Run the ``properlm`` commands in this process; returns the list of the commands run."""
    calls = []
    run = script._runner._run_in_process

    def counted(argv, log):
        calls.append(list(argv))
        return run(argv, log)

    monkeypatch.setattr(script._runner, "IN_PROCESS", True)
    monkeypatch.setattr(script._runner, "_run_in_process", counted)
    return calls


def _tiny_model(tmp_path, texts):
    from properlm.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(
        init="tiny-gpt",
        train_texts=texts,
        vocab_size=300,
        init_options={"hidden_size": 16, "num_layers": 1, "num_heads": 2, "ffn_size": 32},
    )
    out = tmp_path / "tiny"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_end_to_end_with_every_evaluation_resumes_and_reports(tmp_path, script, in_process, capsys):
    import torch

    torch.set_num_threads(1)
    root = tmp_path / "data"
    texts = write_data_root(str(root))
    model_dir = _tiny_model(tmp_path, texts)
    mail = tmp_path / "mail.jsonl"
    _write_jsonl(
        mail,
        [
            {"document": "the cat is in the house", "summary": "cat", "annotations": ["a cat"]},
            {"document": "the sun is big", "summary": "sun"},
        ],
    )
    work = tmp_path / "work"
    argv = [
        str(root),
        "--work-dir",
        str(work),
        "--model-dir",
        str(model_dir),
        "--gguf-file",
        "none",
        "--arms",
        "logarithmic,switch-spherical,dft",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--save-steps",
        "1",
        "--eval-steps",
        "1",
        "--warmup-steps",
        "0",
        "--batch-size",
        "2",
        "--eval-batch-size",
        "2",
        "--bootstrap-samples",
        "20",
        "--precision",
        "fp32",
        *SMALL,
        "--extra-test",
        f"summarization:mail={mail}",
        "--archive",
        str(tmp_path / "archive"),
    ]
    assert script.main(argv) == 0
    # 3 prior passes; untuned: fit, dev + 3 evaluations + 1 extra; per arm: train, fit, dev, 3 + 1
    assert len(in_process) == 3 + 6 + 3 * 7
    trains = {c[c.index("--output-dir") + 1].split(os.sep)[-2]: c for c in in_process if c[0] == "train"}
    assert (
        trains["switch-spherical"][trains["switch-spherical"].index("--schedule") + 1] == "logarithmic:1,spherical:1"
    )  # 80% of 2 steps, rounded to a checkpoint
    assert "--improper-loss" in trains["dft"] and "--task" in trains["dft"]
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    assert manifest["alpaca_dropped_empty"] == 1
    assert manifest["counts"]["alpaca_train"] == 23 - 6 and manifest["counts"]["alpaca_dev"] == 6
    dev = [json.loads(x)["instruction"] for x in (work / "data" / "alpaca_dev.jsonl").open()]
    train = [json.loads(x)["instruction"] for x in (work / "data" / "alpaca_train.jsonl").open()]
    assert not set(dev) & set(train) or len(set(dev)) < 6  # disjoint slices (identical texts aside)
    aeslc = [json.loads(x) for x in (work / "data" / "aeslc_dev.jsonl").open()]
    assert all(r["instruction"].startswith("Write a short subject line") and len(r["annotations"]) == 3 for r in aeslc)
    # the AESLC evaluation is an instruction task with multi-reference ROUGE
    ev = json.loads((work / "seed1" / "dft" / "aeslc" / "results.json").read_text())
    assert "rouge1_multi" in ev["generation"] and ev["num_examples"] == 3
    extra = json.loads((work / "seed1" / "dft" / "extra_mail" / "results.json").read_text())
    assert extra["num_examples"] == 2 and "rouge1_multi" in extra["generation"]
    deen = json.loads((work / "untuned" / "deen" / "results.json").read_text())
    assert deen["generation"]["bleu_signature"].startswith("nrefs:1") and deen["num_examples"] == 3
    prior = json.loads((work / "untuned" / "prior_alpaca" / "results.json").read_text())
    p = prior["teacher_forced"]["mean_target_prob"]
    assert 0.0 < p < 1.0 and 0.0 <= prior["teacher_forced"]["target_prob_above_half"] <= 1.0
    results = json.loads((work / "results.json").read_text())
    assert results["status"]["complete"]
    assert set(results["priors"]) == {"alpaca", "deen", "aeslc"}
    assert {"switch-spherical/deen_bleu", "dft/aeslc_rouge1_multi", "dft/alpaca_rougeL"} <= set(results["comparisons"])
    comp = results["comparisons"]["dft/deen_bleu"]
    assert comp["seeds"] == [1] and comp["bootstrap_per_seed"][0]["p"] is not None
    md = (work / "results.md").read_text()
    assert "Partial" not in md and "## The prior axis" in md and "| DFT (improper) | 1 |" in md
    assert (work / "training_curves.png").is_file()

    # a second invocation runs nothing; --report-only rebuilds the report from the saved settings
    in_process.clear()
    capsys.readouterr()
    assert script.main(argv) == 0
    assert in_process == [] and "[run ]" not in capsys.readouterr().out
    assert script.main([str(root), "--work-dir", str(work), "--report-only"]) == 0
    assert "| log → spherical (switch) | 1 |" in capsys.readouterr().out
    # on a new machine: --report-only with the archive alone rebuilds the same tables into a new work directory
    fresh = tmp_path / "fresh"
    again = [str(root), "--work-dir", str(fresh), "--archive", str(tmp_path / "archive"), "--report-only"]
    assert script.main([*again, "--bootstrap-samples", "20"]) == 0  # the resamples: the report's choice, as before
    assert json.loads((fresh / "results.json").read_text())["comparisons"] == results["comparisons"]
    assert (fresh / "results.md").read_text().split("Compute of")[0] == md.split("Compute of")[0]
    with pytest.raises(script.SetupError, match="no settings.json in"):
        script.main([str(root), "--work-dir", str(tmp_path / "none"), "--report-only"])
    with pytest.raises(script.SetupError, match="other settings"):
        script.main([*argv, "--steps", "3"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arms", "logarithmic,brie"], "unknown arm"),
        (["--arms", "switch-spherical"], "add it"),
        (["--arms", "logarithmic,brier", "--arm-seeds", "dft=1"], "ARM one of --arms"),
        (["--arm-seeds", "brier=4"], "outside --seeds"),
        (["--switch-at", "100"], "multiple of --save-steps"),
        (["--decode-examples", "900"], "cannot exceed"),
        (["--train-fraction", "0"], "--train-fraction"),
        (["--extra-test", "speech:x=a.txt"], "unknown kind"),
        (["--extra-test", "translation:x=missing.de"], "SOURCE_FILE,REFERENCE_FILE"),
        (["--extra-test", "instruction:alpaca=" + SCRIPT], "reserved"),
    ],
)
def test_bad_arguments_are_named(tmp_path, script, argv, message):
    with pytest.raises(script.SetupError, match=message):
        script.parse_args([str(tmp_path), *argv])


def test_extra_test_file_records_are_checked(tmp_path, script):
    bad = tmp_path / "bad.jsonl"
    _write_jsonl(bad, [{"document": "x", "summary": ""}])
    with pytest.raises(script.SetupError, match="record 1: field 'summary'"):
        script.parse_args([str(tmp_path), "--extra-test", f"summarization:s={bad}"])


def test_missing_data_folder_is_named(tmp_path, script):
    (tmp_path / "alpaca").mkdir()
    with pytest.raises(script.SetupError, match="lacks alpaca/train.jsonl"):
        script.main([str(tmp_path), "--work-dir", str(tmp_path / "w"), "--estimate"])


def test_precision_auto_falls_back_to_float32_without_native_bf16(script, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert script.resolve_precision("auto") == "fp32"
    assert "no native bfloat16" in capsys.readouterr().out
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert script.resolve_precision("auto") == "bf16"
    assert script.resolve_precision("fp32") == "fp32"


def test_dry_run_plans_the_budget_choice(tmp_path, script, capsys):
    root = tmp_path / "data"
    write_data_root(str(root))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert (
        script.main(
            [
                str(root),
                "--work-dir",
                str(tmp_path / "w"),
                "--gguf-file",
                "none",
                "--model-dir",
                str(tmp_path / "m"),
                "--precision",
                "fp32",
                *SMALL,
                "--arm-seeds",
                "brier=1",
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    trains = [line.split(":")[0] for line in out.splitlines() if line.startswith("[dry-run]") and "/train:" in line]
    assert "[dry-run] seed1/brier/train" in trains and "[dry-run] seed2/brier/train" not in trains
    assert "[dry-run] seed3/spherical/train" in trains and "core-hours" in out
    assert not (tmp_path / "w").exists()


def test_the_arms_given_set_the_plan_order_before_those_the_work_directory_ran(script):
    """The plan runs in list order: ``--arms logarithmic,switch-spherical,...`` keeps a switch run beside the
    logarithmic run it branches from (whose checkpoint lives only in the work directory), also when the work
    directory recorded other arms before (they follow, in the usual order)."""
    import argparse

    arms = ["logarithmic", "brier", "spherical", "switch-spherical", "dft"]
    args = argparse.Namespace(
        arm_list=["logarithmic", "switch-spherical", "spherical"],
        seed_list=[1],
        arm_seeds={"logarithmic": [1], "switch-spherical": [1], "spherical": [1]},
        extra_tests={},
    )
    script.widen(args, {"arms": arms, "seeds": [1, 2], "arm_seeds": {a: [1, 2] for a in arms}, "extra_tests": {}})
    assert args.arm_list == ["logarithmic", "switch-spherical", "spherical", "brier", "dft"]
    assert args.seed_list == [1, 2] and args.arm_seeds["brier"] == [1, 2]


def test_switch_at_default_does_not_depend_on_the_arms(tmp_path, script):
    """A run of branch-free arms only (e.g. ``--arms brier --seeds 1``) records the same ``switch_at`` as the run with
    the switch arm that started the archive, so the archive's settings check accepts it."""
    with_switch = script.parse_args([str(tmp_path), "--arms", "logarithmic,switch-spherical"])
    branch_free = script.parse_args([str(tmp_path), "--arms", "brier", "--seeds", "1"])
    assert with_switch.switch_at == branch_free.switch_at == 448
    assert all(getattr(with_switch, k) == getattr(branch_free, k) for k in script.RESULT_KEYS)
