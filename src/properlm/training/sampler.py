"""The length-grouped sampler of ``--group-by-length``, a function of ``(seed, epoch)`` so that resuming is exact."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["EpochSeededLengthGroupedSampler"]


class EpochSeededLengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Batches of similar length in an order that depends only on ``(seed, epoch)``.

    The same grouping as ``transformers.trainer_pt_utils.get_length_grouped_indices`` (a random
    permutation cut into mega-batches of up to 50 batches, each sorted by length, the longest batch
    first), with the permutation drawn from ``torch.Generator().manual_seed(seed + epoch)``.
    The Trainer (through accelerate's ``DataLoaderShard.set_epoch``) calls :meth:`set_epoch`
    before each epoch, including the one a resumed run starts in.

    Args:
        batch_size: examples per optimizer step on one process (batch x gradient accumulation).
        lengths: the length of every example, ``len(lengths)`` = dataset size.
        seed: the data seed.
    """

    def __init__(self, batch_size: int, lengths: Sequence[int], seed: int) -> None:
        self.batch_size = int(batch_size)
        self.lengths = list(lengths)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose permutation the next iteration draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
