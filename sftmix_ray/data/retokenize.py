"""Compute-constrained mode across tokenizers: the corpus re-tokenized for the reference model.

When `reference.model` reads a different vocabulary than `model.name_or_path`, the reference
run and scoring cannot use OUT/data's ids. The `reference` stage then re-tokenizes OUT/data's
conversations (its `messages_json` column) with the reference tokenizer into
OUT/work/reference_data/data/ (and OUT/heldout into .../heldout/), one row per row
with the same `example_id`, and scoring reads it.
Confidence is a per-example mean over response tokens, so scores made under one tokenizer rank
the examples that training then reads under the other.

Rows longer than `data.max_length` under the reference tokenizer are truncated as `turns` does
(whole exchanges; never dropped: every training example needs a score; with `data.mask_history`
the earliest history goes first) and counted in the stage summary.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from sftmix_ray.config import Config
from sftmix_ray.errors import SftmixError
from sftmix_ray.layout import RunDir

log = logging.getLogger(__name__)


def reference_model_path(cfg: Config, out_dir: Path | RunDir) -> str:
    """The id or directory of the reference model (the base model when none is named)."""
    from sftmix_ray.modeling import resolve_model_path

    return resolve_model_path(cfg.reference.model or cfg.model.name_or_path, out_dir)


def needs_retokenize(cfg: Config, out_dir: Path | RunDir) -> bool:
    """True when the reference model's tokenizer has another vocabulary than the base's."""
    from sftmix_ray.modeling import load_tokenizer, resolve_model_path

    ref = cfg.reference.model
    if not ref or ref == cfg.model.name_or_path:
        return False
    trust = cfg.model.trust_remote_code
    base = load_tokenizer(
        resolve_model_path(cfg.model.name_or_path, out_dir), trust_remote_code=trust
    )
    other = load_tokenizer(reference_model_path(cfg, out_dir), trust_remote_code=trust)
    return base.get_vocab() != other.get_vocab()


def _retokenize(cfg: Config, source: Path, target: Path, tokenizer_path: str) -> dict[str, Any]:
    """Write `target`: every row of `source` under the reference tokenizer; its counts.

    Streams like `prepare`: chunks of `source`'s row groups in Ray Data tasks, each
    writing its own Parquet part.
    """
    import shutil

    from sftmix_ray.data.chunk_worker import PREPARED, ChunkJob
    from sftmix_ray.data.chunks import plan_chunks
    from sftmix_ray.data.prepare import CHUNKS_PER_WORKER, CorpusPlan, run_chunk_jobs
    from sftmix_ray.io_utils import fresh_tmp_dir, replace_dir

    dataset = pads.dataset(source, format="parquet")
    if "messages_json" not in dataset.schema.names:
        raise SftmixError(
            f"{source} has no messages_json column (prepared by an older version); rerun "
            "`sftmix-ray prepare` (or the pipeline with `--force prepare`) to re-tokenize it "
            f"for reference.model '{cfg.reference.model}'"
        )
    tmp = fresh_tmp_dir(target)
    if dataset.count_rows() == 0:  # an all-rejected held-out split: nothing to re-tokenize
        from sftmix_ray.data.chunk_worker import SCHEMAS

        pq.write_table(SCHEMAS[PREPARED].empty_table(), tmp / "part-00000.parquet")
        replace_dir(tmp, target)
        return {"rows": 0, "truncated": 0, "tokens": 0}
    rejections = fresh_tmp_dir(target.with_name(f"{target.name}-rejections"))
    job = ChunkJob(str(source), PREPARED, "none", "train", 0, {"train": str(tmp)},
                   {"train": str(rejections)})  # fmt: skip
    chunks, total = plan_chunks(
        str(source), hf_split="train", work_dir=tmp.parent,
        parts=cfg.data.num_workers * CHUNKS_PER_WORKER,
    )  # fmt: skip
    stats = run_chunk_jobs([CorpusPlan(str(source), job, chunks, total)], tokenizer_path, cfg,
                           "turns")[0]["train"]  # fmt: skip
    if stats.rejected:
        lines = (
            line
            for part in sorted(rejections.glob("*.jsonl"))
            for line in part.read_text().splitlines()
        )
        lost = [json.loads(line) for line in itertools.islice(lines, 5)]  # not all 300k
        first = ", ".join(f"example_id {r['example_id']}: {r['reason']}" for r in lost)
        raise SftmixError(
            f"reference.model '{cfg.reference.model}': {stats.rejected} of {total} rows of "
            f"{source} cannot be tokenized with its tokenizer ({first}); raise data.max_length "
            "or pick a reference model whose tokenizer covers the corpus"
        )
    shutil.rmtree(rejections, ignore_errors=True)
    replace_dir(tmp, target)
    return {"rows": stats.written, "truncated": stats.truncated, "tokens": stats.tokens}


def build_reference_data(cfg: Config, out_dir: Path | RunDir) -> dict[str, Any]:
    """Write OUT/work/reference_data/{data,heldout}: OUT/data and OUT/heldout under the
    reference tokenizer, row for row; returns the tokenizer and the counts per directory."""
    run = RunDir.of(out_dir)
    if not run.data.exists():
        raise SftmixError(f"{run.data} does not exist; run `sftmix-ray prepare` first")
    tokenizer_path = reference_model_path(cfg, run)
    summary: dict[str, Any] = {"tokenizer": str(tokenizer_path)}
    target = RunDir(run.reference_data)
    pairs = (("data", run.data, target.data), ("heldout", run.heldout, target.heldout))
    for name, source, dest in pairs:
        if source.exists():
            summary[name] = _retokenize(cfg, source, dest, tokenizer_path)
    log.info("re-tokenized the corpus for the reference model: %s", summary)
    return summary


def reference_data_dir(cfg: Config, out_dir: Path | RunDir) -> Path:
    """Where the reference run and scoring read token ids: OUT/work/reference_data/data or
    OUT/data. Checks that the former, when needed, holds exactly OUT/data's example ids.
    """
    run = RunDir.of(out_dir)
    data = run.data
    if not needs_retokenize(cfg, run):
        return data
    target = RunDir(run.reference_data).data
    if not target.exists():
        raise SftmixError(
            f"{target} does not exist: reference.model '{cfg.reference.model}' has its own "
            "tokenizer; run `sftmix-ray reference` first (it re-tokenizes OUT/data)"
        )
    ids = [
        np.sort(pq.read_table(d, columns=["example_id"]).column("example_id").to_numpy())
        for d in (data, target)
    ]
    if not np.array_equal(*ids):
        raise SftmixError(
            f"{target} does not hold the rows of {data}; rerun `sftmix-ray reference`"
        )
    return target
