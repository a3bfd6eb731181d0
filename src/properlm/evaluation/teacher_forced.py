"""The teacher-forced pass: the reference targets scored by the model, batch by batch.

:func:`teacher_forced_metrics` tokenises the examples as for training and feeds the logits of each batch to a
:class:`~properlm.evaluation.metrics.MetricsAccumulator` and to any other consumer (a
:class:`~properlm.evaluation.temperature.TemperatureScan`, a second accumulator at another temperature).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["teacher_forced_metrics"]

def _tqdm(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False)


def teacher_forced_metrics(model: Any, tokenizer: Any, examples: Sequence[Any], rules: Sequence[str], *,
                           max_length: int = 512, batch_size: int = 8, num_bins: int = 15,
                           progress: bool = False, temperature: float = 1.0, scan: Any = None,
                           max_source_length: int | None = None, extra_consumers: Sequence[Any] = ()) -> Any:
    """Score the reference targets of ``examples`` under teacher forcing.

    Examples are tokenised as for training (:func:`properlm.data.tokenize_example`, with
    ``max_length`` and ``max_source_length``: prompt positions labelled -100), batched
    (longest first), and the logits of each batch fed to
    a :class:`~properlm.metrics.MetricsAccumulator` (with ``temperature``), and to ``scan`` (a
    :class:`~properlm.metrics.TemperatureScan`, unscaled logits) when given, and to each of
    ``extra_consumers`` (objects with ``update(logits, labels)``, e.g. a second accumulator at another
    temperature). Returns the accumulator's :class:`~properlm.metrics.EvalMetrics`.
    """
    import torch

    from ..data import DataCollator, tokenize_example
    from ..modeling import is_seq2seq
    from .metrics import MetricsAccumulator

    seq2seq = is_seq2seq(model)
    device = next(model.parameters()).device
    features = [tokenize_example(e, tokenizer, seq2seq=seq2seq, max_length=max_length,
                                 max_source_length=max_source_length) for e in examples]
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = DataCollator(pad_token_id=int(pad))
    acc = MetricsAccumulator(rules, num_bins=num_bins, temperature=temperature)
    consumers = [acc, *([] if scan is None else [scan]), *extra_consumers]
    was_training = model.training
    model.eval()
    bar = _tqdm(len(features), "teacher-forced", progress)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = collate([features[i] for i in order[start:start + batch_size]])
                batch = {k: v.to(device) for k, v in batch.items()}
                if seq2seq:
                    logits = model(**batch).logits
                    labels = batch["labels"]
                else:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    # position t predicts token t+1: shift the labels, not the (large) logits
                    labels = torch.full_like(batch["labels"], -100)
                    labels[:, :-1] = batch["labels"][:, 1:]
                for consumer in consumers:
                    consumer.update(logits, labels)
                bar.update(len(batch["input_ids"]))
    finally:
        bar.close()
        model.train(was_training)
    return acc.compute()
