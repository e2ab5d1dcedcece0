"""Deterministic global batches: the same examples at step s whatever the worker count.

Like torch's DistributedSampler, every worker computes the same seeded plan and takes its own
slice, so every worker runs the same number of steps (no collective hangs), a run with 2
workers sees the same global batch as a run with 1, and resuming at step k is exact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


def _cycled_index(n: int, position: int, seed: int, stream: int) -> int:
    """Row of a stream at a global position: a fresh seeded permutation per pass (epoch)."""
    cycle, offset = divmod(position, n)
    perm = _perm(n, seed, stream, cycle)
    return int(perm[offset])


@functools.lru_cache(maxsize=8)
def _perm(n: int, seed: int, stream: int, cycle: int) -> np.ndarray:
    """The permutation of one pass over a stream (read-only: it is shared between calls)."""
    perm = np.random.default_rng([seed, stream, cycle]).permutation(n)
    perm.setflags(write=False)
    return perm


@dataclass(frozen=True)
class BatchPlan:
    """Which rows each (step, micro-batch, rank) trains on.

    `sizes` holds one row count per stream: one stream (the whole corpus) for NTP and random
    pairing, two (confident, unconfident) for SFTMix. A micro-batch of `rows_per_device` rows
    takes an equal share from each stream; with two streams row i of the first half is paired
    with row i of the second.
    """

    sizes: tuple[int, ...]
    rows_per_device: int
    world_size: int
    grad_accum: int
    seed: int

    def __post_init__(self) -> None:
        if self.rows_per_device % len(self.sizes):
            raise ValueError(
                f"train.per_device_train_batch_size={self.rows_per_device} must be divisible by "
                f"{len(self.sizes)} (equal confident and unconfident halves)"
            )
        if min(self.sizes) < 1:
            raise ValueError(f"every stream needs at least one example, got sizes {self.sizes}")

    @property
    def per_stream(self) -> int:
        """Rows per stream in one micro-batch on one device."""
        return self.rows_per_device // len(self.sizes)

    @property
    def pairs_per_device(self) -> int:
        """Mixup pairs in one micro-batch on one device: row i of the first half with row i of
        the second (confident with unconfident, or two uniform draws for random pairing)."""
        return self.rows_per_device // 2

    @property
    def global_pairs(self) -> int:
        """Mixup pairs in one optimizer step across all devices and micro-batches."""
        return self.pairs_per_device * self.world_size * self.grad_accum

    @property
    def global_per_stream(self) -> int:
        """Rows per stream in one optimizer step across all devices and micro-batches."""
        return self.per_stream * self.world_size * self.grad_accum

    def steps_per_epoch(self) -> int:
        """Optimizer steps for one pass over the largest stream (smaller ones cycle)."""
        return max(1, max(self.sizes) // self.global_per_stream)

    def rows(self, step: int, micro: int, rank: int) -> list[list[int]]:
        """Row indices per stream for one micro-batch of one rank at optimizer step `step`."""
        start = step * self.global_per_stream + (micro * self.world_size + rank) * self.per_stream
        return [
            [_cycled_index(n, start + j, self.seed, stream) for j in range(self.per_stream)]
            for stream, n in enumerate(self.sizes)
        ]


def total_steps(plan: BatchPlan, num_train_epochs: float, max_steps: int) -> int:
    """Optimizer steps of a run: `max_steps` when positive, else epochs x steps per epoch."""
    if max_steps > 0:
        return max_steps
    return max(1, int(num_train_epochs * plan.steps_per_epoch()))
