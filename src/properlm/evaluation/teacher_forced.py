"""The teacher-forced pass: the reference targets scored by the model, batch by batch.

:func:`teacher_forced_metrics` tokenises the examples as for training and feeds the logits of each batch to a
:class:`~properlm.evaluation.metrics.MetricsAccumulator` and to any other consumer (a
:class:`~properlm.evaluation.temperature.TemperatureScan`, a second accumulator at another temperature).

Decoder-only models: only the scored positions reach the output head. The prompt of an instruction
example is most of its tokens (here 70 of 90), and ``(batch, length, V)`` logits at V = 128k-256k
are gigabytes; a forward pre-hook on the output embedding (``model.get_output_embeddings()``) hands
it the final hidden states of the positions whose next token is scored, ``(1, N, H)``, so the model
returns ``(1, N, V)`` logits through its own head and head transform (soft-capping, logit scaling),
the same values as those positions of the full logits. Models whose head the hook does not see get
the full logits, indexed afterwards. :class:`ScoredHiddenStates` keeps those hidden states, so that
the metrics at a second temperature (the fitted one) cost the head alone, not another forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ScoredHiddenStates", "teacher_forced_metrics"]


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False)


class ScoredRowsHook:
    """Forward pre-hook on the output head: its input ``(B, T, H)`` becomes the armed rows ``(1, N, H)``.

    The rows are those of the armed ``mask (B, T)``; only the first call after arming (the call of the pass).
    Registered on ``head`` by :func:`capture_scored_rows`.
    """

    def __init__(self, head: nn.Module) -> None:
        self.head = head
        self.mask: Tensor | None = None
        self.hidden: Tensor | None = None

    def arm(self, mask: Tensor) -> None:
        self.mask, self.hidden = mask, None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        mask, self.mask = self.mask, None
        if mask is None or not args:
            return None
        h = args[0]
        if not (isinstance(h, Tensor) and h.dim() == 3 and tuple(h.shape[:2]) == tuple(mask.shape)):
            return None  # not the (batch, time, hidden) input of the pass: left alone
        self.hidden = h[mask]
        return (self.hidden.unsqueeze(0), *args[1:])

    def rows(self, logits: Tensor, where: str) -> Tensor | None:
        """The logits ``(N, V)`` of the armed rows from the pass's ``logits (1, N, V)``.

        ``None`` when the head never saw the hook (``logits`` are then the full ``(B, T, V)``); disarms.
        """
        self.mask = None
        if self.hidden is None:
            return None
        n = int(self.hidden.shape[0])
        if tuple(logits.shape[:2]) != (1, n):
            raise RuntimeError(
                f"{where}: the model returned logits of shape {tuple(logits.shape)} from {n} "
                f"scored positions; expected (1, {n}, V)"
            )
        return logits[0]


@contextmanager
def capture_scored_rows(model: nn.Module, seq2seq: bool) -> Iterator[ScoredRowsHook | None]:
    """A :class:`ScoredRowsHook` on the output head of a decoder-only ``model`` while the block runs.

    ``None`` for encoder-decoder models and models without an output embedding (full logits then).
    """
    head = None if seq2seq else find_output_head(model)
    if head is None:
        yield None
        return
    hook = ScoredRowsHook(head)
    handle = head.register_forward_pre_hook(hook)
    try:
        yield hook
    finally:
        handle.remove()


class ScoredHiddenStates:
    """The final hidden states of the scored positions of a teacher-forced pass, and the head.

    Decoder-only models; batch by batch with their labels, and the output head that turns them into
    logits. Filled by :func:`teacher_forced_metrics` (``hidden_store=``); :meth:`metrics` then scores the same
    positions at any temperature through the head alone: ``z = g(head(h))``, ``g`` the model's head
    transform (soft-cap ``c tanh(s z / c)``, logit scale ``s``; read off the config as the fused loss
    reads it, :mod:`properlm.integrations.transformers.heads`). ``complete`` says whether every batch
    of the pass was kept; it is ``False`` when the head never saw the hook (the pass then indexed
    full logits), when the model is encoder-decoder, when the head transform cannot be expressed,
    or when the states would exceed ``max_bytes`` (default 1 GiB; they are then dropped).
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = int(max_bytes)
        self.batches: list[tuple[Tensor, Tensor]] = []
        self.head: nn.Module | None = None
        self.softcap: float | None = None
        self.logit_scale: float | None = None
        self.complete = False
        self.reason: str | None = "not filled"
        self._bytes = 0

    def _start(self, head: nn.Module, model: nn.Module) -> bool:
        from ..integrations.transformers.heads import head_transform

        self.batches, self._bytes, self.head = [], 0, head
        try:
            self.softcap, self.logit_scale = head_transform(model)
        except ValueError as exc:
            return self._drop(f"head transform: {exc}")
        self.complete, self.reason = True, None
        return True

    def _drop(self, reason: str) -> bool:
        self.batches, self._bytes, self.complete, self.reason = [], 0, False, reason
        return False

    def _add(self, hidden: Tensor, labels: Tensor) -> None:
        if not self.complete:
            return
        self._bytes += hidden.numel() * hidden.element_size() + labels.numel() * labels.element_size()
        if self._bytes > self.max_bytes:
            self._drop(f"over max_bytes = {self.max_bytes}")
            return
        self.batches.append((hidden.detach(), labels))

    @property
    def num_tokens(self) -> int:
        """Scored positions kept."""
        return sum(int(y.numel()) for _, y in self.batches)

    def logits(self, hidden: Tensor) -> Tensor:
        """``g(head(hidden))``: the logits ``(N, V)`` of hidden states ``(N, H)``, as the model forms them."""
        from ..stats import head_transform_

        if self.head is None:
            raise RuntimeError("ScoredHiddenStates.logits: no head (the store was never filled)")
        z = self.head(hidden.unsqueeze(0))[0]  # the head sees the (1, N, H) input of the pass
        if self.softcap is not None or self.logit_scale is not None:
            z = head_transform_(z, self.softcap, self.logit_scale)
        return z

    def metrics(
        self, rules: Sequence[str], *, temperature: float = 1.0, num_bins: int = 15, ignore_index: int = -100
    ) -> Any:
        """The :class:`~properlm.evaluation.metrics.EvalMetrics` of the kept positions at ``temperature``.

        The same as a teacher-forced pass at that temperature; ``RuntimeError`` when not ``complete``.
        """
        from .metrics import MetricsAccumulator

        if not self.complete:
            raise RuntimeError(f"ScoredHiddenStates.metrics: the store is not complete ({self.reason})")
        acc = MetricsAccumulator(rules, num_bins=num_bins, temperature=temperature, ignore_index=ignore_index)
        with torch.no_grad():
            for h, y in self.batches:
                acc.update(self.logits(h), y)
        return acc.compute()


def find_output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


def teacher_forced_metrics(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    rules: Sequence[str],
    *,
    max_length: int = 512,
    batch_size: int = 8,
    num_bins: int = 15,
    progress: bool = False,
    temperature: float = 1.0,
    scan: Any = None,
    max_source_length: int | None = None,
    extra_consumers: Sequence[Any] = (),
    hidden_store: ScoredHiddenStates | None = None,
) -> Any:
    """Score the reference targets of ``examples`` under teacher forcing.

    Examples are tokenised as for training (:func:`properlm.data.tokenize_example`, with
    ``max_length`` and ``max_source_length``: prompt positions labelled -100), batched
    (longest first), and the logits of each batch's scored positions fed to
    a :class:`~properlm.evaluation.metrics.MetricsAccumulator` (with ``temperature``), and to ``scan`` (a
    :class:`~properlm.evaluation.temperature.TemperatureScan`, unscaled logits) when given, and to each of
    ``extra_consumers`` (objects with ``update(logits, labels)``, e.g. a second accumulator at another
    temperature). Decoder-only models form logits only at the scored positions (see the module
    docstring); ``hidden_store`` (a :class:`ScoredHiddenStates`) then keeps their hidden states for
    scoring at another temperature without a second forward pass. Returns the accumulator's
    :class:`~properlm.evaluation.metrics.EvalMetrics`.
    """
    from ..data import DataCollator, tokenize_example
    from ..models import is_seq2seq
    from .metrics import MetricsAccumulator

    seq2seq = is_seq2seq(model)
    device = next(model.parameters()).device
    features = [
        tokenize_example(e, tokenizer, seq2seq=seq2seq, max_length=max_length, max_source_length=max_source_length)
        for e in examples
    ]
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = DataCollator(pad_token_id=int(pad))
    acc = MetricsAccumulator(rules, num_bins=num_bins, temperature=temperature)
    consumers = [acc, *([] if scan is None else [scan]), *extra_consumers]
    was_training = model.training
    model.eval()
    bar = progress_bar(len(features), "teacher-forced", progress)
    try:
        with torch.no_grad(), capture_scored_rows(model, seq2seq) as hook:
            store = hidden_store
            if store is not None:
                if hook is None:
                    store._drop("encoder-decoder model" if seq2seq else "no output embedding")
                    store = None
                elif not store._start(hook.head, model):
                    store = None
            for start in range(0, len(order), batch_size):
                batch = collate([features[i] for i in order[start : start + batch_size]])
                batch = {k: v.to(device) for k, v in batch.items()}
                if seq2seq:
                    logits = model(**batch).logits
                    labels = batch["labels"]
                else:
                    # position t predicts token t+1: shift the labels, not the (large) logits
                    labels = torch.full_like(batch["labels"], -100)
                    labels[:, :-1] = batch["labels"][:, 1:]
                    scored = labels != -100
                    if hook is not None:
                        hook.arm(scored)
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    rows = None if hook is None else hook.rows(logits, "teacher_forced_metrics")
                    if rows is not None and hook is not None and hook.hidden is not None:
                        logits, labels = rows, labels[scored]
                        if store is not None:
                            store._add(hook.hidden, labels)
                    elif store is not None:  # the head never saw the hook: full logits
                        store._drop("the output head did not see the scored-rows hook")
                        store = None
                for consumer in consumers:
                    consumer.update(logits, labels)
                bar.update(len(batch["input_ids"]))
    finally:
        bar.close()
        model.train(was_training)
    return acc.compute()
