"""What one tokenization task does with one chunk: read, validate, repair, route, tokenize, and
write its kept rows and its rejections as files of their own.

A chunk's outputs are `part-<chunk>.parquet` in each side's directory and
`part-<chunk>.jsonl` of rejections, so the files sort in row order and the driver only ever
receives counts (`SideStats`), never rows.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sftmix_ray.data.chunks import Chunk, iter_chunk_located
from sftmix_ray.data.validation import EXAMPLES_PER_KIND
from sftmix_ray.errors import DataError, RowRejected

log = logging.getLogger(__name__)

FLUSH_ROWS = 1024
PREPARED = "prepared"  # a job format: rows of OUT/data (example_id, messages_json), re-tokenized

SIDES = ("train", "heldout")
SCHEMAS = {
    "train": pa.schema(
        [
            ("example_id", pa.int64()),
            ("messages_json", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int32())),
            ("tools_json", pa.string()),  # the row's tool definitions; null without
        ]
    ),
    "heldout": pa.schema(
        [
            ("example_id", pa.int64()),
            ("messages_json", pa.string()),
            ("answer", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int32())),
            ("tools_json", pa.string()),
        ]
    ),
    PREPARED: pa.schema(
        [
            ("example_id", pa.int64()),
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int32())),
        ]
    ),
}


@dataclass(frozen=True)
class ChunkJob:
    """How every chunk of one corpus is processed, and where its outputs go."""

    source: str  # the name in messages: the corpus path, "demo:train", ...
    fmt: str  # the corpus' row format, or PREPARED
    repair: str
    route: str  # "train", "heldout", or "by_id" (example_id % every == every - 1: held out)
    every: int = 0
    dirs: dict[str, str] = field(default_factory=dict)  # side -> directory of Parquet parts
    rejection_dirs: dict[str, str] = field(default_factory=dict)  # side -> directory of parts
    columns: dict[str, str] = field(default_factory=dict)  # data.columns: {field: column}
    mask_history: bool = False  # data.mask_history: train each row's last answer only
    per_row: bool = False  # data.format auto: a row of another known format is read in it
    reasoning: str = "keep"  # data.reasoning: keep or drop each answer's reasoning
    # text rows: data.response_template, data.instruction_template
    templates: tuple[str | None, str | None] = (None, None)

    def side(self, example_id: int) -> str:
        if self.route == "by_id":
            return "heldout" if example_id % self.every == self.every - 1 else "train"
        return self.route


@dataclass
class SideStats:
    """Counts of one side of one chunk (or, merged, of a whole corpus)."""

    input: int = 0
    written: int = 0
    rejected: int = 0
    invalid: int = 0  # rejected by validation (before tokenization)
    first_invalid: dict[str, Any] | None = None  # {"index", "reason"}
    truncated: int = 0
    tokens: int = 0
    repairs: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> count, examples

    def reject(self, index: int, exc: RowRejected, invalid: bool) -> None:
        self.rejected += 1
        entry = self.by_kind.setdefault(exc.kind, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_KIND:
            entry["examples"].append(index)
        if invalid:
            self.invalid += 1
            if self.first_invalid is None:
                self.first_invalid = {"index": index, "reason": exc.reason}

    def merge(self, other: SideStats) -> None:
        """Add a later chunk's counts (examples stay the first ones in row order)."""
        for name in ("input", "written", "rejected", "invalid", "truncated", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.first_invalid = self.first_invalid or other.first_invalid
        self.repairs = dict(Counter(self.repairs) + Counter(other.repairs))
        for kind, entry in other.by_kind.items():
            mine = self.by_kind.setdefault(kind, {"count": 0, "examples": []})
            mine["count"] += entry["count"]
            mine["examples"] = (mine["examples"] + entry["examples"])[:EXAMPLES_PER_KIND]

    def ordered_kinds(self) -> dict[str, dict[str, Any]]:
        """`by_kind`, most frequent kind first."""
        return dict(sorted(self.by_kind.items(), key=lambda kv: (-kv[1]["count"], kv[0])))


class _Side:
    """Kept rows of one side of a chunk, written to its Parquet part in row groups."""

    def __init__(self, schema: pa.Schema, target: Path):
        self.schema, self.target = schema, target
        self.rows: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.writer: pq.ParquetWriter | None = None

    def add(self, row: dict[str, Any]) -> None:
        for name, values in self.rows.items():
            values.append(row[name])
        if len(self.rows["example_id"]) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows["example_id"]:
            return
        table = pa.table(
            {n: pa.array(v, type=self.schema.field(n).type) for n, v in self.rows.items()},
            schema=self.schema,
        )
        if self.writer is None:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.target, self.schema)
        self.writer.write_table(table)
        self.rows = {name: [] for name in self.schema.names}

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


def process_chunk(job: ChunkJob, chunk_no: int, chunk: Chunk, tokenize: Any) -> dict[str, Any]:
    """Process one chunk; return {"error": str | None, side: SideStats as a dict}.

    `tokenize(messages, tools) -> (ids, labels, truncated)` raises RowRejected. A DataError
    (the file is unreadable at some line) stops the chunk and is returned, not raised, so the
    driver can report the first one in file order.
    """
    from sftmix_ray.data.formats import read_example

    stats = {side: SideStats() for side in SIDES}
    name = f"part-{chunk_no:05d}"
    writers: dict[str, _Side] = {}
    rejections: dict[str, list[str]] = {side: [] for side in SIDES}
    error = None
    try:
        for index, raw, where in iter_chunk_located(chunk):
            with _located_errors(where):
                if job.fmt == PREPARED:
                    index, side = int(raw["example_id"]), "train"
                else:
                    side = job.side(index)
                side_stats = stats[side]
                side_stats.input += 1
                applied: list[str] = []
                try:
                    if job.fmt == PREPARED:
                        messages = json.loads(raw["messages_json"])
                        tools = raw.get("tools_json")  # absent from data prepared before tools
                        tools = json.loads(tools) if tools else None
                    else:
                        raw, messages, tools, applied = read_example(
                            raw, job.fmt, job.repair, columns=job.columns, per_row=job.per_row,
                            history_masked=job.mask_history, reasoning=job.reasoning,
                            templates=job.templates,
                        )  # fmt: skip
                except RowRejected as exc:
                    side_stats.reject(index, exc, invalid=True)
                    rejections[side].append(_rejection_line(index, where, exc))
                    continue
                try:
                    ids, labels, truncated = tokenize(messages, tools)
                except RowRejected as exc:
                    side_stats.reject(index, exc, invalid=False)
                    rejections[side].append(_rejection_line(index, where, exc))
                    continue
                for kind in applied:
                    side_stats.repairs[kind] = side_stats.repairs.get(kind, 0) + 1
                side_stats.written += 1
                side_stats.truncated += int(truncated)
                side_stats.tokens += len(ids)
                answer = raw.get("answer") if isinstance(raw, dict) else None
                record = {
                    "example_id": index,
                    "messages_json": json.dumps(messages),
                    "tools_json": json.dumps(tools) if tools else None,
                    "answer": answer if isinstance(answer, str) else None,
                    "input_ids": ids,
                    "labels": labels,
                }
            # Outside: a full disk is the output's problem, not the row's.
            if side not in writers:
                schema = SCHEMAS[PREPARED if job.fmt == PREPARED else side]
                writers[side] = _Side(schema, Path(job.dirs[side]) / f"{name}.parquet")
            writers[side].add(record)
    except DataError as exc:
        error = str(exc)
    for writer in writers.values():
        writer.close()
    for side, lines in rejections.items():
        if lines:
            target = Path(job.rejection_dirs[side]) / f"{name}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(lines), encoding="utf-8")
    return {"error": error, **{side: asdict(s) for side, s in stats.items()}}


@contextlib.contextmanager
def _located_errors(where: dict[str, Any]) -> Any:
    """An exception reading a parsed row into messages, repairing or tokenizing it that is
    neither a rejection nor a DataError (a Parquet date in a tool's arguments that JSON cannot
    hold, a tokenizer's own crash) becomes a DataError naming the row: one clear line at the
    driver, where it was the Ray task's traceback without the file or the row. Its traceback
    stays in the worker's log. (Parsing the file is the readers' concern: their errors are
    DataErrors already; writing the output is not the row's.)"""
    try:
        yield
    except (DataError, RowRejected):
        raise
    except Exception as exc:
        file, (unit, number) = where["file"], next((k, v) for k, v in where.items() if k != "file")
        log.exception("%s: %s %s: unexpected error", file, unit, number)
        raise DataError(
            f"{file}: {unit} {number}: unexpected {type(exc).__name__} while reading or "
            f"tokenizing the row: {exc}"
        ) from exc


def _rejection_line(index: int, where: dict[str, Any], exc: RowRejected) -> str:
    """One rejection record: the row's corpus index, its file and line (or element, row)."""
    record = {"example_id": index, "index": index, **where, "reason": exc.reason, "kind": exc.kind}
    return json.dumps(record) + "\n"


def _files_stamp(path: str) -> tuple[tuple[str, int, int], ...] | None:
    """Name, size and modification time of a local tokenizer directory's files (None for a Hub
    id): a tokenizer rewritten at the same path (a rerun of `prepare`) is loaded again."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    stamp = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()  # DirEntry caches it: one stat a file
            stamp.append((entry.name, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(path: str, trust: bool, stamp: Any) -> Any:
    from sftmix_ray.modeling import load_tokenizer

    _maybe_inject_fault("tokenizer")
    return load_tokenizer(path, trust_remote_code=trust)


FAULT_ENV = "SFTMIX_FAULT_IN_CHUNK"


def _maybe_inject_fault(where: str) -> None:
    """Fault-injection hook for the reliability tests: `SFTMIX_FAULT_IN_CHUNK=WHERE:MARKER`.

    The task's worker process dies (a real exit, no cleanup) when it starts chunk WHERE (a
    chunk number), or, with WHERE `tokenizer`, when it starts loading the tokenizer: once,
    recorded in the file MARKER, or every time when MARKER is `always`.
    """
    value = os.environ.get(FAULT_ENV)
    if not value:
        return
    target, marker = value.split(":", 1)
    if target != where:
        return
    if marker != "always":
        if Path(marker).exists():
            return
        Path(marker).write_text(f"killed at {where}\n", encoding="utf-8")
    os._exit(17)


def attempt_marker(attempts_dir: str, chunk_no: int) -> Path:
    """The file a task appends one line to as it starts a chunk and removes once the chunk is
    done (or has raised): the lines left count the runs whose worker process died."""
    return Path(attempts_dir) / f"chunk-{chunk_no:06d}"


GIVEN_UP = "given-up"  # in the attempts directory: the error of a chunk that gave up


def _given_up(attempts_dir: str | None) -> str | None:
    """The error of a chunk of this `prepare` that gave up (its worker died too often), if
    one did: the stage fails with it, so the chunks still to run return it unrun instead of
    working on (or dying) for nothing."""
    if attempts_dir is None:
        return None
    try:
        return (Path(attempts_dir) / GIVEN_UP).read_text(encoding="utf-8") or None
    except FileNotFoundError:
        return None


def _give_up(attempts_dir: str | None, error: str) -> None:
    """Record a chunk's give-up for the chunks still to run (atomically: another task may be
    reading it; of two at once, either one's error is reported)."""
    _write_note(attempts_dir, GIVEN_UP, error)


def _write_note(attempts_dir: str | None, name: str, text: str) -> None:
    """`text` as the attempts directory's note `name`, whole or not at all (a hidden part
    renamed into place: another task may be reading it)."""
    if attempts_dir is None:
        return
    part = Path(attempts_dir) / f".{name}.{os.getpid()}"
    part.write_text(text, encoding="utf-8")
    os.replace(part, Path(attempts_dir) / name)


DATA_ERROR = "data-error"  # in the attempts directory: `data-error.<chunk>`, its DataError


def _note_data_error(attempts_dir: str | None, chunk_no: int, error: str) -> None:
    """Record that chunk `chunk_no` met an unreadable file (a truncated line, a corrupt page):
    the stage fails with the first such error in corpus order, so the chunks after it need
    not run (atomically, as `_give_up`)."""
    _write_note(attempts_dir, f"{DATA_ERROR}.{chunk_no}", error)


def _earlier_data_error(attempts_dir: str | None, chunk_no: int) -> str | None:
    """The error of the first chunk before `chunk_no` that met an unreadable file, if one
    did: `prepare` fails with it whatever this chunk holds (chunks before it still run, so
    the error reported is the first in corpus order). One bad line in a 1M-row corpus failed
    the stage only once every chunk had been tokenized, for nothing."""
    if attempts_dir is None:
        return None
    noted = []
    for path in Path(attempts_dir).glob(f"{DATA_ERROR}.*"):
        number = path.name.removeprefix(f"{DATA_ERROR}.")
        if number.isdigit() and int(number) < chunk_no:
            noted.append((int(number), path))
    return min(noted)[1].read_text(encoding="utf-8") if noted else None


def _runs_that_died(marker: Path | None) -> int:
    if marker is None or not marker.exists():
        return 0
    return len(marker.read_text(encoding="utf-8").splitlines())


@contextlib.contextmanager
def _marked_run(marker: Path | None) -> Any:
    """One run of a chunk: its line in `marker` while it runs, removed when it returns or
    raises; only a process that died leaves it behind."""
    if marker is None:
        yield
        return
    with marker.open("a", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def unrun(error: str) -> dict[str, Any]:
    """A chunk's result when it is not run: `error`, nothing processed."""
    return {"error": error, **{side: asdict(SideStats()) for side in SIDES}}


def died_too_often(job: ChunkJob, chunk: Chunk, runs: int, max_retries: int) -> dict[str, Any]:
    """The chunk's result once its worker process died in `runs` > `max_retries` runs: an
    error naming its corpus, file and rows, and nothing processed. (The tokenizer is loaded
    within a chunk's run: a process that dies loading it every time fails the stage too.)"""
    file = chunk.source or chunk.path
    where = file if job.source == file else f"{job.source}: {file}"
    where += f": {chunk.rows} rows from {chunk.unit} {chunk.first_line}"
    rows = f"corpus rows {chunk.first_row}-{chunk.first_row + chunk.rows - 1}"
    error = (
        f"{where} ({rows}): the tokenization task's worker process died in "
        f"{'its one run' if runs == 1 else f'each of its {runs} runs'} "
        f"(data.max_retries={max_retries}); a crash or an out-of-memory kill while loading "
        "the tokenizer or tokenizing, often one huge or malformed row in that range"
    )
    return unrun(error)


def prepare_chunks(
    batch: dict[str, Any], jobs: list[ChunkJob], tokenizer_path: str, max_length: int,
    truncation: str, trust: bool = False, attempts_dir: str | None = None, max_retries: int = 3,
) -> dict[str, Any]:  # fmt: skip
    """Ray Data task: process the batch's chunks (one per row) with the job's tokenizer.

    Tasks, not an actor pool: Ray keeps a job's worker processes between tasks, so the
    imports (torch, transformers, Ray Data) and the tokenizer are paid once per
    worker process and job, not once per `prepare` (a test session, a notebook, or a pipeline
    whose reference model re-tokenizes the corpus after `prepare`); the tokenizer is loaded
    again when its files change.

    Ray Data runs a task again whenever its worker process dies, forever: one row that
    crashes its worker every time (or gets it killed for its memory) would hang `prepare`.
    Each run of a chunk is marked in `attempts_dir` (`attempt_marker`, on the storage every
    node shares); a chunk whose worker already died `max_retries + 1` times is not run again
    but returned as an error naming its rows, which the chunks still to run then return
    unrun (`_given_up`): a worker that dies loading the tokenizer would otherwise die that
    often for each of thousands of chunks before the stage failed. Likewise a chunk that
    meets an unreadable file notes its error, and the chunks after it return it unrun
    (`_earlier_data_error`)."""
    from sftmix_ray.data.tokenize import tokenize_conversation

    def tokenize(
        messages: list[dict], tools: list[dict] | None
    ) -> tuple[list[int], list[int], bool]:
        return tokenize_conversation(tokenizer, messages, max_length, truncation, tools)

    results = []
    for job_no, chunk_no, chunk in zip(batch["job"], batch["chunk_no"], batch["chunk"]):
        job = jobs[int(job_no)]
        located = Chunk.from_json(str(chunk))
        marker = attempt_marker(attempts_dir, int(chunk_no)) if attempts_dir else None
        other = _given_up(attempts_dir) or _earlier_data_error(attempts_dir, int(chunk_no))
        if other is not None:
            results.append(json.dumps(unrun(other)))
            continue
        died = _runs_that_died(marker)
        if died > max_retries:
            failed = died_too_often(job, located, died, max_retries)
            _give_up(attempts_dir, failed["error"])
            results.append(json.dumps(failed))
            continue
        with _marked_run(marker):
            _maybe_inject_fault(str(chunk_no))
            # Loaded inside the run (cached: once per process and tokenizer), so a process that
            # dies loading it is counted too; outside, Ray would run the task again forever.
            tokenizer = _cached_tokenizer(tokenizer_path, trust, _files_stamp(tokenizer_path))
            stats = process_chunk(job, int(chunk_no), located, tokenize)
        if stats["error"]:
            _note_data_error(attempts_dir, int(chunk_no), stats["error"])
        results.append(json.dumps(stats))
    return {"job": batch["job"], "chunk_no": batch["chunk_no"], "stats": results}
