"""Order bias of confidence: does an example's confidence depend on when the reference run
first saw it?

    python benchmarks/order_bias.py --json benchmarks/results/order_bias.json

For each placement of the C reference checkpoints (`reference.checkpoints_at`: `even` over one
epoch, or `epochs`: at the ends of C epochs) it runs `prepare` (once), `reference` and `score`
on the demo corpus with the quickstart config, and reports the Spearman correlation between each
example's first position in the reference run's order (the seeded permutation of its first
pass, `sftmix_ray.train.sampling`) and its confidence, with the steps and seconds the reference
run took. Under `even`, an example early in the order has been trained on at all C checkpoints
and a late one only at the last: its confidence then measures when it was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info

REPO = Path(__file__).resolve().parents[1]
PLACEMENTS = ("even", "epochs")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties broken by order: positions are unique)."""
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def first_positions(n: int, seed: int) -> np.ndarray:
    """Row i's position in the reference run's first pass (rows ordered by example_id)."""
    from sftmix_ray.train.sampling import _perm

    return np.argsort(_perm(n, seed, 0, 0))


def measure(overrides: list[str], work: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from sftmix_ray.config import load_config
    from sftmix_ray.layout import RunDir
    from sftmix_ray.pipeline import run_stage

    base = RunDir(work / "prepared")
    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    run_stage("prepare", cfg, base)
    results: dict[str, Any] = {}
    for placement in PLACEMENTS:
        run = RunDir(work / placement)
        for name in (RunDir.DATA, RunDir.HELDOUT, RunDir.BASE_MODEL):
            shutil.copytree(base / name, run / name)
        cfg = load_config(
            REPO / "configs" / "quickstart.yaml",
            [*overrides, f"reference.checkpoints_at={placement}"],
        )
        start = time.perf_counter()
        reference = run_stage("reference", cfg, run)
        seconds = time.perf_counter() - start
        run_stage("score", cfg, run)
        scores = pq.read_table(run.scores).sort_by("example_id")
        ids = pq.read_table(run.data, columns=["example_id"]).column("example_id").to_numpy()
        assert np.array_equal(np.sort(ids), scores.column("example_id").to_numpy())
        position = first_positions(len(ids), cfg.train.seed)
        confidence = scores.column("confidence").to_numpy()
        results[placement] = {
            "spearman_first_position_vs_confidence": round(spearman(position, confidence), 4),
            "reference_steps": reference["steps"],
            "reference_seconds": round(seconds, 1),
            "checkpoints": [Path(c).name for c in reference["checkpoints"]],
            "examples": len(ids),
        }
        print(placement, json.dumps(results[placement]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(args.overrides, Path(tmp))
    record = {
        "benchmark": "order_bias",
        "command": " ".join(["benchmarks/order_bias.py", *(argv or sys.argv[1:])]),
        "config": "configs/quickstart.yaml",
        "overrides": args.overrides,
        "machine": machine_info(),
        "placements": results,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
