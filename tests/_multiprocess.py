"""Shared driver of the multi-process tests (``test_distributed``, ``test_dtensor``, ``test_fsdp2``).

:func:`run_ranks` spawns ``world`` CPU processes joined in a gloo process group (a file store in
the test's ``tmp_path``); each runs ``body(chk, rank)`` and records its :class:`Checker`'s failures
and check count in ``rank{r}.json`` instead of raising, so a failing comparison never leaves a rank
waiting in a collective. The test then asserts on what the ranks recorded.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class Checker:
    """Records failed checks (``failures``) and counts every check (``count``) without raising."""

    def __init__(self, rtol: float = 1e-5, float64: bool = False) -> None:
        self.failures: list[str] = []
        self.count = 0
        self.rtol = rtol
        self.float64 = float64

    def close(self, what: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None) -> None:
        """``|actual - expected| <= rtol * (|expected| + max|expected|)`` elementwise (in float64 when the
        checker is made with ``float64=True``): relative to the entry, with a floor relative to the
        tensor's scale (gradient entries that are differences of O(max) terms, such as the target's,
        carry float32 rounding of that size)."""
        self.count += 1
        rtol = self.rtol if rtol is None else rtol
        if self.float64:
            actual, expected = actual.detach().double(), expected.detach().double()
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        try:
            torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)
        except AssertionError as exc:
            self.failures.append(f"{what}: {exc}")

    def true(self, what: str, ok: bool) -> None:
        self.count += 1
        if not ok:
            self.failures.append(what)

    def raises(self, what: str, fn: Callable[[], object], match: str) -> None:
        """``fn()`` raises a ``ValueError`` whose message contains ``match``."""
        self.count += 1
        try:
            fn()
        except ValueError as exc:
            if match not in str(exc):
                self.failures.append(f"{what}: ValueError without {match!r}: {exc}")
            return
        except Exception as exc:
            self.failures.append(f"{what}: expected ValueError, got {type(exc).__name__}: {exc}")
            return
        self.failures.append(f"{what}: no ValueError")


def _rank_main(
    rank: int,
    body: Callable[[Checker, int], None],
    world: int,
    chk: Checker,
    timeout: timedelta,
    init_file: str,
    out_dir: str,
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    try:
        body(chk, rank)
        dist.barrier()
    except Exception:
        chk.failures.append(f"rank {rank}: " + traceback.format_exc())
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"failures": chk.failures, "count": chk.count}))
        dist.destroy_process_group()


def run_ranks(
    tmp_path: Path,
    body: Callable[[Checker, int], None],
    world: int,
    *,
    checker: Checker | None = None,
    timeout_s: float = 60.0,
) -> tuple[list[str], list[int]]:
    """Run ``body(chk, rank)`` on every rank of a gloo group of ``world`` spawned processes (one
    thread each), then a barrier; returns every rank's failures (in rank order) and each rank's
    number of checks. ``body`` must be a module-level function (the processes are spawned);
    ``checker`` (a fresh :class:`Checker` by default) is each rank's starting copy."""
    mp.spawn(
        _rank_main,
        args=(body, world, checker or Checker(), timedelta(seconds=timeout_s), str(tmp_path / "store"), str(tmp_path)),
        nprocs=world,
        join=True,
    )
    failures: list[str] = []
    counts: list[int] = []
    for rank in range(world):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        failures += result["failures"]
        counts.append(result["count"])
    return failures, counts
