"""The runs of ``reproduce_summ.py``: its constants, the run directories, the branches' smoothing
selection, the ``properlm`` commands and the plan (:func:`plan`, a list of :class:`_runner.Step`)."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import _runner
import _seq2seq
from _runner import ACTION, RESUME_IF_CHECKPOINT, Arg, Branch, FromJson, Step, Text, eval_name, path_join, read_json_if

PROG = "reproduce_summ.py"

#: protocol -> its label and rules (:class:`_seq2seq.Protocol`)
PROTOCOLS: dict[str, _seq2seq.Protocol] = dict(_seq2seq.PAPER_PROTOCOLS)
#: protocols that branch from (a)'s step-T1 checkpoint
BRANCHES = ("b", "c")
#: the control of the switch (issue 28): (a) continued from its own step-T1 checkpoint with the smoothing the
#: branches chose (0), so that a gain of (b), (c) over it is the rule's, not the change of smoothing
CONTROLS = {"a0": 0.0}
PROTOCOLS["a0"] = _seq2seq.Protocol("(a0) log → log, smoothing 0 after T1", "logarithmic")
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


def branch_eps(args: argparse.Namespace, protocol: str) -> str | FromJson:
    """The smoothing of a branch's run as its directory and ``--smoothing`` spell it: known (``--smoothing``, or a
    selection already recorded), or the selection's choice, read from its record once ``select PROTOCOL`` has run
    (a dry run shows :data:`PENDING`)."""
    eps = protocol_eps(args, protocol)
    if eps is not None:
        return _eps_name(eps)
    path = selection_path(args, protocol)
    return FromJson(
        path, ("chosen",), PENDING, "{:g}", missing=f"the smoothing of ({protocol}) has not been selected ({path})"
    )


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


def branch_dir(args: argparse.Namespace, seed: int, protocol: str) -> str | Text:
    """The directory of a branch's run with its :func:`branch_eps`: late-bound (:class:`_runner.Text`) while the
    selection has not chosen."""
    eps = branch_eps(args, protocol)
    if isinstance(eps, str):
        return grid_dir(args, seed, protocol, eps)
    return Text((grid_dir(args, seed, protocol, ""), eps))


def run_dir(args: argparse.Namespace, seed: int, protocol: str) -> str | None:
    """The run of a seed and protocol that the report counts: ``WORK/seedS/a``, or the branch with its
    smoothing (``None`` while the selection has not chosen it)."""
    if protocol not in BRANCHES and protocol not in CONTROLS:
        return _runner.run_dir(args.work_dir, seed, protocol)
    eps = protocol_eps(args, protocol)
    return None if eps is None else grid_dir(args, seed, protocol, eps)


def train_argv(
    args: argparse.Namespace, seed: int, protocol: str, eps: float | str | FromJson, output_dir: str | Text
) -> list[Arg]:
    """``properlm train`` of one seed and protocol with score smoothing ``eps`` (a placeholder while it is not
    chosen) into ``output_dir`` (``--resume`` is the runner's)."""
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
    return _seq2seq.seq2seq_train_argv(
        args,
        seed,
        PROTOCOLS[protocol].schedule(args.t1, args.t2),
        data,
        output_dir,
        eval_batch_size=64,
        smoothing=eps if isinstance(eps, FromJson) else _eps_name(eps),
    )


def a_branch(args: argparse.Namespace, seed: int) -> Branch:
    """A branch's start: (a)'s step-T1 checkpoint of the same seed."""
    return Branch(_runner.run_dir(args.work_dir, seed, "a"), args.t1, hint=": protocol a must save a checkpoint at T1")


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


def write_heldout(args: argparse.Namespace) -> bool:
    """Write the selection slice to ``WORK/heldout.jsonl`` (``document``, ``summary``) unless it exists (an
    action step: returns whether it wrote it)."""
    path = heldout_path(args)
    if os.path.isfile(path):
        print(f"[skip] heldout slice: {path} exists", flush=True)
        return False
    if args.dry_run:
        print(
            f"[dry-run] heldout slice: write {path} (the held-out {args.heldout_fraction:g} of train.jsonl, "
            "split seed 0, less documents also in the training part)",
            flush=True,
        )
        return False
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
    return True


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


def select_smoothing(args: argparse.Namespace, protocol: str, seed: int) -> bool:
    """Choose a branch's smoothing from its candidates' held-out decodings (:func:`choose_smoothing`
    of :data:`SELECTION_METRIC`) and record it in ``WORK/selection_PROTOCOL.json``, unless recorded (an action
    step: returns whether it chose)."""
    path = selection_path(args, protocol)
    if os.path.isfile(path):
        print(f"[skip] select {protocol}: {path} exists (smoothing {_runner.read_json(path)['chosen']:g})", flush=True)
        return False
    grid = ", ".join(map(_eps_name, args.smoothing_grid))
    if args.dry_run:
        print(
            f"[dry-run] select {protocol}: choose the smoothing of ({protocol}) from {grid}, seed {seed}, by the "
            f"{SELECTION_METRIC} -> {path}; the other seeds' ({protocol}) use it ({PENDING} below)",
            flush=True,
        )
        return False
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
    return True


def split_file(args: argparse.Namespace, split: str) -> str:
    if split == "dev":
        return os.path.join(args.data_dir, "dev.jsonl")
    return heldout_path(args) if split == HELDOUT else args.tests[split]


def eval_argv(
    args: argparse.Namespace, model: str | Text, data_file: str, objective: str, out: str | Text
) -> list[Arg]:
    """``properlm evaluate``: teacher-forced scores of every rule and ECE, then beam search with
    ``objective`` and ROUGE (the truncation is the training run's, read from the model directory); ``model`` and
    ``out`` are late-bound in a branch whose smoothing is not chosen yet."""
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


def evaluations(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(split, beam objective) pairs every final model is decoded with."""
    return [("dev", o) for o in OBJECTIVES] + [(name, "logarithmic") for name in args.tests]


def _train(
    args: argparse.Namespace,
    seed: int,
    protocol: str,
    name: str,
    label: str,
    eps: float | str | FromJson,
    run: str | Text,
    deps: tuple[str, ...],
) -> Step:
    """The training step of one run: a root run (a) from scratch, a branch or control from (a)'s step-T1 checkpoint."""
    root = protocol not in BRANCHES and protocol not in CONTROLS
    return Step(
        name,
        "train",
        run,
        train_argv(args, seed, protocol, eps, run),
        label=label,
        arm=protocol,
        seed=seed,
        deps=deps,
        train_steps=args.t1 + args.t2 if root else args.t2,
        resume=RESUME_IF_CHECKPOINT,
        branch=None if root else a_branch(args, seed),
    )


def _decodings(
    args: argparse.Namespace, seed: int, protocol: str, run: str | Text, deps: tuple[str, ...]
) -> list[Step]:
    """The decodings of a run's final model (:func:`evaluations`), each after ``deps``."""
    steps = []
    for split, objective in evaluations(args):
        d = path_join(run, eval_name(split, objective))
        steps.append(
            Step(
                f"eval {seed}{protocol} {split} {objective}",
                "eval",
                d,
                eval_argv(args, path_join(run, "final"), split_file(args, split), objective, d),
                label=f"seed {seed} {protocol} {split} beam-{objective}",
                arm=protocol,
                seed=seed,
                split=split,
                deps=deps,
            )
        )
    return steps


def _selection(args: argparse.Namespace, seed: int, protocol: str) -> list[Step]:
    """The smoothing selection of a branch on the first seed: one candidate branch per eps of the grid, each
    decoded on the held-out slice, then the choice (``select PROTOCOL``, an action)."""
    steps, decoded = [], []
    for eps in args.smoothing_grid:
        run = grid_dir(args, seed, protocol, eps)
        cand = f"train {seed}{protocol} eps{_eps_name(eps)}"
        steps.append(
            _train(
                args,
                seed,
                protocol,
                cand,
                f"seed {seed} {PROTOCOLS[protocol].label} train, smoothing {_eps_name(eps)} (selection)",
                eps,
                run,
                (f"train {seed}a",),
            )
        )
        d = os.path.join(run, eval_name(HELDOUT, "logarithmic"))
        decoded.append(f"{HELDOUT} {seed}{protocol} eps{_eps_name(eps)}")
        steps.append(
            Step(
                decoded[-1],
                HELDOUT,
                d,
                eval_argv(args, os.path.join(run, "final"), heldout_path(args), "logarithmic", d),
                label=f"seed {seed} {protocol} smoothing {_eps_name(eps)} {HELDOUT} beam-logarithmic",
                arm=protocol,
                seed=seed,
                split=HELDOUT,
                deps=(cand, "heldout slice"),
            )
        )
    steps.append(
        Step(
            f"select {protocol}",
            ACTION,
            arm=protocol,
            seed=seed,
            deps=tuple(decoded),
            action=functools.partial(select_smoothing, args, protocol, seed),
        )
    )
    return steps


def plan(args: argparse.Namespace) -> list[Step]:
    """Every training and evaluation step, in priority order: every seed's (a) first (the longest
    runs, which the rest waits for: with ``--jobs 2`` the last (a) then trains beside the selection),
    then seed by seed (a)'s decodings and the branches; with the selection, the first seed's
    candidate branches and their held-out decodings, then the choice (``select b``, ``select c``),
    which the branches' runs and decodings wait for; each evaluation after its training.

    The directory of a branch's run is late-bound (:func:`branch_dir`) while its smoothing is not chosen: the
    first seed's run is the chosen candidate, and the other seeds' runs are made with the chosen eps."""
    steps: list[Step] = []
    select = selecting(args)
    if select:
        steps.append(Step("heldout slice", ACTION, action=functools.partial(write_heldout, args)))
    for seed in args.seed_list:
        for protocol in args.protocol_list:
            label = PROTOCOLS[protocol].label
            train = f"train {seed}{protocol}"
            if protocol in CONTROLS:  # from (a)'s checkpoint at T1 with a fixed smoothing: no selection
                eps = CONTROLS[protocol]
                run = grid_dir(args, seed, protocol, eps)
                steps.append(
                    _train(args, seed, protocol, train, f"seed {seed} {label} train", eps, run, (f"train {seed}a",))
                )
                steps += _decodings(args, seed, protocol, run, (train,))
                continue
            if protocol not in BRANCHES:
                run = _runner.run_dir(args.work_dir, seed, protocol)
                steps.append(
                    _train(args, seed, protocol, train, f"seed {seed} {label} train", args.smoothing_a, run, ())
                )
                steps += _decodings(args, seed, protocol, run, (train,))
                if any(p in BRANCHES or p in CONTROLS for p in args.protocol_list):
                    d = os.path.join(run, f"eval_dev_checkpoint_{args.t1}")
                    steps.append(
                        Step(
                            f"checkpoint {seed}{protocol}",
                            "checkpoint",
                            d,
                            eval_argv(
                                args,
                                os.path.join(run, f"checkpoint-{args.t1}"),
                                split_file(args, "dev"),
                                "logarithmic",
                                d,
                            ),
                            label=f"seed {seed} {label[:3]} checkpoint-{args.t1} dev beam-logarithmic",
                            arm=protocol,
                            seed=seed,
                            split="dev",
                            deps=(train,),
                        )
                    )
                continue
            branch_run = branch_dir(args, seed, protocol)
            if select and seed == args.seed_list[0]:
                selection = _selection(args, seed, protocol)
                steps += selection
                # the chosen candidate is this seed's run: its decodings need its weights too, not only the record
                # of the choice, which cuts the lineage for --archive (_archive.ArchivedStep)
                candidates = tuple(s.name for s in selection if s.kind == "train")
                steps += _decodings(args, seed, protocol, branch_run, (f"select {protocol}", *candidates))
                continue
            deps = (f"train {seed}a", *((f"select {protocol}",) if select else ()))
            steps.append(
                _train(
                    args,
                    seed,
                    protocol,
                    train,
                    f"seed {seed} {label} train",
                    branch_eps(args, protocol),
                    branch_run,
                    deps,
                )
            )
            steps += _decodings(args, seed, protocol, branch_run, (train,))
    roots = {
        f"train {seed}{p}"
        for seed in args.seed_list
        for p in args.protocol_list
        if p not in BRANCHES and p not in CONTROLS
    }
    return sorted(steps, key=lambda s: s.name not in roots)  # stable: otherwise the order above
