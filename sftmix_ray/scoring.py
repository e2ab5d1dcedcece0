"""The `score` stage: every example's response NLL under every reference checkpoint (Ray Data).

One Ray Data pass over work items (a checkpoint and a slice of one of OUT/data's row groups),
in checkpoint order, on one actor pool that lives through all checkpoints: a scorer actor
loads a checkpoint's weights when its first item of that checkpoint arrives (freeing the
previous ones first), so the pool pays its start-up (processes, imports, Ray Data planning)
once, not once per checkpoint. Items are dispatched in order, so an actor swaps weights about
once per checkpoint. As soon as every row of a checkpoint is back, the driver checks that each
id came exactly once and writes `OUT/work/scores/checkpoint-<step>.parquet` atomically. A rerun
keeps every per-checkpoint file whose ids and fingerprints still match the data and the
checkpoint, and redoes the rest. When all are there they are joined on `example_id` into the
result, `OUT/scores/scores.parquet`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sftmix_ray.config import Config
from sftmix_ray.errors import SftmixError
from sftmix_ray.io_utils import atomic_write_parquet
from sftmix_ray.layout import RunDir
from sftmix_ray.losses import confidence_and_variability
from sftmix_ray.ray_utils import dataset_batches
from sftmix_ray.scorer import ScoreItems, rows_per_batch, score_items, scorer_precision

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MEASURE_METADATA_KEY = b"sftmix.confidence_measure"  # which measure `confidence` holds
_META = b"sftmix"  # Parquet key-value metadata: data and checkpoint fingerprints
# Test hook: seconds the driver waits after writing each checkpoint's scores. With one actor
# pool a tiny test model scores the next checkpoint in well under a second, too short for a
# test to land a signal between two checkpoints.
PAUSE_ENV = "SFTMIX_SCORE_PAUSE_AFTER_CHECKPOINT_S"


def list_checkpoints(out_dir: Path | RunDir) -> list[tuple[int, Path]]:
    """Reference checkpoints as `(step, dir)`, in training order (by step number)."""
    reference = RunDir.of(out_dir).reference
    found = [
        (int(m.group(1)), p)
        for p in reference.glob("checkpoint-*")
        if (m := _CHECKPOINT.match(p.name)) and (p / "config.json").exists()
    ]
    if not found:
        raise SftmixError(f"no checkpoints in {reference}; run `sftmix-ray reference`")
    return sorted(found)


def fingerprint(path: Path) -> str:
    """Cheap identity of a file or directory: names, sizes, and the first and last MiB."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in (f for f in files if not f.name.startswith(".")):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path.parent)}:{size}".encode())
        with file.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def check_ids(found: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Raise unless `found` holds every id of the sorted, unique `expected` exactly once."""
    unique, counts = np.unique(found, return_counts=True)
    missing, extra = np.setdiff1d(expected, unique), np.setdiff1d(unique, expected)
    twice = unique[counts > 1]
    if len(missing) or len(extra) or len(twice):
        raise SftmixError(
            f"{what}: not every example scored exactly once: {len(missing)} missing "
            f"(e.g. {missing[:5].tolist()}), {len(twice)} duplicated (e.g. {twice[:5].tolist()}), "
            f"{len(extra)} unknown (e.g. {extra[:5].tolist()})"
        )


def _complete(path: Path, ids: np.ndarray, meta: dict[str, str]) -> bool:
    """Whether a per-checkpoint file exists, scores exactly `ids`, and has matching fingerprints."""
    if not path.exists():
        return False
    try:
        table = pq.read_table(path)
        stored = json.loads((table.schema.metadata or {}).get(_META, b"{}"))
        check_ids(table.column("example_id").to_numpy(), ids, str(path))
    except (OSError, ValueError, pa.ArrowException, SftmixError) as exc:
        log.warning("redoing %s: %s", path.name, exc)
        return False
    if stored != meta:
        log.warning("redoing %s: data or checkpoint changed since it was scored", path.name)
    return stored == meta


def _check_finite(table: pa.Table, checkpoint: str) -> None:
    """Raise, naming examples, if a pass gave a NaN or infinite NLL (nothing is written: a
    stored NaN would be reused by every rerun)."""
    nll = table.column("nll").to_numpy()
    bad = table.column("example_id").to_numpy()[~np.isfinite(nll)]
    if len(bad):
        raise SftmixError(
            f"{checkpoint}: {len(bad)} examples have no finite response NLL "
            f"(e.g. example_id {bad[:5].tolist()}); nothing of this checkpoint was written"
        )


def _actor_resources(cfg: Config) -> tuple[float, int]:
    """CPUs to reserve per scorer actor, and torch threads per actor, on this cluster."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return actor_resources(
        total, max(nodes, default=total), cfg.score.num_actors, cfg.score.num_gpus_per_actor
    )


def actor_resources(
    total: float, largest_node: float, actors: int, gpus_per_actor: float
) -> tuple[float, int]:
    """CPUs to reserve per scorer actor and its torch threads, from the cluster's CPUs and its
    largest node's: an actor lives on one node, so it never asks for more than a node has
    (sized from the whole cluster, a CPU actor on 4 nodes of 16 CPUs asked for 31.5 and
    was never placed: `score` waited forever)."""
    threads = max(1, int(min(total // actors, largest_node)))
    # Leave a CPU (half the cluster on tiny ones) to Ray Data's read and repartition tasks:
    # actors holding every CPU would starve them and the pipeline would never finish.
    spare = max(total - 1.0, total / 2.0)
    wanted = 1.0 if gpus_per_actor > 0 else float(threads)  # GPU actors: a feeder
    return max(0.05, min(wanted, spare / actors, largest_node)), threads


def _score_all(
    cfg: Config, data_dir: Path, checkpoints: list[tuple[int, Path]], n_rows: int
) -> Any:
    """One Ray Data pass of `ScoreItems` over every (checkpoint, rows) item, on one actor pool.

    Yields `(step, table of the checkpoint's rows by id, counts)` as each checkpoint completes.
    """
    import ray

    num_cpus, threads = _actor_resources(cfg)
    batch_rows = rows_per_batch(n_rows, cfg.score.num_actors)
    items = score_items(data_dir.resolve(), checkpoints, batch_rows)
    scorer_kwargs = dict(
        batch_tokens=cfg.score.batch_tokens, chunk_size=cfg.score.chunk_size,
        chunk_mb=cfg.score.chunk_mb,
        num_threads=threads, trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation, bf16_on_gpu=cfg.train.bf16,
    )  # fmt: skip
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ScoreItems,
        fn_constructor_args=(str(checkpoints[0][1]),),
        fn_constructor_kwargs=scorer_kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=cfg.score.num_actors),
        num_cpus=num_cpus,
        num_gpus=cfg.score.num_gpus_per_actor or None,
        # Ray Data's actor pools restart a dead actor (OOM, lost node, kill) and retry its
        # in-flight item (max_restarts=-1, max_task_retries=-1 by default; the kwargs are
        # deprecated); the driver then checks that every id came back exactly once.
    )
    start = last = time.time()
    parts: dict[int, list[pa.Table]] = {step: [] for step, _ in checkpoints}
    began: dict[int, float] = {}
    first_batch_s, done = 0.0, 0
    rows: dict[int, int] = {step: 0 for step, _ in checkpoints}
    with dataset_batches(ds, batch_size=None, batch_format="pyarrow") as blocks:
        for block in blocks:
            assert isinstance(block, pa.Table)
            first_batch_s = first_batch_s or round(time.time() - start, 2)  # startup + model load
            done += block.num_rows
            if time.time() - last > 10:
                last = time.time()
                log.info("scored %d/%d rows (%.0f rows/s)", done, n_rows * len(checkpoints),
                         done / (last - start))  # fmt: skip
            steps = block.column("step").to_numpy()
            for step in np.unique(steps).tolist():
                if step not in parts:
                    raise SftmixError(f"checkpoint-{step}: rows came back after it was complete")
                part = block.filter(pa.array(steps == step)).drop_columns(["step"])
                began.setdefault(step, time.time())
                parts[step].append(part)
                rows[step] += part.num_rows
                if rows[step] >= n_rows:  # check_ids then finds any row scored twice or missed
                    table = pa.concat_tables(parts.pop(step)).sort_by("example_id")
                    # Distinct values in Arrow: a Python string per row is 1M objects at 1M.
                    actors = sorted(pc.unique(table.column("scorer")).to_pylist())
                    counts = {"batches": len(pc.unique(table.column("batch"))),
                              "actors": len(actors), "actor_ids": actors,
                              "seconds": round(time.time() - began[step], 2),
                              "first_batch_s": first_batch_s}  # fmt: skip
                    yield step, table.drop_columns(["batch"]), counts
    if parts:
        raise SftmixError(f"scoring ended with checkpoints {sorted(parts)} incomplete")


def run_score(cfg: Config, out_dir: Path | RunDir) -> dict[str, Any]:
    """Score every example under every checkpoint once; write OUT/scores; return the summary."""
    from sftmix_ray.data.retokenize import reference_data_dir

    run = RunDir.of(out_dir)
    checkpoints = list_checkpoints(run)
    if not run.data.exists():
        raise SftmixError(f"{run.data} does not exist; run `sftmix-ray prepare` first")
    data_dir = reference_data_dir(cfg, run)  # OUT/data, or its re-tokenized copy
    all_ids = pq.read_table(data_dir, columns=["example_id"]).column("example_id").to_numpy()
    ids = np.unique(all_ids)
    if len(ids) != len(all_ids):
        raise SftmixError(f"{data_dir} holds {len(all_ids) - len(ids)} duplicated example ids")
    per_dir = run.checkpoint_scores_dir
    per_dir.mkdir(parents=True, exist_ok=True)
    for stale in per_dir.glob(".*.tmp"):  # left by a crash mid-write; never read
        stale.unlink(missing_ok=True)
    data_print = fingerprint(data_dir)
    reused, rescored, passes, pending = [], [], [], {}
    on_gpu = cfg.score.num_gpus_per_actor > 0
    # The scorer's identity: another device or precision gives other NLLs (the labels that
    # earlier runs recorded, "cpu:fp32", "gpu:bf16", are kept).
    precision = {"bfloat16": "bf16", "float32": "fp32"}[scorer_precision(on_gpu, cfg.train.bf16)]
    scorer = f"{'gpu' if on_gpu else 'cpu'}:{precision}"
    for step, checkpoint in checkpoints:
        meta = {"data": data_print, "checkpoint": fingerprint(checkpoint), "step": str(step)}
        meta["scorer"] = scorer  # another device or precision gives other NLLs: rescore
        if _complete(run.checkpoint_scores(step), ids, meta):
            log.info("%s: already scored, kept", checkpoint.name)
            reused.append(checkpoint.name)
        else:
            pending[step] = (checkpoint, meta)
    tokens = seconds = 0.0
    if pending:
        start = time.time()
        todo = [(step, checkpoint) for step, (checkpoint, _) in pending.items()]
        results = _score_all(cfg, data_dir, todo, len(ids))
        try:
            for step, table, counts in results:
                checkpoint, meta = pending[step]
                check_ids(table.column("example_id").to_numpy(), ids, checkpoint.name)
                _check_finite(table, checkpoint.name)  # now, not after every other pass
                tokens += int(np.sum(table.column("n_tokens").to_numpy()))
                passes.append({"checkpoint": checkpoint.name, **counts})
                log.info("%s: %d rows scored", checkpoint.name, len(ids))
                table = table.drop_columns(["n_tokens", "scorer"])
                target = run.checkpoint_scores(step)
                table = table.replace_schema_metadata({_META: json.dumps(meta)})
                atomic_write_parquet(target, table)
                rescored.append(checkpoint.name)
                if os.environ.get(PAUSE_ENV):  # the interruption test's window
                    time.sleep(float(os.environ[PAUSE_ENV]))
        finally:
            # Close the Ray Data iterator here, while Ray is up, when an interrupt (Ctrl+C,
            # SIGTERM) lands between two checkpoints (see `dataset_batches`).
            results.close()
        seconds = time.time() - start
    scores = assemble_scores(
        [run.checkpoint_scores(s) for s, _ in checkpoints], ids, cfg.score.confidence
    )
    atomic_write_parquet(run.scores, scores)
    return {
        "scored": len(ids),
        "checkpoints": [c.name for _, c in checkpoints],
        "rescored": rescored,
        "reused": reused,
        "passes": passes,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "rows_per_s": round(len(ids) * len(rescored) / seconds, 1) if seconds else None,
        "mean_confidence": float(np.mean(scores.column("confidence"))),
        "mean_variability": float(np.mean(scores.column("variability"))),
        "scores_path": str(run.scores),
    }


def assemble_scores(
    files: list[Path], ids: np.ndarray, measure: str = "neg_mean_perplexity"
) -> pa.Table:
    """Join per-checkpoint files on `example_id` into the scores table (DESIGN's schema); the
    file's metadata names the confidence measure (`MEASURE_METADATA_KEY`)."""
    nll_columns, n_response = [], None
    for file in files:
        table = pq.read_table(file).sort_by("example_id")
        check_ids(table.column("example_id").to_numpy(), ids, str(file))
        nll_columns.append(table.column("nll").to_numpy())
        counts = table.column("n_response_tokens").to_numpy()
        if n_response is not None and not np.array_equal(counts, n_response):
            raise SftmixError(f"{file}: response-token counts differ from the other checkpoints")
        n_response = counts
    nll = np.stack(nll_columns, axis=1)
    bad = ids[~np.isfinite(nll).all(axis=1)]
    if len(bad):
        raise SftmixError(f"{len(bad)} examples have no finite NLL (e.g. {bad[:5].tolist()})")
    confidence, variability = confidence_and_variability(nll, measure)
    offsets = pa.array(np.arange(0, nll.size + 1, nll.shape[1]), pa.int32())
    return pa.table(
        {
            "example_id": pa.array(ids, pa.int64()),
            "confidence": pa.array(confidence, pa.float64()),
            "variability": pa.array(variability, pa.float64()),
            "n_response_tokens": pa.array(n_response, pa.int64()),
            "nll": pa.ListArray.from_arrays(offsets, pa.array(nll.ravel(), pa.float64())),
        }
    ).replace_schema_metadata({MEASURE_METADATA_KEY: measure.encode()})
