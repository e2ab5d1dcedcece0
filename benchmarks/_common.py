"""Helpers shared by the benchmarks: statistics, machine facts, targets and bars, the model."""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Measure = Callable[[str, "int | None"], dict[str, dict[str, Any]]]

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


GOALS = {
    "sftmix_over_ntp_step_time": Goal("<=", 1.05, 1.10),
    "fused_ntp_peak_mem_over_naive": Goal("<=", 0.25, 0.30),
    "mixup_loss_peak_mem_over_fused_ntp": Goal("<=", 1.05, 1.10),
    "scoring_speedup_over_naive": Goal(">=", 2.0, 1.5),
    "ray_data_over_bare_loop": Goal(">=", 0.95, 0.85),
    "torchtrainer_over_torchrun": Goal("<=", 1.03, 1.10),
    "sharded_load_peak_rss_over_full": Goal("<=", 0.6, 0.8),
    "ray_data_over_bare_loop_end_to_end": Goal(">=", 0.8, 0.7),
    "prepare_driver_rss_4x_over_1x": Goal("<=", 1.2, 1.3),
    "padding_efficiency": Goal(">=", 0.9, 0.85),
    "render_300_turns_limited_over_full": Goal("<=", 0.2, 0.5),
}


def seeded_llama(
    vocab: int, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int, seq_len: int
) -> Any:
    """A seeded (torch seed 0) Llama-style causal LM with an untied LM head, SDPA attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def measured_ratio(name: str, runs: list[float], settings: dict, details: dict) -> dict:
    """One ratio as a `measure` function returns it to benchmarks/run.py."""
    return {name: {"runs": runs, "settings": settings, "details": details}}


def single_benchmark_main(
    benchmark: str, ratio: str, measure: Measure, description: str, argv: list[str] | None
) -> int:
    """The command line of a benchmark that measures one ratio of benchmarks/run.py:
    `--json OUT [--full] [--repeats N]`; writes the measurement with the machine and stats."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--full", dest="mode", action="store_const", const="full", default="quick")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    measured = measure(args.mode, args.repeats)
    result = {"benchmark": benchmark, "machine": machine_info(), **measured}
    result["stats"] = stats(measured[ratio]["runs"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["stats"]))
    return 0
