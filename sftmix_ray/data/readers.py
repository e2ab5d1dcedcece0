"""Read a corpus into raw rows: JSON array, JSON Lines, Parquet, a directory, or a HF dataset.

Every row comes back as it is in the file (normally a dict; `null`, `5` or a list stay as they
are so validation can reject them one by one). Problems with the file itself raise `DataError`
with one message naming the file and the position (byte offset, line and column).

Decisions worth knowing:
- Blank lines in JSON Lines are ignored: they are not rows, so they are neither returned nor
  counted as rejections, and row indices count only non-blank lines.
- A `.json` file is a JSON array, or JSON Lines (one value per line, as `Dataset.to_json` writes).
  A single top-level object is an error: it is usually a wrapper such as `{"data": [...]}`.
- A file or directory without any rows is an error: there is nothing to train on.
- A directory is read non-recursively: its `.parquet`, `.jsonl` and `.ndjson` files, sorted by
  name, so a HF-style `train/` folder of shards reads in shard order.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from sftmix_ray.data.formats import json_type_name
from sftmix_ray.errors import DataError

JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
DIRECTORY_SUFFIXES = PARQUET_SUFFIXES + JSONL_SUFFIXES
SUPPORTED_SUFFIXES = JSON_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

# `org/name` as on the Hugging Face Hub; a local-looking path (with a data suffix) never matches.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_UTF8_BOM = b"\xef\xbb\xbf"


def read_records(path: str | os.PathLike[str], *, hf_split: str = "train") -> list[Any]:
    """Read every raw row of a local corpus file/directory or a Hugging Face dataset by name."""
    local = Path(path)
    if local.is_dir():
        return _read_directory(local)
    if local.is_file():
        return _read_file(local)
    name = os.fspath(path)
    if looks_like_hub_id(name):
        return _read_hub_dataset(name, hf_split)
    raise DataError(f"{name}: no such file or directory")


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub dataset id (`org/name`) rather than a local file path."""
    return bool(_HUB_ID.match(name)) and not name.lower().endswith(SUPPORTED_SUFFIXES)


def _read_file(path: Path) -> list[Any]:
    """Dispatch on the file's extension."""
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        rows = _read_parquet(path)
    elif suffix in JSONL_SUFFIXES:
        rows = _parse_jsonl(path, _read_text(path))
    elif suffix in JSON_SUFFIXES:
        rows = _parse_json(path, _read_text(path))
    else:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise DataError(
            f"{path}: unsupported file extension {suffix or '(none)'!r}; use {supported}"
        )
    if not rows:
        raise DataError(f"{path}: contains no rows")
    return rows


def _read_directory(path: Path) -> list[Any]:
    """Read the directory's Parquet and JSON Lines files in sorted order."""
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DIRECTORY_SUFFIXES
    )
    if not files:
        raise DataError(f"{path}: is a directory without .parquet, .jsonl or .ndjson files")
    rows: list[Any] = []
    for file in files:
        rows.extend(_read_file(file))
    return rows


def _read_text(path: Path) -> str:
    """Decode a file as UTF-8 (an optional BOM is dropped); reject empty files."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc.strerror}") from None
    bom = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start  # position in the file as stored, BOM included
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{path}: not valid UTF-8 at byte {offset} (line {line}): "
            f"unexpected byte 0x{data[offset]:02x}"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def _parse_json(path: Path, text: str) -> list[Any]:
    """Parse a `.json` file: a JSON array, or JSON Lines when it holds several values."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and _first_value_is_one_line(text):
            return _parse_jsonl(path, text)  # one value per line: JSON Lines named .json
        raise DataError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON: nested too deeply") from None
    if isinstance(value, list):
        return value
    start = len(text) - len(text.lstrip())
    line = text.count("\n", 0, start) + 1
    column = start - (text.rfind("\n", 0, start) + 1) + 1
    what = json_type_name(value)
    if isinstance(value, dict):
        what += f" with keys {', '.join(repr(k) for k in list(value)[:5]) or '(none)'}"
    raise DataError(
        f"{path}: line {line}, column {column}: the top-level JSON value must be an array of "
        f"rows, or one row per line (JSON Lines) (got {what})"
    )


def _first_value_is_one_line(text: str) -> bool:
    """Whether the text's first JSON value sits on one line (JSON Lines, not `[...] junk`)."""
    start = len(text) - len(text.lstrip())
    _, end = json.JSONDecoder().raw_decode(text, start)
    return "\n" not in text[start:end]


def _parse_jsonl(path: Path, text: str) -> list[Any]:
    """Parse JSON Lines: one value per line; blank lines are ignored; CRLF is accepted."""
    rows: list[Any] = []
    # Split on "\n" only: U+2028 and friends may legally appear raw inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            hint = (
                " (a JSON array? name the file .json)"
                if lineno == 1 and line.strip() == "["
                else ""
            )
            raise DataError(
                f"{path}: invalid JSON at line {lineno}, column {exc.colno}: {exc.msg}{hint}"
            ) from None
        except RecursionError:
            raise DataError(f"{path}: invalid JSON at line {lineno}: nested too deeply") from None
    return rows


def _read_parquet(path: Path) -> list[Any]:
    """Read a Parquet file; list and struct columns become Python lists and dicts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable Parquet file: {detail}") from None
    return table.to_pylist()


def _read_hub_dataset(name: str, split: str) -> list[Any]:
    """Load a Hugging Face dataset split by name; any failure becomes one clear DataError."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name}: no such local file, and the `datasets` package needed to load it "
            "from the Hugging Face Hub is not installed"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
        rows = dataset.to_list()
    except Exception as exc:  # the Hub raises many types: report them, never a traceback
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{name}: no such local file, and the Hugging Face dataset (split {split!r}) "
            f"cannot be loaded: {detail}"
        ) from None
    if not rows:
        raise DataError(f"{name}: Hugging Face dataset split {split!r} contains no rows")
    return rows
