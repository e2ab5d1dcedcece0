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
- A directory is read non-recursively: its `.parquet`, `.jsonl`, `.ndjson`, `.json`, `.csv`
  and `.tsv` files, sorted by name, so a HF-style `train/` folder of shards reads in shard order.
- JSON, JSON Lines, CSV and TSV may be compressed (`.gz`, `.bz2`, `.xz`; `.zst` where the
  `zstandard` package is installed), as `datasets`' json and csv builders read them; they are
  decompressed as they stream. Row positions are those of the decompressed text.
- CSV and TSV (as LLaMA-Factory and Axolotl read them): a header row names the columns, every
  cell is read as text (an empty cell as ""), quoted cells may hold newlines; rows are numbered
  from 1 after the header.
- A path with a scheme (`s3://bucket/corpus.jsonl`, `gs://...`, `file:///...`) is opened
  through `pyarrow.fs`, so any filesystem pyarrow can open works, directories included.
- A directory written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict read at
  `data.hf_split`) is read with `load_from_disk`, as a Hub dataset is.
"""

from __future__ import annotations

import atexit
import bz2
import csv
import gzip
import io
import logging
import lzma
import os
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sftmix_ray.data.json_stream import (
    NotRows,
    iter_json_array,
    json_file_kind,
    json_layout,
    jsonl_lines,
    parse_jsonl_line,
)
from sftmix_ray.errors import DataError

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
DELIMITED = {".csv": ",", ".tsv": "\t"}  # suffix -> delimiter
_TEXT_SUFFIXES = JSON_SUFFIXES + JSONL_SUFFIXES + tuple(DELIMITED)
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
SUPPORTED_SUFFIXES = (
    *_TEXT_SUFFIXES,
    *PARQUET_SUFFIXES,
    *(text + c for text in _TEXT_SUFFIXES for c in COMPRESSED),
)
DIRECTORY_SUFFIXES = SUPPORTED_SUFFIXES
# Shards a directory may hold that cannot be read: compressed Parquet and HF's Arrow files,
# named in an error, since skipping them would lose their rows without a word (other files,
# README.md or a backup.zip, are ignored as before).
UNREAD_SUFFIXES = (*(p + c for p in PARQUET_SUFFIXES for c in COMPRESSED), ".arrow")
PARQUET_BATCH = 1024
# Read size for object-store files: pyarrow's S3/GCS file sends one ranged GET per read, and
# Python's default 8 KiB buffer made that 650,000 requests for 5 GB of JSON Lines, read once
# by the driver's planning and once by the tasks: hours at 10-30 ms a request.
READ_BUFFER = 8 << 20
MAX_CELL_CHARS = 256 << 20  # a CSV cell may be as long as a JSON row

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
    if is_saved_dataset(local):
        return None  # read by `datasets`, as a Hub dataset is
    if local.is_dir():
        entries = sorted(local.iterdir())
        _warn_subfolders(str(local), [p.name for p in entries if p.is_dir()])
        return _shards(str(local), [str(p) for p in entries if p.is_file()])
    if local.is_file():
        return [str(local)]
    if looks_like_hub_id(name):
        return None
    raise DataError(f"{name}: no such file or directory")


def _uri_files(uri: str) -> list[str]:
    """Files under a `pyarrow.fs` URI: the file itself, or a directory's data files, sorted."""
    import pyarrow.fs as pafs

    try:
        fs, root = uri_filesystem(uri)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
        else:
            entries = [info]
    except (OSError, ValueError) as exc:  # pyarrow raises these for bad URIs and I/O
        raise DataError(f"{uri}: cannot open: {str(exc).splitlines()[0]}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: no such file or directory")
    if info.type == pafs.FileType.Directory:
        listed = sorted(e.path for e in entries if e.type == pafs.FileType.File)  # by key
        names = [_entry_uri(uri, path) for path in listed]
        folders = [e.base_name for e in entries if e.type == pafs.FileType.Directory]
        _warn_subfolders(uri, sorted(folders))
        return _shards(uri, names)
    return [uri]


def _entry_uri(directory: str, path: str) -> str:
    """The URI of a file listed in `directory` (a URI), which `uri_filesystem` opens again:
    its key percent-quoted (a key with a space or `%` in it is not a valid URI as listed)
    and the directory's options kept (`?endpoint_override=...` of a MinIO bucket: without
    them each file was looked for at AWS)."""
    parts = urllib.parse.urlsplit(directory)
    quoted = urllib.parse.quote(path, safe="/")
    # s3 and gs list "bucket/key"; file and hdfs list "/path", under the directory's host.
    # Credentials in the URI (`s3://KEY:SECRET@bucket`) are kept: the files are read with them.
    user, at, _ = parts.netloc.rpartition("@")
    where = f"{parts.netloc}{quoted}" if path.startswith("/") else f"{user}{at}{quoted}"
    return f"{parts.scheme}://{where}" + (f"?{parts.query}" if parts.query else "")


# One `pyarrow.fs` filesystem per object store (scheme, bucket and URI options): building one
# makes a new client (a credential lookup, a connection pool; on S3 without a region, a request
# for the bucket's region), which for every file opened was most of planning's time over
# thousands of object-store files. Filesystems are thread-safe; a process keeps a handful.
_STORES: dict[tuple[str, str, str], Any] = {}
_CACHED_SCHEMES = ("s3", "gs", "gcs")


def uri_filesystem(uri: str) -> tuple[Any, str]:
    """`pyarrow.fs.FileSystem.from_uri(uri)`, the filesystem built once per object store."""
    parts = urllib.parse.urlsplit(uri)
    key = (parts.scheme, parts.netloc, parts.query)
    fs = _STORES.get(key) if parts.scheme in _CACHED_SCHEMES and not parts.fragment else None
    if fs is None:
        fs, inner = _new_filesystem(uri)
        if parts.scheme in _CACHED_SCHEMES and not parts.fragment:
            if not _STORES:  # before pyarrow's own S3 finalizer (exit hooks run last first):
                atexit.register(_STORES.clear)  # a client alive then can hang the exit
            _STORES.setdefault(key, fs)
        return fs, inner
    # As pyarrow reads an s3/gs URI: the bucket (after any `KEY:SECRET@`), then the key
    # percent-decoded, no final "/".
    bucket = parts.netloc.rpartition("@")[2]
    return fs, (bucket + urllib.parse.unquote(parts.path)).rstrip("/")


def _new_filesystem(uri: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    fs, inner = pafs.FileSystem.from_uri(uri)
    return fs, inner


def _warn_subfolders(directory: str, folders: list[str]) -> None:
    """Name a corpus directory's subfolders, which are not read (only its own files are): a
    dump by month, or a split kept apart, was skipped without a word. Not read on purpose: a
    folder may hold the held-out rows, another split, or a run's OUT (whose answers and work
    copies are valid rows). Hidden and `_` folders (`.cache/`, Spark's `_temporary/`) are
    not named."""
    shown = [f"{f}/" for f in folders if not f.startswith((".", "_"))]
    if shown:
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        log.warning(
            "%s: its subfolders are not read (%s%s); name a folder as data.path to read it",
            directory, ", ".join(shown[:5]), more,
        )  # fmt: skip


def _shards(directory: str, names: list[str]) -> list[str]:
    """The data files among a directory's files (sorted); an error for data it cannot read."""
    unread = [n for n in names if file_name(n).lower().endswith(UNREAD_SUFFIXES)]
    if unread:
        shown = ", ".join(n.rsplit("/", 1)[-1] for n in unread[:3])
        more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
        raise DataError(
            f"{directory}: holds files that cannot be read ({shown}{more}): a corpus directory "
            f"holds {_KINDS} files; decompress or convert these, or move them out"
        )
    files = [n for n in names if file_name(n).lower().endswith(DIRECTORY_SUFFIXES)]
    files = [n for n in files if _holds_rows(n)]
    if not files:
        raise DataError(f"{directory}: is a directory without {_KINDS} files")
    return files


_KINDS = ".parquet, .jsonl, .ndjson, .json, .csv or .tsv (the text ones also compressed)"


def _holds_rows(path: str) -> bool:
    """False for a `.json` file in a directory of shards that holds one object, not rows (the
    dataset_info.json or stats.json beside the shards: skipped, and named in a warning)."""
    if not split_compression(path)[0].lower().endswith(JSON_SUFFIXES):
        return True
    with open_binary(path) as f:
        try:
            json_file_kind(f, path)
        except NotRows as exc:
            log.warning("%s: skipped, not rows (%s)", path, exc.what)
            return False
    return True


def open_binary(path: str) -> IO[bytes]:
    """A seekable binary file for a local path or a `pyarrow.fs` URI, decompressed as it is
    read when its name ends with a compression suffix."""
    if not is_uri(path):
        try:
            raw: IO[bytes] = open(path, "rb")  # noqa: SIM115 (the caller closes it)
        except OSError as exc:
            raise DataError(f"{path}: cannot read file: {exc.strerror}") from None
    else:
        try:
            fs, inner = uri_filesystem(path)
            raw = io.BufferedReader(fs.open_input_file(inner), buffer_size=READ_BUFFER)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read file: {str(exc).splitlines()[0]}") from None
    codec = split_compression(path)[1]
    return raw if codec is None else _decompressing(raw, codec, path)


def file_name(path: str) -> str:
    """`path` without a URI's options (`s3://b/x.jsonl?region=...` -> `s3://b/x.jsonl`):
    what its suffixes are read from."""
    return path.split("?", 1)[0] if is_uri(path) else path


def split_compression(path: str) -> tuple[str, str | None]:
    """`path` (a URI without its options) without its compression suffix, and that suffix
    (None when uncompressed)."""
    path = file_name(path)
    root, suffix = os.path.splitext(path)
    return (root, suffix.lower()) if suffix.lower() in COMPRESSED else (path, None)


def _decompressing(raw: IO[bytes], codec: str, path: str) -> IO[bytes]:
    """`raw` read through its codec (seeking back rewinds and decompresses again: done only
    to read a JSON file's first bytes twice); a corrupt or truncated archive is a DataError
    naming the file, wherever the reading finds it."""
    if codec == ".zst":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise DataError(
                f"{path}: reading .zst files needs the zstandard package (pip install "
                "zstandard), or decompress it first"
            ) from None
        stream: Any = zstandard.ZstdDecompressor().stream_reader(raw)
    elif codec == ".gz":
        stream = gzip.GzipFile(fileobj=raw)
    else:
        stream = (bz2.BZ2File if codec == ".bz2" else lzma.LZMAFile)(raw)
    return io.BufferedReader(_Decompressed(stream, raw, path), 1 << 20)


class _Decompressed(io.RawIOBase):
    """A decompressing stream as a raw file: closes the compressed file with it, and turns
    the codecs' errors (OSError, EOFError, LZMAError, zstandard's) into one DataError."""

    def __init__(self, stream: Any, raw: IO[bytes], path: str) -> None:
        super().__init__()
        self._stream, self._raw, self._path = stream, raw, path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._stream.read(len(buffer))
        except Exception as exc:  # each codec raises its own kind for a corrupt archive
            detail = str(exc) or type(exc).__name__
            raise DataError(f"{self._path}: cannot decompress: {detail}") from None
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return int(self._stream.seek(offset, whence))
        except Exception as exc:  # a codec that cannot go back (zstandard's reader)
            raise DataError(f"{self._path}: cannot reread the compressed stream: {exc}") from None

    def tell(self) -> int:
        return int(self._stream.tell())

    def close(self) -> None:
        if not self.closed:
            try:
                self._stream.close()
            finally:
                self._raw.close()
        super().close()


def file_kind(path: str) -> str:
    """ "parquet", "jsonl", "json", "csv" or "tsv" from the file's extension (a compression
    suffix after it is looked through); an error for anything else."""
    name, codec = split_compression(path)
    suffix = os.path.splitext(name)[1].lower()
    if suffix in PARQUET_SUFFIXES and codec is None:
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in DELIMITED:
        return suffix[1:]
    shown = suffix + (codec or "")
    supported = ", ".join((*_TEXT_SUFFIXES, *PARQUET_SUFFIXES))
    raise DataError(
        f"{path}: unsupported file extension {shown or '(none)'!r}; use {supported} (the text "
        f"ones may be compressed: {', '.join(COMPRESSED)})"
    )


def iter_file(path: str) -> Iterator[Any]:
    """Stream one data file's rows; an error for an empty file or one without rows."""
    kind = file_kind(path)
    if kind == "parquet":
        rows = iter_parquet_rows(path)
    elif kind in ("csv", "tsv"):
        rows = iter_delimited_rows(path)
    else:
        with open_binary(path) as f:
            kind = json_layout(f, path, kind)
        rows = _iter_json_array(path) if kind == "array" else _iter_jsonl(path)
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        problem = "file is empty" if kind == "jsonl" else "contains no rows"
        raise DataError(f"{path}: {problem}")


def iter_delimited_rows(path: str) -> Iterator[dict[str, str]]:
    """The rows of a CSV or TSV file (compressed or not) as {column: text}, streaming.

    Python's own `csv` module on the calling thread: pyarrow's streaming CSV reader read the
    Python file object from its own threads, and a process that had read a sheet aborted at
    exit now and then (SIGABRT after printing its result)."""
    delimiter = DELIMITED["." + file_kind(path)]
    csv.field_size_limit(MAX_CELL_CHARS)  # the default (128 KiB) rejects a long answer
    rows = 0
    with open_binary(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            names = next(reader, [])
            if not any(name.strip() for name in names):
                raise DataError(f"{path}: no header row (the first line names the columns)")
            if len(set(names)) != len(names):
                raise DataError(f"{path}: the header names a column twice ({', '.join(names)})")
            for cells in reader:
                rows += 1
                if len(cells) != len(names):
                    if not any(cells):
                        rows -= 1  # a blank line is not a row
                        continue
                    raise DataError(
                        f"{path}: data row {rows} (line {reader.line_num}) has {len(cells)} "
                        f"fields, the header {len(names)}"
                    )
                yield dict(zip(names, cells))
        except (csv.Error, UnicodeDecodeError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(
                f"{path}: not readable as CSV after data row {rows}: {detail}"
            ) from None


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
        raise unreadable_parquet(path, exc) from None


def unreadable_parquet(path: str, exc: BaseException) -> DataError:
    """The error for a Parquet file pyarrow cannot read (a bad footer or page), with the
    first line of pyarrow's reason."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DataError(f"{path}: not a readable Parquet file: {detail}")


def _has_map(schema: Any) -> bool:
    """Whether an Arrow schema (or type) holds a map anywhere, nested in lists or structs."""
    import pyarrow as pa

    if isinstance(schema, pa.Schema):
        return any(_has_map(field.type) for field in schema)
    if pa.types.is_map(schema):
        return True
    if pa.types.is_struct(schema):
        return any(_has_map(schema.field(i).type) for i in range(schema.num_fields))
    value_type = getattr(schema, "value_type", None)  # list, large list, fixed-size list
    return value_type is not None and _has_map(value_type)


def iter_parquet_rows(path: str, row_groups: list[int] | None = None) -> Iterator[Any]:
    """Rows of a Parquet file (or of some of its row groups), a batch at a time; list and
    struct columns become Python lists and dicts."""
    import pyarrow as pa

    pf = parquet_file(path)
    # Map columns (Spark's default for Python dicts, DuckDB's MAP) as dicts, not Arrow's
    # default lists of (key, value) pairs, which no turn or tool reader would recognise.
    # Asked for only where the schema has one: the option may take a slower path.
    maps = {"maps_as_pydicts": "strict"} if _has_map(pf.schema_arrow) else {}
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=row_groups):
            yield from batch.to_pylist(**maps)
    except (pa.ArrowException, OSError) as exc:  # first: ArrowInvalid is a ValueError too
        raise unreadable_parquet(path, exc) from None
    except KeyError as exc:  # strict: a map holding one key twice
        raise DataError(f"{path}: {exc.args[0] if exc.args else exc}") from None
    except UnicodeDecodeError as exc:  # a string column whose bytes are not UTF-8
        raise DataError(f"{path}: a string that is not valid UTF-8: {exc}") from None
    except (OverflowError, ValueError) as exc:  # a date or time Python cannot hold
        raise DataError(f"{path}: a value Python cannot hold: {exc}") from None


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a directory written by `datasets`' `save_to_disk`: a Dataset (its
    `state.json` and `dataset_info.json` beside `.arrow` files) or a DatasetDict (its
    `dataset_dict.json`, one folder a split). A folder of shards with some other `state.json`
    is not one."""
    if not path.is_dir():
        return False
    if (path / "dataset_dict.json").is_file():
        return True
    marks = all((path / n).is_file() for n in ("state.json", "dataset_info.json"))
    return marks and any(path.glob("*.arrow"))


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
    saved = is_saved_dataset(Path(name))
    try:
        if saved:  # `save_to_disk`'s directory: memory-mapped Arrow, as the Hub's cache
            dataset = datasets.load_from_disk(name)
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(
                        f"{name}: saved dataset has no split {split!r} (it has "
                        f"{', '.join(dataset)}); set data.hf_split"
                    )
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, split=split)
    except DataError:
        raise
    except Exception as exc:  # the Hub raises many types: report them, never a traceback
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = (
            "the dataset saved there"
            if saved
            else "no such local file, and the Hugging Face dataset"
        )
        raise DataError(f"{name}: {what} (split {split!r}) cannot be loaded: {detail}") from None
    if len(dataset) == 0:
        raise DataError(f"{name}: Hugging Face dataset split {split!r} contains no rows")
    return dataset


def _iter_hub_dataset(name: str, split: str) -> Iterator[Any]:
    yield from load_hub_dataset(name, split)
