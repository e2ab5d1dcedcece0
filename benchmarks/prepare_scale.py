"""Driver memory and throughput of `sftmix-ray prepare` on a ShareGPT-like corpus and on the
same corpus 4 times over.

    python benchmarks/prepare_scale.py --json out.json          # or through benchmarks/run.py

Each run is a fresh `sftmix-ray prepare` process (its own local Ray, 2 CPUs) on a JSON Lines
corpus from `corpus.py` (multi-turn, heavy-tailed, with real-dump defects), `data.max_length`
1024, reading a tokenizer prepared beforehand (a real model's tokenizer is read, not trained;
the tiny preset trains its own on a bounded sample). Measured per run: the driver's peak RSS
(VmHWM, the process that plans chunks and gathers counts; Ray's own processes are apart) and
rows per second end to end (Ray start-up included). The ratio
`prepare_driver_rss_4x_over_1x` is peak RSS at 4x over 1x: 1.0 when the driver's memory does
not grow with the corpus. Before streaming prepare the driver held the whole corpus (1.25 GB at
121 MB of JSON Lines, 3.46 GB at 4x: a ratio of 2.8, issue 17).

`padding_efficiency` reads the token lengths of the prepared 1x corpus, splits it at random
into two halves (confident, unconfident) and counts real over padded tokens in one epoch of
the training batch plan (8 workers x 8 rows x 2 micro-batches per step, micro-batches padded to
their longest row) with `train.group_by_length` at its default (`pairs`); `details` has `rows`,
`none` and the bound for random pairs (each pair's shorter row padded to its partner).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import measured_ratio, single_benchmark_main, stats
from corpus import sharegpt_like, write_jsonl

ROWS = {"quick": 5000, "full": 20000}
CHILD = """
import json, sys, time
from sftmix_ray.cli import main
started = time.perf_counter()
code = main(sys.argv[1:])
wall = time.perf_counter() - started
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"code": code, "wall_s": wall, "peak_rss": peak}), file=sys.stderr)
"""


def _tokenizer(work: Path) -> Path:
    """The tiny preset (tokenizer + model) trained on the corpus' first 2,000 rows."""
    from sftmix_ray.config import ModelConfig
    from sftmix_ray.modeling import materialize_tiny

    texts = [t["value"] for r in sharegpt_like(2000) for t in r["conversations"]]
    return materialize_tiny(ModelConfig(tiny_vocab_size=2048), texts, work / "base_model")


def _prepare(corpus: Path, model: Path, out: Path) -> dict[str, Any]:
    argv = [
        "prepare", "--output-dir", str(out), f"--set=data.path={corpus}",
        "--set=data.max_length=1024", f"--set=model.name_or_path={model}", "--set=ray.num_cpus=2",
    ]  # fmt: skip
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env, timeout=1800
    )
    record = json.loads(proc.stderr.strip().splitlines()[-1])
    if record["code"] != 0:
        raise RuntimeError(f"prepare failed: {proc.stderr[-2000:]}")
    train = json.loads((out / "summary.json").read_text())["stages"]["prepare"]["train"]
    return {**record, "rows": train["input"], "rows_per_s": train["input"] / record["wall_s"],
            "written": train["written"], "repairs": train["repairs"]}  # fmt: skip


def padding(data_dir: Path) -> dict[str, float]:
    """Padding efficiency of one epoch per `train.group_by_length` mode (and the pair bound)."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from sftmix_ray.train.sampling import BatchPlan, padding_efficiency

    table = pq.read_table(data_dir, columns=["input_ids"])
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy().astype(np.int64)
    halves = np.random.default_rng(0).permutation(len(lengths))
    half = len(lengths) // 2
    streams = (lengths[halves[:half]], lengths[halves[half : 2 * half]])
    result = {}
    for name in ("pairs", "rows", "none"):
        plan = BatchPlan(sizes=(half, half), rows_per_device=8, world_size=8, grad_accum=2,
                         seed=0, lengths=None if name == "none" else streams,
                         group="rows" if name == "rows" else "pairs")  # fmt: skip
        result[name] = padding_efficiency(plan, streams, plan.steps_per_epoch())
    longer, shorter = np.maximum(*streams), np.minimum(*streams)
    result["random_pair_bound"] = float((longer + shorter).sum() / (2 * longer.sum()))
    result["n_rows"], result["tokens_p50"] = half * 2, float(np.median(lengths))
    result["at_max_length"] = float((lengths >= 1024).mean())
    return result


def measure(mode: str, repeats: int | None) -> dict[str, dict[str, Any]]:
    """`prepare_driver_rss_4x_over_1x`, `repeats` times (1x and 4x alternate)."""
    rows = ROWS[mode]
    repeats = repeats or (1 if mode == "quick" else 2)
    runs, details, pads = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        work = Path(tmp)
        model = _tokenizer(work)
        sizes = {k: write_jsonl(work / f"{k}x.jsonl", rows, copies=k) for k in (1, 4)}
        for repeat in range(repeats):
            one = _prepare(work / "1x.jsonl", model, work / f"out-1x-{repeat}")
            four = _prepare(work / "4x.jsonl", model, work / f"out-4x-{repeat}")
            runs.append(four["peak_rss"] / one["peak_rss"])
            details.append({"1x": one, "4x": four})
            pads.append(padding(work / f"out-1x-{repeat}" / "data"))
    settings = {
        "rows_1x": rows,
        "bytes": sizes,
        "format": "sharegpt JSON Lines (benchmarks/corpus.py)",
        "max_length": 1024,
        "ray_cpus": 2,
        "repeats": repeats,
        "memory": "driver peak RSS (VmHWM) of a fresh `sftmix-ray prepare` process",
    }
    padding_settings = {
        "corpus": "the prepared 1x corpus, split at random into two halves",
        "plan": "8 workers x 8 rows x 2 micro-batches, one epoch",
        "group_by_length": "pairs (the default)",
    }
    rate = stats([d["4x"]["rows_per_s"] for d in details])
    return {
        **measured_ratio(
            "padding_efficiency", [p["pairs"] for p in pads], padding_settings, {"modes": pads}
        ),
        **measured_ratio(
            "prepare_driver_rss_4x_over_1x",
            runs,
            settings,
            {"rows_per_s_4x": rate, "repeats": details},
        ),
    }


def main(argv: list[str] | None = None) -> int:
    return single_benchmark_main(
        "prepare_scale", "prepare_driver_rss_4x_over_1x", measure, __doc__.splitlines()[0], argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
