"""Split a corpus into chunks that workers read on their own, numbered so row ids stay global.

The driver plans: it lists the files, scans JSON Lines once line by line (counting rows and
checking UTF-8, never parsing or keeping them), reads Parquet footers, and turns a JSON array,
a compressed JSON (Lines) file, a CSV or TSV file or a Hub dataset into a file it can cut (JSON
Lines / Parquet under `work_dir`, streamed; rows keep the positions of the file as named).
Each `Chunk` knows the corpus index of its first row, so `example_id`s are the same as a
whole-file read gives, however many chunks or workers there are. Workers read a chunk with
`iter_chunk`; JSON syntax errors are found there and still name the file, line and column.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from sftmix_ray.config import URL_CREDENTIALS
from sftmix_ray.data.json_stream import json_layout, jsonl_lines, parse_jsonl_line
from sftmix_ray.data.readers import (
    corpus_files,
    file_kind,
    is_uri,
    iter_delimited_rows,
    iter_file,
    iter_parquet_rows,
    load_hub_dataset,
    open_binary,
    parquet_file,
    split_compression,
    unreadable_parquet,
    uri_filesystem,
)
from sftmix_ray.errors import DataError

T = TypeVar("T")
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 64 << 20
PLAN_THREADS = 16  # files planned at once (object-store requests wait on the network)
PARQUET_ROW_GROUP = 4096  # rows per row group of a rewritten CSV: chunks cut between them


@dataclass(frozen=True)
class Chunk:
    """A contiguous run of a corpus' rows inside one file."""

    path: str  # the file (local path or URI) the chunk reads
    kind: str  # "jsonl" (byte range) or "parquet" (row-group range)
    start: int  # first byte (jsonl, a line start) or first row group (parquet)
    stop: int  # end byte or end row group, exclusive
    first_row: int  # index in the corpus of the chunk's first row
    rows: int
    first_line: int = 1  # jsonl: the file's line number at `start`; parquet: its 1-based row
    source: str = ""  # the file as the user named it, where `path` is a rewritten copy
    unit: str = "line"  # how `source` numbers rows: line (JSON Lines), element, row

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Chunk:
        return cls(**json.loads(text))


def iter_chunk(chunk: Chunk) -> Iterator[tuple[int, Any]]:
    """(corpus row index, raw row) for every row of the chunk, in file order."""
    for index, row, _ in iter_chunk_located(chunk):
        yield index, row


def iter_chunk_located(chunk: Chunk) -> Iterator[tuple[int, Any, dict[str, Any]]]:
    """`iter_chunk` with where each row is in the corpus as the user gave it:
    `{"file": ..., "line": n}` (JSON Lines), `"element": n` (a JSON array), `"row": n`
    (Parquet, a Hub dataset's split); numbers from 1."""
    # As the user named it, without credentials (`s3://KEY:SECRET@...`): it is written to the
    # rejections file and the reports.
    source = URL_CREDENTIALS.sub("***@", chunk.source or chunk.path)
    if chunk.kind == "parquet":
        rows = iter_parquet_rows(chunk.path, list(range(chunk.start, chunk.stop)))
        numbered: Iterator[tuple[int, Any]] = enumerate(rows, start=chunk.first_line)
    else:
        numbered = _chunk_jsonl_rows(chunk)
    for offset, (number, row) in enumerate(numbered):
        yield chunk.first_row + offset, row, {"file": source, chunk.unit: number}


def _chunk_jsonl_rows(chunk: Chunk) -> Iterator[tuple[int, Any]]:
    with open_binary(chunk.path) as f:
        for _, line, text in jsonl_lines(f, chunk.path, chunk.start, chunk.stop, chunk.first_line):
            yield line, parse_jsonl_line(chunk.path, line, text)


def plan_chunks(path: str, *, hf_split: str, work_dir: Path, parts: int) -> tuple[list[Chunk], int]:
    """The chunks of a corpus, in row order, about `parts` of them or more, and its row count.

    A JSON array file is rewritten as JSON Lines and a Hub dataset as Parquet under
    `work_dir` (streamed), so that both can be cut; all other files are read where they are.
    Files are planned `PLAN_THREADS` at a time: on an object store each one costs a few
    requests of 10-30 ms, serially minutes over thousands of files. The first error in corpus
    order is the one raised, as a serial plan would.
    """
    files = corpus_files(path)
    hub = files is None
    if files is None:
        files = [_hub_to_parquet(path, hf_split, work_dir)]
    source = {"source": f"{path} ({hf_split} split)"} if hub else {}
    chunks: list[Chunk] = []
    total = 0
    pool = ThreadPoolExecutor(max_workers=min(PLAN_THREADS, len(files)))
    stop = threading.Event()
    try:
        target = _target_bytes(list(pool.map(_size, files)), parts)
        # A file's row groups are cut finer only when the files alone give fewer than `parts`.
        regroup = len(files) < parts
        planned = [
            pool.submit(_plan_file, file, number, target, regroup, work_dir, source, stop)
            for number, file in enumerate(files)
        ]
        for future in planned:
            for chunk in future.result():
                chunks.append(Chunk(**{**asdict(chunk), "first_row": total}))
                total += chunk.rows
    except BaseException:  # an error, Ctrl+C: the files being planned stop at their next rows
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return chunks, total


class _Stopped(Exception):
    """Planning a file was cut short: an earlier file failed, or the run was interrupted."""


def _until(stop: threading.Event, items: Iterable[T], every: int = 1024) -> Iterator[T]:
    """`items`, checking `stop` every `every` of them (a rewrite of a 1M-row file took
    minutes after another file had failed, and the error waited for it)."""
    for n, item in enumerate(items):
        if n % every == 0 and stop.is_set():
            raise _Stopped
        yield item


def _plan_file(
    file: str,
    number: int,
    target: int,
    regroup: bool,
    work_dir: Path,
    named: dict[str, str],
    stop: threading.Event,
) -> list[Chunk]:
    """One file's chunks (`first_row` counted from the file's start), named as the user named
    the file; a file pyarrow cannot cut as it is is rewritten under `work_dir` first."""
    kind = file_kind(file)
    if kind in ("csv", "tsv"):  # its rows numbered from 1 after the header
        named = {"source": file, "unit": "row"}
        file = _delimited_to_parquet(file, work_dir / f"{number:05d}.parquet", stop)
        kind = "parquet"
    elif split_compression(file)[1] is not None:  # cut by byte ranges: decompressed first
        named = {"source": file}
        file = _decompressed(file, work_dir / f"{number:05d}.{kind}", stop)
    if kind in ("json", "jsonl"):
        with open_binary(file) as f:
            kind = json_layout(f, file, kind)
            if kind != "array":  # planned from the same open file: one request less
                planned = _plan_jsonl(f, file, target, stop)
        if kind == "array":  # one element per line: line n is element n
            named = {"source": named.get("source", file), "unit": "element"}
            # Its own name: a decompressed `.jsonl` copy may sit at `{number}.jsonl`.
            file = _array_to_jsonl(file, work_dir / f"{number:05d}.rows.jsonl", stop)
            with open_binary(file) as f:
                planned = _plan_jsonl(f, file, target, stop)
    else:
        meta = parquet_file(file).metadata
        if regroup and _too_coarse(meta, 2 * target):  # finer row groups
            named = {"source": named.get("source", file), "unit": "row"}
            file = _regrouped(file, work_dir / f"{number:05d}.regrouped.parquet", stop)
            meta = parquet_file(file).metadata
        planned = _plan_parquet(file, meta, target)
    return [Chunk(**{**asdict(chunk), **named}) for chunk in planned]


def _target_bytes(sizes: list[int], parts: int) -> int:
    """Bytes per chunk: the corpus (its files' sizes) in about `parts` chunks, within
    [64 KiB, 64 MiB]."""
    size = sum(sizes)
    return max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, -(-size // max(parts, 1))))


def _size(path: str) -> int:
    if not is_uri(path):
        return os.path.getsize(path)
    fs, inner = uri_filesystem(path)
    return int(fs.get_file_info(inner).size or 0)


def _plan_jsonl(f: IO[bytes], path: str, target: int, stop: threading.Event) -> list[Chunk]:
    """Byte ranges of about `target` bytes, each starting at a row's line, of the JSON Lines
    file `path` open as `f`."""
    chunks: list[Chunk] = []
    start, first_line, rows = 0, 1, 0
    for offset, line, _ in _until(stop, jsonl_lines(f, path)):
        if rows and offset - start >= target:
            chunks.append(Chunk(path, "jsonl", start, offset, 0, rows, first_line))
            start, first_line, rows = offset, line, 0
        rows += 1
    end = f.tell()  # read to its end: the file's size (no request for it)
    if not rows:
        raise DataError(f"{path}: file is empty")
    chunks.append(Chunk(path, "jsonl", start, end, 0, rows, first_line))
    return chunks


def _plan_parquet(path: str, meta: Any, target: int) -> list[Chunk]:
    """Runs of whole row groups of about `target` (uncompressed) bytes; `meta` is the file's
    footer (`FileMetaData`)."""
    if meta.num_rows == 0:
        raise DataError(f"{path}: contains no rows")
    chunks: list[Chunk] = []
    start, rows, size, before = 0, 0, 0, 0  # before: the file's rows ahead of this chunk
    for group in range(meta.num_row_groups):
        if rows and size >= target:
            chunks.append(Chunk(path, "parquet", start, group, 0, rows, before + 1, unit="row"))
            start, before, rows, size = group, before + rows, 0, 0
        rows += meta.row_group(group).num_rows
        size += meta.row_group(group).total_byte_size
    last = Chunk(path, "parquet", start, meta.num_row_groups, 0, rows, before + 1, unit="row")
    chunks.append(last)
    return [c for c in chunks if c.rows]


def _too_coarse(meta: Any, limit: int) -> bool:
    """Whether a Parquet file (its footer, `FileMetaData`) has a row group of more than
    `limit` bytes (and more rows than a rewrite's row group): pandas and pyarrow write up to
    1M rows in one group by default, and chunks are cut between row groups, so such a file
    was one task: an hour of tokenizing on one core at 1M rows while the other workers
    waited. (200 files of one big group each are 200 tasks already: rewriting them on the
    driver would only cost time.)"""
    return any(
        meta.row_group(g).total_byte_size > limit and meta.row_group(g).num_rows > PARQUET_ROW_GROUP
        for g in range(meta.num_row_groups)
    )


def _regrouped(path: str, target: Path, stop: threading.Event) -> str:
    """Rewrite a Parquet file under `work_dir` in row groups of `PARQUET_ROW_GROUP` rows,
    the same rows in the same order and schema (Arrow batches, never Python rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = parquet_file(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(target, source.schema_arrow) as writer:
        batches = _until(stop, source.iter_batches(batch_size=PARQUET_ROW_GROUP), every=1)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:  # a corrupt page (ArrowIOError: OSError)
                raise unreadable_parquet(path, exc) from None
            if batch is None:
                break
            # A write error (a full work disk) is an OSError naming the copy, not the source.
            writer.write_table(pa.Table.from_batches([batch]), PARQUET_ROW_GROUP)
    return str(target)


def _array_to_jsonl(path: str, target: Path, stop: threading.Event) -> str:
    """Rewrite a JSON array file as JSON Lines, one element per line, streaming."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", encoding="utf-8") as out:
        for row in _until(stop, iter_file(path)):
            out.write(json.dumps(row) + "\n")  # ASCII: lone surrogates survive
    return str(target)


def _decompressed(path: str, target: Path, stop: threading.Event) -> str:
    """Write a compressed file's text under `work_dir`, streaming."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open_binary(path) as f, open(target, "wb") as out:
        # A corrupt archive: open_binary's DataError.
        for block in _until(stop, iter(lambda: f.read(1 << 20), b""), every=1):
            out.write(block)
    return str(target)


def _delimited_to_parquet(path: str, target: Path, stop: threading.Event) -> str:
    """Write a CSV or TSV file (every column text) as Parquet under `work_dir`, streaming."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target.parent.mkdir(parents=True, exist_ok=True)
    writer, batch = None, []
    try:
        for row in _until(stop, itertools.chain(iter_delimited_rows(path), [None])):
            if row is not None:
                batch.append(row)
            if batch and (row is None or len(batch) == PARQUET_ROW_GROUP):
                if writer is None:
                    schema = pa.schema([(name, pa.string()) for name in batch[0]])
                    writer = pq.ParquetWriter(target, schema)
                writer.write_table(pa.Table.from_pylist(batch, schema=writer.schema))
                batch = []
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise DataError(f"{path}: contains no rows")
    return str(target)


def _hub_to_parquet(name: str, split: str, work_dir: Path) -> str:
    """Write a Hub dataset split to Parquet under `work_dir` (batch by batch, from its
    memory-mapped Arrow cache)."""
    dataset = load_hub_dataset(name, split)
    work_dir.mkdir(parents=True, exist_ok=True)
    target = work_dir / "hub.parquet"
    dataset.to_parquet(str(target))
    return str(target)
