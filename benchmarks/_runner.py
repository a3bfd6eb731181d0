"""The one runner of the studies (``reproduce_mt.py``, ``reproduce_summ.py``, ``reproduce_llm.py``,
``reproduce_instruct.py``).

A study is a plan: a list of :class:`Step`, in priority order. A step is data: its name (the key of the
scheduler, of ``timings.json`` and of the archive), its display label, kind, arm or protocol, seed, split,
output directory, dependencies and training steps, and what it does: one ``properlm`` command (an argv list,
run in a subprocess with its console output in ``OUTPUT_DIR.log``), optionally after a branch from another run's
checkpoint (:class:`Branch`), or, for the few steps that are work of the study itself (the held-out slice and
the smoothing selection of ``reproduce_summ.py``), an in-process action. A value that only exists once an
earlier step has run (the temperature fitted on dev, a selected smoothing) is a declared placeholder
(:class:`FromJson`, inside a path :class:`Text`), resolved when the step starts; ``--resume`` is added by the
runner when the step's :attr:`Step.resume` says so. A step whose ``results.json`` exists is finished and
skipped, so a study killed at any point resumes where it stopped (an interrupted ``train`` step resumes from its
newest checkpoint).

Parts:

* the readers of step outputs: :func:`read_json`, :func:`read_json_if`, :func:`read_lines`, :func:`read_log`;
* one command: :func:`run_step` (a ``properlm`` command), :func:`start_from_checkpoint`,
  :func:`checkpoint_steps`, :func:`started`;
* steps as data: :class:`Step`, its placeholders :class:`FromJson`, :class:`Text`, :class:`DryRunAs`, its branch
  :class:`Branch` (executed by :func:`branch_from`), :func:`execute` (one step), :func:`arg`,
  :func:`path_join`, :func:`resolve_argv`;
* the scheduler: :class:`Task`, :func:`run_tasks` (``--jobs`` at a time, the list order as the priority);
* the main flow of every study: :class:`Study` (the hooks a study fills in) and :func:`run_study` (argument
  checks and settings, the ``--archive`` restore, the run with ``--jobs``, :class:`Timings`, per-step archiving,
  checkpoint cleanup, the report), with :func:`restore_archive` and :func:`archive_steps`;
* run directories: :func:`run_dir`, :func:`eval_name`.

The command line and argument checks are :mod:`_options`'s, the seq2seq protocols and training command
:mod:`_seq2seq`'s, the archive :mod:`_archive`'s, the statistics :mod:`_stats`'s, the report helpers (tables,
``results.md``) :mod:`_report`'s; the curves are drawn by :func:`properlm.evaluation.curves.plot_curves`.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ACTION",
    "IN_PROCESS",
    "RESUME_ALWAYS",
    "RESUME_IF_CHECKPOINT",
    "RESUME_NEVER",
    "Arg",
    "Branch",
    "DryRunAs",
    "FromJson",
    "Step",
    "Study",
    "Task",
    "Text",
    "Timings",
    "archive_steps",
    "arg",
    "branch_from",
    "checkpoint_steps",
    "eval_name",
    "execute",
    "path_join",
    "read_json",
    "read_json_if",
    "read_lines",
    "read_log",
    "resolve_argv",
    "restore_archive",
    "run_dir",
    "run_step",
    "run_study",
    "run_tasks",
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


def read_json_if(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when there is no such file (a step not run yet)."""
    return read_json(path) if os.path.isfile(path) else None


def first_json(dirs: list[str], name: str) -> dict[str, Any] | None:
    """The JSON object in ``DIR/name`` for the first of ``dirs`` that has that file, else ``None``
    (e.g. a work directory's settings, else its archive's)."""
    for d in dirs:
        found = read_json_if(os.path.join(d, name))
        if found is not None:
            return found
    return None


def _finished(name: str, output_dir: str) -> bool:
    """Whether ``OUTPUT_DIR/results.json`` exists (the step is finished), saying so."""
    if os.path.isfile(os.path.join(output_dir, "results.json")):
        print(f"[skip] {name}: {output_dir}/results.json exists", flush=True)
        return True
    return False


def run_step(name: str, argv: Sequence[str], output_dir: str, *, threads: int = 1, dry_run: bool = False) -> bool:
    """Run ``properlm ARGV`` unless ``OUTPUT_DIR/results.json`` exists; return whether it ran.

    The console output goes to ``OUTPUT_DIR.log``; a failing command raises ``RuntimeError``
    with the last lines of that log. ``threads`` sets ``OMP_NUM_THREADS``/``torch`` threads.
    """
    if _finished(name, output_dir):
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


def started(run: str) -> bool:
    """Whether a run directory has begun (holds a checkpoint) or finished (holds ``results.json``)."""
    return bool(checkpoint_steps(run)) or os.path.isfile(os.path.join(run, "results.json"))


# ------------------------------------------------------------------------------ steps as data


@dataclass(frozen=True)
class FromJson:
    """A placeholder for a value that an earlier step writes: the JSON value at ``keys`` of the file ``path``,
    formatted with ``fmt``, read when the step that needs it starts (e.g. the temperature fitted on dev, from the
    fit's ``results.json``; the smoothing a selection chose, from its record).

    A dry run shows ``stand_in`` (nothing has run); a real run whose file is missing raises ``RuntimeError``
    (``missing``, or a message naming the file): the plan's dependencies make the step wait for its writer."""

    path: str
    keys: tuple[str, ...]
    stand_in: str
    fmt: str = "{}"
    missing: str = ""

    def known(self) -> str | None:
        """The value, or ``None`` while ``path`` does not exist."""
        data: Any = read_json_if(self.path)
        if data is None:
            return None
        for key in self.keys:
            data = data[key]
        return self.fmt.format(data)

    def resolve(self, dry_run: bool) -> str:
        """The value (:meth:`known`) in a run, ``stand_in`` in a dry run."""
        if dry_run:
            return self.stand_in
        value = self.known()
        if value is None:
            raise RuntimeError(self.missing or f"{self.path} does not exist")
        return value


@dataclass(frozen=True)
class Text:
    """A string with placeholders: the concatenation of ``parts`` (a path that names a value only known once an
    earlier step has run, e.g. ``WORK/seed2/b_eps`` + the selected smoothing)."""

    parts: tuple[str | FromJson, ...]

    def known(self) -> str | None:
        """The string, or ``None`` while one of its placeholders is not known."""
        values = [p if isinstance(p, str) else p.known() for p in self.parts]
        return None if any(v is None for v in values) else "".join(v for v in values if v is not None)

    def resolve(self, dry_run: bool) -> str:
        """The string with every placeholder resolved (:meth:`FromJson.resolve`)."""
        return "".join(p if isinstance(p, str) else p.resolve(dry_run) for p in self.parts)


@dataclass(frozen=True)
class DryRunAs:
    """Command-line items that a dry run shows as ``shown`` instead of ``items`` (the options of a data file that
    only a real run prepares)."""

    items: tuple[str, ...]
    shown: tuple[str, ...]


#: one item of a step's command: a string, a placeholder resolved when the step starts, or items a dry run hides
Arg = str | FromJson | Text | DryRunAs


def arg(value: object) -> Arg:
    """One command-line item: a placeholder as it is, any other value as ``str(value)``."""
    return value if isinstance(value, (str, FromJson, Text, DryRunAs)) else str(value)


def path_join(base: str | Text, *names: str) -> str | Text:
    """``os.path.join(base, *names)`` for a plain or a late-known (:class:`Text`) path."""
    if isinstance(base, str):
        return os.path.join(base, *names)
    return Text((*base.parts, os.sep + os.path.join(*names))) if names else base


def resolve_argv(argv: Sequence[Arg], dry_run: bool) -> list[str]:
    """The command line of ``argv`` with every placeholder resolved (a dry run shows the stand-ins)."""
    out: list[str] = []
    for a in argv:
        if isinstance(a, str):
            out.append(a)
        elif isinstance(a, DryRunAs):
            out.extend(a.shown if dry_run else a.items)
        else:
            out.append(a.resolve(dry_run))
    return out


@dataclass(frozen=True)
class Branch:
    """Where a training run starts, as data: ``source``'s ``checkpoint-STEP`` (weights, optimizer, scheduler, RNG
    and data order, with ``source``'s log records up to it; its ``tokenizer/`` too when ``tokenizer``: a pretrained
    model's run has none), executed by :func:`branch_from` before the run's first step. A missing checkpoint is a
    ``RuntimeError`` ending in ``hint``. With ``newest`` (continuing a shorter run: ``reproduce_mt.py --reuse``),
    the run continues the newest checkpoint of ``source`` at or below ``step`` instead, saying so in a line that
    starts with ``note``, and starts afresh when there is none."""

    source: str
    step: int
    tokenizer: bool = True
    hint: str = ""
    newest: bool = False
    note: str = ""


def branch_from(branch: Branch, run: str) -> None:
    """Start the run directory ``run`` from ``branch`` (:func:`start_from_checkpoint`) unless it has begun
    (:func:`started`)."""
    if started(run):
        return
    step = branch.step
    if branch.newest:
        steps = [n for n in checkpoint_steps(branch.source) if n <= branch.step]
        if not steps:
            return
        step = steps[-1]
        print(f"{branch.note} {branch.source}/checkpoint-{step}", flush=True)
    start_from_checkpoint(branch.source, run, step, tokenizer=branch.tokenizer, missing_hint=branch.hint)


#: :attr:`Step.resume`: never add ``--resume``; add it when the output directory holds a checkpoint (after the
#: branch, if any); always add it (a branch always puts a checkpoint there before the run starts)
RESUME_NEVER, RESUME_IF_CHECKPOINT, RESUME_ALWAYS = "never", "if-checkpoint", "always"
#: :attr:`Step.kind` of an in-process action (work of the study itself, not a ``properlm`` command)
ACTION = "action"


@dataclass(frozen=True)
class Step:
    """One step of a study's plan, as data.

    ``name`` is its key (the scheduler's, ``timings.json``'s and the archive's), ``label`` what the ``[run ]`` /
    ``[dry-run]`` / ``[skip]`` lines call it (default: ``name``); ``kind`` what it does (``train``, a kind of
    evaluation, or :data:`ACTION`), ``arm`` and ``seed`` whose it is (the arm or protocol; ``seed`` ``None``: the
    untuned model or the whole study), ``split`` the evaluation set, ``train_steps`` the optimizer steps it trains
    (for estimates), ``deps`` the names of the steps it waits for.

    ``out`` is its output directory (finished once it holds ``results.json``): a path, or, where the directory is
    only known once an earlier step has run (the summarisation branches after the smoothing selection), a
    late-bound :class:`Text` whose placeholders are resolved when the step starts (:meth:`output_dir` is ``None``
    until then). ``argv`` is its ``properlm`` command (placeholders resolved when it starts); ``resume`` says
    when the runner adds ``--resume`` (:data:`RESUME_NEVER`, :data:`RESUME_IF_CHECKPOINT`,
    :data:`RESUME_ALWAYS`); ``branch`` where a training run starts (:class:`Branch`). A step of kind
    :data:`ACTION` runs ``action()`` in this process instead (it has no ``argv``; it prints what it does or would
    do in a dry run, and returns whether it did something)."""

    name: str
    kind: str
    out: str | Text | None = None
    argv: Sequence[Arg] = ()
    label: str = ""
    arm: str = ""
    seed: int | None = None
    split: str | None = None
    deps: Sequence[str] = ()
    train_steps: int = 0
    resume: str = RESUME_NEVER
    branch: Branch | None = None
    action: Callable[[], bool] | None = None

    def __post_init__(self) -> None:  # a list given is kept as a tuple: a step is a value
        object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "deps", tuple(self.deps))
        if (self.kind == ACTION) != (self.action is not None) or (self.kind == ACTION and self.argv):
            raise ValueError(f"step {self.name!r}: an action (kind {ACTION!r}) has an action and no argv; others not")
        if self.kind != ACTION and self.out is None:
            raise ValueError(f"step {self.name!r}: a command step needs an output directory")
        if self.resume not in (RESUME_NEVER, RESUME_IF_CHECKPOINT, RESUME_ALWAYS):
            raise ValueError(f"step {self.name!r}: unknown resume rule {self.resume!r}")

    @property
    def title(self) -> str:
        """What the console lines call the step: its label, or its name."""
        return self.label or self.name

    def output_dir(self) -> str | None:
        """The output directory, ``None`` while it is not known (an action has none)."""
        return self.out.known() if isinstance(self.out, Text) else self.out

    @property
    def done(self) -> bool:
        """Whether the step has finished (its output directory holds ``results.json``)."""
        out = self.output_dir()
        return out is not None and os.path.isfile(os.path.join(out, "results.json"))

    def command(self, dry_run: bool) -> list[str]:
        """The ``properlm`` arguments as the step starts: ``argv`` resolved, then ``--resume`` when :attr:`resume`
        says so (for :data:`RESUME_IF_CHECKPOINT`, when the output directory holds a checkpoint by then)."""
        argv = resolve_argv(self.argv, dry_run)
        out = self.out.resolve(dry_run) if isinstance(self.out, Text) else self.out
        if self.resume == RESUME_ALWAYS or (
            self.resume == RESUME_IF_CHECKPOINT and out is not None and checkpoint_steps(out)
        ):
            argv.append("--resume")
        return argv


def execute(step: Step, *, threads: int = 1, dry_run: bool = False) -> bool:
    """Run one step (:func:`run_step`, after its branch when it has one; or its action); returns whether it ran
    (``False``: finished before, or a dry run)."""
    if step.action is not None:
        return bool(step.action()) and not dry_run
    assert step.out is not None
    out = step.out.resolve(dry_run) if isinstance(step.out, Text) else step.out
    if step.branch is not None and not dry_run:
        branch_from(step.branch, out)
    if _finished(step.title, out):
        return False
    return run_step(step.title, step.command(dry_run), out, threads=threads, dry_run=dry_run)


# ------------------------------------------------------------------------------ the scheduler


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
    pending, done, running = list(tasks), set[str](), dict[Any, str]()
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


# ------------------------------------------------------------------------------ the main flow


class Timings:
    """``WORK/timings.json``: seconds per finished step, summed over invocations (thread-safe)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.data: dict[str, float] = read_json_if(path) or {}

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.data[name] = self.data.get(name, 0.0) + seconds
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump(self.data, f, indent=2)


class Study:
    """A study as :func:`run_study` sees it: its parsed ``args`` (``work_dir``, ``jobs``, ``threads``,
    ``dry_run``, ``report_only``, ``archive``; ``estimate`` and ``keep_checkpoints`` where the study has them) and
    the hooks a study overrides: :meth:`setup`, :meth:`plan`, :meth:`report`, and where it needs them
    :meth:`check_archive`, :meth:`preview` and :meth:`fail`."""

    #: work-level files (relative to the work directory) restored from the archive before the steps (records the
    #: plan reads: a selection, the data manifest) and archived after every step, beside ``timings.json``
    files: tuple[str, ...] = ()
    #: the report's files, archived with it
    report_files: tuple[str, ...] = ("results.md", "results.json", "training_curves.png")
    #: delete a training run's checkpoints (not ``final``) once it and the runs that branch from it have finished,
    #: unless ``--keep-checkpoints``
    cleanup: bool = False

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    @property
    def work(self) -> str:
        """The work directory (as the steps' paths spell it)."""
        return str(self.args.work_dir)

    def setup(self) -> dict[str, float]:
        """Fail on a bad argument, check (and, unless nothing may be written, record) the settings, prepare what
        the steps read (data, a base model); returns the seconds of that preparation to record in the timings
        (e.g. ``{"base": 60.0}``)."""
        return {}

    def plan(self) -> list[Step]:
        """Every step, in priority order (called once the archive's files are restored: a restored selection names
        output directories)."""
        raise NotImplementedError

    def check_archive(self, archive: Any) -> None:
        """Refuse (``ValueError``) an archive made with other settings; default: those of ``WORK/settings.json``."""
        settings = read_json_if(os.path.join(self.work, "settings.json"))
        if settings is not None:
            archive.check_settings(settings)

    def preview(self, steps: Sequence[Step], timings: Timings) -> None:
        """Print what comes before the run (the LLM studies: the data and the plan's estimate)."""

    def report(self, steps: Sequence[Step], timings: Timings, wall_seconds: float | None) -> str:
        """Write the report (``results.md``, ``results.json``, figures) of what has finished; returns its markdown.
        ``wall_seconds``: this invocation's, ``None`` with ``--report-only``."""
        raise NotImplementedError

    def fail(self, message: str) -> BaseException:
        """The exception that stops the study on a bad setting (``--archive``)."""
        return SystemExit(message)


def archive_steps(work: str, steps: Sequence[Step]) -> list[tuple[str, str | None, tuple[str, ...]]]:
    """``(name, output directory, deps)`` of every step, for :mod:`_archive` (its ``ArchivedStep``): an action has
    no directory (a recorded choice: it cuts the lineage); a late-bound directory not known yet is a stand-in that
    never finishes."""
    out: list[tuple[str, str | None, tuple[str, ...]]] = []
    for s in steps:
        d = s.output_dir()
        if d is None and s.out is not None:
            d = os.path.join(work, ".not-known-yet", s.name.replace(os.sep, "_"))
        out.append((s.name, d, tuple(s.deps)))
    return out


def restore_archive(archive: Any, work_dir: str, steps: Callable[[], Sequence[Step]], files: Sequence[str]) -> None:
    """The ``--archive`` restore of every study: the work-level ``files`` first, then the finished steps of
    ``steps()`` (called once the files are back: a selection file may name output directories; each step with
    all the steps after it, :mod:`_archive`) into ``work_dir``; then save the finished steps the archive does not
    hold yet."""
    for rel in files:
        archive.restore_file(rel)
    triples = archive_steps(work_dir, steps())
    restored = archive.restore(triples)
    saved = archive.save_all(triples)
    print(
        f"archive {archive.root}: {len(restored)} finished step(s) restored into {work_dir}, {len(saved)} saved",
        flush=True,
    )
    waiting = archive.waiting(triples)
    if waiting:
        print(
            f"archive {archive.root}: {len(waiting)} finished step(s) wait for the rest of their lineage and are left "
            f"out (they run again, or come back once it is archived): {', '.join(waiting[:6])}"
            + (" ..." if len(waiting) > 6 else ""),
            flush=True,
        )


def _open_archive(study: Study) -> Any:
    from _archive import ResultsArchive

    try:
        archive = ResultsArchive(study.args.archive, study.work)
        study.check_archive(archive)
    except ValueError as exc:
        raise study.fail(f"--archive: {exc}") from None
    restore_archive(archive, study.work, study.plan, [*study.files, "timings.json"])
    return archive


def _cleanup(train_dir: str, args: Any) -> None:
    """Delete a finished run's checkpoints (not ``final``) unless --keep-checkpoints."""
    if args.keep_checkpoints or args.dry_run or not os.path.isfile(os.path.join(train_dir, "results.json")):
        return
    for entry in os.listdir(train_dir):
        if entry.startswith("checkpoint-"):
            shutil.rmtree(os.path.join(train_dir, entry), ignore_errors=True)


def _run_archived(step: Step, study: Study, timings: Timings, archive: Any) -> None:
    """:func:`execute` ``step``; once it has run, time it and archive its output directory and the work-level files."""
    args = study.args
    started_at = time.time()
    ran = execute(step, threads=args.threads, dry_run=args.dry_run)
    if ran:
        timings.add(step.name, time.time() - started_at)
    if archive is not None and not args.dry_run:
        out = step.output_dir()
        if ran and out is not None:
            archive.save(out)
        with timings.lock:
            for rel in (*study.files, "timings.json"):
                archive.save_file(rel)


def _run_plan(study: Study, steps: Sequence[Step], timings: Timings, archive: Any) -> None:
    """Run the plan with ``--jobs`` steps at a time (:func:`run_tasks`; one at a time in a dry run, which so prints
    in plan order), with the study's checkpoint cleanup right after each training run."""
    args = study.args
    tasks = []
    for s in steps:
        tasks.append(Task(s.name, functools.partial(_run_archived, s, study, timings, archive), set(s.deps)))
        if study.cleanup and s.kind == "train":  # right after its run in the list: it runs as soon as it may
            after = {s.name} | {t.name for t in steps if t.kind == "train" and s.name in t.deps}
            out = s.output_dir()
            assert out is not None
            tasks.append(Task(f"cleanup {s.name}", functools.partial(_cleanup, out, args), after))
    run_tasks(tasks, jobs=1 if args.dry_run else args.jobs)


def run_study(study: Study) -> int:
    """The main flow of every study; returns the exit status 0.

    :meth:`Study.setup` (argument checks, settings, data); with ``--archive DIR`` (not in a dry run or an
    estimate) the archive's check and restore (:func:`restore_archive`); ``WORK/timings.json``
    (:class:`Timings`); the plan (:meth:`Study.plan`); unless ``--report-only``: :meth:`Study.preview` (an
    ``--estimate`` stops there), the run with ``--jobs`` steps at a time, each timed and, with an archive,
    archived once it has run (a ``--dry-run`` stops there); then the report (:meth:`Study.report`), archived with
    every finished step and the work-level files, printed with the wall time of the invocation."""
    args = study.args
    t0 = time.time()
    prepared = study.setup()
    estimate = bool(getattr(args, "estimate", False))
    archive = _open_archive(study) if getattr(args, "archive", None) and not (args.dry_run or estimate) else None
    timings = Timings(os.path.join(study.work, "timings.json"))  # after the restore: it reads the archived times
    for name, seconds in prepared.items():
        timings.add(name, seconds)
    steps = study.plan()
    if not args.report_only:
        study.preview(steps, timings)
        if estimate:
            return 0
        _run_plan(study, steps, timings, archive)
        if args.dry_run:
            return 0
    md = study.report(steps, timings, None if args.report_only else time.time() - t0)
    written = [f for f in study.report_files if os.path.isfile(os.path.join(study.work, f))]
    if archive is not None:
        saved = archive.save_all(archive_steps(study.work, steps))
        for rel in (*study.files, "timings.json", *written):
            archive.save_file(rel)
        print(f"archive {archive.root}: {len(saved)} more finished step(s) saved, with the report", flush=True)
    print()
    print(md.rstrip("\n"))
    print(f"\nwritten: {', '.join(os.path.join(study.work, f) for f in written)}")
    if not args.report_only:
        print(f"wall time of this invocation: {(time.time() - t0) / 60:.1f} min")
    return 0


# ------------------------------------------------------------------------------ run directories


def run_dir(work_dir: str, seed: int, protocol: str) -> str:
    """The ``properlm train`` directory of one seed and protocol: ``WORK_DIR/seedS/PROTOCOL``."""
    return os.path.join(work_dir, f"seed{seed}", protocol)


def eval_name(split: str, objective: str) -> str:
    """The directory (inside a run) of the beam-search evaluation of ``split`` with ``objective``."""
    return f"eval_{split}_beam_{objective}"
