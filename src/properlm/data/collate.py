"""Batching: :class:`DataCollator` pads tokenised examples into ``torch.long`` tensors (right padding)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .tokenization import IGNORE_INDEX

__all__ = ["DataCollator"]


@dataclass
class DataCollator:
    """Pad a list of tokenised examples into a batch (right padding).

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels``
    with ``-100``; for seq2seq examples the labels are padded to their own length. Returns
    ``torch.long`` tensors of shape ``(batch, time)``.
    """

    pad_token_id: int
    label_pad_token_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None

    def _pad(self, rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, r in enumerate(rows):
            if len(r):
                out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        return out

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a batch of tokenised examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        batch = {"input_ids": self._pad([f["input_ids"] for f in features], self.pad_token_id)}
        if "attention_mask" in features[0]:
            batch["attention_mask"] = self._pad([f["attention_mask"] for f in features], 0)
        else:
            batch["attention_mask"] = self._pad([[1] * len(f["input_ids"]) for f in features], 0)
        if "labels" in features[0]:
            batch["labels"] = self._pad([f["labels"] for f in features], self.label_pad_token_id)
        return batch
