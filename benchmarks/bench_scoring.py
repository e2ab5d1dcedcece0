"""Scoring throughput on CPU: our scorer against a naive loop, and Ray Data against a bare loop.

    python benchmarks/bench_scoring.py --json out/bench_scoring.json [--quick] [--check]

Data: the demo corpus through the real `prepare` stage (prompt and response lengths vary).
Models: Llama-style, hidden 256, 4 layers, seeded random init (a forward costs the same
whatever the weights), with the tiny preset's BPE tokenizer (2048 ids) and two LM heads:
`vocab32000` (a LLaMA-2-sized head; rows past the tokenizer are never targets, as in models
whose embedding is padded past their tokenizer) and `vocab2048` (the preset itself).
`vocab32000` is the headline model: its head costs what a real tokenizer's does.

- ours: `Scorer` (rows sorted by length, token-budget micro-batches, chunked target-only NLL),
  `rows_per_batch` rows per call, in-process, all cores.
- naive: dataset order, fixed batches of `--naive-batch-size` rows padded to the longest, full
  logits and a full `log_softmax`, gather, mean over response tokens; in-process, all cores.
- ray_data: the `score` stage end to end for one checkpoint (actor start-up, model load, read,
  score, write), `score.num_actors` actors sharing the cores.
- bare_loop: the same `Scorer` class in this process with all cores, model load included.
  `ray_data_over_bare_loop` compares the rates after each side's first scored batch (a lower
  bound for Ray): the throughput once running, as `torchtrainer_over_torchrun` compares step
  times. The fixed start-up (actor processes importing torch and loading the model, Ray Data
  planning; seconds, whatever the corpus size) is reported beside it, and
  `ray_data_over_bare_loop_end_to_end` includes it.

Throughput is real (unpadded) tokens per wall second. Ours and naive alternate slice by slice
and Ray Data and the bare loop run back to back, so a shared machine's bursts hit both sides;
ratios are per repeat, reported as median, min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import GOALS, machine_info, stats

from sftmix_ray.config import Config, load_config
from sftmix_ray.layout import RunDir
from sftmix_ray.modeling import build_tiny_model, load_model, load_tokenizer
from sftmix_ray.pipeline import run_stage
from sftmix_ray.scorer import Scorer, rows_per_batch
from sftmix_ray.scoring import run_score

RATIOS = ("scoring_speedup_over_naive", "ray_data_over_bare_loop")
TARGETS = {key: GOALS[key].target for key in RATIOS}
BARS = {key: GOALS[key].bar for key in RATIOS}
HEADLINE, OTHER = "vocab32000", "vocab2048"
IGNORE = -100


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Wall seconds of `fn(*args)` and its result."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def naive_nll(model: torch.nn.Module, table: pa.Table, batch_size: int) -> np.ndarray:
    """Mean response NLL per row: fixed batches in dataset order, full logits and log-softmax."""
    ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    out = []
    for start in range(0, len(ids), batch_size):
        rows = range(start, min(start + batch_size, len(ids)))
        width = max(len(ids[r]) for r in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            x[j, : len(ids[r])], y[j, : len(ids[r])] = torch.tensor(ids[r]), torch.tensor(labels[r])
            mask[j, : len(ids[r])] = 1
        with torch.inference_mode():
            logits = model(input_ids=x, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target, valid = y[:, 1:], y[:, 1:] != IGNORE
            token_nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
            out.append((token_nll.sum(1) / valid.sum(1)).double().numpy())
    return np.concatenate(out)


def ours_vs_naive(
    scorer: Scorer, model: torch.nn.Module, table: pa.Table, batch_rows: int, naive_batch: int
) -> tuple[float, float, float]:
    """Seconds of ours and of naive over the table, alternating per slice; max |NLL diff|."""
    t_ours = t_naive = diff = 0.0
    for offset in range(0, table.num_rows, batch_rows):
        part = table.slice(offset, batch_rows)
        dt_ours, ours = timed(scorer, part)
        dt_naive, naive = timed(naive_nll, model, part, naive_batch)
        t_ours, t_naive = t_ours + dt_ours, t_naive + dt_naive
        diff = max(diff, float(np.max(np.abs(ours.column("nll").to_numpy() - naive))))
    return t_ours, t_naive, diff


def bare_loop(checkpoint: Path, cfg: Config, table: pa.Table, batch_rows: int, threads: int):
    """The stage's scorer in a plain loop, model load included; seconds to the first batch."""
    start = time.perf_counter()
    scorer = Scorer(str(checkpoint), batch_tokens=cfg.score.batch_tokens,
                    chunk_size=cfg.score.chunk_size, num_threads=threads)  # fmt: skip
    first = 0.0
    for offset in range(0, table.num_rows, batch_rows):
        scorer(table.slice(offset, batch_rows))
        first = first or time.perf_counter() - start
    return first


def setup(work: Path, rows: int, cores: int, actors: int) -> tuple[Config, dict[str, Path]]:
    """Prepare the demo corpus; the vocab-32000 model is the stage's one reference checkpoint."""
    cfg = load_config(
        None,
        [
            f"data.demo_train_size={rows}", "data.demo_eval_size=0", "data.max_length=256",
            "model.tiny_hidden_size=256", "model.tiny_num_layers=4", "model.tiny_vocab_size=2048",
            f"ray.num_cpus={cores}", f"score.num_actors={actors}", "score.batch_tokens=4096",
        ],
    )  # fmt: skip
    import ray

    # A fresh local cluster, even when another is running on this machine (`ray start`).
    ray.init(address="local", num_cpus=cores, include_dashboard=False, configure_logging=False)
    run_stage("prepare", cfg, work)
    tokenizer = load_tokenizer(str(work / "base_model"))
    big = build_tiny_model(cfg.model, 32000, tokenizer.pad_token_id, tokenizer.eos_token_id)
    models = {HEADLINE: work / "reference" / "checkpoint-0", OTHER: work / "base_model"}
    big.save_pretrained(models[HEADLINE], safe_serialization=True)
    tokenizer.save_pretrained(models[HEADLINE])
    return cfg, models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="2000 rows (~2 min on 2 idle cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-batch-size", type=int, default=16)
    parser.add_argument("--check", action="store_true", help="exit 1 if a bar is missed")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    cores, actors = os.cpu_count() or 2, 2
    # Ray Data vs the bare loop scores the whole corpus; ours vs naive its first rows (naive is
    # slow with a 32000-row head, and the comparison needs no more).
    rows, compare_rows = (2000, 300) if args.quick else (6000, 1000)
    torch.set_num_threads(cores)
    tps: dict[str, list[float]] = {}
    ratio: dict[str, list[float]] = {}
    startup: dict[str, list[float]] = {"ray_data_first_batch": [], "bare_loop_first_batch": []}
    diffs: list[float] = []

    def record(name: str, value: float, into: dict[str, list[float]]) -> None:
        into.setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory(prefix="bench_scoring_") as tmp:
        work = Path(tmp)
        cfg, models = setup(work, rows, cores, actors)
        table = pq.read_table(work / "data").sort_by("example_id")
        subset = table.slice(0, compare_rows)
        lengths = np.array([len(x) for x in table.column("input_ids").to_pylist()])
        tokens, subset_tokens = int(lengths.sum()), int(lengths[:compare_rows].sum())
        response = sum(int((np.array(x[1:]) != IGNORE).sum()) for x in table["labels"].to_pylist())
        batch_rows = rows_per_batch(table.num_rows, actors)  # as the stage calls the scorer
        pairs = {}
        for name, path in models.items():
            scorer = Scorer(str(path), batch_tokens=cfg.score.batch_tokens,
                            chunk_size=cfg.score.chunk_size, num_threads=cores)  # fmt: skip
            pairs[name] = (scorer, load_model(str(path)).eval())
            ours_vs_naive(*pairs[name], table.slice(0, 48), batch_rows, 16)  # warm-up

        for repeat in range(args.repeats):
            line = [f"repeat {repeat}:"]
            for name, (scorer, model) in pairs.items():
                t_ours, t_naive, diff = ours_vs_naive(
                    scorer, model, subset, batch_rows, args.naive_batch_size
                )
                diffs.append(diff)
                record(f"ours@{name}", subset_tokens / t_ours, tps)
                record(f"naive@{name}", subset_tokens / t_naive, tps)
                record(f"scoring_speedup_over_naive@{name}", t_naive / t_ours, ratio)
                line.append(f"{name} ours/naive x{t_naive / t_ours:.2f};")
            print(" ".join(line), flush=True)
        del pairs
        for repeat in range(args.repeats):
            shutil.rmtree(RunDir(work).scores_dir, ignore_errors=True)
            shutil.rmtree(RunDir(work).checkpoint_scores_dir, ignore_errors=True)
            t_ray, summary = timed(run_score, cfg, work)
            t_bare, first = timed(bare_loop, models[HEADLINE], cfg, table, batch_rows, cores)
            startup["ray_data_first_batch"].append(summary["passes"][0]["first_batch_s"])
            startup["bare_loop_first_batch"].append(first)
            record("ray_data", tokens / t_ray, tps)
            record("bare_loop", tokens / t_bare, tps)
            record("ray_data_over_bare_loop_end_to_end", t_bare / t_ray, ratio)
            # After start-up: tokens after the first batch over time after it. Ray's other actors
            # may have finished a batch by then too; counting them as done makes this a lower
            # bound for Ray.
            call_tokens = tokens * batch_rows / table.num_rows
            ray_rest = (tokens - actors * call_tokens) / (
                t_ray - startup["ray_data_first_batch"][-1]
            )
            bare_rest = (tokens - call_tokens) / (t_bare - first)
            record("ray_data_over_bare_loop", ray_rest / bare_rest, ratio)
            print(
                f"repeat {repeat}: ray_data/bare_loop x{ray_rest / bare_rest:.2f} after start-up, "
                f"x{t_bare / t_ray:.2f} end to end",
                flush=True,
            )

    ratios = {key: stats(values) for key, values in ratio.items()}
    ratios["scoring_speedup_over_naive"] = ratios[f"scoring_speedup_over_naive@{HEADLINE}"]
    met = {key: ratios[key]["median"] >= bound for key, bound in TARGETS.items()}
    bars = {key: ratios[key]["median"] >= bound for key, bound in BARS.items()}
    result = {
        "benchmark": "bench_scoring",
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": {**machine_info(), "load_average_at_end": os.getloadavg()},
        "config": {
            "device": "cpu",
            "dtype": "float32",
            "rows": int(table.num_rows),
            "tokens": tokens,
            "ours_vs_naive_rows": compare_rows,
            "ours_vs_naive_tokens": subset_tokens,
            "response_tokens": response,
            "length_min_median_max": [
                int(lengths.min()),
                int(np.median(lengths)),
                int(lengths.max()),
            ],
            "hidden_size": 256,
            "num_layers": 4,
            "models": list(models),
            "headline": HEADLINE,
            "batch_tokens": cfg.score.batch_tokens,
            "chunk_size": cfg.score.chunk_size,
            "rows_per_batch": batch_rows,
            "naive_batch_size": args.naive_batch_size,
            "in_process_threads": cores,
            "ray_actors": actors,
            "repeats": args.repeats,
            "quick": args.quick,
        },
        "tokens_per_s": {key: stats(values) for key, values in tps.items()},
        "startup_s": {key: stats(values) for key, values in startup.items()},
        "max_abs_nll_diff_ours_vs_naive": max(diffs),
        "ratios": ratios,
        "targets": {key: f">= {bound}" for key, bound in TARGETS.items()},
        "targets_met": met,
        "bars": {key: f">= {bound}" for key, bound in BARS.items()},
        "bars_met": bars,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    brief = {key: round(value["median"], 3) for key, value in ratios.items()}
    print(json.dumps({"ratios_median": brief, "targets_met": met}, indent=2))
    return 1 if args.check and not all(bars.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
