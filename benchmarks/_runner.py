"""Shared plumbing of the reproduction benchmarks (``reproduce_mt.py``, ``reproduce_summ.py``, ``reproduce_llm.py``).

Each benchmark is a list of *steps*; a step is one ``properlm`` command (``train`` or
``evaluate``) run in a subprocess, with its console output in a log file. A step whose
``results.json`` exists is finished and skipped, so a benchmark killed at any point resumes
where it stopped (an interrupted ``train`` step resumes from its newest checkpoint).

The one runner of the studies. Scaffolding of the seq2seq scripts (``reproduce_mt.py``, ``reproduce_summ.py``),
which keep only their protocols: the shared command-line :data:`OPTIONS` (:func:`add_options`), argument checks
(:func:`check_data_dir`, :func:`int_list`, :func:`parse_protocols`, :func:`check_stages`), one set of
settings per work directory (:func:`check_settings`), run directories and branches
(:func:`run_dir`, :func:`branch_from`), the ``properlm train`` command (:func:`seq2seq_train_argv`),
the task list (:class:`Plan`), the main flow (:func:`run_benchmark`) and the readers of step outputs
(:func:`read_json`, :func:`read_json_if`, :func:`read_lines`, :func:`read_log`). The statistics are
:mod:`_stats`'s, the report helpers (tables, ``results.md``) :mod:`_report`'s; the curves are drawn by
:func:`properlm.evaluation.curves.plot_curves`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "IN_PROCESS",
    "OPTIONS",
    "PAPER_PROTOCOLS",
    "Plan",
    "Protocol",
    "Step",
    "Task",
    "Timings",
    "add_options",
    "branch_from",
    "check_data_dir",
    "check_settings",
    "check_stages",
    "checkpoint_steps",
    "eval_name",
    "int_list",
    "parse_protocols",
    "protocols_help",
    "read_json",
    "read_json_if",
    "read_lines",
    "read_log",
    "restore_archive",
    "run_benchmark",
    "run_dir",
    "run_step",
    "run_steps",
    "run_tasks",
    "seq2seq_train_argv",
    "start_from_checkpoint",
    "started",
]


#: run steps in this process (tests: no interpreter start-up per step) instead of a subprocess
IN_PROCESS = False


def read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def read_log(path: str) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (none if it does not exist), the last one per
    step and kind (training log / evaluation), by step: the library's
    :func:`properlm.evaluation.run_records.read_run_log` (a resumed run logs again the steps after its
    checkpoint, and the final evaluation repeats the last scheduled one)."""
    from properlm.evaluation.run_records import read_run_log

    return read_run_log(path)


def run_step(name: str, argv: Sequence[str], output_dir: str, *, threads: int = 1, dry_run: bool = False) -> bool:
    """Run ``properlm ARGV`` unless ``OUTPUT_DIR/results.json`` exists; return whether it ran.

    The console output goes to ``OUTPUT_DIR.log``; a failing command raises ``RuntimeError``
    with the last lines of that log. ``threads`` sets ``OMP_NUM_THREADS``/``torch`` threads.
    """
    if os.path.isfile(os.path.join(output_dir, "results.json")):
        print(f"[skip] {name}: {output_dir}/results.json exists", flush=True)
        return False
    cmd = [sys.executable, "-m", "properlm.cli.main", *argv]
    if dry_run:
        print(f"[dry-run] {name}: {shlex.join(cmd)}", flush=True)
        return False
    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
    }
    log = output_dir.rstrip("/") + ".log"
    started = time.time()
    print(f"[run ] {name} ...", flush=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        returncode = (
            _run_in_process(argv, f)
            if IN_PROCESS
            else subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        )
    if returncode != 0:
        tail = "\n".join(read_lines(log)[-25:])
        raise RuntimeError(f"step {name} failed (exit {returncode}); log {log}:\n{tail}")
    print(f"[done] {name} in {time.time() - started:.0f} s", flush=True)
    return True


@dataclass
class Task:
    """One unit of work for :func:`run_tasks`: ``fn()`` runs once every task named in ``deps`` is done."""

    name: str
    fn: Callable[[], Any]
    deps: set[str] = field(default_factory=set)
    #: the task's output directory (``results.json`` there once it has finished; for ``--archive``),
    #: or a function giving it when it is only known later (``None`` until then); ``None``: it has none
    out: str | Callable[[], str | None] | None = None


def run_tasks(tasks: Sequence[Task], jobs: int = 1) -> None:
    """Run ``tasks`` with at most ``jobs`` at a time, each as soon as its dependencies are done,
    the earliest ready task in list order first (so the list order is the priority). The first
    failure stops new tasks from starting and is raised once the running ones finish."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    names = {t.name for t in tasks}
    unknown = {d for t in tasks for d in t.deps} - names
    if unknown:
        raise ValueError(f"tasks depend on unknown tasks: {sorted(unknown)}")
    pending, done, running = list(tasks), set(), {}
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            while error is None and len(running) < max(1, jobs):
                ready = next((t for t in pending if t.deps <= done), None)
                if ready is None:
                    break
                pending.remove(ready)
                running[pool.submit(ready.fn)] = ready.name
            if not running:
                if error is None and pending:
                    raise RuntimeError(f"tasks can never start (circular dependencies): {[t.name for t in pending]}")
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                name = running.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    # said at once: the running tasks may take hours before the error is raised
                    print(
                        f"[fail] {name}: {type(exc).__name__}: {exc}"
                        + (
                            f"; no new task starts, waiting for {len(running)} running"
                            if running and error is None
                            else ""
                        ),
                        flush=True,
                    )
                    error = error or exc
                done.add(name)
    if error is not None:
        raise error


def _run_in_process(argv: Sequence[str], log: Any) -> int:
    import contextlib

    from properlm.cli.main import main

    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return main(list(argv))
        except SystemExit as exc:
            return int(exc.code or 0)


def checkpoint_steps(run: str) -> list[int]:
    """Steps of the complete ``checkpoint-N`` directories of a run, ascending."""
    from properlm.training import find_checkpoints

    return [int(os.path.basename(c).split("-")[1]) for c in find_checkpoints(run)]


def start_from_checkpoint(src: str, dst: str, step: int, *, tokenizer: bool = True, missing_hint: str = "") -> None:
    """Make run directory ``dst`` continue run ``src`` from its ``checkpoint-STEP``: copy the
    checkpoint (weights, optimizer, scheduler, RNG and data-order state), the tokenizer (``src/tokenizer``,
    unless not ``tokenizer``: a pretrained model's run has none) and ``src``'s log records up to ``step``
    (so the curves are whole). The checkpoint is copied under a temporary name and renamed, so ``dst``
    holds it completely or not at all. ``RuntimeError`` (``"SRC/checkpoint-STEP is missing"`` +
    ``missing_hint``) when that checkpoint is missing."""
    import shutil

    ckpt = f"checkpoint-{step}"
    if not os.path.isfile(os.path.join(src, ckpt, "trainer_state.json")):
        raise RuntimeError(f"{src}/{ckpt} is missing{missing_hint}")
    os.makedirs(dst, exist_ok=True)
    if tokenizer:
        shutil.copytree(os.path.join(src, "tokenizer"), os.path.join(dst, "tokenizer"), dirs_exist_ok=True)
    records = [r for r in read_log(os.path.join(src, "metrics.jsonl")) if r["step"] <= step]
    with open(os.path.join(dst, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    shutil.copytree(os.path.join(src, ckpt), os.path.join(dst, ckpt + ".tmp"), dirs_exist_ok=True)
    os.replace(os.path.join(dst, ckpt + ".tmp"), os.path.join(dst, ckpt))


# ------------------------------------------------------------------------------ protocols


@dataclass(frozen=True)
class Protocol:
    """A training protocol of the seq2seq studies, as data: its label and its rules, ``first`` for the T1 steps
    of stage 1 and ``then`` for the T2 steps after the switch (``None``: ``first`` for all T1 + T2 steps)."""

    label: str
    first: str
    then: str | None = None

    def schedule(self, t1: int, t2: int) -> str:
        """The ``properlm train --schedule`` of the protocol."""
        return f"{self.first}:{t1 + t2}" if self.then is None else f"{self.first}:{t1},{self.then}:{t2}"


#: the paper's fine-tuning protocols, with T = T1 + T2 steps each; (b) and (c) branch from (a)'s checkpoint at T1
PAPER_PROTOCOLS: dict[str, Protocol] = {
    "a": Protocol("(a) log → log", "logarithmic"),
    "b": Protocol("(b) log → brier", "logarithmic", "brier"),
    "c": Protocol("(c) log → spherical", "logarithmic", "spherical"),
}


def protocols_help(protocols: dict[str, Protocol], branches: str) -> str:
    """The ``--protocols`` help: each protocol's label, and which (``branches``) start from (a)."""
    return (
        "protocols to run: "
        + "; ".join(f"{k} = {v.label[4:]}" for k, v in protocols.items())
        + f"; {branches} branch from a's step-T1 checkpoint and need a"
    )


# ------------------------------------------------------------------------------ command-line options

#: options shared by the seq2seq reproduction scripts: name -> ``add_argument`` keywords; a script
#: names the ones it takes with :func:`add_options`, in its own order, overriding defaults and help
OPTIONS: dict[str, dict[str, Any]] = {
    "work_dir": {"help": "where runs, evaluations and the summary go"},
    "t1": {"type": int, "help": "T1: steps of the logarithmic stage before the switch"},
    "t2": {"type": int, "help": "T2: steps after the switch (every protocol runs T1 + T2)"},
    "batch_size": {"type": int, "help": "examples per step"},
    "learning_rate": {"type": float, "help": "peak learning rate"},
    "warmup_steps": {"type": int, "help": "linear warm-up steps before inverse-sqrt decay"},
    "smoothing": {"type": float, "default": 0.1, "help": "score smoothing eps of every protocol"},
    "vocab_size": {"type": int, "help": "joint BPE vocabulary size"},
    "hidden_size": {"type": int, "default": 128, "help": "model width"},
    "num_layers": {"type": int, "default": 2, "help": "encoder and decoder layers (each)"},
    "num_heads": {"type": int, "default": 4, "help": "attention heads"},
    "ffn_size": {"type": int, "default": 512, "help": "feed-forward width"},
    "dropout": {"type": float, "default": 0.1, "help": "dropout"},
    "eval_every": {"type": int, "default": 250, "help": "validation scores every N steps (the curves)"},
    "save_every": {
        "type": int,
        "default": 500,
        "help": "checkpoint every N steps (T1 must be a multiple: the branches start from it)",
    },
    "num_beams": {"type": int, "help": "beam width of every decoding"},
    "eval_batch_size": {"type": int, "default": 50, "help": "sentences per decoding batch"},
    "bootstrap_samples": {"type": int, "default": 1000, "help": "paired bootstrap resamples"},
    "threads": {"type": int, "default": 1, "help": "torch threads of each step"},
    "jobs": {"type": int, "default": 1, "help": "steps run at the same time (independent runs in parallel)"},
    "report_only": {"action": "store_true", "help": "only aggregate what has finished"},
    "dry_run": {"action": "store_true", "help": "print the commands that would run"},
    "archive": {
        "metavar": "DIR",
        "default": None,
        "help": "also keep the small outputs of every finished step (results, hypotheses, metric logs; no "
        "weights) in DIR, and restore finished steps from DIR into a new --work-dir, so a study that "
        "outlives its machine continues on the next one (commit DIR; see _archive.py)",
    },
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where it is ``None`` (the help text then says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_options(parser: Any, options: dict[str, Any]) -> None:
    """Add the shared :data:`OPTIONS` named in ``options`` to an ``argparse`` parser, in that order.

    ``options`` maps an option name (``"batch_size"`` for ``--batch-size``) to its default, or to a
    dict of ``add_argument`` keywords that override the shared ones (``{}``: as they are).
    """
    for name, value in options.items():
        kwargs = {**OPTIONS[name], **(value if isinstance(value, dict) else {"default": value})}
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


# ------------------------------------------------------------------------------ argument checks


def check_data_dir(prog: str, data_dir: str, files: Sequence[str], expected: str) -> None:
    """Exit (``SystemExit`` naming ``prog``) unless ``data_dir`` holds every one of ``files``."""
    missing = [f for f in files if not os.path.isfile(os.path.join(data_dir, f))]
    if missing:
        raise SystemExit(
            f"{prog}: data directory {data_dir!r} lacks {', '.join(missing)} (expected {expected}: {', '.join(files)})"
        )


def int_list(text: str) -> list[int]:
    """``"1,2, 3"`` -> ``[1, 2, 3]`` (empty items skipped); ``ValueError`` on a non-integer."""
    return [int(s) for s in text.split(",") if s.strip()]


def parse_protocols(
    prog: str, text: str, protocols: Sequence[str], branches: Sequence[str], root: str = "a"
) -> list[str]:
    """The comma-separated protocol names of ``text``, each one of ``protocols``; exit when there is
    none, one is unknown, or one of ``branches`` (which start from a checkpoint of ``root``) is named
    without ``root``."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names or any(p not in protocols for p in names):
        raise SystemExit(f"{prog}: --protocols {text!r}: allowed values are {', '.join(protocols)}")
    if any(p in branches for p in names) and root not in names:
        raise SystemExit(f"{prog}: protocols {', '.join(branches)} branch from {root}'s checkpoint; include {root}")
    return names


def check_stages(prog: str, args: Any, positive: Sequence[str]) -> None:
    """Exit unless the options named in ``positive`` are positive and ``args.t1`` is a multiple of
    ``args.save_every`` (the branches start from the checkpoint at T1)."""
    for name in positive:
        if getattr(args, name) <= 0:
            raise SystemExit(f"{prog}: --{name.replace('_', '-')} must be positive")
    if args.t1 % args.save_every:
        raise SystemExit(f"{prog}: --t1 {args.t1} must be a multiple of --save-every {args.save_every}")


def check_settings(
    prog: str,
    work_dir: str,
    settings: dict[str, Any],
    *,
    record: bool,
    reuse: str | None = None,
    reuse_keys: Sequence[str] = (),
) -> None:
    """Keep one set of ``settings`` per work directory, in ``WORK_DIR/settings.json``.

    Exits when ``work_dir`` holds runs made with other settings (or when ``reuse``, a work directory
    whose runs are continued, differs from ``settings`` in one of ``reuse_keys``), then records
    ``settings`` there if ``record`` and none are recorded yet.
    """
    path = os.path.join(work_dir, "settings.json")
    if os.path.isfile(path):
        saved = read_json(path)
        diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if diff:
            raise SystemExit(
                f"{prog}: {work_dir} holds runs made with other settings "
                f"(option: (saved, now)) {diff}; use the same options or another --work-dir"
            )
    if reuse:
        other = os.path.join(reuse, "settings.json")
        if not os.path.isfile(other):
            raise SystemExit(f"{prog}: --reuse {reuse!r} holds no settings.json")
        saved = read_json(other)
        diff = {k: (saved.get(k), settings[k]) for k in reuse_keys if saved.get(k) != settings[k]}
        if diff:
            raise SystemExit(f"{prog}: --reuse {reuse}: its runs used other settings (option: (theirs, now)) {diff}")
    if record and not os.path.isfile(path):
        os.makedirs(work_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)


# ------------------------------------------------------------------------------ runs and steps


def run_dir(work_dir: str, seed: int, protocol: str) -> str:
    """The ``properlm train`` directory of one seed and protocol: ``WORK_DIR/seedS/PROTOCOL``."""
    return os.path.join(work_dir, f"seed{seed}", protocol)


def eval_name(split: str, objective: str) -> str:
    """The directory (inside a run) of the beam-search evaluation of ``split`` with ``objective``."""
    return f"eval_{split}_beam_{objective}"


def started(run: str) -> bool:
    """Whether a run directory has begun (holds a checkpoint) or finished (holds ``results.json``)."""
    return bool(checkpoint_steps(run)) or os.path.isfile(os.path.join(run, "results.json"))


def branch_from(root: str, run: str, step: int) -> None:
    """Start ``run`` from ``checkpoint-STEP`` of the root protocol's run ``root``
    (:func:`start_from_checkpoint`); ``RuntimeError`` when that checkpoint is missing."""
    if step not in checkpoint_steps(root):
        raise RuntimeError(f"{root}/checkpoint-{step} is missing: protocol a must save a checkpoint at T1")
    start_from_checkpoint(root, run, step)


def seq2seq_train_argv(
    args: Any, seed: int, schedule: str, data: Sequence[str], output_dir: str, *, eval_batch_size: int, resume: bool
) -> list[str]:
    """``properlm train`` of a Transformer encoder-decoder from scratch (``--init tiny-seq2seq``).

    Model (``vocab_size``, ``hidden_size``, ``num_layers``, ``num_heads``, ``ffn_size``, ``dropout``)
    and optimisation (``smoothing``, ``batch_size``, ``learning_rate``, ``warmup_steps``,
    ``eval_every``, ``save_every``) come from ``args``; ``data`` are the data options (files and
    lengths), ``schedule`` the rule schedule (``--schedule``). AdamW(0.9, 0.98), linear warm-up
    then inverse-sqrt decay, batches grouped by length; ``--resume`` when ``resume``.
    """
    argv = [
        "train",
        "--init",
        "tiny-seq2seq",
        "--vocab-size",
        str(args.vocab_size),
        "--hidden-size",
        str(args.hidden_size),
        "--num-layers",
        str(args.num_layers),
        "--num-heads",
        str(args.num_heads),
        "--ffn-size",
        str(args.ffn_size),
        "--dropout",
        str(args.dropout),
        *data,
        "--schedule",
        schedule,
        "--smoothing",
        str(args.smoothing),
        "--seed",
        str(seed),
        "--per-device-train-batch-size",
        str(args.batch_size),
        "--per-device-eval-batch-size",
        str(eval_batch_size),
        "--learning-rate",
        str(args.learning_rate),
        "--lr-scheduler",
        "inverse_sqrt",
        "--warmup-steps",
        str(args.warmup_steps),
        "--adam-beta2",
        "0.98",
        "--group-by-length",
        "--eval-steps",
        str(args.eval_every),
        "--save-steps",
        str(args.save_every),
        "--logging-steps",
        "50",
        "--output-dir",
        output_dir,
        "--no-progress-bar",
        "--no-tensorboard",
    ]
    return argv + (["--resume"] if resume else [])


@dataclass
class Plan:
    """The :class:`Task` list of a benchmark, built step by step: each step is one :func:`run_step`
    with the plan's ``threads`` and ``dry_run``; the list order is the priority of :func:`run_tasks`."""

    threads: int = 1
    dry_run: bool = False
    tasks: list[Task] = field(default_factory=list)

    def step(
        self,
        task: str,
        name: str,
        argv: Sequence[str] | Callable[[], Sequence[str]],
        output_dir: str,
        deps: Iterable[str] = (),
    ) -> str:
        """Add task ``task``: ``run_step(name, argv, output_dir)`` (``argv()`` called when the task runs,
        for an argument only known then) once ``deps`` are done; returns ``task``."""
        self.tasks.append(Task(task, functools.partial(self._run, name, argv, output_dir), set(deps), output_dir))
        return task

    def train(
        self,
        task: str,
        name: str,
        output_dir: str,
        argv: Callable[[bool], Sequence[str]],
        prepare: Callable[[], None] | None = None,
        deps: Iterable[str] = (),
    ) -> str:
        """Add training task ``task``: ``prepare()`` (not in a dry run; e.g. start from another run's
        checkpoint), then ``run_step(name, argv(resume), output_dir)`` with ``resume`` whether
        ``output_dir`` holds a checkpoint by then; returns ``task``."""
        self.tasks.append(
            Task(task, functools.partial(self._train, name, output_dir, argv, prepare), set(deps), output_dir)
        )
        return task

    def _run(self, name: str, argv: Sequence[str] | Callable[[], Sequence[str]], output_dir: str) -> bool:
        return run_step(
            name, argv() if callable(argv) else argv, output_dir, threads=self.threads, dry_run=self.dry_run
        )

    def _train(
        self, name: str, output_dir: str, argv: Callable[[bool], Sequence[str]], prepare: Callable[[], None] | None
    ) -> bool:
        if prepare is not None and not self.dry_run:
            prepare()
        return self._run(name, argv(bool(checkpoint_steps(output_dir))), output_dir)


# ------------------------------------------------------------------------------ steps as data (the LLM studies)


@dataclass
class Step:
    """One ``properlm`` command of a study's plan, as data: ``kind`` is what it does (train, fit, a decoding
    split ...), ``arm`` and ``seed`` whose it is (``seed`` ``None``: the untuned model), ``out`` its output
    directory, ``deps`` the steps it waits for, ``split`` the evaluation set, ``train_steps`` the optimizer
    steps it trains (for the estimate); ``argv()`` is built when the step starts (it may read the dev
    temperature or find a checkpoint to resume), after ``prepare()`` (e.g. a branch from a checkpoint)."""

    name: str
    kind: str
    arm: str
    seed: int | None
    out: str
    argv: Callable[[], list[str]]
    deps: tuple[str, ...] = ()
    split: str | None = None
    train_steps: int = 0
    prepare: Callable[[], None] | None = None

    @property
    def done(self) -> bool:
        return os.path.isfile(os.path.join(self.out, "results.json"))


class Timings:
    """``WORK/timings.json``: seconds per finished step, summed over invocations (thread-safe)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.data: dict[str, float] = read_json_if(path) or {}

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.data[name] = self.data.get(name, 0.0) + seconds
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump(self.data, f, indent=2)


def _run_timed(step: Step, args: Any, timings: Timings, archive: Any = None) -> None:
    if step.prepare is not None and not args.dry_run and not step.done:
        step.prepare()
    started = time.time()
    if run_step(step.name, step.argv(), step.out, threads=args.threads, dry_run=args.dry_run):
        timings.add(step.name, time.time() - started)
        if archive is not None:
            archive.save(step.out)
            with timings.lock:
                archive.save_file("timings.json")


def _cleanup(train_dir: str, args: Any) -> None:
    """Delete a finished run's checkpoints (not ``final``) unless --keep-checkpoints."""
    if args.keep_checkpoints or args.dry_run or not os.path.isfile(os.path.join(train_dir, "results.json")):
        return
    for entry in os.listdir(train_dir):
        if entry.startswith("checkpoint-"):
            shutil.rmtree(os.path.join(train_dir, entry), ignore_errors=True)


def run_steps(args: Any, steps: Sequence[Step], timings: Timings, archive: Any = None) -> None:
    """Run the plan with ``--jobs`` steps at a time (:func:`run_tasks`), timing each finished step in
    ``timings`` and archiving it in ``archive`` (``--archive``); each run's checkpoints go once it and the
    runs that branch from it have finished (unless ``--keep-checkpoints``)."""
    tasks = []
    for s in steps:
        tasks.append(Task(s.name, functools.partial(_run_timed, s, args, timings, archive), set(s.deps)))
        if s.kind == "train":  # right after its run in the list: it runs as soon as it may
            after = {s.name} | {t.name for t in steps if t.kind == "train" and s.name in t.deps}
            tasks.append(Task(f"cleanup {s.name}", functools.partial(_cleanup, s.out, args), after))
    run_tasks(tasks, jobs=1 if args.dry_run else args.jobs)  # a dry run prints in plan order


def _task_out(work_dir: str, task: Task) -> str | None:
    """The output directory of ``task`` for the archive: a placeholder that never finishes while a
    late-known directory is not known yet."""
    out = task.out() if callable(task.out) else task.out
    if out is None and callable(task.out):
        return os.path.join(work_dir, ".not-known-yet", task.name.replace(os.sep, "_"))
    return out


def _open_archive(args: Any, files: Sequence[str], tasks: Callable[[Any], Sequence[Task]]) -> Any:
    """``--archive DIR`` of ``args.work_dir``: refuse one made with other settings (those of
    ``WORK/settings.json``), restore the work-level ``files`` (e.g. a selection record), then the
    finished tasks (each with all the tasks after it, :mod:`_archive`), and save what the work
    directory has finished that the archive lacks."""
    from _archive import ResultsArchive

    try:
        archive = ResultsArchive(args.archive, args.work_dir)
        settings = read_json_if(os.path.join(args.work_dir, "settings.json"))
        if settings is not None:
            archive.check_settings(settings)
    except ValueError as exc:
        raise SystemExit(f"--archive: {exc}") from None
    # the steps once the files are back: a restored selection names the branches' directories
    restore_archive(
        archive, args.work_dir, lambda: [(t.name, _task_out(args.work_dir, t), t.deps) for t in tasks(args)], files
    )
    return archive


def restore_archive(
    archive: Any, work_dir: str, steps: Sequence[Any] | Callable[[], Sequence[Any]], files: Sequence[str] = ()
) -> None:
    """The common part of every study's ``--archive``: restore the work-level ``files`` and then the finished
    ``steps`` (``(name, output directory, deps)``, or a function giving them once the files are back: a
    selection file may name output directories; each step with all the steps after it, :mod:`_archive`) into
    ``work_dir``, and save the finished steps the archive does not hold yet."""
    for rel in files:
        archive.restore_file(rel)
    if callable(steps):
        steps = steps()
    restored = archive.restore(steps)
    saved = archive.save_all(steps)
    print(
        f"archive {archive.root}: {len(restored)} finished step(s) restored into {work_dir}, {len(saved)} saved",
        flush=True,
    )


def _archiving(task: Task, work_dir: str, archive: Any, files: Sequence[str]) -> Task:
    """``task`` that, once it has run, archives its output directory and the work-level ``files``."""

    def fn() -> Any:
        result = task.fn()
        out = _task_out(work_dir, task)
        if out is not None:
            archive.save(out)
        for rel in files:
            archive.save_file(rel)
        return result

    return Task(task.name, fn, task.deps, task.out)


def run_benchmark(
    args: Any,
    check: Callable[[Any], None],
    settings: Callable[[Any], None],
    tasks: Callable[[Any], Sequence[Task]],
    report: Callable[[Any, float | None], str],
    *,
    archive_files: Sequence[str] = (),
) -> int:
    """The main flow of a benchmark, for its parsed ``args``: ``check(args)`` (fail on a bad argument
    before any work), ``settings(args)`` (the settings check), run ``tasks(args)`` with ``args.jobs``
    at a time (not with ``--report-only``; a ``--dry-run`` stops there), then print
    ``report(args, wall_seconds)`` (``None`` with ``--report-only``) and the wall time; returns the
    exit status 0.

    With ``args.archive`` (``--archive DIR``, not in a dry run), finished steps are restored from
    ``DIR`` first and archived there as they finish, with the work-level files ``archive_files``
    (relative to the work directory) and the report (``results.md``, ``results.json``, ``*.png``)."""
    check(args)
    t0 = time.time()
    settings(args)
    archive = None
    if getattr(args, "archive", None) and not args.dry_run:
        archive = _open_archive(args, archive_files, tasks)
    if not args.report_only:
        todo = list(tasks(args))
        if archive is not None:
            todo = [_archiving(t, args.work_dir, archive, archive_files) for t in todo]
        run_tasks(todo, jobs=args.jobs)
    if args.dry_run:
        return 0
    md = report(args, None if args.report_only else time.time() - t0)
    if archive is not None:
        archive.save_all([(t.name, _task_out(args.work_dir, t), t.deps) for t in tasks(args)])
        for rel in [*archive_files, "results.md", "results.json", "training_curves.png", "bleu_vs_scores.png"]:
            archive.save_file(rel)
    print(md)
    if not args.report_only:
        print(f"\nwall time of this invocation: {(time.time() - t0) / 60:.1f} min")
    return 0


def read_json_if(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when there is no such file (a step not run yet)."""
    return read_json(path) if os.path.isfile(path) else None
