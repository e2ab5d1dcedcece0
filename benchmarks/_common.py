"""Helpers shared by the benchmarks: summary statistics, machine facts, targets and bars."""

from __future__ import annotations

import operator
import os
import platform
import statistics
from dataclasses import dataclass
from typing import Any

OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def stats(values: list[float]) -> dict[str, Any]:
    """Median, min, max and the raw values."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": [round(v, 4) for v in values],
    }


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (zeros where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [0.0, 0.0, 0.0]


def machine_info() -> dict[str, Any]:
    """Platform, CPU count and library versions."""
    import ray
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "ray": ray.__version__,
    }


@dataclass(frozen=True)
class Goal:
    """A ratio's target (what we aim for) and bar (below which `--check` fails)."""

    op: str
    target: float
    bar: float

    def judge(self, value: float) -> dict[str, Any]:
        """The goal as text beside whether `value` meets the target and passes the bar."""
        compare = OPS[self.op]
        return {
            "target": f"{self.op} {self.target}",
            "bar": f"{self.op} {self.bar}",
            "meets_target": bool(compare(value, self.target)),
            "passes_bar": bool(compare(value, self.bar)),
        }
