"""Read a corpus into raw rows: JSON array, JSON Lines, Parquet, a directory, or a HF dataset.

Every row comes back as it is in the file (normally a dict; `null`, `5` or a list stay as they
are so validation can reject them one by one). Problems with the file itself raise `DataError`
with one message naming the file and the position (byte offset, line and column).
`iter_records` streams: it holds one row (one Parquet batch) at a time, never the corpus.

Decisions worth knowing:
- Blank lines in JSON Lines are ignored: they are not rows, so they are neither returned nor
  counted as rejections, and row indices count only non-blank lines.
- A `.json` file is a JSON array, or JSON Lines (one value per line, as `Dataset.to_json` writes).
  A single top-level object is an error: it is usually a wrapper such as `{"data": [...]}`.
- A file or directory without any rows is an error: there is nothing to train on.
- A directory is read non-recursively: its `.parquet`, `.jsonl` and `.ndjson` files, sorted by
  name, so a HF-style `train/` folder of shards reads in shard order.
- A path with a scheme (`s3://bucket/corpus.jsonl`, `gs://...`, `file:///...`) is opened
  through `pyarrow.fs`, so any filesystem pyarrow can open works, directories included.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sftmix_ray.data.json_stream import (
    NotRows,
    iter_json_array,
    json_file_kind,
    jsonl_lines,
    parse_jsonl_line,
)
from sftmix_ray.errors import DataError

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
DIRECTORY_SUFFIXES = PARQUET_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES
# Shards a directory may hold that cannot be read: compressed data files and HF's Arrow
# files, named in an error, since skipping them would lose their rows without a word (other
# files, README.md or a backup.zip, are ignored as before).
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
UNREAD_SUFFIXES = (
    *(data + c for data in JSON_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES for c in _COMPRESSED),
    ".arrow",
)
SUPPORTED_SUFFIXES = JSON_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
PARQUET_BATCH = 1024

# `org/name` as on the Hugging Face Hub; a local-looking path (with a data suffix) never matches.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def read_records(path: str | os.PathLike[str], *, hf_split: str = "train") -> list[Any]:
    """Every raw row of a corpus (see `iter_records`) as one list."""
    return list(iter_records(path, hf_split=hf_split))


def iter_records(path: str | os.PathLike[str], *, hf_split: str = "train") -> Iterator[Any]:
    """Stream every raw row of a local or `pyarrow.fs` corpus file/directory, or of a Hugging
    Face dataset by name."""
    files = corpus_files(path)
    if files is None:
        yield from _iter_hub_dataset(os.fspath(path), hf_split)
        return
    for file in files:
        yield from iter_file(file)


def is_uri(path: str) -> bool:
    """Whether `path` names a file through a filesystem scheme (s3://, gs://, file://, ...)."""
    return "://" in path


def corpus_files(path: str | os.PathLike[str]) -> list[str] | None:
    """The data files a corpus path names, in reading order; None for a Hub dataset id."""
    name = os.fspath(path)
    if is_uri(name):
        return _uri_files(name)
    local = Path(name)
    if local.is_dir():
        names = sorted(str(p) for p in local.iterdir() if p.is_file())
        return _shards(str(local), names)
    if local.is_file():
        return [str(local)]
    if looks_like_hub_id(name):
        return None
    raise DataError(f"{name}: no such file or directory")


def _uri_files(uri: str) -> list[str]:
    """Files under a `pyarrow.fs` URI: the file itself, or a directory's data files, sorted."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
        else:
            entries = [info]
    except (OSError, ValueError) as exc:  # pyarrow raises these for bad URIs and I/O
        raise DataError(f"{uri}: cannot open: {str(exc).splitlines()[0]}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: no such file or directory")
    scheme = uri.split("://", 1)[0]
    if info.type == pafs.FileType.Directory:
        names = sorted(f"{scheme}://{e.path}" for e in entries if e.type == pafs.FileType.File)
        return _shards(uri, names)
    return [uri]


def _shards(directory: str, names: list[str]) -> list[str]:
    """The data files among a directory's files (sorted); an error for data it cannot read."""
    unread = [n for n in names if n.lower().endswith(UNREAD_SUFFIXES)]
    if unread:
        shown = ", ".join(n.rsplit("/", 1)[-1] for n in unread[:3])
        more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
        raise DataError(
            f"{directory}: holds files that cannot be read ({shown}{more}): a corpus directory "
            "holds .parquet, .jsonl, .ndjson or .json files; decompress or convert these, or "
            "move them out"
        )
    files = [n for n in names if n.lower().endswith(DIRECTORY_SUFFIXES) and _holds_rows(n)]
    if not files:
        raise DataError(
            f"{directory}: is a directory without .parquet, .jsonl, .ndjson or .json files"
        )
    return files


def _holds_rows(path: str) -> bool:
    """False for a `.json` file in a directory of shards that holds one object, not rows (the
    dataset_info.json or stats.json beside the shards: skipped, and named in a warning)."""
    if not path.lower().endswith(JSON_SUFFIXES):
        return True
    with open_binary(path) as f:
        try:
            json_file_kind(f, path)
        except NotRows as exc:
            log.warning("%s: skipped, not rows (%s)", path, exc.what)
            return False
    return True


def open_binary(path: str) -> IO[bytes]:
    """A seekable binary file for a local path or a `pyarrow.fs` URI."""
    if not is_uri(path):
        try:
            return open(path, "rb")
        except OSError as exc:
            raise DataError(f"{path}: cannot read file: {exc.strerror}") from None
    import pyarrow.fs as pafs

    try:
        fs, inner = pafs.FileSystem.from_uri(path)
        return io.BufferedReader(fs.open_input_file(inner))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read file: {str(exc).splitlines()[0]}") from None


def file_kind(path: str) -> str:
    """ "parquet", "jsonl" or "json" from the file's extension; an error for anything else."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in JSON_SUFFIXES:
        return "json"
    supported = ", ".join(SUPPORTED_SUFFIXES)
    raise DataError(f"{path}: unsupported file extension {suffix or '(none)'!r}; use {supported}")


def iter_file(path: str) -> Iterator[Any]:
    """Stream one data file's rows; an error for an empty file or one without rows."""
    kind = file_kind(path)
    if kind == "parquet":
        rows = iter_parquet_rows(path)
    elif kind == "json":
        with open_binary(path) as f:
            kind = json_file_kind(f, path)
        rows = _iter_json_array(path) if kind == "array" else _iter_jsonl(path)
    else:
        rows = _iter_jsonl(path)
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        problem = "file is empty" if kind == "jsonl" else "contains no rows"
        raise DataError(f"{path}: {problem}")


def _iter_jsonl(path: str) -> Iterator[Any]:
    with open_binary(path) as f:
        for _, line, text in jsonl_lines(f, path):
            yield parse_jsonl_line(path, line, text)


def _iter_json_array(path: str) -> Iterator[Any]:
    with open_binary(path) as f:
        yield from iter_json_array(f, path)


def parquet_file(path: str) -> Any:
    """`pyarrow.parquet.ParquetFile` of `path`; a DataError when it is not readable Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(open_binary(path))
    except (pa.ArrowException, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable Parquet file: {detail}") from None


def iter_parquet_rows(path: str, row_groups: list[int] | None = None) -> Iterator[Any]:
    """Rows of a Parquet file (or of some of its row groups), a batch at a time; list and
    struct columns become Python lists and dicts."""
    import pyarrow as pa

    pf = parquet_file(path)
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=row_groups):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable Parquet file: {detail}") from None


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub dataset id (`org/name`) rather than a local file path."""
    return bool(_HUB_ID.match(name)) and not name.lower().endswith(SUPPORTED_SUFFIXES)


def load_hub_dataset(name: str, split: str) -> Any:
    """A Hugging Face dataset split by name (Arrow-backed, memory-mapped); any failure becomes
    one clear DataError."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name}: no such local file, and the `datasets` package needed to load it "
            "from the Hugging Face Hub is not installed"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the Hub raises many types: report them, never a traceback
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{name}: no such local file, and the Hugging Face dataset (split {split!r}) "
            f"cannot be loaded: {detail}"
        ) from None
    if len(dataset) == 0:
        raise DataError(f"{name}: Hugging Face dataset split {split!r} contains no rows")
    return dataset


def _iter_hub_dataset(name: str, split: str) -> Iterator[Any]:
    yield from load_hub_dataset(name, split)
