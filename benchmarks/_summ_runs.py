"""The runs of ``reproduce_summ.py``: its constants, the run directories, the branches' smoothing
selection, the ``properlm`` commands and the task graph (:func:`tasks`)."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import _runner
from _runner import Task, eval_name, read_json_if

PROG = "reproduce_summ.py"

#: protocol -> its label and rules (:class:`_runner.Protocol`)
PROTOCOLS: dict[str, _runner.Protocol] = dict(_runner.PAPER_PROTOCOLS)
#: protocols that branch from (a)'s step-T1 checkpoint
BRANCHES = ("b", "c")
#: the control of the switch (issue 28): (a) continued from its own step-T1 checkpoint with the smoothing the
#: branches chose (0), so that a gain of (b), (c) over it is the rule's, not the change of smoothing
CONTROLS = {"a0": 0.0}
PROTOCOLS["a0"] = _runner.Protocol("(a0) log → log, smoothing 0 after T1", "logarithmic")
#: the rule each branch switches to at T1
BRANCH_RULES = {"b": "brier", "c": "spherical"}
#: teacher-forced token scores reported for every model
RULES = ("logarithmic", "brier", "spherical")
#: beam objectives every final model is decoded with on dev
OBJECTIVES = ("logarithmic", "spherical")
#: the generation metrics (ROUGE F1 in percent), single- and multi-reference
ROUGE = ("rouge1", "rouge2", "rougeL")
ROUGE_LABELS = {"rouge1": "R-1", "rouge2": "R-2", "rougeL": "R-L"}
REQUIRED_FILES = ("train.jsonl", "dev.jsonl")
LABELS = {k: v.label for k, v in PROTOCOLS.items()}
#: the seed of the held-out split of train (``properlm train --validation-seed``): the same slice for every seed
VALIDATION_SEED = 0
#: the split name of the selection slice (its decodings: ``eval_heldout_beam_logarithmic``)
HELDOUT = "heldout"
#: what the smoothing selection maximises
SELECTION_METRIC = "mean of ROUGE-1/2/L F1 (%), beam search with the log objective, on the selection slice"
#: scores closer than this count as a tie (the smaller eps wins)
TIE_TOLERANCE = 1e-9
#: the directory-name stand-in for a branch eps a --dry-run cannot know yet (the selection has not run)
PENDING = "CHOSEN"


def _eps_name(eps: float | str) -> str:
    return eps if isinstance(eps, str) else f"{eps:g}"


# ------------------------------------------------------------------------------ runs and the smoothing selection


def selecting(args: argparse.Namespace) -> bool:
    """Whether the branches' smoothing is selected (no ``--smoothing``, and a branch is run)."""
    return args.smoothing is None and any(p in BRANCHES for p in args.protocol_list)


def selection_path(args: argparse.Namespace, protocol: str) -> str:
    """The selection record of a branch: ``WORK/selection_PROTOCOL.json``."""
    return os.path.join(args.work_dir, f"selection_{protocol}.json")


def heldout_path(args: argparse.Namespace) -> str:
    """The selection slice of train, as JSONL: ``WORK/heldout.jsonl``."""
    return os.path.join(args.work_dir, "heldout.jsonl")


def protocol_eps(args: argparse.Namespace, protocol: str) -> float | None:
    """The smoothing of a protocol's run: (a)'s ``--smoothing-a``, a branch's ``--smoothing`` or the
    selection's choice (``None`` until the selection has run)."""
    if protocol in CONTROLS:
        return CONTROLS[protocol]
    if protocol not in BRANCHES:
        return args.smoothing_a
    if args.smoothing is not None:
        return args.smoothing
    sel = read_json_if(selection_path(args, protocol))
    return None if sel is None else float(sel["chosen"])


def grid_dir(args: argparse.Namespace, seed: int, protocol: str, eps: float | str) -> str:
    """The ``properlm train`` directory of a branch with smoothing ``eps``: ``WORK/seedS/PROTOCOL_epsEPS``."""
    return _runner.run_dir(args.work_dir, seed, f"{protocol}_eps{_eps_name(eps)}")


def run_dir(args: argparse.Namespace, seed: int, protocol: str) -> str | None:
    """The run of a seed and protocol that the report counts: ``WORK/seedS/a``, or the branch with its
    smoothing (``None`` while the selection has not chosen it)."""
    if protocol not in BRANCHES and protocol not in CONTROLS:
        return _runner.run_dir(args.work_dir, seed, protocol)
    eps = protocol_eps(args, protocol)
    return None if eps is None else grid_dir(args, seed, protocol, eps)


def train_argv(
    args: argparse.Namespace, seed: int, protocol: str, eps: float | str, output_dir: str, resume: bool
) -> list[str]:
    """``properlm train`` of one seed and protocol with score smoothing ``eps`` into ``output_dir``."""
    data = [
        "--train-file",
        os.path.join(args.data_dir, "train.jsonl"),
        "--validation-fraction",
        str(args.heldout_fraction),
        "--validation-seed",
        str(VALIDATION_SEED),
        "--max-length",
        str(args.max_length),
        "--max-source-length",
        str(args.max_source_length),
    ]
    with_eps = argparse.Namespace(**{**vars(args), "smoothing": _eps_name(eps)})
    return _runner.seq2seq_train_argv(
        with_eps,
        seed,
        PROTOCOLS[protocol].schedule(args.t1, args.t2),
        data,
        output_dir,
        eval_batch_size=64,
        resume=resume,
    )


def prepare_branch(args: argparse.Namespace, seed: int, run: str) -> None:
    """Before a branch's first step: start it from (a)'s step-T1 checkpoint."""
    if not _runner.started(run):
        _runner.branch_from(_runner.run_dir(args.work_dir, seed, "a"), run, args.t1)


def heldout_examples(args: argparse.Namespace) -> tuple[list[Any], int]:
    """The selection slice: the examples ``properlm train`` holds out of ``train.jsonl`` (the same
    split, ``--heldout-fraction`` with seed :data:`VALIDATION_SEED`) whose document does not also
    occur verbatim among the examples it trains on; returns them and how many were dropped."""
    from properlm.data import load_examples, split_validation

    examples = load_examples(os.path.join(args.data_dir, "train.jsonl"), task="summarization")
    train, held_out = split_validation(examples, args.heldout_fraction, VALIDATION_SEED)
    trained_on = {e.source for e in train}
    kept = [e for e in held_out if e.source not in trained_on]
    return kept, len(held_out) - len(kept)


def write_heldout(args: argparse.Namespace) -> None:
    """Write the selection slice to ``WORK/heldout.jsonl`` (``document``, ``summary``) unless it exists."""
    path = heldout_path(args)
    if os.path.isfile(path):
        print(f"[skip] heldout slice: {path} exists", flush=True)
        return
    if args.dry_run:
        print(
            f"[dry-run] heldout slice: write {path} (the held-out {args.heldout_fraction:g} of train.jsonl, "
            "split seed 0, less documents also in the training part)",
            flush=True,
        )
        return
    kept, dropped = heldout_examples(args)
    os.makedirs(args.work_dir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"document": e.source, "summary": e.target}, ensure_ascii=False) + "\n" for e in kept)
    os.replace(path + ".tmp", path)
    print(
        f"[done] heldout slice: {len(kept)} emails ({dropped} dropped: their body also occurs in the training "
        f"part) -> {path}",
        flush=True,
    )


def choose_smoothing(scores: Mapping[float, float]) -> float:
    """The eps of ``scores`` (eps -> selection score, higher is better) with the best score; scores
    within :data:`TIE_TOLERANCE` of the best tie, and the smallest tied eps wins. NaN scores never win;
    ``ValueError`` when there is no finite score."""
    finite = {e: s for e, s in scores.items() if s is not None and not math.isnan(s)}
    if not finite:
        raise ValueError(f"no finite selection score among {dict(scores)}")
    best = max(finite.values())
    return min(e for e, s in finite.items() if s >= best - TIE_TOLERANCE)


def selection_rows(args: argparse.Namespace, protocol: str, seed: int) -> list[dict[str, Any]]:
    """Per candidate eps whose held-out decoding has finished: its ROUGE, their mean (the selection
    score) and the held-out token scores."""
    rows = []
    for eps in args.smoothing_grid or ():
        ev = read_json_if(
            os.path.join(grid_dir(args, seed, protocol, eps), eval_name(HELDOUT, "logarithmic"), "results.json")
        )
        if ev is None:
            continue
        gen, tf = ev["generation"], ev["teacher_forced"]
        row: dict[str, Any] = {"smoothing": eps, **{k: gen[k] for k in ROUGE}}
        row["selection_score"] = sum(gen[k] for k in ROUGE) / len(ROUGE)
        row.update({f"score_{r}": tf["mean_scores"].get(r) for r in RULES})
        row["num_examples"] = ev.get("num_examples")
        rows.append(row)
    return rows


def select_smoothing(args: argparse.Namespace, protocol: str, seed: int) -> None:
    """Choose a branch's smoothing from its candidates' held-out decodings (:func:`choose_smoothing`
    of :data:`SELECTION_METRIC`) and record it in ``WORK/selection_PROTOCOL.json``, unless recorded."""
    path = selection_path(args, protocol)
    if os.path.isfile(path):
        print(f"[skip] select {protocol}: {path} exists (smoothing {read_json_if(path)['chosen']:g})", flush=True)
        return
    grid = ", ".join(map(_eps_name, args.smoothing_grid))
    if args.dry_run:
        print(
            f"[dry-run] select {protocol}: choose the smoothing of ({protocol}) from {grid}, seed {seed}, by the "
            f"{SELECTION_METRIC} -> {path}; the other seeds' ({protocol}) use it ({PENDING} below)",
            flush=True,
        )
        return
    rows = selection_rows(args, protocol, seed)
    if len(rows) != len(args.smoothing_grid):
        raise RuntimeError(f"select {protocol}: {len(rows)} of the {len(args.smoothing_grid)} held-out decodings exist")
    chosen = choose_smoothing({r["smoothing"]: r["selection_score"] for r in rows})
    record = {
        "protocol": protocol,
        "rule": BRANCH_RULES[protocol],
        "seed": seed,
        "grid": args.smoothing_grid,
        "metric": SELECTION_METRIC,
        "tie_rule": "scores within 1e-9 tie; the smaller eps wins",
        "slice": heldout_path(args),
        "rows": rows,
        "chosen": chosen,
    }
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    scores = ", ".join(f"eps {_eps_name(r['smoothing'])}: {r['selection_score']:.2f}" for r in rows)
    print(f"[done] select {protocol}: smoothing {chosen:g} ({scores})", flush=True)


def train_branch(args: argparse.Namespace, seed: int, protocol: str, name: str) -> bool:
    """Train a branch with its chosen smoothing (known once its selection has run: the directory and
    the command are made when the task runs; a dry run before the selection shows :data:`PENDING`)."""
    eps = protocol_eps(args, protocol)
    if eps is None and not args.dry_run:
        raise RuntimeError(f"the smoothing of ({protocol}) has not been selected ({selection_path(args, protocol)})")
    run = grid_dir(args, seed, protocol, PENDING if eps is None else eps)
    if not args.dry_run:
        prepare_branch(args, seed, run)
    argv = train_argv(args, seed, protocol, PENDING if eps is None else eps, run, bool(_runner.checkpoint_steps(run)))
    return _runner.run_step(name, argv, run, threads=args.threads, dry_run=args.dry_run)


def split_file(args: argparse.Namespace, split: str) -> str:
    if split == "dev":
        return os.path.join(args.data_dir, "dev.jsonl")
    return heldout_path(args) if split == HELDOUT else args.tests[split]


def eval_argv(args: argparse.Namespace, model: str, data_file: str, objective: str, out: str) -> list[str]:
    """``properlm evaluate``: teacher-forced scores of every rule and ECE, then beam search with
    ``objective`` and ROUGE (the truncation is the training run's, read from the model directory)."""
    return [
        "evaluate",
        "--model",
        model,
        "--data-file",
        data_file,
        "--rules",
        ",".join(RULES),
        "--num-beams",
        str(args.num_beams),
        "--objective",
        objective,
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--batch-size",
        str(args.eval_batch_size),
        "--output-dir",
        out,
        "--no-progress",
    ]


def eval_branch(args: argparse.Namespace, seed: int, protocol: str, split: str, objective: str, name: str) -> bool:
    """Decode a branch's final model (its directory known once its smoothing is: see :func:`train_branch`)."""
    eps = protocol_eps(args, protocol)
    run = grid_dir(args, seed, protocol, PENDING if eps is None else eps)
    d = os.path.join(run, eval_name(split, objective))
    return _runner.run_step(
        name,
        eval_argv(args, os.path.join(run, "final"), split_file(args, split), objective, d),
        d,
        threads=args.threads,
        dry_run=args.dry_run,
    )


def _eval_dir(args: argparse.Namespace, seed: int, protocol: str, split: str, objective: str) -> str | None:
    run = run_dir(args, seed, protocol)
    return None if run is None else os.path.join(run, eval_name(split, objective))


def evaluations(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(split, beam objective) pairs every final model is decoded with."""
    return [("dev", o) for o in OBJECTIVES] + [(name, "logarithmic") for name in args.tests]


def tasks(args: argparse.Namespace) -> list[Task]:
    """Every training and evaluation step, in priority order: every seed's (a) first (the longest
    runs, which the rest waits for: with ``--jobs 2`` the last (a) then trains beside the selection),
    then seed by seed (a)'s decodings and the branches; with the selection, the first seed's
    candidate branches and their held-out decodings, then the choice (``select b``, ``select c``),
    which the branches' runs and decodings wait for; each evaluation after its training."""
    plan = _runner.Plan(args.threads, args.dry_run)
    select = selecting(args)
    if select:
        plan.tasks.append(Task("heldout slice", functools.partial(write_heldout, args)))

    def decodings(seed: int, protocol: str, run: str, train: str) -> None:
        """The decodings of a run whose directory is known now (a root run or a control)."""
        for split, objective in evaluations(args):
            d = os.path.join(run, eval_name(split, objective))
            plan.step(
                f"eval {seed}{protocol} {split} {objective}",
                f"seed {seed} {protocol} {split} beam-{objective}",
                eval_argv(args, os.path.join(run, "final"), split_file(args, split), objective, d),
                d,
                {train},
            )

    for seed in args.seed_list:
        for protocol in args.protocol_list:
            label = PROTOCOLS[protocol].label
            if protocol in CONTROLS:  # from (a)'s checkpoint at T1 with a fixed smoothing: no selection
                run = grid_dir(args, seed, protocol, CONTROLS[protocol])
                train = plan.train(
                    f"train {seed}{protocol}",
                    f"seed {seed} {label} train",
                    run,
                    functools.partial(train_argv, args, seed, protocol, CONTROLS[protocol], run),
                    functools.partial(prepare_branch, args, seed, run),
                    {f"train {seed}a"},
                )
                decodings(seed, protocol, run, train)
                continue
            if protocol not in BRANCHES:
                run = _runner.run_dir(args.work_dir, seed, protocol)
                train = plan.train(
                    f"train {seed}{protocol}",
                    f"seed {seed} {label} train",
                    run,
                    functools.partial(train_argv, args, seed, protocol, args.smoothing_a, run),
                )
                decodings(seed, protocol, run, train)
                if any(p in BRANCHES or p in CONTROLS for p in args.protocol_list):
                    d = os.path.join(run, f"eval_dev_checkpoint_{args.t1}")
                    plan.step(
                        f"checkpoint {seed}{protocol}",
                        f"seed {seed} {label[:3]} checkpoint-{args.t1} dev beam-logarithmic",
                        eval_argv(
                            args, os.path.join(run, f"checkpoint-{args.t1}"), split_file(args, "dev"), "logarithmic", d
                        ),
                        d,
                        {train},
                    )
                continue
            if select and seed == args.seed_list[0]:
                # the selection: one branch per candidate eps, each decoded on the held-out slice
                decoded, candidates = set(), set()
                for eps in args.smoothing_grid:
                    run = grid_dir(args, seed, protocol, eps)
                    cand = plan.train(
                        f"train {seed}{protocol} eps{_eps_name(eps)}",
                        f"seed {seed} {label} train, smoothing {_eps_name(eps)} (selection)",
                        run,
                        functools.partial(train_argv, args, seed, protocol, eps, run),
                        functools.partial(prepare_branch, args, seed, run),
                        {f"train {seed}a"},
                    )
                    candidates.add(cand)
                    d = os.path.join(run, eval_name(HELDOUT, "logarithmic"))
                    decoded.add(
                        plan.step(
                            f"{HELDOUT} {seed}{protocol} eps{_eps_name(eps)}",
                            f"seed {seed} {protocol} smoothing {_eps_name(eps)} {HELDOUT} beam-logarithmic",
                            eval_argv(args, os.path.join(run, "final"), heldout_path(args), "logarithmic", d),
                            d,
                            {cand, "heldout slice"},
                        )
                    )
                train = f"select {protocol}"  # the chosen candidate is this seed's run
                plan.tasks.append(Task(train, functools.partial(select_smoothing, args, protocol, seed), decoded))
                # its decodings (below) need the candidates' weights too, not only the record of the
                # choice, which cuts the lineage for --archive (_archive.ArchivedStep)
            else:
                train = f"train {seed}{protocol}"
                deps = {f"train {seed}a"} | ({f"select {protocol}"} if select else set())
                plan.tasks.append(
                    Task(
                        train,
                        functools.partial(train_branch, args, seed, protocol, f"seed {seed} {label} train"),
                        deps,
                        functools.partial(run_dir, args, seed, protocol),
                    )
                )
                candidates = set()
            for split, objective in evaluations(args):
                plan.tasks.append(
                    Task(
                        f"eval {seed}{protocol} {split} {objective}",
                        functools.partial(
                            eval_branch,
                            args,
                            seed,
                            protocol,
                            split,
                            objective,
                            f"seed {seed} {protocol} {split} beam-{objective}",
                        ),
                        {train} | candidates,
                        functools.partial(_eval_dir, args, seed, protocol, split, objective),
                    )
                )
    roots = {
        f"train {seed}{p}"
        for seed in args.seed_list
        for p in args.protocol_list
        if p not in BRANCHES and p not in CONTROLS
    }
    return sorted(plan.tasks, key=lambda t: t.name not in roots)  # stable: otherwise the order above
