"""The seq2seq studies' protocols, training command and study (``reproduce_mt.py``, ``reproduce_summ.py``): a protocol
as data (:class:`Protocol`, :data:`PAPER_PROTOCOLS`, :func:`protocols_help`), the ``properlm train`` command of a
Transformer encoder-decoder from scratch (:func:`seq2seq_train_argv`) and the study that
:func:`_runner.run_study` runs from a script's functions (:class:`Seq2SeqStudy`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import _runner
from _runner import Arg, Step, Text

__all__ = ["PAPER_PROTOCOLS", "Protocol", "Seq2SeqStudy", "protocols_help", "seq2seq_train_argv"]


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


# ------------------------------------------------------------------------------ the training command


def seq2seq_train_argv(
    args: Any,
    seed: int,
    schedule: str,
    data: Sequence[str],
    output_dir: str | Text,
    *,
    eval_batch_size: int,
    smoothing: Arg | None = None,
) -> list[Arg]:
    """``properlm train`` of a Transformer encoder-decoder from scratch (``--init tiny-seq2seq``).

    Model (``vocab_size``, ``hidden_size``, ``num_layers``, ``num_heads``, ``ffn_size``, ``dropout``)
    and optimisation (``smoothing``, ``batch_size``, ``learning_rate``, ``warmup_steps``,
    ``eval_every``, ``save_every``) come from ``args``; ``data`` are the data options (files and
    lengths), ``schedule`` the rule schedule (``--schedule``). AdamW(0.9, 0.98), linear warm-up
    then inverse-sqrt decay, batches grouped by length. ``smoothing`` (default ``args.smoothing``) may be a
    placeholder, ``output_dir`` a late-bound path (:class:`Text`); ``--resume`` is the runner's
    (:attr:`Step.resume`).
    """
    argv: list[Arg] = [
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
        str(args.smoothing) if smoothing is None else smoothing,
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
    return argv


# ------------------------------------------------------------------------------ the study


class Seq2SeqStudy(_runner.Study):
    """A seq2seq study for :func:`_runner.run_study`, made of its script's functions of the parsed ``args``:
    ``checks`` (each fails on a bad argument or an existing work directory's other settings, and records them),
    ``plan`` (the steps) and ``report`` (``report(args, wall_seconds)`` writes ``report_files`` and returns the
    markdown). ``files``: the work-level records of the archive (:attr:`_runner.Study.files`)."""

    def __init__(
        self,
        args: argparse.Namespace,
        *,
        checks: Sequence[Callable[[argparse.Namespace], None]],
        plan: Callable[[argparse.Namespace], list[Step]],
        report: Callable[[argparse.Namespace, float | None], str],
        report_files: tuple[str, ...],
        files: tuple[str, ...] = (),
    ) -> None:
        super().__init__(args)
        self._checks = tuple(checks)
        self._plan = plan
        self._report = report
        self.report_files = report_files
        self.files = files

    def setup(self) -> dict[str, float]:
        for check in self._checks:
            check(self.args)
        return {}

    def plan(self) -> list[Step]:
        return self._plan(self.args)

    def report(self, steps: Sequence[Step], timings: _runner.Timings, wall_seconds: float | None) -> str:
        return self._report(self.args, wall_seconds)
