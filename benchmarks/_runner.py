"""Shared plumbing of the reproduction benchmarks (``reproduce_mt.py``, ``reproduce_llm.py``).

Each benchmark is a list of *steps*; a step is one ``properlm`` command (``train`` or
``evaluate``) run in a subprocess, with its console output in a log file. A step whose
``results.json`` exists is finished and skipped, so a benchmark killed at any point resumes
where it stopped (an interrupted ``train`` step resumes from its newest checkpoint).

Statistics: :func:`mean_std` over seeds, :func:`paired_bootstrap` (sacrebleu's paired
bootstrap resampling of BLEU and chrF against a baseline system), :func:`paired_bootstrap_means`
(the same over per-document scores such as ROUGE F1); seeds as the unit of evidence:
:func:`mean_ci` (Student-t 95% interval of a mean difference across seeds) and
:func:`sign_test`; :func:`kendall_tau` with a bootstrap interval over models.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["IN_PROCESS", "Task", "checkpoint_steps", "fmt_mean_std", "kendall_tau", "kendall_tau_interval", "mean_ci",
           "mean_std", "paired_bootstrap", "paired_bootstrap_means", "read_json", "read_lines", "read_log", "run_step",
           "run_tasks", "sign_test", "start_from_checkpoint"]


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
    step and kind (training log / evaluation): a resumed run logs again the steps after its
    checkpoint, and the final evaluation repeats the last scheduled one."""
    from properlm.cli.compare import read_metrics_log

    if not os.path.isfile(path):
        return []
    last: dict[tuple[int, str], dict[str, Any]] = {}
    for rec in read_metrics_log(path):
        kind = "eval" if "eval_loss" in rec else "loss" if "loss" in rec else "other"
        last[(rec["step"], kind)] = rec
    return [last[k] for k in sorted(last)]


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
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    log = output_dir.rstrip("/") + ".log"
    started = time.time()
    print(f"[run ] {name} ...", flush=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        returncode = _run_in_process(argv, f) if IN_PROCESS else \
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
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
                if fut.exception() is not None and error is None:
                    error = fut.exception()
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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for no values."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def fmt_mean_std(values: Sequence[float], digits: int = 2, scale: float = 1.0) -> str:
    """``"m ± s"`` over seeds (``"m"`` for one value, ``"-"`` for none)."""
    vals = [float(v) * scale for v in values if v is not None]
    if not vals:
        return "-"
    m, s = mean_std(vals)
    return f"{m:.{digits}f}" if len(vals) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def paired_bootstrap(baseline: Sequence[str], systems: dict[str, Sequence[str]], references: Sequence[str],
                     *, n_samples: int = 1000, tokenize: str | None = None) -> dict[str, dict[str, Any]]:
    """Paired bootstrap resampling (Koehn 2004, as in ``sacrebleu --paired-bs``) of BLEU and
    chrF of each system against ``baseline``: ``{system: {"bleu": score, "bleu_p": p, "chrf": ...}}``.
    The p-value is the probability, under resampling, that the difference is not real."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    metrics = {"BLEU": BLEU(tokenize=tokenize) if tokenize else BLEU(), "chrF": CHRF()}
    named = [("baseline", list(baseline))] + [(k, list(v)) for k, v in systems.items()]
    test = PairedTest(named, metrics, [list(references)], test_type="bs", n_samples=n_samples)
    _, scores = test()
    chrf_key = next(k for k in scores if k.startswith("chrF"))  # sacrebleu names it "chrF2" (beta = 2)
    out: dict[str, dict[str, Any]] = {}
    for i, (name, _) in enumerate(named[1:], start=1):
        out[name] = {"bleu": scores["BLEU"][i].score, "bleu_p": scores["BLEU"][i].p_value,
                     "chrf": scores[chrf_key][i].score, "chrf_p": scores[chrf_key][i].p_value}
    return out


#: two-sided 95% quantiles t_{0.975, df} of Student's t, df = 1..30 (larger df: 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and its 95% Student-t interval ``(mean, low, high)`` over seeds:
    ``mean -+ t_{0.975, n-1} s / sqrt(n)``; the interval is ``(nan, nan)`` for fewer than 2 values."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    m, s = mean_std(vals)
    if len(vals) < 2:
        return m, math.nan, math.nan
    t = _T975[len(vals) - 2] if len(vals) - 1 <= len(_T975) else 1.96
    half = t * s / math.sqrt(len(vals))
    return m, m - half, m + half


def sign_test(values: Sequence[float]) -> float:
    """Two-sided exact sign test of "positive and negative differences are equally likely":
    ``min(1, 2 P(X >= max(k, n - k)))`` for ``X ~ Binomial(n, 1/2)``, ``k`` the positive values,
    zeros dropped; 1.0 for no nonzero value."""
    nonzero = [v for v in values if v != 0]
    n, k = len(nonzero), sum(v > 0 for v in nonzero)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(max(k, n - k), n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of paired values (ties in either variable corrected for); NaN when
    either variable is constant."""
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else math.nan


def kendall_tau_interval(x: Sequence[float], y: Sequence[float], n_samples: int = 1000,
                         seed: int = 0) -> tuple[float, float, float]:
    """Kendall's tau and a 95% percentile bootstrap interval, resampling the models (pairs)."""
    import random

    rng = random.Random(seed)
    tau = kendall_tau(x, y)
    n = len(x)
    draws = []
    for _ in range(n_samples):
        idx = [rng.randrange(n) for _ in range(n)]
        t = kendall_tau([x[i] for i in idx], [y[i] for i in idx])
        if not math.isnan(t):
            draws.append(t)
    if not draws:
        return tau, math.nan, math.nan
    draws.sort()
    return tau, draws[int(0.025 * (len(draws) - 1))], draws[math.ceil(0.975 * (len(draws) - 1))]


def paired_bootstrap_means(baseline: Sequence[float], system: Sequence[float], *, n_samples: int = 1000,
                           seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap over documents of a mean per-document score (e.g. ROUGE F1).

    With per-document differences ``d_i = system_i - baseline_i`` (``n`` documents), each of
    ``n_samples`` resamples draws ``n`` documents with replacement and takes the mean of their
    ``d``. Returns ``{"delta": mean(d), "ci95": [2.5%, 97.5%] percentiles of the resampled means,
    "p": two-sided p}`` with ``p = min(1, 2 (1 + #{resampled means on the other side of 0 from delta,
    or at 0}) / (n_samples + 1))`` (1.0 when ``delta`` is 0): small when the difference keeps its
    sign under resampling.
    """
    import numpy as np

    if len(baseline) != len(system) or not baseline:
        raise ValueError(f"paired scores needed: {len(baseline)} baseline vs {len(system)} system values")
    d = np.asarray(system, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    delta = float(d.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(n_samples)
    for start in range(0, n_samples, 100):  # 100 resamples at a time: n_docs x 100 indices in memory
        k = min(100, n_samples - start)
        means[start:start + k] = d[rng.integers(0, len(d), size=(k, len(d)))].mean(axis=1)
    if delta == 0:
        p = 1.0
    else:
        other = int((means <= 0).sum()) if delta > 0 else int((means >= 0).sum())
        p = min(1.0, 2 * (1 + other) / (n_samples + 1))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"delta": delta, "ci95": [float(lo), float(hi)], "p": p}


def checkpoint_steps(run: str) -> list[int]:
    """Steps of the complete ``checkpoint-N`` directories of a run, ascending."""
    from properlm.training import find_checkpoints

    return [int(os.path.basename(c).split("-")[1]) for c in find_checkpoints(run)]


def start_from_checkpoint(src: str, dst: str, step: int) -> None:
    """Make run directory ``dst`` continue run ``src`` from its ``checkpoint-STEP``: copy the
    checkpoint (weights, optimizer, scheduler, RNG and data-order state), the tokenizer and
    ``src``'s log records up to ``step`` (so the curves are whole). The checkpoint is copied
    under a temporary name and renamed, so ``dst`` holds it completely or not at all."""
    import shutil

    ckpt = f"checkpoint-{step}"
    if not os.path.isfile(os.path.join(src, ckpt, "trainer_state.json")):
        raise RuntimeError(f"{src}/{ckpt} is missing")
    os.makedirs(dst, exist_ok=True)
    shutil.copytree(os.path.join(src, "tokenizer"), os.path.join(dst, "tokenizer"), dirs_exist_ok=True)
    records = [r for r in read_log(os.path.join(src, "metrics.jsonl")) if r["step"] <= step]
    with open(os.path.join(dst, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    shutil.copytree(os.path.join(src, ckpt), os.path.join(dst, ckpt + ".tmp"), dirs_exist_ok=True)
    os.replace(os.path.join(dst, ckpt + ".tmp"), os.path.join(dst, ckpt))
