"""The batch plan: deterministic, worker-count invariant, every row once per pass, and, with
length grouping, the same pairs in batches of similar length (far less padding)."""

from __future__ import annotations

import numpy as np
import pytest

from sftmix_ray.train.sampling import BatchPlan, _perm, padding_efficiency


def _lengths(n: int, seed: int) -> np.ndarray:
    """A heavy-tailed token-length mix like a ShareGPT dump cut at 1024 tokens."""
    rng = np.random.default_rng(seed)
    return np.minimum(1024, np.maximum(8, rng.lognormal(5.0, 1.0, n).astype(np.int64)))


def _step_rows(plan: BatchPlan, step: int) -> list[tuple[int, ...]]:
    """Every (row per stream) unit of one optimizer step over all ranks and micro-batches."""
    units = []
    for micro in range(plan.grad_accum):
        for rank in range(plan.world_size):
            per_stream = plan.rows(step, micro, rank)
            units.extend(zip(*per_stream))
    return units


def _plan(sizes, world, accum, grouped, per_device=8, window=16) -> BatchPlan:
    """`grouped`: None (no grouping), "pairs" or "rows"."""
    lengths = tuple(_lengths(n, k) for k, n in enumerate(sizes)) if grouped else None
    return BatchPlan(sizes=sizes, rows_per_device=per_device, world_size=world, grad_accum=accum,
                     seed=3, lengths=lengths, window_steps=window,
                     group=grouped or "pairs")  # fmt: skip


@pytest.mark.parametrize("grouped", [None, "pairs", "rows"])
def test_a_step_holds_the_same_pairs_whatever_the_worker_count(grouped):
    sizes = (700, 500)
    layouts = [(1, 8, 8), (2, 4, 8), (4, 2, 8), (8, 1, 8), (4, 1, 16)]  # world, accum, rows
    plans = [_plan(sizes, w, a, grouped, per_device=r) for w, a, r in layouts]
    for step in (0, 1, 15, 16, 40):
        units = [sorted(_step_rows(p, step)) for p in plans]
        assert all(u == units[0] for u in units[1:]), step
        assert len(units[0]) == 32


def test_ungrouped_plan_is_the_seeded_permutation_per_pass():
    plan = _plan((10, 7), 1, 1, grouped=None, per_device=4)
    # positions 0, 1 at step 0; a pass over the 7-row stream ends at position 7
    first, second = _perm(10, 3, 0, 0), _perm(7, 3, 1, 0)
    assert plan.rows(0, 0, 0) == [first[:2].tolist(), second[:2].tolist()]
    assert plan.rows(3, 0, 0)[1][1] == int(_perm(7, 3, 1, 1)[0])


@pytest.mark.parametrize("grouped", [None, "pairs", "rows"])
def test_every_row_of_the_larger_stream_once_per_pass(grouped):
    sizes = (512, 384)
    plan = _plan(sizes, 2, 2, grouped, window=4)  # 16 positions per step, windows of 64
    steps = 512 // plan.global_per_stream
    units = [u for step in range(steps) for u in _step_rows(plan, step)]
    assert sorted(u[0] for u in units) == list(range(512))
    assert sorted(u[1] for u in units[:384]) == list(range(384))


def test_grouping_keeps_the_random_pairs_and_cuts_padding():
    sizes = (4096, 4096)
    plans = {g: _plan(sizes, 4, 2, g) for g in ("pairs", "rows")}
    plans["plain"] = _plan(sizes, 4, 2, None)
    window = plans["pairs"].window_steps
    lengths = plans["pairs"].lengths
    assert lengths is not None

    def units(plan: BatchPlan) -> list[tuple[int, ...]]:
        return sorted(u for step in range(window) for u in _step_rows(plan, step))

    # `pairs`: the same random (confident, unconfident) pairs in a window, in another order.
    assert units(plans["plain"]) == units(plans["pairs"])
    efficiency = {name: padding_efficiency(p, lengths, window) for name, p in plans.items()}
    # The bound for random pairs: each pair's shorter row padded to its partner.
    pairs = units(plans["plain"])
    longer = sum(max(lengths[0][a], lengths[1][b]) for a, b in pairs)
    shorter = sum(min(lengths[0][a], lengths[1][b]) for a, b in pairs)
    bound = (longer + shorter) / (2 * longer)
    assert efficiency["plain"] < 0.45 and bound * 0.95 < efficiency["pairs"] <= bound
    assert efficiency["rows"] > 0.85, efficiency
    # Batches within a window come in shuffled order, not longest first.
    grouped = plans["pairs"]
    longest = [
        max(int(lengths[k][r]) for k, part in enumerate(grouped.rows(s, 0, 0)) for r in part)
        for s in range(window)
    ]
    assert longest != sorted(longest, reverse=True)
