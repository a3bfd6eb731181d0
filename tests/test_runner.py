"""The benchmarks' runner (``benchmarks/_runner.py``): a step as data (placeholders, ``--resume``, branches,
late-bound output directories, in-process actions) and the main flow every study runs on."""

from __future__ import annotations

import argparse
import json
import os

import pytest

import _runner
from _runner import (
    ACTION,
    RESUME_ALWAYS,
    RESUME_IF_CHECKPOINT,
    Branch,
    DryRunAs,
    FromJson,
    Step,
    Text,
)


def _write_json(path, obj) -> None:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _checkpoint(run, step: int, weights: str = "w") -> None:
    d = os.path.join(str(run), f"checkpoint-{step}")
    os.makedirs(d)
    _write_json(os.path.join(d, "trainer_state.json"), {"global_step": step})
    with open(os.path.join(d, "model.safetensors"), "w") as f:
        f.write(weights)


def test_from_json_placeholder_reads_the_value_when_the_step_starts(tmp_path):
    fit = tmp_path / "fit" / "results.json"
    t = FromJson(str(fit), ("temperature_fit", "temperature"), "T_FITTED")
    assert t.known() is None and t.resolve(dry_run=True) == "T_FITTED"
    with pytest.raises(RuntimeError, match="results.json does not exist"):
        t.resolve(dry_run=False)
    _write_json(fit, {"temperature_fit": {"temperature": 1.25}})
    assert t.known() == "1.25" and t.resolve(dry_run=False) == "1.25"
    assert t.resolve(dry_run=True) == "T_FITTED"  # a dry run always shows the stand-in
    chosen = FromJson(str(tmp_path / "sel.json"), ("chosen",), "CHOSEN", "{:g}", missing="not selected yet")
    with pytest.raises(RuntimeError, match="not selected yet"):
        chosen.resolve(dry_run=False)
    _write_json(tmp_path / "sel.json", {"chosen": 0.10})
    assert chosen.resolve(dry_run=False) == "0.1"


def test_text_path_join_and_resolve_argv(tmp_path):
    sel = str(tmp_path / "sel.json")
    eps = FromJson(sel, ("chosen",), "CHOSEN", "{:g}")
    run = _runner.path_join(Text(("/w/seed2/b_eps", eps)), "final")
    assert isinstance(run, Text) and run.known() is None
    assert run.resolve(dry_run=True) == os.path.join("/w/seed2/b_epsCHOSEN", "final")
    assert _runner.path_join("/w", "a", "b") == os.path.join("/w", "a", "b")
    argv = ["--model", run, DryRunAs(("--source-file", "s", "--target-file", "t"), ("--data-file", "EXTRA")), "--x"]
    assert _runner.resolve_argv(argv, dry_run=True) == [
        "--model",
        os.path.join("/w/seed2/b_epsCHOSEN", "final"),
        "--data-file",
        "EXTRA",
        "--x",
    ]
    _write_json(sel, {"chosen": 0})
    assert _runner.resolve_argv(argv, dry_run=False) == [
        "--model",
        os.path.join("/w/seed2/b_eps0", "final"),
        "--source-file",
        "s",
        "--target-file",
        "t",
        "--x",
    ]
    assert _runner.arg(0.5) == "0.5" and _runner.arg(eps) is eps


def test_resume_flag_is_declared_and_added_by_the_runner(tmp_path):
    run = str(tmp_path / "run")
    never = Step("t", "train", run, ["train", "--output-dir", run])
    maybe = Step("t", "train", run, ["train", "--output-dir", run], resume=RESUME_IF_CHECKPOINT)
    always = Step("t", "train", run, ["train", "--output-dir", run], resume=RESUME_ALWAYS)
    assert [s.command(dry_run=True)[-1] for s in (never, maybe, always)] == [run, run, "--resume"]
    _checkpoint(run, 4)
    assert [s.command(dry_run=False)[-1] for s in (never, maybe, always)] == [run, "--resume", "--resume"]
    assert maybe.command(dry_run=True)[-1] == "--resume"  # a dry run of a started run shows it too
    with pytest.raises(ValueError, match="unknown resume rule"):
        Step("t", "train", run, resume="sometimes")


def test_step_kinds_are_checked():
    with pytest.raises(ValueError, match="needs an output directory"):
        Step("e", "eval", None, ["evaluate"])
    with pytest.raises(ValueError, match="an action"):
        Step("select", ACTION)
    with pytest.raises(ValueError, match="an action"):
        Step("e", "eval", "/w/e", action=lambda: True)
    step = Step("e", "eval", "/w/e", ["evaluate"], label="seed 1 e", deps=["x"])
    assert step.argv == ("evaluate",) and step.deps == ("x",) and step.title == "seed 1 e"
    assert Step("e", "eval", "/w/e").title == "e"


def test_branch_data_is_executed_by_branch_from(tmp_path, capsys):
    src, dst = tmp_path / "a", tmp_path / "b"
    _checkpoint(src, 2, "weights at 2")
    _checkpoint(src, 4)
    os.makedirs(src / "tokenizer")
    (src / "tokenizer" / "vocab.json").write_text("{}")
    (src / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    _runner.branch_from(Branch(str(src), 2), str(dst))
    assert sorted(os.listdir(dst)) == ["checkpoint-2", "metrics.jsonl", "tokenizer"]
    assert (dst / "checkpoint-2" / "model.safetensors").read_text() == "weights at 2"
    assert [json.loads(x)["step"] for x in (dst / "metrics.jsonl").open()] == [1, 2]
    _runner.branch_from(Branch(str(src), 4), str(dst))  # a started run is left as it is
    assert sorted(os.listdir(dst)) == ["checkpoint-2", "metrics.jsonl", "tokenizer"]
    no_tok = tmp_path / "c"
    _runner.branch_from(Branch(str(src), 4, tokenizer=False), str(no_tok))
    assert sorted(os.listdir(no_tok)) == ["checkpoint-4", "metrics.jsonl"]
    with pytest.raises(RuntimeError, match=r"a/checkpoint-3 is missing: ask for it$"):
        _runner.branch_from(Branch(str(src), 3, hint=": ask for it"), str(tmp_path / "d"))
    # newest: continue the newest checkpoint at or below the step, saying so; none: start afresh
    _runner.branch_from(Branch(str(src), 3, newest=True, note="[reuse] x:"), str(tmp_path / "e"))
    assert os.listdir(tmp_path / "e" / "checkpoint-2") and f"[reuse] x: {src}/checkpoint-2" in capsys.readouterr().out
    _runner.branch_from(Branch(str(src), 1, newest=True, note="[reuse] x:"), str(tmp_path / "f"))
    assert not os.path.exists(tmp_path / "f") and capsys.readouterr().out == ""


def test_late_bound_output_directory(tmp_path):
    sel = str(tmp_path / "selection_b.json")
    run = Text((str(tmp_path / "seed2" / "b_eps"), FromJson(sel, ("chosen",), "CHOSEN", "{:g}")))
    step = Step("train 2b", "train", run, ["train", "--output-dir", run])
    action = Step("select b", ACTION, action=lambda: True)
    assert step.output_dir() is None and not step.done
    triples = _runner.archive_steps(str(tmp_path), [step, action])
    assert triples[0] == ("train 2b", os.path.join(str(tmp_path), ".not-known-yet", "train 2b"), ())
    assert triples[1] == ("select b", None, ())  # a recorded choice: no directory of its own
    _write_json(sel, {"chosen": 0.1})
    assert step.output_dir() == str(tmp_path / "seed2" / "b_eps0.1") and not step.done
    _write_json(tmp_path / "seed2" / "b_eps0.1" / "results.json", {})
    assert step.done and _runner.archive_steps(str(tmp_path), [step])[0][1] == step.output_dir()


def test_execute_runs_actions_branches_and_commands(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_step(name, argv, output_dir, *, threads=1, dry_run=False):
        calls.append((name, list(argv), output_dir, dry_run))
        return not dry_run

    monkeypatch.setattr(_runner, "run_step", fake_run_step)
    done = []
    action = Step("select b", ACTION, action=lambda: done.append(1) or True)
    assert _runner.execute(action) is True and done == [1]
    assert _runner.execute(action, dry_run=True) is False  # an action handles its dry run itself
    src, run = tmp_path / "a", str(tmp_path / "b")
    _checkpoint(src, 2)
    os.makedirs(src / "tokenizer")
    fit = str(tmp_path / "fit" / "results.json")
    t = FromJson(fit, ("temperature_fit", "temperature"), "T_FIT")
    step = Step(
        "train 1b",
        "train",
        run,
        ["train", "--t", t, "--output-dir", run],
        label="seed 1 (b) train",
        resume=RESUME_IF_CHECKPOINT,
        branch=Branch(str(src), 2),
    )
    assert _runner.execute(step, dry_run=True) is False
    assert calls[-1] == ("seed 1 (b) train", ["train", "--t", "T_FIT", "--output-dir", run], run, True)
    assert not os.path.exists(run)  # a dry run branches nothing
    _write_json(fit, {"temperature_fit": {"temperature": 0.9}})
    assert _runner.execute(step) is True
    assert calls[-1][1] == ["train", "--t", "0.9", "--output-dir", run, "--resume"]  # the branch's checkpoint
    assert os.path.isdir(os.path.join(run, "checkpoint-2"))
    _write_json(os.path.join(run, "results.json"), {})
    n = len(calls)
    assert _runner.execute(step) is False and len(calls) == n
    assert f"[skip] seed 1 (b) train: {run}/results.json exists" in capsys.readouterr().out


class _ToyStudy(_runner.Study):
    """Two commands and an action; the commands "run" by writing their results.json."""

    files = ("choice.json",)
    cleanup = True

    def __init__(self, args, log):
        super().__init__(args)
        self.log = log

    def setup(self):
        self.log.append("setup")
        return {"base": 2.0} if not (self.args.dry_run or self.args.report_only) else {}

    def plan(self):
        w = self.work
        return [
            Step("train", "train", os.path.join(w, "run"), ["train"], resume=RESUME_IF_CHECKPOINT),
            Step("choose", ACTION, deps=("train",), action=self.choose),
            Step("eval", "eval", os.path.join(w, "run", "eval"), ["evaluate"], deps=("choose",)),
        ]

    def choose(self):
        self.log.append("choose")
        if not self.args.dry_run:
            _write_json(os.path.join(self.work, "choice.json"), {"chosen": 1})
        return not self.args.dry_run

    def report(self, steps, timings, wall_seconds):
        self.log.append(("report", [s.name for s in steps if s.done], sorted(timings.data)))
        with open(os.path.join(self.work, "results.md"), "w") as f:
            f.write("# toy\n")
        return "# toy"


def test_run_study_runs_times_archives_and_cleans_up(tmp_path, monkeypatch, capsys):
    ran = []

    def fake_run_step(name, argv, output_dir, *, threads=1, dry_run=False):
        ran.append((name, list(argv), dry_run))
        if dry_run:
            return False
        _checkpoint(output_dir, 1) if argv[0] == "train" else None
        _write_json(os.path.join(output_dir, "results.json"), {"ok": True})
        return True

    monkeypatch.setattr(_runner, "run_step", fake_run_step)

    def args(**kw):
        base = {"work_dir": str(tmp_path / "w"), "archive": str(tmp_path / "arch"), "jobs": 2, "threads": 1}
        base.update(dry_run=False, report_only=False, keep_checkpoints=False)
        return argparse.Namespace(**{**base, **kw})

    log: list = []
    assert _runner.run_study(_ToyStudy(args(dry_run=True), log)) == 0
    assert log == ["setup", "choose"] and [r[0] for r in ran] == ["train", "eval"]  # plan order, nothing written
    assert not os.path.exists(tmp_path / "w") and not os.path.exists(tmp_path / "arch")
    log.clear(), ran.clear()
    assert _runner.run_study(_ToyStudy(args(), log)) == 0
    assert log == ["setup", "choose", ("report", ["train", "eval"], ["base", "choose", "eval", "train"])]
    assert not any(e.startswith("checkpoint-") for e in os.listdir(tmp_path / "w" / "run"))  # cleaned up
    arch = tmp_path / "arch"
    for rel in ("run/results.json", "run/eval/results.json", "choice.json", "timings.json", "results.md"):
        assert (arch / rel).is_file(), rel
    out = capsys.readouterr().out
    assert "# toy" in out and "wall time of this invocation" in out
    # a new work directory restores everything from the archive: nothing runs again
    log.clear(), ran.clear()
    assert _runner.run_study(_ToyStudy(args(work_dir=str(tmp_path / "w2")), log)) == 0
    assert ran == [] and (tmp_path / "w2" / "choice.json").is_file()
    assert "2 finished step(s) restored" in capsys.readouterr().out
    # --report-only: no step runs, the report is archived again
    log.clear()
    assert _runner.run_study(_ToyStudy(args(work_dir=str(tmp_path / "w2"), report_only=True), log)) == 0
    assert log == ["setup", ("report", ["train", "eval"], ["base", "choose", "eval", "train"])] and ran == []


def test_run_tasks_respects_dependencies_priority_and_failures(capsys):
    import threading
    import time

    order, lock = [], threading.Lock()

    def note(name, delay=0.0):
        def fn():
            time.sleep(delay)
            with lock:
                order.append(name)

        return fn

    tasks = [
        _runner.Task("a", note("a", 0.05)),
        _runner.Task("b", note("b"), {"a"}),
        _runner.Task("c", note("c", 0.01)),
        _runner.Task("d", note("d"), {"b", "c"}),
    ]
    _runner.run_tasks(tasks, jobs=2)
    assert order.index("a") < order.index("b") < order.index("d") and order.index("c") < order.index("d")
    assert order[0] == "c"  # a and c start together; c is shorter
    order.clear()
    _runner.run_tasks(tasks, jobs=1)
    assert order == ["a", "b", "c", "d"]  # list order is the priority

    def boom():
        raise RuntimeError("step failed")

    order.clear()
    with pytest.raises(RuntimeError, match="step failed"):
        _runner.run_tasks([_runner.Task("x", boom), _runner.Task("y", note("y"), {"x"})], jobs=2)
    assert order == []  # nothing starts after a failure
    # a failure is said when it happens, not only once the tasks still running (hours, in a study) end
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="step failed"):
        _runner.run_tasks(
            [_runner.Task("slow", note("slow", 0.3)), _runner.Task("x", boom), _runner.Task("z", note("z"))], jobs=2
        )
    assert "[fail] x: RuntimeError: step failed; no new task starts, waiting for 1 running" in capsys.readouterr().out
    assert order == ["slow"]  # the running task finishes, z never starts
    with pytest.raises(ValueError, match="unknown tasks"):
        _runner.run_tasks([_runner.Task("y", note("y"), {"zz"})])


def test_first_json_takes_the_first_directory_that_has_the_file(tmp_path):
    work, archive = tmp_path / "work", tmp_path / "archive"
    _write_json(archive / "data" / "manifest.json", {"from": "archive"})
    name = os.path.join("data", "manifest.json")
    assert _runner.first_json([str(work), str(archive)], name) == {"from": "archive"}
    _write_json(work / "data" / "manifest.json", {})  # an empty object is still a file found
    assert _runner.first_json([str(work), str(archive)], name) == {}
    assert _runner.first_json([str(work)], "settings.json") is None
