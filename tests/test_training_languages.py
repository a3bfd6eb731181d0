"""The language names of translation prompts travel with the model: `properlm train --source-lang
--target-lang` records them, and `evaluate` / `generate` prompt with them unless told otherwise.

Before, a decoder-only model trained on "Translate from German to English:" prompts was evaluated on
"Translate from source to target:" prompts when the names were not repeated: a silent mismatch.
"""

from __future__ import annotations

import json
import warnings

import pytest

from properlm.cli.main import build_parser, main

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

SRC = ["das haus ist klein", "der hund ist gross", "die katze schläft", "ich trinke wasser"]
TGT = ["the house is small", "the dog is big", "the cat sleeps", "i drink water"]


@pytest.fixture(scope="module")
def lang_run(tmp_path_factory):
    """A tiny decoder-only model trained for one step on German->English prompts."""
    from properlm.training import make_config, run_training

    root = tmp_path_factory.mktemp("langs")
    src, tgt = root / "train.de", root / "train.en"
    src.write_text("\n".join(SRC) + "\n", encoding="utf-8")
    tgt.write_text("\n".join(TGT) + "\n", encoding="utf-8")
    cfg = make_config(
        {
            "init": "tiny-gpt",
            "source_file": str(src),
            "target_file": str(tgt),
            "source_lang": "German",
            "target_lang": "English",
            "vocab_size": 300,
            "hidden_size": 16,
            "num_layers": 1,
            "num_heads": 2,
            "max_steps": 1,
            "per_device_train_batch_size": 4,
            "output_dir": str(root / "run"),
            "progress_bar": False,
            "tensorboard": False,
        }
    )
    run_training(cfg, quiet=True)
    return str(root / "run" / "final"), str(src), str(tgt)


def _evaluate(model, src, tgt, out, *extra):
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
                "--no-generate",
                "--rules",
                "logarithmic",
                "--output-dir",
                str(out),
                *extra,
            ]
        )
        == 0
    )
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_the_training_record_holds_the_language_names(lang_run):
    from properlm.models import TRAINING_RECORD, read_training_record

    record, path = read_training_record(lang_run[0])
    assert path.endswith(TRAINING_RECORD)
    assert record["source_lang"] == "German" and record["target_lang"] == "English"


def test_evaluate_prompts_with_the_training_runs_language_names(lang_run, tmp_path, capsys):
    model, src, tgt = lang_run
    default = _evaluate(model, src, tgt, tmp_path / "default")
    assert "language names German -> English from the training run" in capsys.readouterr().err
    assert default["settings"]["source_lang"] == "German" and default["settings"]["target_lang"] == "English"
    assert default["languages"]["from"].startswith("training run")
    explicit = _evaluate(model, src, tgt, tmp_path / "explicit", "--source-lang", "German", "--target-lang", "English")
    assert "languages" not in explicit  # nothing was taken from the record
    log = default["teacher_forced"]["mean_scores"]["logarithmic"]
    assert log == explicit["teacher_forced"]["mean_scores"]["logarithmic"]  # the same prompts, bit for bit
    # other names are other prompts: the scores move (what a silent default used to do)
    other = _evaluate(model, src, tgt, tmp_path / "other", "--source-lang", "source", "--target-lang", "target")
    assert other["teacher_forced"]["mean_scores"]["logarithmic"] != log
    # one name given: the other still comes from the run
    half = _evaluate(model, src, tgt, tmp_path / "half", "--target-lang", "en")
    assert half["settings"]["source_lang"] == "German" and half["settings"]["target_lang"] == "en"


def test_generate_takes_task_and_languages_from_the_training_run(lang_run, capsys):
    from properlm.cli import generate
    from properlm.models import load_model_and_tokenizer

    model, _, _ = lang_run
    args = build_parser().parse_args(["generate", "--model", model])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, limits = generate._validate(args)
    err = capsys.readouterr().err
    assert args.task == "translation" and "translation prompts, as in the training run" in err
    assert (args.source_lang, args.target_lang) == ("German", "English") and "German -> English" in err
    _, tok = load_model_and_tokenizer(model)
    prompt = tok.decode(generate._prompt("das haus", args, tok, False, limits))
    assert "Translate from German to English" in prompt
    # --task raw is still the raw line
    args = build_parser().parse_args(["generate", "--model", model, "--task", "raw"])
    generate._validate(args)
    assert args.task == "raw" and args.source_lang is None


def test_bleu_says_when_it_cannot_use_the_languages_tokenizer(monkeypatch):
    """A tokenizer sacrebleu cannot load (ja-mecab without its extra) used to fall back to 13a silently."""
    import sacrebleu.metrics

    from properlm.evaluation.text_metrics import translation_metrics

    real = sacrebleu.metrics.BLEU

    def bleu(*args, **kwargs):
        if kwargs.get("trg_lang"):
            raise RuntimeError("no module named MeCab")
        return real(*args, **kwargs)

    monkeypatch.setattr(sacrebleu.metrics, "BLEU", bleu)
    with pytest.warns(UserWarning, match=r"tokenizer for target language 'ja' is unavailable \(no module named MeCab"):
        m = translation_metrics(["a b c d"], ["a b c d"], target_lang="ja")
    assert "tok:13a" in m["bleu_signature"] and m["bleu"] == pytest.approx(100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        translation_metrics(["a b c d"], ["a b c d"])  # no language: no warning
