"""Every benchmark ratio in one run: each measured side by side, judged against target and bar.

    python benchmarks/run.py --quick --json benchmarks/results/run_quick.json [--check]
    python benchmarks/run.py --full --json benchmarks/results/run_full.json
    python benchmarks/run.py --quick --only sftmix_over_ntp_step_time --json out.json

Ratios (each a median over repeats, with min, max and the runs):

- `sftmix_over_ntp_step_time`: one training step, SFTMix over NTP (`step_time.py`);
- `fused_ntp_peak_mem_over_naive`, `mixup_loss_peak_mem_over_fused_ntp`: peak tensor memory of
  the chunked losses (`bench_losses.py`, vocabulary 32000);
- `scoring_speedup_over_naive`, `ray_data_over_bare_loop`: scoring throughput
  (`bench_scoring.py`; Ray Data's rate once running, its start-up and the end-to-end ratio in
  `details`);
- `torchtrainer_over_torchrun`: median DDP step time under Ray Train against torchrun
  (`trainer_overhead.py`);
- `sharded_load_peak_rss_over_full`: host memory of building the FSDP2-sharded model on a
  rank other than 0, meta device + rank 0's rows over every rank loading the whole checkpoint
  (`sharded_load.py`, 2 gloo processes, a 1 GB fp32 model);
- `ray_data_over_bare_loop_end_to_end`: the `score` stage (one actor pool for all checkpoints)
  against a bare in-process loop, wall time over 20k rows x 3 checkpoints (`scoring_e2e.py`);
- `prepare_driver_rss_4x_over_1x`: peak RSS of the `prepare` driver on a ShareGPT-like corpus 4
  times over against once (`prepare_scale.py`; rows/s in `details`);
- `padding_efficiency`: real over padded tokens in one epoch of length-grouped training batches
  of that corpus (`prepare_scale.py`; each grouping mode in `details`);
- `render_300_turns_limited_over_full`: time to tokenize a 300-turn conversation at
  `data.max_length` 2048, spans stopped at the limit over all spans computed
  (`render_turns.py`; ms per row at 4, 100 and 300 turns in `details`).

`--quick` takes about 3.5 minutes on 2 idle cores. The JSON holds the machine, the load average
before and after, every ratio's settings, target, bar and whether it passes; `--check` exits 1
when a ratio misses its bar (or fails to run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import GOALS, load_average, machine_info, stats

Measured = dict[str, dict[str, Any]]  # ratio name -> {"runs", "settings", "details"}


def measure_losses(mode: str, repeats: int | None) -> Measured:
    """Peak tensor memory of naive NTP, chunked NTP and the Mixup loss on one batch each, at the
    product's chunking (`train.loss_chunk_mb`'s default byte budget): 4 rows x 1024 tokens at
    vocabulary 32000, and in `--full` also the 8B recipes' 4 x 2048 at 128256."""
    from bench_losses import mixup_step, ntp_steps, peak_tensor_bytes

    from sftmix_ray.loss_kernels import DEFAULT_CHUNK_MB, chunk_positions

    rows, length, hidden = 4, 1025, 256  # rows * (length - 1) = 4096 positions
    shapes = [(rows, length, 32000)] + ([] if mode == "quick" else [(4, 2049, 128256)])
    repeats = repeats or (2 if mode == "quick" else 3)
    chunks = {vocab: chunk_positions(0, DEFAULT_CHUNK_MB, vocab) for _, _, vocab in shapes}
    settings = {
        "positions": rows * (length - 1),
        "hidden_size": hidden,
        "chunk_mb": DEFAULT_CHUNK_MB,
        "chunk_positions": chunks,
        "vocab": 32000,
        "repeats": repeats,
        "dtype": "float32",
        "memory": "peak live tensor bytes in forward+backward (dispatch-mode tracker)",
    }
    peak: dict[str, list[int]] = {}
    for n_rows, n_length, vocab in shapes:
        for name, step in ntp_steps(n_rows, n_length, hidden, vocab, chunks[vocab]).items():
            peak[f"{name}_ntp@{vocab}"] = [peak_tensor_bytes(step) for _ in range(repeats)]
    # `rows` pairs mix as many positions as NTP over `rows` rows scores.
    mix = mixup_step(rows, length, hidden, 32000, chunks[32000])
    peak["mixup_loss@32000"] = [peak_tensor_bytes(mix) for _ in range(repeats)]

    def ratio(top: str, bottom: str) -> list[float]:
        return [a / b for a, b in zip(peak[top], peak[bottom])]

    details = {"peak_bytes": peak}
    if mode != "quick":
        details["fused_ntp_peak_mem_over_naive@128256_4x2048"] = stats(
            ratio("fused_ntp@128256", "naive_ntp@128256")
        )
    return {
        "fused_ntp_peak_mem_over_naive": {
            "runs": ratio("fused_ntp@32000", "naive_ntp@32000"),
            "settings": settings,
            "details": details,
        },
        "mixup_loss_peak_mem_over_fused_ntp": {
            "runs": ratio("mixup_loss@32000", "fused_ntp@32000"),
            "settings": {**settings, "pairs": rows},
            "details": {"peak_bytes": {k: v for k, v in peak.items() if "@32000" in k}},
        },
    }


def measure_scoring(mode: str, repeats: int | None) -> Measured:
    """`bench_scoring`'s own run (same data, models and method); its JSON, regrouped."""
    import ray
    from bench_scoring import main as bench_scoring

    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        out = Path(tmp) / "scoring.json"
        argv = ["--json", str(out), "--repeats", str(repeats or 3)]
        argv += ["--quick"] if mode == "quick" else []
        try:
            bench_scoring(argv)
        finally:
            ray.shutdown()
        result = json.loads(out.read_text())
    ratios, settings = result["ratios"], result["config"]
    return {
        "scoring_speedup_over_naive": {
            "runs": ratios["scoring_speedup_over_naive"]["runs"],
            "settings": settings,
            "details": {
                "same_at_vocab2048": ratios["scoring_speedup_over_naive@vocab2048"],
                "tokens_per_s": result["tokens_per_s"],
                "max_abs_nll_diff_ours_vs_naive": result["max_abs_nll_diff_ours_vs_naive"],
            },
        },
        "ray_data_over_bare_loop": {
            "runs": ratios["ray_data_over_bare_loop"]["runs"],
            "settings": settings,
            "details": {
                "what": "throughput after each side's first scored batch (lower bound for Ray)",
                "end_to_end": ratios["ray_data_over_bare_loop_end_to_end"],
                "startup_s": result["startup_s"],
                "rows": settings["rows"],
            },
        },
    }


def measure_step_time(mode: str, repeats: int | None) -> Measured:
    from step_time import measure

    return measure(mode, repeats)


def measure_trainer(mode: str, repeats: int | None) -> Measured:
    from trainer_overhead import measure

    return measure(mode, repeats)


def measure_sharded_load(mode: str, repeats: int | None) -> Measured:
    from sharded_load import measure

    return measure(mode, repeats)


def measure_scoring_e2e(mode: str, repeats: int | None) -> Measured:
    from scoring_e2e import measure

    return measure(mode, repeats)


def measure_prepare(mode: str, repeats: int | None) -> Measured:
    from prepare_scale import measure

    return measure(mode, repeats)


def measure_render(mode: str, repeats: int | None) -> Measured:
    from render_turns import measure

    return measure(mode, repeats)


GROUPS: dict[str, tuple[Callable[[str, int | None], Measured], tuple[str, ...]]] = {
    "losses": (
        measure_losses,
        ("fused_ntp_peak_mem_over_naive", "mixup_loss_peak_mem_over_fused_ntp"),
    ),
    "step_time": (measure_step_time, ("sftmix_over_ntp_step_time",)),
    "scoring": (measure_scoring, ("scoring_speedup_over_naive", "ray_data_over_bare_loop")),
    "trainer": (measure_trainer, ("torchtrainer_over_torchrun",)),
    "sharded_load": (measure_sharded_load, ("sharded_load_peak_rss_over_full",)),
    "scoring_e2e": (measure_scoring_e2e, ("ray_data_over_bare_loop_end_to_end",)),
    "prepare": (measure_prepare, ("prepare_driver_rss_4x_over_1x", "padding_efficiency")),
    "render": (measure_render, ("render_300_turns_limited_over_full",)),
}


def judged(name: str, measured: dict[str, Any]) -> dict[str, Any]:
    """A ratio's statistics beside its goal, settings and details."""
    summary = stats(measured["runs"])
    return {
        **summary,
        **GOALS[name].judge(summary["median"]),
        "settings": measured["settings"],
        "details": measured["details"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    for mode, text in (
        ("quick", "small sizes, few repeats (the default; ~3.5 min on 2 idle cores)"),
        ("full", "larger sizes, more repeats"),
    ):
        size.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode, help=text)
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--only", default="", help="comma-separated ratio names to run")
    parser.add_argument("--repeats", type=int, help="override every measurement's repeats")
    parser.add_argument("--check", action="store_true", help="exit 1 if a ratio misses its bar")
    args = parser.parse_args(argv)
    args.mode = args.mode or "quick"
    args.only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(args.only) - set(GOALS))
    if unknown:
        parser.error(f"unknown ratio(s) {', '.join(unknown)}; choose from {', '.join(GOALS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "run",
        "command": " ".join(["benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "mode": args.mode,
        "repeats_override": args.repeats,
        "machine": {**machine_info(), "load_average_before": load_average()},
        "ratios": {},
        "errors": {},
    }
    for group, (measure, names) in GROUPS.items():
        if args.only and not set(names) & set(args.only):
            continue
        print(f"== {group}", flush=True)
        group_start = time.perf_counter()
        try:
            for name, measured in measure(args.mode, args.repeats).items():
                if not args.only or name in args.only:
                    result["ratios"][name] = judged(name, measured)
        except Exception:  # one broken measurement must not hide the others
            traceback.print_exc()
            result["errors"][group] = traceback.format_exc(limit=5)
        result.setdefault("group_wall_s", {})[group] = round(time.perf_counter() - group_start, 1)
    result["machine"]["load_average_after"] = load_average()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    ratios = result["ratios"]
    result["passed"] = not result["errors"] and all(r["passes_bar"] for r in ratios.values())
    result["targets_met"] = all(r["meets_target"] for r in ratios.values())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")

    for name, r in ratios.items():
        verdict = "ok" if r["meets_target"] else ("bar ok" if r["passes_bar"] else "MISSED BAR")
        theory = r["details"].get("theoretical_flop_ratio")
        beside = f"  [theoretical FLOP ratio {theory:.3f}]" if theory else ""
        print(f"{name:38s} {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})  "
              f"target {r['target']}, bar {r['bar']}: {verdict}{beside}")  # fmt: skip
    for group in result["errors"]:
        print(f"{group}: FAILED (traceback in the JSON)")
    print(f"wall {result['wall_s']} s; load average {result['machine']['load_average_before']}"
          f" -> {result['machine']['load_average_after']}; wrote {args.json}")  # fmt: skip
    return 1 if args.check and not result["passed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
