"""Peak tensor memory and time of the chunked losses against full-logits baselines, on CPU.

    python benchmarks/bench_losses.py --json out/bench_losses.json [--quick] [--check]

Memory is the peak of live tensor bytes allocated during one forward+backward (inputs and the
LM head's weight excluded, its gradient included), measured by a `TorchDispatchMode` that
follows every tensor storage created under it until it is freed (the method of PyTorch's
`torch.distributed._tools.mem_tracker`); it sees the tensors, not Python's heap (what
`tracemalloc` sees) nor allocator caching (what RSS sees). Time is the wall time of one
forward+backward: median, min and max over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info

from sftmix_ray.losses import NTPLoss, chunked_soft_ce, sftmix_mixup_loss

Step = Callable[[], None]
TARGETS = {
    "fused_ntp_peak_mem_over_naive@32000": ("<=", 0.30),
    "mixup_loss_peak_mem_over_fused_ntp": ("<=", 1.10),
    "single_pass_over_two_ce_time": ("<", 1.0),
}


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while active (views counted once, freed on GC)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, nbytes: int, _ref: object) -> None:
        self.current -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._live:
            return
        nbytes = storage.nbytes()
        # The storage's Python object lives as long as the memory, so its weakref callback
        # marks the moment the memory is freed.
        self._live[storage] = weakref.ref(storage, partial(self._free, nbytes))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and item.device.type != "meta":
                self._track(item)
        return out


def peak_tensor_bytes(step: Step) -> int:
    """Peak bytes of tensors allocated while `step` runs."""
    tracker = PeakTensorBytes()
    with tracker:
        step()
    return tracker.peak


def timings(step: Step, repeats: int) -> dict[str, float]:
    """Median, min and max wall seconds of `repeats` calls of `step`."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def make_head(vocab: int, hidden: int) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(hidden, vocab, bias=False)


def ntp_steps(rows: int, length: int, hidden: int, vocab: int, chunk: int) -> dict[str, Step]:
    """Naive (full logits, F.cross_entropy) and fused (NTPLoss) forward+backward on one batch."""
    head = make_head(vocab, hidden)
    g = torch.Generator().manual_seed(1)
    states = torch.randn(rows, length, hidden, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    fused = NTPLoss(chunk_size=chunk)

    def reset() -> None:
        states.grad, head.weight.grad = None, None

    def naive() -> None:
        reset()
        logits = head(states[:, :-1]).float()
        loss = F.cross_entropy(logits.reshape(-1, vocab), labels[:, 1:].reshape(-1))
        loss.backward()

    def chunked() -> None:
        reset()
        loss, _ = fused(states, labels, head)
        loss.backward()

    return {"naive": naive, "fused": chunked}


def mixup_step(rows: int, length: int, hidden: int, vocab: int, chunk: int) -> Step:
    """`L_mix` forward+backward over `rows` pairs: as many positions as NTP over `rows` rows."""
    head = make_head(vocab, hidden)
    g = torch.Generator().manual_seed(2)
    h_conf = torch.randn(rows, length, hidden, generator=g).requires_grad_()
    h_unconf = torch.randn(rows, length, hidden, generator=g).requires_grad_()
    y_conf = torch.randint(0, vocab, (rows, length), generator=g)
    y_unconf = torch.randint(0, vocab, (rows, length), generator=g)
    lam = torch.rand(rows, generator=g)

    def step() -> None:
        h_conf.grad, h_unconf.grad, head.weight.grad = None, None, None
        loss = sftmix_mixup_loss(h_conf, h_unconf, y_conf, y_unconf, head, lam, chunk_size=chunk)
        loss.backward()

    return step


def two_target_steps(positions: int, hidden: int, vocab: int, chunk: int) -> dict[str, Step]:
    """One pass with K=2 targets (one lse) against two K=1 passes (two lse, two logits)."""
    head = make_head(vocab, hidden)
    g = torch.Generator().manual_seed(3)
    states = torch.randn(positions, hidden, generator=g).requires_grad_()
    targets = torch.randint(0, vocab, (positions, 2), generator=g)
    weights = torch.rand(positions, 2, generator=g)

    def single() -> None:
        states.grad, head.weight.grad = None, None
        chunked_soft_ce(states, head, targets, weights, chunk).sum().backward()

    def two() -> None:
        states.grad, head.weight.grad = None, None
        first = chunked_soft_ce(states, head, targets[:, :1], weights[:, :1], chunk)
        second = chunked_soft_ce(states, head, targets[:, 1:], weights[:, 1:], chunk)
        (first + second).sum().backward()

    return {"single_pass": single, "two_calls": two}


def measure(step: Step, repeats: int) -> dict[str, object]:
    """Peak tensor memory of one call (which also warms up), then timed repeats."""
    return {"peak_mem_bytes": peak_tensor_bytes(step), "time_s": timings(step, repeats)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, fewer positions")
    parser.add_argument("--chunk-size", type=int, default=256, help="positions per chunk")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)

    hidden = 256
    rows, length = (2, 513) if args.quick else (4, 513)  # positions = rows * (length - 1)
    repeats = 2 if args.quick else 5
    positions = rows * (length - 1)
    chunk = args.chunk_size
    cases: dict[str, dict[str, object]] = {}

    for vocab in (32000, 128256):
        steps = ntp_steps(rows, length, hidden, vocab, chunk)
        for name, step in steps.items():
            cases[f"{name}_ntp@{vocab}"] = {"vocab": vocab, **measure(step, repeats)}
            print(f"{name}_ntp@{vocab}: {cases[f'{name}_ntp@{vocab}']}", flush=True)
    vocab = 32000
    # Mixup over `rows` pairs has as many positions as fused NTP over `rows` rows above.
    cases[f"mixup_loss@{vocab}"] = {
        "vocab": vocab,
        **measure(mixup_step(rows, length, hidden, vocab, chunk), repeats),
    }
    for name, step in two_target_steps(positions, hidden, vocab, chunk).items():
        cases[f"{name}@{vocab}"] = {"vocab": vocab, **measure(step, repeats)}

    def mem(name: str) -> float:
        return float(cases[name]["peak_mem_bytes"])  # type: ignore[arg-type]

    def med(name: str) -> float:
        return float(cases[name]["time_s"]["median"])  # type: ignore[index]

    ratios = {
        "fused_ntp_peak_mem_over_naive": {
            str(v): mem(f"fused_ntp@{v}") / mem(f"naive_ntp@{v}") for v in (32000, 128256)
        },
        "fused_ntp_time_over_naive": {
            str(v): med(f"fused_ntp@{v}") / med(f"naive_ntp@{v}") for v in (32000, 128256)
        },
        "mixup_loss_peak_mem_over_fused_ntp": mem("mixup_loss@32000") / mem("fused_ntp@32000"),
        "mixup_loss_time_over_fused_ntp": med("mixup_loss@32000") / med("fused_ntp@32000"),
        "single_pass_over_two_ce_time": med("single_pass@32000") / med("two_calls@32000"),
        "single_pass_over_two_ce_peak_mem": mem("single_pass@32000") / mem("two_calls@32000"),
    }
    flat = {
        "fused_ntp_peak_mem_over_naive@32000": ratios["fused_ntp_peak_mem_over_naive"]["32000"],
        "mixup_loss_peak_mem_over_fused_ntp": ratios["mixup_loss_peak_mem_over_fused_ntp"],
        "single_pass_over_two_ce_time": ratios["single_pass_over_two_ce_time"],
    }
    met = {
        key: (flat[key] <= bound if op == "<=" else flat[key] < bound)
        for key, (op, bound) in TARGETS.items()
    }
    result = {
        "benchmark": "bench_losses",
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine_info(),
        "config": {
            "device": "cpu",
            "dtype": "float32",
            "positions": positions,
            "hidden_size": hidden,
            "chunk_size": chunk,
            "repeats": repeats,
            "quick": args.quick,
            "memory": "peak live tensor bytes during forward+backward (dispatch-mode tracker)",
        },
        "cases": cases,
        "ratios": ratios,
        "targets": {key: f"{op} {bound}" for key, (op, bound) in TARGETS.items()},
        "targets_met": met,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": ratios, "targets_met": met}, indent=2))
    return 1 if args.check and not all(met.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
