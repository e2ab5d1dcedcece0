"""The `prepare` stage: read, validate, normalize, template and tokenize the corpus -> OUT/data/."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sftmix_ray.config import Config
from sftmix_ray.errors import DataError
from sftmix_ray.io_utils import fresh_tmp_dir, replace_dir
from sftmix_ray.layout import RunDir

log = logging.getLogger(__name__)

DEMO = "demo"


@dataclass
class Corpus:
    """Validated conversations of one split: (example_id, messages, answer) and the report."""

    rows: list[tuple[int, list[dict], str | None]]
    total: int
    rejections: list[dict]  # {"index", "reason", "kind"}
    source: str
    repairs: dict[str, int] = field(default_factory=dict)  # kind -> rows repaired and kept


def _answer(row: Any) -> str | None:
    return row.get("answer") if isinstance(row, dict) else None


def _validated(
    raw_rows: list[Any], fmt: str, source: str, on_invalid: str, repair: str = "standard"
) -> Corpus:
    from sftmix_ray.data.validation import validate_rows

    valid, report = validate_rows(raw_rows, fmt, repair=repair)
    rejections = [{"index": r.index, "reason": r.reason, "kind": r.kind} for r in report.rejections]
    if rejections and on_invalid == "error":
        first = rejections[0]
        raise DataError(
            f"{source}: {len(rejections)} invalid rows (data.on_invalid=error); first: "
            f"row {first['index']}: {first['reason']}"
        )
    rows = [(idx, messages, _answer(raw_rows[idx])) for idx, messages in valid]
    return Corpus(
        rows=rows, total=report.total, rejections=rejections, source=source, repairs=report.repairs
    )


def load_corpora(cfg: Config) -> tuple[Corpus, Corpus | None]:
    """Train and held-out corpora from the demo generator, files, or a HF dataset."""
    from sftmix_ray.data.readers import read_records

    d = cfg.data
    if d.path == DEMO:
        from sftmix_ray.data.demo import generate_demo

        train_raw, eval_raw = generate_demo(d.demo_train_size, d.demo_eval_size, seed=0)
        train = _validated(train_raw, "messages", "demo:train", d.on_invalid)
        heldout = _validated(eval_raw, "messages", "demo:eval", d.on_invalid) if eval_raw else None
        return train, heldout
    raw_train = read_records(d.path, hf_split=d.hf_split)
    train = _validated(raw_train, d.format, d.path, d.on_invalid, d.repair)
    if d.eval_path:
        raw = read_records(d.eval_path, hf_split=d.hf_split)
        return train, _validated(raw, d.format, d.eval_path, d.on_invalid, d.repair)
    if d.eval_fraction > 0:
        # Every k-th example by id, so the held-out split is stable across runs.
        every = max(2, round(1 / d.eval_fraction))
        kept = [r for r in train.rows if r[0] % every != every - 1]
        held = [r for r in train.rows if r[0] % every == every - 1]
        heldout = Corpus(rows=held, total=len(held), rejections=[], source=f"{d.path}[heldout]")
        train.rows = kept
        return train, heldout
    return train, None


def tokenizer_training_texts(rows: list[tuple[int, list[dict], str | None]]) -> list[str]:
    """Texts the tiny preset's BPE is trained on: every turn's content and the role names."""
    texts = [m["content"] for _, messages, _ in rows for m in messages]
    return [*texts, "system user assistant"]


def tokenize_corpora(
    corpora: list[Corpus], tokenizer_path: str, cfg: Config, truncation: str | None = None
) -> list[pa.Table]:
    """Tokenize all corpora in one Ray Data `map_batches` pass on an actor pool.

    Returns one table per corpus with every row and its fate (kept or a reject reason).
    `truncation` overrides `data.truncation`.
    """
    import pyarrow.compute as pc
    import ray

    from sftmix_ray.data.tokenize import TokenizeBatch

    rows = [(k, r) for k, corpus in enumerate(corpora) for r in corpus.rows]
    table = pa.table(
        {
            "corpus": pa.array([k for k, _ in rows], type=pa.int8()),
            "example_id": pa.array([r[0] for _, r in rows], type=pa.int64()),
            "messages_json": pa.array([json.dumps(r[1]) for _, r in rows], type=pa.string()),
            "answer": pa.array([r[2] for _, r in rows], type=pa.string()),
        }
    )
    n_actors = max(1, min(cfg.data.num_workers, len(rows) // cfg.data.tokenize_batch_size))
    # Pre-sliced blocks: a repartition would need free CPUs while the actor pool holds them.
    per_block = -(-table.num_rows // (n_actors * 2))
    ds = ray.data.from_arrow(
        [table.slice(i, per_block) for i in range(0, table.num_rows, per_block)]
    )
    truncation = truncation or cfg.data.truncation
    ds = ds.map_batches(
        TokenizeBatch,
        fn_constructor_args=(tokenizer_path, cfg.data.max_length, truncation),
        fn_constructor_kwargs={"trust": cfg.model.trust_remote_code},
        batch_size=cfg.data.tokenize_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=1,
    )
    out = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("example_id")
    return [
        out.filter(pc.equal(out.column("corpus"), k)).drop_columns(["corpus"])
        for k in range(len(corpora))
    ]


def write_shards(table: pa.Table, target: Path, rows_per_file: int = 2048) -> None:
    """Write kept rows as Parquet shards into `target`, atomically (tmp dir then rename)."""
    tmp = fresh_tmp_dir(target)
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        pq.write_table(table.slice(start, rows_per_file), tmp / f"part-{i:05d}.parquet")
    replace_dir(tmp, target)


def _finish(corpus: Corpus, tokenized: pa.Table, target: Path, rejections_file: Path) -> dict:
    """Split tokenized rows into kept and rejected, write the kept ones and the list of every
    rejection (`rejections_file`, JSON Lines), return the counts.

    Row indices are 0-based positions in the source (for file corpora also the example_id).
    """
    import pyarrow.compute as pc

    from sftmix_ray.data.validation import Rejection, rejections_by_kind
    from sftmix_ray.io_utils import atomic_write_text

    reasons = tokenized.column("reject_reason")
    kept = tokenized.filter(pc.equal(reasons, "")).drop_columns(["reject_reason", "reject_kind"])
    dropped = tokenized.filter(pc.not_equal(reasons, ""))
    write_shards(kept.drop_columns(["truncated"]), target)
    token_rejections = [
        {"index": int(i), "reason": str(r), "kind": str(k)}
        for i, r, k in zip(
            dropped.column("example_id").to_pylist(),
            dropped.column("reject_reason").to_pylist(),
            dropped.column("reject_kind").to_pylist(),
        )
    ]
    rejections = sorted(corpus.rejections + token_rejections, key=lambda r: r["index"])
    lines = "".join(json.dumps({"example_id": r["index"], **r}) + "\n" for r in rejections)
    atomic_write_text(rejections_file, lines)
    n_tokens = pc.sum(pc.list_value_length(kept.column("input_ids"))).as_py() or 0
    by_kind = rejections_by_kind(
        [Rejection(r["index"], r["reason"], r["kind"]) for r in rejections]
    )
    return {
        "source": corpus.source,
        "input": corpus.total,
        "rejected": len(rejections),
        "written": kept.num_rows,
        "truncated": int(pc.sum(kept.column("truncated")).as_py() or 0),
        "repairs": corpus.repairs,
        "tokens": int(n_tokens),
        "rejections_by_kind": by_kind,
        "rejections_file": str(rejections_file),
    }


def run_prepare(cfg: Config, out_dir: Path | RunDir) -> dict[str, Any]:
    """Prepare OUT/data (and OUT/heldout); builds the tiny preset when the model is `tiny`."""
    from sftmix_ray.modeling import TINY, materialize_tiny

    run = RunDir.of(out_dir)
    train, heldout = load_corpora(cfg)
    if not train.rows:
        raise DataError(f"{train.source}: no valid rows ({train.total} read, all rejected)")
    tokenizer_path = cfg.model.name_or_path
    if cfg.model.name_or_path == TINY:
        texts = tokenizer_training_texts(train.rows)
        tokenizer_path = str(materialize_tiny(cfg.model, texts, run.base_model))
    corpora = [train] + ([heldout] if heldout is not None and heldout.rows else [])
    tokenized = tokenize_corpora(corpora, tokenizer_path, cfg)
    # The held-out table keeps messages and answers for generation-based evaluation; the
    # training table keeps the messages so a reference model with another tokenizer can
    # re-tokenize them (`sftmix_ray.data.retokenize`).
    train_table = tokenized[0].drop_columns(["answer"])
    counts = {"train": _finish(train, train_table, run.data, run.rejections("train"))}
    if len(corpora) == 2:
        counts["heldout"] = _finish(heldout, tokenized[1], run.heldout, run.rejections("heldout"))
    if counts["train"]["written"] == 0:
        raise DataError(f"{train.source}: every row was rejected during tokenization")
    return counts
