"""The `prepare` stage: read, validate, repair, template and tokenize the corpus -> OUT/data/.

Streaming: the driver plans chunks (`sftmix_ray.data.chunks`) and receives counts; Ray Data
tasks read each chunk from the files, validate, repair, tokenize and write its Parquet part
and its rejections (`sftmix_ray.data.chunk_worker`). No process holds the corpus or its tokens,
so the driver's memory does not grow with the corpus (see `prepare_driver_rss_4x_over_1x` in
benchmarks/run.py). The tiny preset's tokenizer trains on a bounded sample of the corpus.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftmix_ray.config import Config
from sftmix_ray.data.chunk_worker import SIDES, ChunkJob, SideStats
from sftmix_ray.data.chunks import Chunk
from sftmix_ray.errors import DataError
from sftmix_ray.io_utils import fresh_tmp_dir, replace_dir
from sftmix_ray.layout import RunDir
from sftmix_ray.ray_utils import dataset_batches

log = logging.getLogger(__name__)

DEMO = "demo"
TOKENIZER_SAMPLE_ROWS = 50_000  # valid rows the tiny preset's tokenizer trains on, at most
TOKENIZER_SAMPLE_CHARS = 16 << 20  # and characters of their turns
CHUNKS_PER_WORKER = 4


@dataclass
class CorpusPlan:
    """One corpus file/directory to process: where it is and how its rows are routed."""

    path: str
    job: ChunkJob
    chunks: list[Chunk]
    total: int


def resolve_format(
    path: str, fmt: str, hf_split: str, columns: dict[str, str] | None = None
) -> str:
    """`fmt`, or for `auto` the format of the corpus' first row that matches one (streamed),
    its columns renamed by `columns` (`data.columns`)."""
    from sftmix_ray.data.columns import rename_columns
    from sftmix_ray.data.formats import detect_format
    from sftmix_ray.data.readers import iter_records

    if fmt != "auto":
        return fmt
    rows = iter_records(path, hf_split=hf_split)
    try:
        return detect_format(rename_columns(row, columns) for row in rows)
    except DataError as exc:
        if str(exc).startswith("cannot detect"):  # detect_format's own error: name the corpus
            raise DataError(f"{path}: {exc}") from None
        raise


def _write_demo(cfg: Config, work: Path) -> tuple[str, str | None]:
    """The bundled demo corpus as JSON Lines files (train, held-out) under `work`."""
    from sftmix_ray.data.demo import generate_demo

    train_rows, eval_rows = generate_demo(cfg.data.demo_train_size, cfg.data.demo_eval_size, seed=0)
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("demo-train.jsonl", train_rows), ("demo-eval.jsonl", eval_rows)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(str(work / name) if rows else None)
    return str(paths[0]), paths[1]


def plan_corpora(cfg: Config, run: RunDir, dirs: dict[str, str], rejection_dirs: dict[str, str]):
    """The corpora of a run (train, and held-out when it has its own file), chunked."""
    from sftmix_ray.data.chunks import plan_chunks

    d = cfg.data
    work = run.prepare_work
    parts = d.num_workers * CHUNKS_PER_WORKER
    if d.path == DEMO:
        train_path, eval_path = _write_demo(cfg, work)
        specs = [("demo:train", train_path, "messages", "train", 0)]
        if eval_path:
            specs.append(("demo:eval", eval_path, "messages", "heldout", 0))
    else:
        every = max(2, round(1 / d.eval_fraction)) if d.eval_fraction > 0 else 0
        route = "by_id" if every and not d.eval_path else "train"
        specs = [(d.path, d.path, d.format, route, every)]
        if d.eval_path:
            specs.append((d.eval_path, d.eval_path, d.format, "heldout", 0))
    plans = []
    for number, (source, path, fmt, route, every) in enumerate(specs):
        columns = {} if d.path == DEMO else d.columns  # the demo is in the formats' names
        # `auto` also reads each row in its own format (formats.format_of).
        per_row = fmt == "auto"
        fmt = resolve_format(path, fmt, d.hf_split, columns)
        job = ChunkJob(
            source, fmt, d.repair, route, every, dirs, rejection_dirs, columns, d.mask_history,
            per_row, d.reasoning, (d.response_template, d.instruction_template),
        )  # fmt: skip
        chunks, total = plan_chunks(
            path, hf_split=d.hf_split, work_dir=work / f"source-{number}", parts=parts
        )
        plans.append(CorpusPlan(path, job, chunks, total))
    return plans


def tokenizer_sample(plan: CorpusPlan, limit: int = TOKENIZER_SAMPLE_ROWS) -> list[str]:
    """Texts the tiny preset's BPE trains on: every turn of the first `limit` valid training
    rows (in row order, held-out rows left out; at most TOKENIZER_SAMPLE_CHARS characters)
    and the role names."""
    from sftmix_ray.data.chunks import iter_chunk
    from sftmix_ray.data.formats import read_example
    from sftmix_ray.errors import RowRejected

    texts: list[str] = []
    kept = chars = 0
    for chunk in plan.chunks:
        for index, raw in iter_chunk(chunk):
            if plan.job.side(index) != "train":
                continue
            try:
                job = plan.job
                _, messages, tools, _ = read_example(
                    raw, job.fmt, job.repair, columns=job.columns, per_row=job.per_row,
                    reasoning=job.reasoning, templates=job.templates,
                )  # fmt: skip
            except RowRejected:
                continue
            row_texts = [m["content"] for m in messages]
            row_texts += [m["reasoning"] for m in messages if m.get("reasoning")]
            # Text to learn a vocabulary from (`default=str`: a value JSON cannot hold is
            # reported, naming its row, by the tokenization task that stores the row).
            structured = [m["tool_calls"] for m in messages if m.get("tool_calls")]
            structured += [tools] if tools else []
            row_texts += [json.dumps(value, default=str) for value in structured]
            texts.extend(row_texts)
            kept += 1
            chars += sum(map(len, row_texts))
            if kept >= limit or chars >= TOKENIZER_SAMPLE_CHARS:
                return [*texts, "system user assistant"]
    if not kept:
        raise DataError(f"{plan.job.source}: no valid rows ({plan.total} read, all rejected)")
    return [*texts, "system user assistant"]


def run_chunk_jobs(
    plans: list[CorpusPlan], tokenizer_path: str, cfg: Config, truncation: str
) -> list[dict[str, SideStats]]:
    """Process every chunk of every plan in Ray Data tasks, at most `data.num_workers` at once;
    per plan, merged counts.

    Raises the first unreadable-file error in corpus and file order, or the first chunk whose
    task's worker process died more than `data.max_retries` times (`prepare_chunks`).
    """
    import ray

    from sftmix_ray.data.chunk_worker import FAULT_ENV, prepare_chunks

    items: list[dict[str, Any]] = []
    for job_no, plan in enumerate(plans):
        for chunk in plan.chunks:
            items.append({"job": job_no, "chunk_no": len(items), "chunk": chunk.to_json()})
    size = max(1, min(cfg.data.num_workers, len(items)))
    jobs = [p.job for p in plans]
    # Beside the first output directory: under OUT, which every node sees; a rerun after a
    # driver that was killed starts it afresh.
    first_dir = Path(next(iter(plans[0].job.dirs.values())))
    attempts = fresh_tmp_dir(first_dir.parent / "chunk-attempts")
    task = functools.partial(
        prepare_chunks, jobs=jobs, tokenizer_path=tokenizer_path,
        max_length=cfg.data.max_length, truncation=truncation, trust=cfg.model.trust_remote_code,
        attempts_dir=str(attempts), max_retries=cfg.data.max_retries,
    )  # fmt: skip
    fault = os.environ.get(FAULT_ENV)  # the reliability tests' hook, passed to the task workers
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        task,
        batch_size=1,
        compute=ray.data.TaskPoolStrategy(size=size),
        num_cpus=1,
        runtime_env={"env_vars": {FAULT_ENV: fault}} if fault else None,
    )
    try:
        with dataset_batches(ds, batch_size=None, batch_format="pyarrow") as blocks:
            rows = (r for b in blocks for r in b.to_pylist())
            results = sorted(rows, key=lambda r: r["chunk_no"])
    finally:
        shutil.rmtree(attempts, ignore_errors=True)
    merged = [{side: SideStats() for side in SIDES} for _ in plans]
    for result in results:
        stats = json.loads(result["stats"])
        if stats["error"]:
            raise DataError(stats["error"])
        for side in SIDES:
            merged[int(result["job"])][side].merge(SideStats(**stats[side]))
    return merged


def _gather_rejections(parts: Path, target: Path) -> None:
    """Concatenate a side's rejection parts (in row order) into `target`, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as out:
        for part in sorted(parts.glob("part-*.jsonl")) if parts.exists() else []:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)


def _ensure_schema_file(directory: Path, side: str) -> None:
    """A side with no kept row still reads as a dataset: one empty file with the schema."""
    import pyarrow.parquet as pq

    from sftmix_ray.data.chunk_worker import SCHEMAS

    if not any(directory.glob("*.parquet")):
        pq.write_table(SCHEMAS[side].empty_table(), directory / "part-00000.parquet")


def _check_invalid(plan: CorpusPlan, stats: dict[str, SideStats], on_invalid: str) -> None:
    """With data.on_invalid=error, fail on the corpus' first invalid row."""
    invalid = sum(s.invalid for s in stats.values())
    if not invalid or on_invalid != "error":
        return
    first = min(
        (s.first_invalid for s in stats.values() if s.first_invalid), key=lambda f: f["index"]
    )
    raise DataError(
        f"{plan.job.source}: {invalid} invalid rows (data.on_invalid=error); first: "
        f"row {first['index']}: {first['reason']}"
    )


def _side_result(source: str, stats: SideStats, rejections_file: Path) -> dict[str, Any]:
    return {
        "source": source,
        "input": stats.input,
        "rejected": stats.rejected,
        "written": stats.written,
        "truncated": stats.truncated,
        "repairs": dict(sorted(stats.repairs.items(), key=lambda kv: (-kv[1], kv[0]))),
        "tokens": stats.tokens,
        "rejections_by_kind": stats.ordered_kinds(),
        "rejections_file": str(rejections_file),
    }


def run_prepare(cfg: Config, out_dir: Path | RunDir) -> dict[str, Any]:
    """Prepare OUT/data (and OUT/heldout); builds the tiny preset when the model is `tiny`.

    Every row is counted once: per side, `input == written + rejected`.
    """
    from sftmix_ray.modeling import TINY, check_vocabulary, load_tokenizer, materialize_tiny

    run = RunDir.of(out_dir)
    scratch = run.prepare_work / "outputs"
    shutil.rmtree(scratch, ignore_errors=True)
    dirs = {"train": str(fresh_tmp_dir(run.data)), "heldout": str(fresh_tmp_dir(run.heldout))}
    rejection_dirs = {side: str(scratch / "rejections" / side) for side in SIDES}
    plans = plan_corpora(cfg, run, dirs, rejection_dirs)
    tokenizer_path = cfg.model.name_or_path
    if cfg.model.name_or_path == TINY:
        texts = tokenizer_sample(plans[0])
        tokenizer_path = str(materialize_tiny(cfg.model, texts, run.base_model))
    else:  # before any worker tokenizes: ids the model has no embedding row for
        remote = cfg.model.trust_remote_code
        tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=remote)
        check_vocabulary(tokenizer_path, tokenizer, trust_remote_code=remote)
    stats = run_chunk_jobs(plans, tokenizer_path, cfg, cfg.data.truncation)
    for plan, plan_stats in zip(plans, stats):
        _check_invalid(plan, plan_stats, cfg.data.on_invalid)
    train_plan, train = plans[0], stats[0]["train"]
    source = train_plan.job.source
    if train.written == 0:
        if train.invalid == train.input:
            raise DataError(f"{source}: no valid rows ({train.input} read, all rejected)")
        raise DataError(f"{source}: every row was rejected during tokenization")
    counts = {"train": _side_result(train_plan.job.source, train, run.rejections("train"))}
    heldout_source, heldout = None, None
    if len(plans) == 2:
        heldout_source, heldout = plans[1].job.source, stats[1]["heldout"]
    elif stats[0]["heldout"].input:
        heldout_source, heldout = f"{train_plan.job.source}[heldout]", stats[0]["heldout"]
    _ensure_schema_file(Path(dirs["train"]), "train")
    replace_dir(Path(dirs["train"]), run.data)
    _gather_rejections(Path(rejection_dirs["train"]), run.rejections("train"))
    if heldout is not None and heldout_source is not None:
        _ensure_schema_file(Path(dirs["heldout"]), "heldout")
        replace_dir(Path(dirs["heldout"]), run.heldout)
        _gather_rejections(Path(rejection_dirs["heldout"]), run.rejections("heldout"))
        counts["heldout"] = _side_result(heldout_source, heldout, run.rejections("heldout"))
    else:  # an earlier config's held-out rows are not held out now (they may be trained on)
        shutil.rmtree(dirs["heldout"], ignore_errors=True)
        shutil.rmtree(run.heldout, ignore_errors=True)
        run.rejections("heldout").unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return counts
