"""Streaming JSON and JSON Lines parsing with errors that name the file and the position.

Every function reads a binary file object a block or a line at a time, so memory stays bounded
by the largest row, never the file. Positions in errors are those of the file as stored: a
byte offset (a UTF-8 BOM included) and a 1-based line and column.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO, Any

from sftmix_ray.data.turns import json_type_name
from sftmix_ray.errors import DataError

UTF8_BOM = b"\xef\xbb\xbf"
BLOCK = 1 << 20
PEEK = 4096  # bytes read at a time to find a file's first character
MAX_ROW_CHARS = 256 << 20  # an incomplete value is read on up to this size before it is an error
_WS = " \t\n\r"


def utf8_error(path: str, exc: UnicodeDecodeError, offset: int, line: int) -> DataError:
    """The error for undecodable bytes at file byte `offset` (the file's line `line`)."""
    return DataError(
        f"{path}: not valid UTF-8 at byte {offset} (line {line}): "
        f"unexpected byte 0x{exc.object[exc.start]:02x}"
    )


def jsonl_lines(
    f: IO[bytes], path: str, start: int = 0, end: int | None = None, first_line: int = 1
) -> Iterator[tuple[int, int, str]]:
    """(byte offset, line number, text) of each non-blank line starting in [start, end).

    `start` must be a line start. CRLF is accepted; only "\\n" ends a line (U+2028 may appear
    raw inside JSON strings). A UTF-8 BOM at byte 0 is skipped.
    """
    f.seek(start)
    offset, line = start, first_line
    for raw in f:
        if end is not None and offset >= end:
            return
        body = raw[len(UTF8_BOM) :] if offset == 0 and raw.startswith(UTF8_BOM) else raw
        skipped = len(raw) - len(body)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise utf8_error(path, exc, offset + skipped + exc.start, line) from None
        text = text.rstrip("\n").rstrip("\r")
        if text.strip():
            yield offset, line, text
        offset += len(raw)
        line += 1


def parse_jsonl_line(path: str, line: int, text: str) -> Any:
    """One JSON Lines row; a DataError names the file, line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {line}, column {exc.colno}"
        raise DataError(f"{path}: invalid JSON at {where}: {exc.msg}") from None
    except ValueError as exc:  # a number Python will not convert (over 4300 digits)
        raise DataError(f"{path}: unreadable JSON at line {line}: {exc}") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON at line {line}: nested too deeply") from None


class _TextStream:
    """A file decoded as UTF-8 block by block, with the line and column of the buffer start."""

    def __init__(self, f: IO[bytes], path: str):
        self.f, self.path = f, path
        self.buf = ""
        self.eof = False
        self.byte_offset = 0  # of the next undecoded byte
        self.newlines = 0  # in the bytes decoded so far
        self.line, self.col = 1, 0  # of buf[0]: line number, characters since that line's start
        self.pending = b""
        head = f.read(len(UTF8_BOM))
        if head == UTF8_BOM:
            self.byte_offset = len(UTF8_BOM)
        else:
            self.pending = head

    def fill(self, size: int = BLOCK) -> bool:
        """Decode up to `size` more bytes into `buf`; False at end of file."""
        if self.eof:
            return False
        data = self.pending + self.f.read(size)
        if len(data) == len(self.pending):
            self.eof = True
            data, self.pending = self.pending, b""
        else:
            cut = len(data)
            # Stop before a UTF-8 sequence the block splits (continuation bytes are 0b10xxxxxx).
            for back in range(1, min(4, len(data)) + 1):
                byte = data[-back]
                if byte & 0xC0 != 0x80:
                    need = (
                        1 if byte < 0x80 else 2 if byte >> 5 == 6 else 3 if byte >> 4 == 14 else 4
                    )
                    cut = len(data) - back if need > back else len(data)
                    break
            data, self.pending = data[:cut], data[cut:]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = self.newlines + data.count(b"\n", 0, exc.start) + 1
            raise utf8_error(self.path, exc, self.byte_offset + exc.start, line) from None
        self.byte_offset += len(data)
        self.newlines += data.count(b"\n")
        self.buf += text
        return bool(text) or not self.eof

    def skip_ws(self, pos: int) -> int:
        """The first non-whitespace position at or after `pos` (filling as needed), or len(buf)."""
        while True:
            while pos < len(self.buf) and self.buf[pos] in _WS:
                pos += 1
            if pos < len(self.buf) or not self.fill():
                return pos

    def decode(self, pos: int) -> tuple[Any, int]:
        """The JSON value at `pos` and the position after it, reading on while it is incomplete."""
        size = BLOCK
        while True:
            try:
                return json.JSONDecoder().raw_decode(self.buf, pos)
            except json.JSONDecodeError as exc:
                if self.eof or len(self.buf) - pos > MAX_ROW_CHARS:
                    raise self.error(exc.pos, exc.msg) from None
                self.fill(size)
                size *= 2
            except RecursionError:
                raise DataError(f"{self.path}: invalid JSON: nested too deeply") from None
            except ValueError as exc:  # a number Python will not convert (over 4300 digits)
                line, col = self.where(pos)
                raise DataError(f"{self.path}: line {line}, column {col}: {exc}") from None

    def drop(self, pos: int) -> None:
        """Forget buf[:pos], keeping the line and column of the new start."""
        gone = self.buf[:pos]
        lines = gone.count("\n")
        self.col = len(gone) - gone.rfind("\n") - 1 if lines else self.col + len(gone)
        self.line += lines
        self.buf = self.buf[pos:]

    def where(self, pos: int) -> tuple[int, int]:
        """(line, column) of buf[pos], 1-based, as `json` numbers them."""
        lines = self.buf.count("\n", 0, pos)
        if lines:
            return self.line + lines, pos - self.buf.rfind("\n", 0, pos)
        return self.line, self.col + pos + 1

    def error(self, pos: int, msg: str) -> DataError:
        line, col = self.where(pos)
        return DataError(f"{self.path}: invalid JSON at line {line}, column {col}: {msg}")


class NotRows(DataError):
    """A `.json` file holds one top-level value that is not an array of rows; `what` says what
    it is (a metadata file such as `dataset_info.json` beside a directory's shards)."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


def json_layout(f: IO[bytes], path: str, kind: str) -> str:
    """How to read a JSON text file of `kind` ("json" or "jsonl", from its name): "array" or
    "jsonl". A `.jsonl` file that opens with `[` holds a JSON array (`df.to_json(orient=
    "records")` writes one on a single line under any name); `datasets`' json builder reads it
    as rows, and so does this."""
    if kind == "json":
        return json_file_kind(f, path)
    # Its first byte past a BOM and whitespace, read a few KiB at a time: planning reads every
    # file of the corpus, and `_TextStream` would read a whole block (1 MiB) of each.
    block = f.read(PEEK)
    block = block[len(UTF8_BOM) :] if block.startswith(UTF8_BOM) else block
    while block:
        if body := block.lstrip(b" \t\r\n"):
            return "array" if body.startswith(b"[") else "jsonl"
        block = f.read(PEEK)
    return "jsonl"


def json_file_kind(f: IO[bytes], path: str) -> str:
    """How to read a `.json` file: "array" (a JSON array of rows) or "jsonl" (one value per
    line, as `Dataset.to_json` writes). Raise for an empty file, a single top-level value
    (usually a wrapper such as `{"data": [...]}`) or invalid JSON."""
    stream = _TextStream(f, path)
    pos = stream.skip_ws(0)
    if pos >= len(stream.buf):
        raise DataError(f"{path}: file is empty")
    if stream.buf[pos] == "[":
        return "array"
    value, end = stream.decode(pos)
    after = stream.skip_ws(end)
    if after < len(stream.buf):
        if "\n" not in stream.buf[pos:end]:
            return "jsonl"
        raise stream.error(after, "Extra data")
    line, col = stream.where(pos)
    what = json_type_name(value)
    if isinstance(value, dict):
        what += f" with keys {', '.join(repr(k) for k in list(value)[:5]) or '(none)'}"
    raise NotRows(
        f"{path}: line {line}, column {col}: the top-level JSON value must be an array of "
        f"rows, or one row per line (JSON Lines) (got {what})",
        what,
    )


def iter_json_array(f: IO[bytes], path: str) -> Iterator[Any]:
    """The elements of a file holding one JSON array, one at a time."""
    stream = _TextStream(f, path)
    pos = stream.skip_ws(0)
    if pos >= len(stream.buf) or stream.buf[pos] != "[":
        raise DataError(f"{path}: not a JSON array")
    pos = stream.skip_ws(pos + 1)
    if pos < len(stream.buf) and stream.buf[pos] == "]":
        pos += 1
    else:
        while True:
            if pos >= len(stream.buf):
                raise stream.error(pos, "Expecting value")
            value, pos = stream.decode(pos)
            yield value
            pos = stream.skip_ws(pos)
            if pos < len(stream.buf) and stream.buf[pos] == "]":
                pos += 1
                break
            if pos >= len(stream.buf) or stream.buf[pos] != ",":
                raise stream.error(pos, "Expecting ',' delimiter")
            pos = stream.skip_ws(pos + 1)
            if pos > BLOCK:  # forget what is parsed, a block at a time (linear, not per row)
                stream.drop(pos)
                pos = 0
    after = stream.skip_ws(pos)
    if after < len(stream.buf):
        raise stream.error(after, "Extra data")
