"""What a training worker pays to hold the corpus: memory-mapped token rows against Python
lists of every row (the loader before issue 17).

    python benchmarks/token_rows.py --rows 100000 --json out.json

Writes a prepared-corpus-like Parquet directory (`--rows` rows, token lengths log-normal with a
median of ~600 and a cap of 1024, like a ShareGPT dump at `data.max_length` 1024), then, each in
a fresh process, (a) `train.token_rows.open_token_rows` (the first worker of a node: it builds
the node-local cache; a second open maps the built cache) and (b) the old loader: `to_pylist`
of both token columns into one int64 numpy array per row, in example_id order. Per side: wall
seconds until the rows are ready (the part of time-to-first-step that grows with the corpus)
and the process's RSS growth: peak (VmHWM) and, once ready, private (RssAnon) and file-backed
(RssFile: mapped pages touched, shared through the page cache by the workers of a node and
reclaimable). 1M-row figures in `extrapolated_1m` scale linearly with rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info

CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

how, source, cache = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
import pyarrow.parquet as pq  # imports before the baseline
from sftmix_ray.train.token_rows import open_token_rows
before = {k: status(k + ":") for k in ("VmRSS", "RssAnon", "RssFile")}
started = time.perf_counter()
if how == "lists":
    table = pq.read_table(source, columns=["example_id", "input_ids", "labels"])
    ids = table.column("example_id").to_pylist()
    inputs = [np.asarray(x, dtype=np.int64) for x in table.column("input_ids").to_pylist()]
    labels = [np.asarray(x, dtype=np.int64) for x in table.column("labels").to_pylist()]
    del table
    order = np.argsort(np.asarray(ids), kind="stable")
    inputs, labels = [inputs[i] for i in order], [labels[i] for i in order]
    checksum = int(sum(int(inputs[i][0]) for i in range(0, len(inputs), 997)))
else:
    rows = open_token_rows(source, root=cache)
    checksum = int(sum(int(rows.row(i)[0][0]) for i in range(0, len(rows), 997)))
ready = time.perf_counter() - started
grown = {k: status(k + ":") - v for k, v in before.items()}
peak = status("VmHWM:") - before["VmRSS"]
print(json.dumps({"ready_s": ready, "rss_growth": grown["VmRSS"], "anon_growth": grown["RssAnon"],
                  "file_growth": grown["RssFile"], "peak_growth": peak, "checksum": checksum}))
"""


def write_corpus(directory: Path, rows: int, seed: int = 0) -> int:
    """Parquet shards like OUT/data; returns the number of tokens."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    tokens = 0
    ids = rng.permutation(rows)
    for shard, part in enumerate(np.array_split(ids, max(1, rows // 2048))):
        lengths = np.minimum(1024, np.maximum(16, rng.lognormal(6.4, 0.7, len(part)))).astype(int)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = rng.integers(0, 128000, int(offsets[-1]), dtype=np.int32)
        labels = np.where(rng.random(len(values)) < 0.6, values, -100).astype(np.int32)
        table = pa.table({
            "example_id": pa.array(part, pa.int64()),
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
            "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels)),
        })  # fmt: skip
        pq.write_table(table, directory / f"part-{shard:05d}.parquet")
        tokens += int(offsets[-1])
    return tokens


def _run(how: str, source: Path, cache: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, how, str(source), str(cache)],
        capture_output=True, text=True, timeout=3600, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_token_rows_") as tmp:
        work = Path(tmp)
        tokens = write_corpus(work / "data", args.rows)
        results = {
            "mapped_first_open": _run("mapped", work / "data", work / "cache"),
            "mapped_cached": _run("mapped", work / "data", work / "cache"),
            "lists": _run("lists", work / "data", work / "cache"),
        }
        cache_bytes = sum(p.stat().st_size for p in (work / "cache").rglob("*") if p.is_file())
    assert len({r["checksum"] for r in results.values()}) == 1, results
    scale = 1_000_000 / args.rows
    result = {
        "benchmark": "token_rows",
        "machine": machine_info(),
        "rows": args.rows,
        "tokens": tokens,
        "cache_bytes": cache_bytes,
        "results": results,
        "extrapolated_1m": {
            name: {k: r[k] * scale for k in ("ready_s", "peak_growth", "anon_growth")}
            for name, r in results.items()
        },
        "ratios": {
            "mapped_over_lists_peak_rss": results["mapped_first_open"]["peak_growth"]
            / results["lists"]["peak_growth"],
            "mapped_over_lists_ready_s": results["mapped_first_open"]["ready_s"]
            / results["lists"]["ready_s"],
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("rows", "tokens", "ratios")}, indent=1))
    for name, r in results.items():
        print(f"{name:18s} ready {r['ready_s']:7.2f} s  peak +{r['peak_growth'] / 2**20:8.1f} MiB"
              f"  private +{r['anon_growth'] / 2**20:8.1f} MiB"
              f"  file +{r['file_growth'] / 2**20:8.1f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
