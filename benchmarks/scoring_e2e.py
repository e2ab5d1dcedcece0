"""The `score` stage end to end against a bare in-process loop, over C checkpoints.

    python benchmarks/scoring_e2e.py --json out.json [--rows 20000] [--checkpoints 3]

The same data and models as `bench_scoring.py` (the demo corpus through `prepare`; a
Llama-style model, hidden 256, 4 layers, a 32000-row LM head), saved as C reference
checkpoints. `ray_data_over_bare_loop_end_to_end` is the bare loop's wall time over the
stage's: the stage (one Ray Data actor pool for all checkpoints: actor start-up, model loads
and swaps, reading, scoring, the exactly-once checks and writes) against one process scoring
every row under every checkpoint with all cores, model loads included. The fixed start-up is
paid once per stage, so the ratio grows with rows x checkpoints.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import measured_ratio, single_benchmark_main
from bench_scoring import HEADLINE, setup

SIZES = {"quick": (20000, 3), "full": (50000, 3)}  # rows, checkpoints


def bare_loop(checkpoints: list[Path], cfg: Any, table: Any, batch_rows: int, threads: int) -> None:
    """Every row under every checkpoint with the stage's `Scorer`, in this process."""
    from sftmix_ray.scorer import Scorer

    scorer = Scorer(str(checkpoints[0]), batch_tokens=cfg.score.batch_tokens,
                    chunk_size=cfg.score.chunk_size, num_threads=threads)  # fmt: skip
    for checkpoint in checkpoints:
        scorer.load(str(checkpoint))
        for offset in range(0, table.num_rows, batch_rows):
            scorer.score(table.slice(offset, batch_rows))


def measure(mode: str, repeats: int | None) -> dict[str, dict[str, Any]]:
    import pyarrow.parquet as pq
    import ray

    from sftmix_ray.layout import RunDir
    from sftmix_ray.scorer import rows_per_batch
    from sftmix_ray.scoring import run_score

    rows, n_checkpoints = SIZES[mode]
    repeats = repeats or 1
    cores, actors = os.cpu_count() or 2, 2
    runs, details = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_scoring_e2e_") as tmp:
            work = Path(tmp)
            cfg, models = setup(work, rows, cores, actors)
            checkpoints = [models[HEADLINE]]
            for k in range(1, n_checkpoints):
                target = work / "reference" / f"checkpoint-{k}"
                shutil.copytree(models[HEADLINE], target)
                checkpoints.append(target)
            table = pq.read_table(work / "data").sort_by("example_id")
            batch_rows = rows_per_batch(table.num_rows, actors)
            for _ in range(repeats):
                shutil.rmtree(RunDir(work).scores_dir, ignore_errors=True)
                shutil.rmtree(RunDir(work).checkpoint_scores_dir, ignore_errors=True)
                start = time.perf_counter()
                summary = run_score(cfg, work)
                t_ray = time.perf_counter() - start
                start = time.perf_counter()
                bare_loop(checkpoints, cfg, table, batch_rows, cores)
                t_bare = time.perf_counter() - start
                runs.append(t_bare / t_ray)
                details.append({"stage_s": round(t_ray, 1), "bare_loop_s": round(t_bare, 1),
                                "first_batch_s": summary["passes"][0]["first_batch_s"],
                                "passes": summary["passes"]})  # fmt: skip
                print(f"stage {t_ray:.1f} s, bare loop {t_bare:.1f} s", flush=True)
    finally:
        ray.shutdown()
    settings = {"rows": rows, "checkpoints": n_checkpoints, "ray_actors": actors,
                "in_process_threads": cores, "repeats": repeats,
                "model": "Llama-style, hidden 256, 4 layers, 32000-row head, fp32"}  # fmt: skip
    return measured_ratio(
        "ray_data_over_bare_loop_end_to_end", runs, settings, {"repeats": details}
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    return single_benchmark_main(
        "scoring_e2e", "ray_data_over_bare_loop_end_to_end", measure, __doc__.splitlines()[0], argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
