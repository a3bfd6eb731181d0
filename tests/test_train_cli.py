"""``properlm train``: training with each rule, schedules, resume after a kill, LoRA, YAML,
--help, fail-fast validation and a 2-process torchrun (gloo) run. Tiny models, few steps."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

from properlm.cli.main import main
from properlm.training import (
    ConfigError,
    TrainConfig,
    average_checkpoints,
    config_fields,
    find_checkpoints,
    make_config,
    run_training,
)

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

WORDS = "zero one two three four five six seven eight nine".split()


def write_parallel(directory, n=48, seed=0):
    import random

    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(n):
        digits = str(rng.randint(0, 999))
        src.append(digits)
        tgt.append(" ".join(WORDS[int(c)] for c in digits))
    (directory / "train.src").write_text("\n".join(src) + "\n", encoding="utf-8")
    (directory / "train.tgt").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return str(directory / "train.src"), str(directory / "train.tgt")


def write_alpaca(directory, n=32):
    path = directory / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(
                json.dumps({"instruction": "Spell the number.", "input": str(i % 10), "output": WORDS[i % 10]}) + "\n"
            )
    return str(path)


def write_summaries(directory, n=32):
    path = directory / "sum.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            doc = " ".join(WORDS[(i + k) % 10] for k in range(12))
            f.write(json.dumps({"document": doc, "summary": " ".join(doc.split()[:3])}) + "\n")
    return str(path)


def tiny(tmp_path, name="run", **overrides) -> TrainConfig:
    src, tgt = write_parallel(tmp_path)
    base = {
        "init": "tiny-seq2seq",
        "source_file": src,
        "target_file": tgt,
        "vocab_size": 270,
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "max_length": 32,
        "per_device_train_batch_size": 8,
        "learning_rate": 3e-3,
        "lr_scheduler": "constant",
        "max_steps": 6,
        "logging_steps": 1,
        "output_dir": str(tmp_path / name),
        "progress_bar": False,
        "tensorboard": False,
        "seed": 0,
    }
    base.update(overrides)
    return make_config(base)


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def assert_same_weights(got: dict, want: dict, lr: float) -> None:
    """Two runs' weights equal up to summation order. Adam moves every element by about ``lr`` a
    step whatever its gradient's size, so an element whose gradient is near zero moves by an amount
    that rounding in the gradient's sum (two all-reduced half batches against one batch) can change
    by far more than float32 precision: allow a few such elements (at most 1 in 500 beyond 1e-5)
    and none beyond 1% of one step."""
    assert got.keys() == want.keys()
    for name, t in want.items():
        diff = (got[name].float() - t.float()).abs()
        assert float(diff.max()) <= lr / 100, (name, float(diff.max()))
        assert int((diff > 1e-5 + 1e-4 * t.abs()).sum()) <= max(1, t.numel() // 500), name


def train_losses(output_dir):
    return [r["loss"] for r in read_metrics(output_dir) if "loss" in r]


def final_weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


# ---------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "init, rule, fused, data",
    [
        ("tiny-seq2seq", "logarithmic", True, "translation"),
        ("tiny-seq2seq", "brier", True, "translation"),
        ("tiny-gpt", "spherical", True, "instruction"),
        ("tiny-gpt", "brier", False, "instruction"),
        ("tiny-gpt", "logarithmic", True, "translation"),
        ("tiny-seq2seq", "power:3", False, "translation"),
        ("tiny-seq2seq", "spherical", True, "summarization"),
    ],
)
def test_training_lowers_the_loss(tmp_path, init, rule, fused, data):
    extra = {"source_lang": "digits", "target_lang": "English"}
    if data != "translation":
        path = write_alpaca(tmp_path) if data == "instruction" else write_summaries(tmp_path)
        extra = {"train_file": path, "source_file": None, "target_file": None}
    cfg = tiny(tmp_path, init=init, rule=rule, fused=fused, max_steps=8, **extra)
    results = run_training(cfg)
    losses = train_losses(cfg.output_dir)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert {r["rule"] for r in read_metrics(cfg.output_dir)} == {results["rule_stages"][0][0]}
    assert os.path.isfile(os.path.join(cfg.output_dir, "final", "model.safetensors"))
    assert os.path.isfile(os.path.join(cfg.output_dir, "final", "tokenizer.json"))
    with open(os.path.join(cfg.output_dir, "results.json"), encoding="utf-8") as f:
        assert json.load(f)["global_step"] == 8


def test_eval_reports_every_rule_and_averaging(tmp_path):
    cfg = tiny(
        tmp_path, validation_fraction=0.25, eval_steps=2, save_steps=2, average_last=2, max_steps=6, rule="spherical"
    )
    results = run_training(cfg)
    evals = [r for r in read_metrics(cfg.output_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]  # the final model's metrics reuse the step-6 evaluation
    assert results["eval"]["eval_loss"] == evals[-1]["eval_loss"]
    for key in ("eval_score_logarithmic", "eval_score_brier", "eval_score_spherical"):
        assert key in evals[0]
    e = results["eval"]
    assert e["eval_score_logarithmic"] < 0 and 0 < e["eval_score_spherical"] < 1 and -1 < e["eval_score_brier"] < 1
    # the spherical loss on the eval set is 1 - mean spherical score (batch-weighted, so nearly equal)
    assert abs(e["eval_loss"] - (1 - e["eval_score_spherical"])) < 0.05
    # averaged = mean of checkpoint-4 and checkpoint-6
    ckpts = find_checkpoints(cfg.output_dir)
    assert [os.path.basename(c) for c in ckpts] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    avg = final_weights(os.path.join(cfg.output_dir, "averaged"))
    a, b = final_weights(ckpts[1]), final_weights(ckpts[2])
    for k in avg:
        torch.testing.assert_close(avg[k], (a[k] + b[k]) / 2)
    assert average_checkpoints(ckpts[1:]).keys() == avg.keys()
    assert "eval_averaged_score_brier" in results["eval_averaged"]


def test_schedule_switches_rule_at_the_right_step(tmp_path):
    cfg = tiny(tmp_path, schedule="logarithmic:3,brier:3", max_steps=None)
    results = run_training(cfg)
    assert results["global_step"] == 6
    records = [r for r in read_metrics(cfg.output_dir) if "loss" in r]
    assert [(r["step"], r["rule"]) for r in records] == [
        (1, "logarithmic"),
        (2, "logarithmic"),
        (3, "logarithmic"),
        (4, "brier"),
        (5, "brier"),
        (6, "brier"),
    ]
    # log loss of a fresh model is about log(V) ~ 5.6; a Brier loss is at most 2
    assert all(r["loss"] > 3 for r in records[:3]) and all(r["loss"] < 2 for r in records[3:])


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine", "inverse_sqrt"])
def test_every_lr_scheduler_warms_up(tmp_path, scheduler):
    """--warmup-steps W: the learning rate rises linearly over the first W steps whatever the schedule (regression:
    ``constant`` went to transformers' ``"constant"``, which ignores the warm-up)."""
    cfg = tiny(tmp_path, lr_scheduler=scheduler, warmup_steps=4, max_steps=8)
    run_training(cfg)
    lrs = [r["learning_rate"] for r in read_metrics(cfg.output_dir) if "loss" in r]
    assert len(lrs) == 8
    peak = cfg.learning_rate
    # the rate step s ran at (transformers' convention: step 1 at 0): (s - 1) / W of the peak up to step W + 1
    assert lrs[:5] == pytest.approx([peak * (s - 1) / 4 for s in range(1, 6)], rel=1e-6, abs=1e-12), lrs
    assert max(lrs) == pytest.approx(peak, rel=1e-6)
    if scheduler == "constant":
        assert lrs[4:] == pytest.approx([peak] * 4, rel=1e-6)


class Kill(Exception):
    pass


class KillAt:
    """A TrainerCallback that raises at the end of a step, as a killed process would stop."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Kill(f"killed at step {self.step}")


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    opts = {"schedule": "logarithmic:4,spherical:4", "max_steps": None, "save_steps": 2, "dropout": 0.1}
    full = tiny(tmp_path, name="full", **opts)
    run_training(full)
    killed = tiny(tmp_path, name="killed", **opts)
    with pytest.raises(Kill):
        run_training(killed, callbacks=[KillAt(5)])  # checkpoint-4 exists, step 5 is lost
    assert os.path.basename(find_checkpoints(killed.output_dir)[-1]) == "checkpoint-4"
    with pytest.raises(ConfigError, match="already holds checkpoints; pass --resume"):
        run_training(killed)
    resumed = dataclasses.replace(killed, resume=True)
    results = run_training(resumed)
    assert results["resumed_from"].endswith("checkpoint-4") and results["global_step"] == 8
    a = final_weights(os.path.join(full.output_dir, "final"))
    b = final_weights(os.path.join(killed.output_dir, "final"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # the resumed run logged steps 5..8 in the spherical stage
    after = [r for r in read_metrics(killed.output_dir) if "loss" in r and r["step"] > 4]
    assert [(r["step"], r["rule"]) for r in after][-4:] == [
        (5, "spherical"),
        (6, "spherical"),
        (7, "spherical"),
        (8, "spherical"),
    ]


class KillAtLog(KillAt):
    """Raises once step ``step`` is logged: a run stopped after its last checkpoint, with later steps in its log."""

    def on_step_end(self, args, state, control, **kwargs):
        pass

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step:
            raise Kill(f"killed at step {self.step}")


def run_cli(*args, cwd=None, timeout=240, **popen):
    """``properlm ARGS`` as a user runs it (``python -m properlm.cli.main``), with this checkout's package.

    With ``popen`` keywords (``stdout=subprocess.PIPE``, ...) the started ``Popen``; else the finished run."""
    import properlm

    src = os.path.dirname(os.path.dirname(properlm.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "properlm.cli.main", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **popen)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def test_resume_says_where_it_resumes_and_takes_the_run_options(tmp_path):
    """`properlm train --resume` used to say nothing of where it resumed; the one line a user saw was transformers'
    "There were missing keys in the checkpoint model loaded: [...embed_tokens.weight ... lm_head.weight]" (weights
    tied to the saved embedding, so nothing is lost). `--resume --output-dir DIR` alone needed every option again,
    and metrics.jsonl logged the steps after the checkpoint twice. Now it says "resuming from checkpoint-4 (step 4
    of 6)", takes the options saved with the checkpoint and logs each step once. (That a resumed run ends with the
    uninterrupted run's weights is test_resume_after_kill_matches_uninterrupted_run.)"""
    opts = {"max_steps": 6, "save_steps": 2, "dropout": 0.1}
    killed = tiny(tmp_path, name="killed", **opts)
    with pytest.raises(Kill):
        run_training(killed, callbacks=[KillAtLog(5)], quiet=True)  # checkpoint-4 saved, step 5 logged
    assert [r["step"] for r in read_metrics(killed.output_dir) if "loss" in r] == [1, 2, 3, 4, 5]
    proc = run_cli("train", "--resume", "--output-dir", "killed", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from checkpoint-4 (step 4 of 6)" in proc.stdout
    assert "the options not given are the run's" in proc.stdout
    assert "missing keys" not in proc.stderr + proc.stdout
    assert [r["step"] for r in read_metrics(killed.output_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    with open(os.path.join(killed.output_dir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert results["global_step"] == 6 and results["resumed_from"].endswith("checkpoint-4")
    ignored = ("resume", "source_file", "target_file", "output_dir")
    assert {k: v for k, v in results["config"].items() if k not in ignored} == {
        k: v for k, v in dataclasses.asdict(killed).items() if k not in ignored
    }
    assert results["config"]["source_file"] == os.path.abspath(killed.source_file)


def test_resume_takes_given_options_over_the_saved_ones(tmp_path):
    """A flag given with --resume (without the data) overrides the saved option and drops the saved ones it is an
    alternative to: --schedule (the paper's switch) replaces the saved --rule and --max-steps. A command that gives
    the data (one that ran before) takes nothing saved."""
    from properlm.training.checkpoints import missing_weights
    from properlm.training.resume import options_to_resume

    cfg = tiny(tmp_path, max_steps=4, save_steps=2)
    run_training(cfg, quiet=True)
    assert options_to_resume({"output_dir": cfg.output_dir}) == (None, {"output_dir": cfg.output_dir})
    with_data = {"output_dir": cfg.output_dir, "resume": True, "source_file": "a", "target_file": "b"}
    assert options_to_resume(with_data) == (None, with_data)  # a command that ran before is taken as it is
    given = {"output_dir": cfg.output_dir, "resume": True, "schedule": "logarithmic:4,brier:2"}
    path, merged = options_to_resume(given)
    assert path.endswith(os.path.join("checkpoint-4", "properlm_config.json"))
    assert "max_steps" not in merged and "rule" not in merged and merged["learning_rate"] == cfg.learning_rate
    resumed = make_config(merged)
    assert resumed.source_file == os.path.abspath(cfg.source_file) and resumed.output_dir == cfg.output_dir
    from properlm.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(os.path.join(cfg.output_dir, "final"))
    tied = ["model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"]
    assert missing_weights(model, [*tied, "model.encoder.embed_positions.weight"]) == []  # sinusoidal: not saved
    assert missing_weights(model, ["model.shared.weight", *tied]) == ["model.shared.weight", *tied]  # all lost


def test_ctrl_c_says_what_was_saved_and_how_to_continue(tmp_path):
    """Ctrl-C used to print a KeyboardInterrupt traceback of 10-19 frames. Now one line says which checkpoint
    was saved and the command that continues the run, with exit status 130."""
    import signal

    src, tgt = write_parallel(tmp_path)
    args = [
        "train",
        "--init",
        "tiny-seq2seq",
        "--source-file",
        src,
        "--target-file",
        tgt,
        "--vocab-size",
        "270",
        "--hidden-size",
        "16",
        "--num-layers",
        "1",
        "--num-heads",
        "2",
        "--max-length",
        "32",
        "--max-steps",
        "100000",
        "--save-steps",
        "2",
        "--save-total-limit",
        "2",
        "--no-progress-bar",
        "--no-tensorboard",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    # stderr to a file (a pipe nobody reads while the run logs could fill and block it); SIGINT at its default in
    # the child whatever this process inherited (Python installs its KeyboardInterrupt handler only then)
    log = tmp_path / "stderr.txt"
    with open(log, "w", encoding="utf-8") as stderr:
        proc = run_cli(
            *args,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.time() + 180
            while not find_checkpoints(tmp_path / "run") and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert find_checkpoints(tmp_path / "run"), proc.poll()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = log.read_text(encoding="utf-8")
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("properlm train: interrupted")]
    assert len(lines) == 1, err[-3000:]
    assert "; saved: " in lines[0] and "checkpoint-" in lines[0]
    assert lines[0].endswith(f"continue with: properlm train --resume --output-dir {tmp_path / 'run'}")


def test_resume_names_the_options_that_changed(tmp_path, monkeypatch):
    """--resume with other options than the checkpoint's run (a new learning rate, more steps) used to continue
    silently; it now warns before training, naming each changed option with its old value. Logging and saving
    options, and running from another working directory, are not changes of the run."""
    from properlm.training.resume import RUN_CONFIG, read_run_config, resume_differences
    from properlm.training.validation import validate_config

    cfg = tiny(tmp_path, max_steps=4, save_steps=2)
    run_training(cfg)
    checkpoint = find_checkpoints(cfg.output_dir)[-1]
    assert os.path.isfile(os.path.join(checkpoint, RUN_CONFIG))
    assert read_run_config(checkpoint)["learning_rate"] == cfg.learning_rate
    same = dataclasses.replace(cfg, resume=True, logging_steps=5, save_steps=3, save_total_limit=2)
    assert resume_differences(same, checkpoint) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_config(same)
    monkeypatch.chdir(tmp_path)  # relative paths to the same files: the same run
    rel = dataclasses.replace(same, source_file=os.path.relpath(cfg.source_file, tmp_path))
    assert resume_differences(rel, checkpoint) == []
    changed = dataclasses.replace(same, learning_rate=1e-3, max_steps=8, rule="brier")
    assert resume_differences(changed, checkpoint) == [  # a constant rate: the longer run is not a change
        f"--rule brier (the run had {cfg.rule})",
        f"--learning-rate 0.001 (the run had {cfg.learning_rate})",
    ]
    with pytest.warns(
        UserWarning,
        match=r"--resume: 2 option\(s\) differ from the run saved in .*checkpoint-4.*"
        r"--rule brier.*not the run that the original command would have produced",
    ):
        validate_config(changed)
    # what only shapes the steps still to come is a continuation: the paper's switch (the checkpoint's rule for its
    # steps, then another) and a longer constant-rate run; a longer run does move a linear decay's past rates
    switch = dataclasses.replace(same, max_steps=None, schedule=f"{cfg.rule}:4,brier:4")
    assert resume_differences(switch, checkpoint) == []
    assert resume_differences(dataclasses.replace(same, max_steps=8), checkpoint) == []
    assert resume_differences(
        dataclasses.replace(same, schedule="brier:2,logarithmic:6", max_steps=None), checkpoint
    ) == ["--schedule brier:2,logarithmic:6 (the run had unset)"]
    linear = tiny(tmp_path, name="linear", max_steps=4, save_steps=2, lr_scheduler="linear")
    run_training(linear)
    assert resume_differences(
        dataclasses.replace(linear, resume=True, max_steps=8), find_checkpoints(linear.output_dir)[-1]
    ) == ["--max-steps 8 (the run had 4)"]
    # a checkpoint saved before the options were recorded: nothing to compare, no warning
    os.remove(os.path.join(checkpoint, RUN_CONFIG))
    assert read_run_config(checkpoint) is None and resume_differences(changed, checkpoint) == []


@pytest.mark.parametrize(
    "sampling, kill_at",
    [
        ({"group_by_length": False}, 9),
        ({"group_by_length": True}, 9),
        ({"group_by_length": True}, 13),  # checkpoint-12 ends epoch 2: resume starts a fresh epoch
        ({"group_by_length": True, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 4}, 9),
        ({"group_by_length": False, "dataloader_num_workers": 1}, 9),
        ({"group_by_length": True, "validation_fraction": 0.25, "eval_steps": 3}, 10),  # evaluations in between
    ],
)
def test_resume_past_the_first_epoch_is_exact(tmp_path, sampling, kill_at):
    """48 examples, 8 per step: 6 steps an epoch. Killed in epoch 2 or 3, the resumed run ends with
    the uninterrupted run's weights bit for bit, with every sampler option."""
    opts = {"max_steps": 16, "save_steps": 4, "dropout": 0.1, **sampling}
    full = tiny(tmp_path, name="full", **opts)
    run_training(full)
    killed = tiny(tmp_path, name="killed", **opts)
    with pytest.raises(Kill):
        run_training(killed, callbacks=[KillAt(kill_at)])
    resumed = dataclasses.replace(killed, resume=True)
    results = run_training(resumed)
    assert results["global_step"] == 16
    a = final_weights(os.path.join(full.output_dir, "final"))
    b = final_weights(os.path.join(killed.output_dir, "final"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    full_losses = {r["step"]: r["loss"] for r in read_metrics(full.output_dir) if "loss" in r}
    resumed_losses = {r["step"]: r["loss"] for r in read_metrics(killed.output_dir) if "loss" in r}
    assert resumed_losses == full_losses


def test_length_grouped_sampler_is_a_function_of_seed_and_epoch(tmp_path, monkeypatch):
    from properlm.training import EpochSeededLengthGroupedSampler

    lengths = [(7 * i) % 23 + 1 for i in range(400)]
    s = EpochSeededLengthGroupedSampler(8, lengths, seed=3)
    first = list(s)
    assert sorted(first) == list(range(400)) and list(s) == first
    batches = [first[i : i + 8] for i in range(0, 400, 8)]
    spread = sum(max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches) / len(batches)
    assert spread < 3  # grouped by length (random batches of 8 would span about 17)
    s.set_epoch(1)
    assert list(s) != first
    assert list(EpochSeededLengthGroupedSampler(8, lengths, seed=3)) == first
    # the Trainer sets the epoch before every epoch (a fixed order every epoch would be a regression)
    epochs = []
    real = EpochSeededLengthGroupedSampler.set_epoch
    monkeypatch.setattr(EpochSeededLengthGroupedSampler, "set_epoch", lambda self, e: (epochs.append(e), real(self, e)))
    run_training(tiny(tmp_path, max_steps=14, group_by_length=True))
    assert sorted(set(epochs)) == [0, 1, 2]


def test_lora(tmp_path):
    from properlm.models import load_model_and_tokenizer

    cfg = tiny(
        tmp_path,
        init="tiny-gpt",
        train_file=write_alpaca(tmp_path),
        source_file=None,
        target_file=None,
        lora=True,
        lora_r=4,
        learning_rate=1e-2,
        max_steps=8,
        save_steps=4,
        average_last=2,
    )
    run_training(cfg)
    losses = train_losses(cfg.output_dir)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    final = os.path.join(cfg.output_dir, "final")
    assert os.path.isfile(os.path.join(final, "adapter_config.json"))
    assert not os.path.isfile(os.path.join(final, "model.safetensors"))
    merged, _tok = load_model_and_tokenizer(final)  # base from output_dir/base + adapter, merged
    base, _ = load_model_and_tokenizer(os.path.join(cfg.output_dir, "base"))
    changed = [n for (n, p), (_, q) in zip(merged.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert changed and all("proj" in n for n in changed)
    assert os.path.isfile(os.path.join(cfg.output_dir, "averaged", "adapter_config.json"))


# ---------------------------------------------------------------------------- the command line


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for f in config_fields():
        assert "--" + f.name.replace("_", "-") in out, f.name
    for flag in ("--config", "--no-fused", "--resume", "--schedule", "--lr-scheduler", "inverse_sqrt"):
        assert flag in out


def test_yaml_config_and_override(tmp_path, capsys):
    src, tgt = write_parallel(tmp_path)
    out = tmp_path / "yaml_run"
    (tmp_path / "run.yaml").write_text(
        f"init: tiny-seq2seq\nsource-file: {src}\ntarget_file: {tgt}\nvocab_size: 270\nhidden_size: 16\n"
        f"num_layers: 1\nnum_heads: 2\nmax_steps: 50\nrule: brier\nlogging_steps: 1\noutput_dir: {out}\n"
        "tensorboard: false\nprogress_bar: false\n",
        encoding="utf-8",
    )
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--max-steps", "2", "--rule", "spherical"]) == 0
    with open(out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    assert results["global_step"] == 2 and results["config"]["rule"] == "spherical"
    assert results["config"]["hidden_size"] == 16
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.1\n", encoding="utf-8")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'learning_rat' (did you mean 'learning_rate'?)" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rule", "cubic"], "unknown scoring rule 'cubic'"),
        (["--smoothing", "1.5"], "--smoothing must be in [0, 1)"),
        (["--schedule", "logarithmic:10,brier"], "--schedule"),
        (["--schedule", "logarithmic:10,brier:5", "--max-steps", "7"], "differs from the schedule's total"),
        (["--fp16"], "--fp16 needs a CUDA GPU"),
        (["--average-last", "3"], "--average-last needs checkpoints"),
        (["--eval-steps", "5"], "--eval-steps needs a validation set"),
        (["--per-device-train-batch-size", "0"], "must be positive"),
        (["--resume"], "no checkpoint-N directory"),
        (["--init", "tiny-gpt", "--model", "x"], "do not combine"),
        (["--vocab-size", "120"], "--vocab-size must be at least 260"),
    ],
)
def test_bad_arguments_fail_fast(tmp_path, capsys, extra, message):
    src, tgt = write_parallel(tmp_path)
    argv = ["train", "--source-file", src, "--target-file", tgt, "--output-dir", str(tmp_path / "o")]
    if "--model" not in extra:
        argv += ["--init", "tiny-seq2seq"]
    argv += extra
    if "--fp16" in extra and torch.cuda.is_available():
        pytest.skip("fp16 is available on this machine")
    started = time.time()
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert time.time() - started < 5
    assert not os.path.exists(tmp_path / "o")


def test_malformed_data_fails_before_training(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "outptu": "d"}\n', encoding="utf-8")
    assert main(["train", "--init", "tiny-gpt", "--train-file", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "train.jsonl line 2: field 'output' is missing" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "tokenizer")
    assert main(["train", "--init", "tiny-gpt", "--train-file", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_torchrun_two_processes_match_one_process(tmp_path):
    """2-process data parallel (gloo) equals one process with the same global batch (issue 8)."""
    src, tgt = write_parallel(tmp_path)
    common = [
        "--init",
        "tiny-seq2seq",
        "--source-file",
        src,
        "--target-file",
        tgt,
        "--vocab-size",
        "270",
        "--hidden-size",
        "16",
        "--num-layers",
        "1",
        "--num-heads",
        "2",
        "--dropout",
        "0",
        "--max-steps",
        "3",
        "--rule",
        "spherical",
        "--smoothing",
        "0.1",
        "--logging-steps",
        "1",
        "--learning-rate",
        "1e-2",
        "--lr-scheduler",
        "constant",
        "--seed",
        "0",
        "--validation-fraction",
        "0.2",
        "--eval-steps",
        "3",
        "--save-steps",
        "3",
        "--no-progress-bar",
        "--no-tensorboard",
    ]
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "properlm.cli.main",
        "train",
        *common,
        "--per-device-train-batch-size",
        "4",
        "--output-dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    assert results["global_step"] == 3
    assert "eval_score_spherical" in results["eval"]
    assert os.path.isfile(out / "final" / "model.safetensors")
    assert os.path.isdir(out / "checkpoint-3")

    single = tmp_path / "single"
    assert main(["train", *common, "--per-device-train-batch-size", "8", "--output-dir", str(single)]) == 0
    ddp_losses, one_losses = train_losses(out), train_losses(single)
    assert len(ddp_losses) == len(one_losses) == 3
    assert ddp_losses == pytest.approx(one_losses, rel=1e-4)
    assert ddp_losses[-1] < ddp_losses[0]
    w_ddp = load_file(str(out / "final" / "model.safetensors"))
    w_one = load_file(str(single / "final" / "model.safetensors"))
    assert_same_weights(w_ddp, w_one, lr=1e-2)


#: the FSDP2 options of ``accelerate launch`` that README "Scaling out" shows
FSDP2_LAUNCH = [
    "--num_processes",
    "2",
    "--use_fsdp",
    "--fsdp_version",
    "2",
    "--fsdp_auto_wrap_policy",
    "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap",
    "LlamaDecoderLayer",
    "--fsdp_state_dict_type",
    "FULL_STATE_DICT",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def test_accelerate_fsdp2_on_cpu_matches_one_process(tmp_path):
    """``accelerate launch --use_fsdp --fsdp_version 2`` with 2 CPU processes equals one process
    with the same global batch. accelerate enables FSDP only on accelerators, so on CPUs it runs
    DDP over gloo: ``properlm train`` says so (a warning) instead of pretending to shard."""
    import socket

    data = write_alpaca(tmp_path)
    common = [
        "--init",
        "tiny-gpt",
        "--train-file",
        data,
        "--vocab-size",
        "300",
        "--hidden-size",
        "32",
        "--dropout",
        "0",
        "--num-layers",
        "2",
        "--num-heads",
        "2",
        "--max-steps",
        "3",
        "--rule",
        "spherical",
        "--smoothing",
        "0.1",
        "--logging-steps",
        "1",
        "--learning-rate",
        "1e-2",
        "--lr-scheduler",
        "constant",
        "--seed",
        "0",
        "--no-progress-bar",
        "--no-tensorboard",
    ]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    out = tmp_path / "fsdp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *FSDP2_LAUNCH,
        "--main_process_port",
        port,
        "-m",
        "properlm.cli.main",
        "train",
        *common,
        "--per-device-train-batch-size",
        "4",
        "--output-dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "accelerate shards with FSDP only on accelerators" in proc.stderr
    assert "DistributedType.MULTI_CPU" in proc.stderr

    single = tmp_path / "single"
    assert main(["train", *common, "--per-device-train-batch-size", "8", "--output-dir", str(single)]) == 0
    two, one = train_losses(out), train_losses(single)
    assert len(two) == len(one) == 3
    assert two == pytest.approx(one, rel=1e-4)
    assert_same_weights(
        load_file(str(out / "final" / "model.safetensors")),
        load_file(str(single / "final" / "model.safetensors")),
        lr=1e-2,
    )


def test_train_from_gguf_file(tmp_path):
    from properlm.models import load_model_and_tokenizer
    from test_models import write_llama_gguf

    model, tok = load_model_and_tokenizer(
        init="tiny-gpt",
        train_texts=WORDS * 5,
        vocab_size=270,
        init_options={"hidden_size": 16, "num_layers": 1, "num_heads": 2},
    )
    write_llama_gguf(model, tok, tmp_path / "tiny.gguf")
    cfg = tiny(
        tmp_path,
        init=None,
        gguf_file=str(tmp_path / "tiny.gguf"),
        train_file=write_alpaca(tmp_path),
        source_file=None,
        target_file=None,
        rule="brier",
        max_steps=4,
    )
    results = run_training(cfg)
    assert results["global_step"] == 4 and not results["seq2seq"]
    losses = train_losses(cfg.output_dir)
    assert len(losses) == 4 and all(0 <= v <= 2 for v in losses)
    loaded, _ = load_model_and_tokenizer(os.path.join(cfg.output_dir, "final"))
    assert type(loaded).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("as_path", [False, True])
def test_lora_adapter_on_a_gguf_model_reloads(tmp_path, as_path):
    from properlm.models import BASE_RECORD, load_model_and_tokenizer
    from test_models import write_llama_gguf

    model, tok = load_model_and_tokenizer(
        init="tiny-gpt",
        train_texts=WORDS * 5,
        vocab_size=270,
        init_options={"hidden_size": 16, "num_layers": 1, "num_heads": 2},
    )
    os.makedirs(tmp_path / "m")
    write_llama_gguf(model, tok, tmp_path / "m" / "tiny.gguf")
    where = (
        {"gguf_file": str(tmp_path / "m" / "tiny.gguf")}
        if as_path
        else {"model": str(tmp_path / "m"), "gguf_file": "tiny.gguf"}
    )
    cfg = tiny(
        tmp_path,
        init=None,
        train_file=write_alpaca(tmp_path),
        source_file=None,
        target_file=None,
        rule="spherical",
        max_steps=2,
        lora=True,
        lora_r=2,
        learning_rate=1e-2,
        save_steps=1,
        **where,
    )
    run_training(cfg)
    final = os.path.join(cfg.output_dir, "final")
    assert json.load(open(os.path.join(final, BASE_RECORD))) == {"gguf_file": "tiny.gguf"}
    # intermediate checkpoints carry the record too, and reload
    for step in (1, 2):
        ckpt = os.path.join(cfg.output_dir, f"checkpoint-{step}")
        assert json.load(open(os.path.join(ckpt, BASE_RECORD))) == {"gguf_file": "tiny.gguf"}
    assert (
        type(load_model_and_tokenizer(os.path.join(cfg.output_dir, "checkpoint-1"))[0]).__name__ == "LlamaForCausalLM"
    )
    merged, _ = load_model_and_tokenizer(final)
    base, _ = load_model_and_tokenizer(str(tmp_path / "m"), gguf_file="tiny.gguf")
    assert type(merged).__name__ == "LlamaForCausalLM"
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, merged.state_dict()[k])]
    assert changed and all("proj" in k for k in changed)  # the LoRA deltas, merged into the base weights


def test_tensorboard_logs_in_output_dir(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny(tmp_path, tensorboard=True, max_steps=2)
    run_training(cfg)
    events = [
        f
        for _, _, files in os.walk(os.path.join(cfg.output_dir, "runs"))
        for f in files
        if f.startswith("events.out.tfevents")
    ]
    assert events


def test_eval_score_sums_match_token_scores(monkeypatch):
    from properlm import token_scores
    from properlm.training import scores

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    labels = torch.randint(11, (3, 5))
    labels[0, :2] = -100
    labels[2] = -100
    monkeypatch.setattr(scores, "_EVAL_CHUNK_ELEMENTS", 30)  # 2 rows per chunk (the module score_sums reads)
    rules = ["logarithmic", "brier", "spherical", "power:3"]
    sums = scores.score_sums(logits, labels, rules)
    assert sums.shape == (3, 4)
    for j, rule in enumerate(rules):
        torch.testing.assert_close(sums[:, j].float(), token_scores(logits, labels, rule).sum(-1))
    assert torch.all(sums[2] == 0)


def test_group_by_length_selects_the_length_grouped_sampler(tmp_path):
    import datasets
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from properlm.training.arguments import training_arguments

    lengths = [3, 40, 5, 38, 4, 41, 6, 39] * 100
    ds = datasets.Dataset.from_list([{"input_ids": [1] * n} for n in lengths])
    samplers = {}
    for flag in (True, False):
        cfg = make_config(
            {
                "init": "tiny-gpt",
                "source_file": "s",
                "target_file": "t",
                "group_by_length": flag,
                "output_dir": str(tmp_path),
                "per_device_train_batch_size": 4,
            }
        )
        trainer = Trainer(model=torch.nn.Linear(1, 1), args=training_arguments(cfg, 10, False), train_dataset=ds)
        samplers[flag] = trainer._get_train_sampler(ds)
    assert isinstance(samplers[True], LengthGroupedSampler) and not isinstance(samplers[False], LengthGroupedSampler)

    def padded(order):
        return sum(4 * max(lengths[i] for i in order[k : k + 4]) for k in range(0, len(order), 4))

    grouped, shuffled = list(samplers[True]), list(samplers[False])
    assert sorted(grouped) == list(range(len(lengths)))
    assert padded(grouped) < 0.7 * padded(shuffled)  # about half the padded tokens


def test_bad_optimiser_values_fail_fast(tmp_path):
    """Out-of-range AdamW betas and non-finite values are refused by validate_config, before any model is built
    (a beta of 1.5 used to pass and fail in torch's Adam constructor, a NaN weight decay to train to NaN)."""
    from properlm.training import validate_config

    for options, message in [
        ({"adam_beta2": 1.5}, "--adam-beta2 must be in [0, 1), got 1.5"),
        ({"adam_beta1": -0.1}, "--adam-beta1 must be in [0, 1)"),
        ({"adam_beta2": float("nan")}, "--adam-beta2 must be in [0, 1)"),
        ({"weight_decay": float("nan")}, "--weight-decay must be a finite number"),
        ({"max_grad_norm": float("nan")}, "--max-grad-norm must be a number >= 0"),
        ({"num_train_epochs": float("nan")}, "--num-train-epochs must be positive"),
        ({"lora_alpha": float("nan")}, "--lora-alpha must be a finite number"),
    ]:
        with pytest.raises(ConfigError) as exc:
            validate_config(tiny(tmp_path, **options))
        assert message in str(exc.value), options
    validate_config(tiny(tmp_path, adam_beta1=0.0, adam_beta2=0.98, weight_decay=0.01, max_grad_norm=0.0))


def test_ignored_options_warn(tmp_path):
    """Valid options that the configuration ignores warn (named, with the reason); the configurations of the
    benchmark studies and the tests' tiny run warn nothing."""
    import warnings

    from properlm.training import validate_config
    from properlm.training.validation import ignored_option_warnings

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}", encoding="utf-8")
    pretrained = {
        "init": None,
        "model": str(model_dir),
        "vocab_size": 1000,
        "hidden_size": 128,
        "num_layers": 2,
        "num_heads": 4,
    }
    cases = [
        (
            {**pretrained, "hidden_size": 64, "dropout": 0.3},
            "--hidden-size, --dropout only configure a fresh --init model and have no effect on --model",
        ),
        ({**pretrained, "num_layers": 6}, "--num-layers only configures a fresh --init model and has no effect"),
        ({"lora_r": 4}, "--lora-r has no effect without --lora"),
        ({"torch_compile_backend": "aot_eager"}, "--torch-compile-backend aot_eager has no effect without"),
        ({"validation_seed": 3}, "--validation-seed 3 has no effect without --validation-fraction"),
        ({"smoothing_variant": "gated"}, "--smoothing-variant gated has no effect without --smoothing"),
        ({"save_total_limit": 1}, "--save-total-limit 1 has no effect without --save-steps"),
        ({"num_train_epochs": 3.0}, "--num-train-epochs 3 has no effect: the run takes 6 steps (--max-steps)"),
        ({"warmup_steps": 6}, "--warmup-steps 6 is not below the run's 6 steps"),
        (
            {"max_steps": None, "schedule": "logarithmic:3,brier:3", "warmup_steps": 10},
            "--warmup-steps 10 is not below the run's 6 steps",
        ),
        ({"average_last": 3, "save_steps": 4}, "--average-last 3: the run saves only 2 checkpoint(s)"),
        (
            {"source_file": None, "target_file": None, "train_file": write_alpaca(tmp_path), "source_lang": "German"},
            "--source-lang only names a language of --source-file/--target-file translation prompts",
        ),
    ]
    for options, message in cases:
        cfg = tiny(tmp_path, **options)
        with pytest.warns(UserWarning, match=r".*") as caught:
            validate_config(cfg)
        assert any(message in str(w.message) for w in caught), (message, [str(w.message) for w in caught])
        assert ignored_option_warnings(cfg)
    src, tgt = write_parallel(tmp_path)
    quiet = [
        tiny(tmp_path),
        tiny(
            tmp_path,
            warmup_steps=5,
            save_steps=2,
            average_last=3,
            save_total_limit=3,
            smoothing=0.1,
            smoothing_variant="gated",
            validation_fraction=0.2,
            validation_seed=1,
        ),
        # the options of the benchmark studies' runs (reproduce_mt: --init; reproduce_llm: --model)
        tiny(
            tmp_path,
            lr_scheduler="inverse_sqrt",
            warmup_steps=4,
            adam_beta2=0.98,
            dropout=0.3,
            ffn_size=64,
            validation_source_file=src,
            validation_target_file=tgt,
            eval_steps=2,
            save_steps=2,
        ),
        tiny(
            tmp_path,
            **pretrained,
            source_lang="German",
            target_lang="English",
            rule="brier",
            smoothing=0.1,
            smoothing_variant="gated",
            warmup_steps=2,
            save_steps=2,
            save_total_limit=1,
        ),
    ]
    for cfg in quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            validate_config(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_config(tiny(tmp_path, lora_r=4), warn=False)


def test_help_names_the_model_sources(capsys):
    """--gguf-file goes with --model (its directory), so the model group does not say 'exactly one of'."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "exactly one of" not in out and "--model and/or --gguf-file, or --init" in out


def test_what_an_earlier_run_left_in_the_output_dir_warns(tmp_path):
    """A new run (not --resume) in a used --output-dir warns: an --init run takes up the old tokenizer (so
    --vocab-size does not change it) and metrics.jsonl is appended to. With --overwrite-output-dir the earlier
    run is removed first, so there is nothing to warn about."""
    from properlm.training import validate_config

    out = tmp_path / "run"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("{}", encoding="utf-8")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n', encoding="utf-8")
    with pytest.warns(UserWarning) as caught:
        validate_config(tiny(tmp_path, vocab_size=300))
    messages = " | ".join(str(w.message) for w in caught)
    assert "holds the tokenizer of an earlier run (tokenizer/): this --init run uses it as it is" in messages
    assert "holds the metrics.jsonl of an earlier run: this run appends" in messages
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_config(tiny(tmp_path, vocab_size=300, overwrite_output_dir=True))
        validate_config(tiny(tmp_path, resume=True))  # continuing the run takes all of it up, as it should


def test_overwrite_output_dir_starts_afresh_and_keeps_other_files(tmp_path, capsys):
    """--overwrite-output-dir used to leave the earlier run's checkpoints, logs and tokenizer in place, so
    --average-last could average an old run's checkpoints into the new model. Now they are removed before
    training; what properlm train did not write stays."""
    from properlm.training.checkpoints import remove_earlier_run

    old = tiny(tmp_path, max_steps=8, save_steps=2, vocab_size=300)
    run_training(old)
    out = tmp_path / "run"
    vocab = len(json.loads((out / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    assert vocab > 280
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    (out / "runs").mkdir()
    (out / "runs" / "plan.md").write_text("not TensorBoard", encoding="utf-8")
    (out / "final_thoughts").mkdir()
    new = dataclasses.replace(old, max_steps=4, vocab_size=280, overwrite_output_dir=True, average_last=2)
    results = run_training(new)
    printed = capsys.readouterr().out
    assert (
        "--overwrite-output-dir removed the earlier run's checkpoint-2, checkpoint-4, checkpoint-6, checkpoint-8"
        in printed
        and "metrics.jsonl" in printed
        and "tokenizer" in printed
    )
    assert [os.path.basename(c) for c in find_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert [os.path.basename(c) for c in results["averaged_checkpoints"]] == ["checkpoint-2", "checkpoint-4"]
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]  # not appended to the old ones
    tok = json.loads((out / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(tok["model"]["vocab"]) <= 280  # trained anew with the new --vocab-size
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (out / "runs" / "plan.md").is_file() and (out / "final_thoughts").is_dir()
    assert remove_earlier_run(tmp_path / "missing") == []


@pytest.mark.parametrize("improper", [None, "dft"])
def test_eval_forms_logits_at_scored_positions_only_with_the_same_metrics(tmp_path, monkeypatch, improper):
    """Decoder-only validation: the output head sees only the scored positions' hidden states
    (``(1, N, H)``), and every eval metric equals the full-logits path's (forced here by hiding the head)."""
    from properlm.evaluation import teacher_forced as tf_module

    seen = []
    real = tf_module.ScoredRowsHook.__call__

    def spy(self, module, args):
        out = real(self, module, args)
        if out is not None:
            seen.append(tuple(out[0].shape))
        return out

    monkeypatch.setattr(tf_module.ScoredRowsHook, "__call__", spy)
    kw = dict(init="tiny-gpt", validation_fraction=0.25, eval_steps=2, save_steps=100, max_steps=2, rule="brier")
    if improper:
        kw.update(rule="logarithmic", improper_loss=improper)
    fast = run_training(tiny(tmp_path, "fast", **kw))["eval"]
    assert seen and all(s[0] == 1 for s in seen)  # (1, N, H) reached the head
    monkeypatch.setattr(tf_module, "find_output_head", lambda model: None)
    full = run_training(tiny(tmp_path, "full", **kw))["eval"]
    keys = [k for k in full if k.startswith("eval_score_") or k in ("eval_loss", "eval_tokens")]
    assert "eval_score_brier" in keys and "eval_loss" in keys
    for k in keys:
        assert fast[k] == pytest.approx(full[k], abs=1e-5), k


def test_a_finished_run_is_not_trained_over(tmp_path, capsys):
    """A new run into a finished run's --output-dir (no checkpoints left, but final/ and results.json) used to
    append to its metrics.jsonl, take up its tokenizer and overwrite final/. It is now refused, as a directory
    with checkpoints is, unless --overwrite-output-dir is given."""
    src, tgt = write_parallel(tmp_path)
    argv = [
        "train",
        "--init",
        "tiny-seq2seq",
        "--source-file",
        src,
        "--target-file",
        tgt,
        "--vocab-size",
        "270",
        "--hidden-size",
        "16",
        "--num-layers",
        "1",
        "--num-heads",
        "2",
        "--max-length",
        "32",
        "--max-steps",
        "2",
        "--logging-steps",
        "1",
        "--no-progress-bar",
        "--no-tensorboard",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 0
    out = tmp_path / "run"
    assert not find_checkpoints(out) and (out / "final").is_dir() and (out / "results.json").is_file()
    before = {p: p.stat().st_mtime_ns for p in [out / "metrics.jsonl", *(out / "final").iterdir()]}
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"properlm train: error: --output-dir {str(out)!r} holds a finished run (final, "
        "results.json); pass --overwrite-output-dir to replace it, or choose another "
        "--output-dir"
    ]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert main([*argv, "--resume"]) == 2
    assert "no checkpoint-N directory in" in capsys.readouterr().err
    assert main([*argv, "--overwrite-output-dir"]) == 0
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]


def test_rule_errors_and_warnings_read_as_the_command_s_own(tmp_path, capsys):
    """`--rule spherical:2` used to end in "Spherical.__init__() takes 1 positional argument but 2 were given",
    `--rule brie` got no suggestion, and warnings printed with a source path and line (".../training/run.py:54:
    UserWarning"). Now the rule errors say what is wrong, and a warning prints as `properlm: warning: MESSAGE`."""
    src, tgt = write_parallel(tmp_path)
    data = ["--init", "tiny-seq2seq", "--source-file", src, "--target-file", tgt]
    assert main(["train", *data, "--rule", "spherical:2"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(
            "properlm train: error: --rule: rule 'spherical:2': wrong number of parameters: spherical "
            "takes no parameter"
        )
        and "power:ALPHA, pseudo-spherical:ALPHA" in err
    )
    assert main(["train", *data, "--rule", "brie"]) == 2
    assert "unknown scoring rule 'brie' (did you mean 'brier'?)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\nnot json\n', encoding="utf-8")
    proc = run_cli(
        "train",
        "--init",
        "tiny-gpt",
        "--train-file",
        str(bad),
        "--lora-r",
        "4",
        "--output-dir",
        str(tmp_path / "w"),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "properlm: warning: --lora-r has no effect without --lora",
        f"properlm train: error: {bad} line 2: not valid JSON (Expecting value at column 1)",
    ], proc.stderr


def test_what_training_cut_and_its_bars_are_said_where_a_user_reads(tmp_path):
    """As a user runs it with its output going to a log: the examples cut at --max-length are counted in one
    line (and in results.json); no progress bar, not even transformers' loading or saving bars, floods the
    log with carriage returns; a run that cuts nothing says nothing about it."""
    src, tgt = write_parallel(tmp_path, n=24)
    long_src = tmp_path / "long.src"
    lines = (tmp_path / "train.src").read_text(encoding="utf-8").splitlines()
    lines[0] = " ".join(["123"] * 30)
    long_src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = [
        "train",
        "--init",
        "tiny-seq2seq",
        "--target-file",
        tgt,
        "--vocab-size",
        "270",
        "--hidden-size",
        "16",
        "--num-layers",
        "1",
        "--num-heads",
        "2",
        "--max-steps",
        "1",
        "--no-tensorboard",
    ]
    proc = run_cli(
        *common,
        "--source-file",
        str(long_src),
        "--max-length",
        "16",
        "--output-dir",
        str(tmp_path / "cut"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "properlm train: 1 of 24 training examples cut at --max-length 16" in proc.stdout
    assert "\r" not in proc.stdout + proc.stderr  # no bar in a log
    results = json.loads((tmp_path / "cut" / "results.json").read_text(encoding="utf-8"))
    assert results["truncation"]["num_cut_at_max_length"] == 1 and results["truncation"]["max_length"] == 16
    proc = run_cli(*common, "--source-file", src, "--output-dir", str(tmp_path / "whole"), cwd=tmp_path)
    assert proc.returncode == 0 and "cut at" not in proc.stdout


def test_paper_smoothing_is_warned_before_the_model_loads(tmp_path, monkeypatch):
    """The collapsing combination (a bounded rule, the paper's smoothing, a large vocabulary) is said by the
    checks, from the model directory's config.json, before anything is loaded; once."""
    import warnings

    from properlm import stats
    from properlm.training import TrainConfig, validate_config
    from properlm.training.validation import expected_vocab_size

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 49152}), encoding="utf-8")
    src, tgt = write_parallel(tmp_path, n=4)
    monkeypatch.setattr(stats, "_WARNED_PAPER_SMOOTHING", set())
    cfg = TrainConfig(
        model=str(model),
        source_file=src,
        target_file=tgt,
        rule="spherical",
        smoothing=0.1,
        output_dir=str(tmp_path / "run"),
    )
    assert expected_vocab_size(cfg) == 49152
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate_config(cfg)
    texts = [str(w.message) for w in caught if "--smoothing-variant gated" in str(w.message)]
    assert len(texts) == 1 and "49152 tokens" in texts[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate_config(
            TrainConfig(
                model=str(model),
                source_file=src,
                target_file=tgt,
                rule="spherical",
                smoothing=0.1,
                smoothing_variant="gated",
                output_dir=str(tmp_path / "run"),
            )
        )
    assert not [w for w in caught if "--smoothing-variant" in str(w.message)]
