"""Reading corpora (JSON, JSONL, Parquet, directories, HF by name) and every file-level error."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftmix_ray.data.readers import looks_like_hub_id, read_records
from sftmix_ray.data.validation import format_report, validate_file
from sftmix_ray.errors import DataError

ROWS: list[Any] = [
    {"instruction": "q1", "output": "a1"},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    None,
    5,
]


def write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def jsonl(rows: list[Any], newline: str = "\n") -> str:
    return "".join(json.dumps(row) + newline for row in rows)


def data_error(path: Any, *fragments: str) -> str:
    """Read `path`, expect a DataError naming the file and every fragment; return the message."""
    with pytest.raises(DataError) as info:
        read_records(path)
    message = str(info.value)
    assert Path(path).name in message
    for fragment in fragments:
        assert fragment in message
    return message


# --- formats that read ----------------------------------------------------------------------


def test_json_array(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", json.dumps(ROWS, indent=2))
    assert read_records(path) == ROWS


@pytest.mark.parametrize("name", ["c.jsonl", "c.ndjson", "c.json", "C.JSONL"])
def test_json_lines(tmp_path: Path, name: str) -> None:
    assert read_records(str(write(tmp_path / name, jsonl(ROWS)))) == ROWS


def test_bom_and_crlf(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    lines = write(tmp_path / "c.jsonl", bom + jsonl(ROWS, "\r\n").encode())
    array = write(
        tmp_path / "c.json", bom + json.dumps(ROWS, indent=1).replace("\n", "\r\n").encode()
    )
    assert read_records(lines) == ROWS
    assert read_records(array) == ROWS


def test_blank_lines_are_ignored_not_rows(tmp_path: Path) -> None:
    text = "\n" + json.dumps(ROWS[0]) + "\n  \n\r\n" + json.dumps(ROWS[1]) + "\n\n"
    assert read_records(write(tmp_path / "c.jsonl", text)) == ROWS[:2]


def test_line_separator_inside_a_string_is_not_a_line_break(tmp_path: Path) -> None:
    row = {"instruction": "a\u2028b\u0085c", "output": "d"}
    path = write(tmp_path / "c.jsonl", json.dumps(row, ensure_ascii=False) + "\n")
    assert read_records(path) == [row]


def test_parquet_nested_columns(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    records = read_records(tmp_path / "c.parquet")
    assert records == rows
    assert isinstance(records[0]["messages"], list) and isinstance(records[0]["messages"][0], dict)


def test_directory_of_parquet_reads_sorted(tmp_path: Path) -> None:
    for name, value in [("part-1.parquet", "b"), ("part-0.parquet", "a"), ("part-2.parquet", "c")]:
        pq.write_table(
            pa.Table.from_pylist([{"instruction": value, "output": "x"}]), tmp_path / name
        )
    write(tmp_path / "README.md", "not data")
    assert [r["instruction"] for r in read_records(tmp_path)] == ["a", "b", "c"]


def test_directory_mixing_parquet_and_jsonl(tmp_path: Path) -> None:
    pq.write_table(
        pa.Table.from_pylist([{"instruction": "a", "output": "x"}]), tmp_path / "a.parquet"
    )
    write(tmp_path / "b.jsonl", jsonl([{"instruction": "b", "output": "y"}]))
    assert [r["instruction"] for r in read_records(tmp_path)] == ["a", "b"]


def test_directory_reads_json_shards_and_names_the_files_it_cannot_read(
    tmp_path: Path, caplog
) -> None:
    """A .json shard beside .jsonl ones is read (it was skipped without a word, its rows
    lost), a .json holding one object (HF's dataset_info.json) is not rows and is skipped; a
    compressed shard is an error naming it, not a silent skip."""
    import gzip

    write(tmp_path / "a.jsonl", jsonl([{"instruction": "a", "output": "x"}]))
    rows = [{"instruction": "b", "output": "y"}, {"instruction": "c", "output": "z"}]
    write(tmp_path / "b.json", json.dumps(rows))
    write(tmp_path / "README.md", "not data")
    write(tmp_path / "dataset_info.json", json.dumps({"features": {}, "splits": {}}, indent=1))
    (tmp_path / "backup.zip").write_bytes(b"PK")  # not a shard: ignored as before
    with caplog.at_level("WARNING", logger="sftmix_ray.data.readers"):
        assert [r["instruction"] for r in read_records(tmp_path)] == ["a", "b", "c"]
    assert "dataset_info.json: skipped, not rows (object with keys 'features', 'splits')" in (
        caplog.text
    )
    # A broken .json shard is an error naming it, not a file skipped as metadata.
    write(tmp_path / "c.json", '[{"instruction": "d", "output": "w"},')
    data_error(tmp_path, "c.json", "Expecting value")
    (tmp_path / "c.json").unlink()
    (tmp_path / "d.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
    data_error(tmp_path, "holds files that cannot be read (d.parquet.gz)", "decompress")


# --- file-level errors ----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    data_error(tmp_path / "nope.jsonl", "no such file")


def test_missing_relative_path_is_not_a_hub_id() -> None:
    data_error("data/missing-corpus.jsonl", "no such file")


def test_directory_without_data_files(tmp_path: Path) -> None:
    write(tmp_path / "notes.txt", "x")
    data_error(tmp_path, "directory without .parquet, .jsonl, .ndjson, .json, .csv or .tsv")


def test_not_utf8_reports_byte_offset_and_line(tmp_path: Path) -> None:
    good = json.dumps(ROWS[0]) + "\n"
    path = write(tmp_path / "c.jsonl", good.encode() + b'{"instruction": "caf\xe9"}\n')
    offset = len(good.encode()) + len('{"instruction": "caf')
    data_error(path, f"not valid UTF-8 at byte {offset} (line 2)", "0xe9")


def test_not_utf8_offset_counts_the_bom(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", b"\xef\xbb\xbf[\xff]")
    data_error(path, "not valid UTF-8 at byte 4 (line 1)")


def test_malformed_json_array_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", '[\n  {"instruction": "q",\n   "output" "a"}\n]')
    data_error(path, "invalid JSON at line 3, column 13", "Expecting ':' delimiter")


def test_truncated_json_array(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", json.dumps(ROWS, indent=2)[:-10])
    data_error(path, "invalid JSON at line")


def test_malformed_jsonl_line_number(tmp_path: Path) -> None:
    text = jsonl(ROWS[:2]) + "\n" + '{"instruction": "q", "output": }\n' + jsonl(ROWS[:1])
    data_error(write(tmp_path / "c.jsonl", text), "invalid JSON at line 4, column 32")


def test_truncated_jsonl_last_line(tmp_path: Path) -> None:
    text = jsonl(ROWS[:2]) + '{"instruction": "q", "outp'
    data_error(write(tmp_path / "c.jsonl", text), "invalid JSON at line 3")


def test_json_lines_in_dot_json_with_bad_line(tmp_path: Path) -> None:
    text = jsonl(ROWS[:2]) + "{oops}\n"
    data_error(write(tmp_path / "c.json", text), "invalid JSON at line 3, column 2")


def test_json_array_followed_by_junk(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", json.dumps(ROWS, indent=2) + "\n{}\n")
    data_error(
        path,
        f"invalid JSON at line {len(json.dumps(ROWS, indent=2).splitlines()) + 1}, "
        "column 1: Extra data",
    )


def test_json_lines_in_dot_json_after_blank_lines(tmp_path: Path) -> None:
    assert read_records(write(tmp_path / "c.json", "\n\n" + jsonl(ROWS))) == ROWS


@pytest.mark.parametrize("indent", [None, 2], ids=["one-line", "pretty"])
def test_json_array_in_dot_jsonl_reads_as_rows(tmp_path: Path, indent: int | None) -> None:
    """`df.to_json("c.jsonl", orient="records")` writes one JSON array on one line; `datasets`'
    json builder reads it as rows whatever the name, and so do the reader and the planner."""
    from sftmix_ray.data.chunks import iter_chunk_located, plan_chunks

    path = write(tmp_path / "c.jsonl", json.dumps(ROWS, indent=indent))
    assert read_records(path) == ROWS
    chunks, total = plan_chunks(str(path), hf_split="train", work_dir=tmp_path / "w", parts=2)
    located = [(row, where) for c in chunks for _, row, where in iter_chunk_located(c)]
    assert total == len(ROWS) and [row for row, _ in located] == ROWS
    assert [w for _, w in located] == [{"file": str(path), "element": n} for n in (1, 2, 3, 4)]
    # Found past a BOM and blank lines longer than one read of the peek (4 KiB).
    assert read_records(write(tmp_path / "bom.jsonl", "\ufeff" + "\n" * 5000 + "[1]")) == [1]
    # Rows that are arrays are no JSON Lines corpus: one clear error at the second line.
    data_error(write(tmp_path / "rows.jsonl", "[1, 2]\n[3]\n"), "line 2")


@pytest.mark.parametrize("content", [b"", b"  \n\r\n", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("name", ["c.json", "c.jsonl"])
def test_empty_file(tmp_path: Path, content: bytes, name: str) -> None:
    data_error(write(tmp_path / name, content), "file is empty")


def test_empty_array_has_no_rows(tmp_path: Path) -> None:
    data_error(write(tmp_path / "c.json", "[]"), "contains no rows")


@pytest.mark.parametrize("name", ["c.txt", "corpus", "c.parquet.gz", "c.jsonl.zip"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    data_error(write(tmp_path / name, "a,b\n"), "unsupported file extension")


def test_top_level_object(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", '\n  {"data": [], "version": 1}')
    data_error(
        path, "line 2, column 3", "must be an array", "got object with keys 'data', 'version'"
    )


def test_top_level_scalar(tmp_path: Path) -> None:
    data_error(write(tmp_path / "c.json", "null"), "line 1, column 1", "(got null)")


def test_corrupt_parquet(tmp_path: Path) -> None:
    data_error(write(tmp_path / "c.parquet", b"PAR1 this is not parquet"), "not a readable Parquet")


def test_empty_parquet(tmp_path: Path) -> None:
    table = pa.table(
        {"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}
    )
    pq.write_table(table, tmp_path / "c.parquet")
    data_error(tmp_path / "c.parquet", "contains no rows")


def test_error_in_a_directory_names_the_member_file(tmp_path: Path) -> None:
    write(tmp_path / "a.jsonl", jsonl(ROWS[:1]))
    write(tmp_path / "b.jsonl", "{bad\n")
    message = data_error(tmp_path, "line 1")
    assert "b.jsonl" in message


# --- Hugging Face by name -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tatsu-lab/alpaca", True),
        ("org/name.v2", True),
        ("data/train.jsonl", False),
        ("/abs/path", False),
        ("./org/name", False),
        ("plainname", False),
        ("a/b/c", False),
    ],
)
def test_looks_like_hub_id(name: str, expected: bool) -> None:
    assert looks_like_hub_id(name) is expected


def test_unreachable_hf_dataset_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)  # so the name cannot resolve to a local path
    datasets = pytest.importorskip("datasets")
    # The libraries read these variables at import time; another test may have imported them.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    name = "sftmix-test-nonexistent/no-such-dataset"
    with pytest.raises(DataError) as info:
        read_records(name)
    message = str(info.value)
    assert name in message and "cannot be loaded" in message and "split 'train'" in message
    assert "\n" not in message and "Traceback" not in message


# --- validate_file --------------------------------------------------------------------------


def test_validate_file_mixed_jsonl(tmp_path: Path) -> None:
    ok = {"instruction": "q", "output": "a"}
    rows = [ok, {"instruction": "q"}, None, ok, {"instruction": 3, "output": "a"}, ok]
    path = write(tmp_path / "mixed.jsonl", jsonl(rows[:3]) + "\n\n" + jsonl(rows[3:]))
    valid, report = validate_file(path)
    assert [index for index, _ in valid] == [0, 3, 5]
    assert report.total == report.valid + report.rejected == 6
    assert [(r.index, r.reason) for r in report.rejections] == [
        (1, "missing field 'output'"),
        (2, "row is not an object (got null)"),
        (4, "field 'instruction' must be a string (got int)"),
    ]
    assert format_report(report, path).startswith(f"{path}: 6 rows, 3 valid, 3 rejected")


def test_validate_file_undetectable_format_names_file(tmp_path: Path) -> None:
    path = write(tmp_path / "plain.jsonl", jsonl([{"body": "a"}, {"body": "b"}]))
    with pytest.raises(DataError, match=r"plain\.jsonl: cannot detect the corpus format"):
        validate_file(path)
    _, report = validate_file(path, "alpaca")
    assert (report.total, report.rejected) == (2, 2)


# --- Parquet map columns ------------------------------------------------------------------


def _map_rows_table(duplicate: bool = False) -> pa.Table:
    """ShareGPT rows as Spark writes Python dicts by default: each turn a map<string, string>,
    and a struct holding a map (a tool's parameters)."""
    turn = pa.map_(pa.string(), pa.string())
    first = [("from", "human"), ("value", "Hi")]
    turns = [[first, [("from", "gpt"), ("value", "Hello")]], [first + first[:1] * duplicate]]
    meta = pa.struct([("args", pa.map_(pa.string(), pa.int64()))])
    return pa.table(
        {
            "conversations": pa.array(turns, pa.list_(turn)),
            "meta": pa.array([{"args": [("n", 1)]}, None], meta),
        }
    )


def test_parquet_map_columns_read_as_objects(tmp_path: Path) -> None:
    """Map columns (Spark's default for dicts, DuckDB's MAP) read as objects, not as lists
    of (key, value) pairs that every row's turns would be rejected for; a map holding one key
    twice is an error naming the file."""
    from sftmix_ray.data.chunks import iter_chunk_located, plan_chunks

    path = tmp_path / "spark.parquet"
    pq.write_table(_map_rows_table(), path)
    expected = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
         "meta": {"args": {"n": 1}}},
        {"conversations": [{"from": "human", "value": "Hi"}], "meta": None},
    ]  # fmt: skip
    assert read_records(path) == expected
    chunks, _ = plan_chunks(str(path), hf_split="train", work_dir=tmp_path / "w", parts=1)
    assert [row for c in chunks for _, row, _ in iter_chunk_located(c)] == expected
    _, report = validate_file(path)
    assert (report.total, report.valid, report.rejected) == (2, 1, 1)
    assert report.rejections[0].kind == "no_assistant_turn"  # the second row has no answer
    pq.write_table(_map_rows_table(duplicate=True), bad := tmp_path / "dup.parquet")
    data_error(bad, "duplicate key was 'from'")


def test_parquet_date_python_cannot_hold_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "dates.parquet"
    pq.write_table(pa.table({"instruction": ["a"], "output": ["b"],
                             "day": pa.array([2**31 - 1], pa.date32())}), path)  # fmt: skip
    data_error(path, "a value Python cannot hold")


def test_parquet_corrupt_mid_page_is_not_readable_not_a_value(tmp_path: Path) -> None:
    """A data page whose bytes are garbage (its footer intact) is an unreadable file: pyarrow's
    ArrowInvalid is a ValueError too, and was reported as a value Python cannot hold."""
    path = tmp_path / "c.parquet"
    table = pa.table({"instruction": [f"q{i}" * 50 for i in range(2000)], "output": ["a"] * 2000})
    pq.write_table(table, path, compression="none", use_dictionary=False)
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    data = bytearray(path.read_bytes())
    middle = column.data_page_offset + column.total_compressed_size // 2
    data[middle : middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    data_error(path, "not a readable Parquet file")


# --- compressed files, CSV and TSV ----------------------------------------------------------

PLAIN = [
    {"instruction": "Say hi", "input": "", "output": 'Hi,\nthere "you"'},  # a multi-line cell
    {"instruction": "Add", "input": "1\t2", "output": "3"},  # a number stays text
    {"instruction": "", "input": "", "output": "x"},  # invalid: rejected by validation, kept here
]


def _delimited(rows: list[dict], delimiter: str) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), delimiter=delimiter)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _compressed(name: str, text: str) -> bytes:
    import bz2
    import gzip
    import lzma

    codec = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}
    suffix = Path(name).suffix
    return codec[suffix](text.encode()) if suffix in codec else text.encode()


@pytest.mark.parametrize(
    ("name", "text", "unit"),
    [
        ("c.jsonl.gz", jsonl(PLAIN), "line"),
        ("c.json.bz2", json.dumps(PLAIN), "element"),
        ("c.jsonl.gz", json.dumps(PLAIN), "element"),  # an array, decompressed then rewritten
        ("c.ndjson.xz", jsonl(PLAIN), "line"),
        ("c.csv", _delimited(PLAIN, ","), "row"),
        ("c.tsv.gz", _delimited(PLAIN, "\t"), "row"),
    ],
)
def test_compressed_and_delimited_files_read_like_plain_json(tmp_path, name, text, unit) -> None:
    """What `datasets`' json and csv builders read (Axolotl, TRL and LLaMA-Factory users hold
    .jsonl.gz dumps and CSV sheets): the same rows as the plain file, through the reader
    (validate-data's) and the chunk planner (prepare's, which cuts a decompressed copy or a
    Parquet rewrite), rows located in the file as named; every CSV cell is text."""
    from sftmix_ray.data.chunks import iter_chunk_located, plan_chunks

    path = write(tmp_path / name, _compressed(name, text))
    assert read_records(path) == PLAIN
    chunks, total = plan_chunks(str(path), hf_split="train", work_dir=tmp_path / "w", parts=3)
    located = [(row, where) for c in chunks for _, row, where in iter_chunk_located(c)]
    assert total == 3 and [row for row, _ in located] == PLAIN
    assert [where for _, where in located] == [{"file": str(path), unit: n} for n in (1, 2, 3)]
    _, report = validate_file(path)
    assert (report.total, report.valid, report.rejected) == (3, 2, 1)
    assert report.rejections[0].index == 2


def test_csv_and_compression_problems_are_clear_errors(tmp_path) -> None:
    import gzip

    write(tmp_path / "dup.csv", "instruction,instruction\na,b\n")
    data_error(tmp_path / "dup.csv", "the header names a column twice")
    write(tmp_path / "ragged.csv", "instruction,output\na,b\nc,d,e\n")
    data_error(tmp_path / "ragged.csv", "data row 2 (line 3) has 3 fields, the header 2")
    write(tmp_path / "bad.csv", b"instruction,output\na,\xff\n")
    data_error(tmp_path / "bad.csv", "not readable as CSV after data row 0", "can't decode")
    write(tmp_path / "junk.jsonl.gz", b"not gzip at all")
    data_error(tmp_path / "junk.jsonl.gz", "cannot decompress")
    from sftmix_ray.data.chunks import plan_chunks

    write(tmp_path / "cut.jsonl.gz", gzip.compress(jsonl(PLAIN).encode())[:-12])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: cannot decompress"):
        plan_chunks(str(tmp_path / "cut.jsonl.gz"), hf_split="train", work_dir=tmp_path, parts=1)
    try:
        import zstandard  # noqa: F401
    except ImportError:
        write(tmp_path / "c.jsonl.zst", b"(\xb5/\xfd")
        data_error(tmp_path / "c.jsonl.zst", "needs the zstandard package")


def test_a_save_to_disk_directory_reads_like_a_hub_dataset(tmp_path) -> None:
    """`Dataset.save_to_disk` / `DatasetDict.save_to_disk` directories (LLaMA-Factory and
    Axolotl read them): read with `load_from_disk`, a DatasetDict at `data.hf_split`, through
    the reader and the chunk planner; a missing split names the ones there."""
    import datasets

    from sftmix_ray.data.chunks import iter_chunk_located, plan_chunks

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    splits = {"train_sft": rows[:3], "test_sft": rows[3:]}
    datasets.DatasetDict(
        {k: datasets.Dataset.from_list(v) for k, v in splits.items()}
    ).save_to_disk(str(tmp_path / "dict"))
    assert read_records(tmp_path / "one") == rows
    assert read_records(tmp_path / "dict", hf_split="test_sft") == rows[3:]
    chunks, total = plan_chunks(
        str(tmp_path / "dict"), hf_split="train_sft", work_dir=tmp_path / "w", parts=2
    )
    located = [(row, where) for c in chunks for _, row, where in iter_chunk_located(c)]
    assert total == 3 and [row for row, _ in located] == rows[:3]
    assert located[2][1] == {"file": f"{tmp_path / 'dict'} (train_sft split)", "row": 3}
    message = data_error(tmp_path / "dict", "saved dataset has no split 'train'")
    assert "train_sft, test_sft" in message
    _, report = validate_file(tmp_path / "one")
    assert (report.valid, report.rejected) == (5, 0)


def test_csv_empty_cells_are_absent_lists(tmp_path) -> None:
    """Found in review: a CSV sheet has no nulls; an empty `history` cell is no history (a
    JSON-text one is read), and an empty `messages` cell does not make an alpaca row a
    messages one."""
    history = json.dumps([["Hi", "Hello"]])
    sheet = _delimited([
        {"instruction": "q1", "input": "", "output": "a1", "history": "", "messages": ""},
        {"instruction": "q2", "input": "", "output": "a2", "history": history, "messages": ""},
        {"instruction": "", "input": "", "output": "", "history": "",
         "messages": json.dumps([{"role": "user", "content": "q3"},
                                 {"role": "assistant", "content": "a3"}])},
    ], ",")  # fmt: skip
    valid, report = validate_file(write(tmp_path / "mixed.csv", sheet))
    assert (report.valid, report.rejected) == (3, 0), report.rejections
    assert [len(messages) for _, messages in valid] == [2, 4, 2]


def test_a_shard_folder_with_some_state_json_is_not_a_saved_dataset(tmp_path) -> None:
    """Found in review: only `save_to_disk`'s own files make a saved dataset."""
    write(tmp_path / "part-0.jsonl", jsonl([{"instruction": "q", "output": "a"}]))
    write(tmp_path / "state.json", json.dumps({"step": 3}))
    assert read_records(tmp_path) == [{"instruction": "q", "output": "a"}]
