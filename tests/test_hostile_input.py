"""Hostile and edge-case corpora through the real CLI: a clear error naming the file and the
position, or a counted, reported rejection of each bad row; never a traceback, never a valid
row lost. Plus output directories that cannot be written or fill up."""

from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftmix_ray.cli import main
from tests.conftest import TINY_OVERRIDES

GOOD = {"instruction": "Add 2 and 3.", "output": "5"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def _jsonl(*rows: object) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"


def _parquet(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


# name -> (what is written, expected error text); the file name must appear in the message too.
# fmt: off
FILE_ERRORS: dict[str, tuple[str, bytes | None, str]] = {
    "truncated_array": ("c.json", b'[{"instruction": "a", "output": "b"}, {"instr', "line 1"),
    "truncated_jsonl_line": ("c.jsonl", _jsonl(GOOD, GOOD) + b'{"instruction": "x', "line 3"),
    "invalid_utf8": ("c.jsonl", _jsonl(GOOD) + b'{"instruction": "caf\xe9", "output": "x"}\n',
                     "not valid UTF-8 at byte"),
    "empty_file": ("c.jsonl", b"", "file is empty"),
    "whitespace_only": ("c.json", b"  \r\n\n\t\n", "file is empty"),
    "top_level_object": ("c.json", json.dumps({"data": [GOOD]}).encode(),
                         "must be an array of rows"),
    "jsonl_rows_that_are_arrays": ("c.jsonl", b"[1]\n[2]\n", "line 2"),
    "number_too_long_in_jsonl": ("c.jsonl", _jsonl(GOOD) + b'{"n": ' + b"9" * 5000 + b"}\n",
                                 "line 2"),
    "number_too_long_in_array": ("c.json", b'[{"n": ' + b"9" * 5000 + b"}]", "line 1"),
    "nested_too_deeply": ("c.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "unsupported_extension": ("c.txt", b"instruction,output\na,b\n", "unsupported file extension"),
    "truncated_gzip": ("c.jsonl.gz", gzip.compress(_jsonl(GOOD, GOOD))[:-9], "cannot decompress"),
    "csv_without_header": ("c.csv", b"\n", "no header row"),
    "corrupt_parquet": ("c.parquet", b"PAR1" + os.urandom(64) + b"PAR1",
                        "not a readable Parquet file"),
    "no_format_detectable": ("c.jsonl", _jsonl({"body": "a", "label": "b"}),
                             "cannot detect the corpus format"),
    "array_of_nothing": ("c.json", b"[]", "contains no rows"),
}
# fmt: on


@pytest.mark.parametrize("case", list(FILE_ERRORS))
def test_unusable_file_is_one_clear_error(case, tmp_path, capsys):
    name, data, expected = FILE_ERRORS[case]
    path = tmp_path / case / name
    path.parent.mkdir()
    path.write_bytes(data)
    code = main(["validate-data", "--data", str(path), "--json"])
    err = capsys.readouterr().err
    assert code == 1
    assert str(path) in err and expected in err, err
    assert "Traceback" not in err and err.count("\n") == 1  # one line, no stack


def test_missing_path_and_empty_directory_are_clear_errors(tmp_path, capsys):
    assert main(["validate-data", "--data", str(tmp_path / "nope.jsonl")]) == 1
    assert "nope.jsonl: no such file or directory" in capsys.readouterr().err
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "README.txt").write_text("not data")
    assert main(["validate-data", "--data", str(tmp_path / "shards")]) == 1
    assert (
        "is a directory without .parquet, .jsonl, .ndjson, .json, .csv or .tsv"
        in capsys.readouterr().err
    )
    dangling = tmp_path / "link.jsonl"
    dangling.symlink_to(tmp_path / "gone.jsonl")
    assert main(["validate-data", "--data", str(dangling)]) == 1
    assert "link.jsonl: no such file or directory" in capsys.readouterr().err


HUGE = "9" * 2_000_000  # a 2 MB answer: valid JSON, a valid row (prepare rejects it as too long)

# name -> (file name, bytes, valid row indices, {rejected index: reason text})
# fmt: off
ROW_CASES: dict[str, tuple[str, bytes, list[int], dict[int, str]]] = {
    "null_rows": ("c.jsonl", _jsonl(GOOD, None, GOOD, None), [0, 2],
                  {1: "not an object (got null)", 3: "not an object (got null)"}),
    "wrong_types": ("c.jsonl", _jsonl(GOOD, {"instruction": 5, "output": "x"},
                                      {"instruction": "a", "output": ["x"]}, 7, "text",
                                      {"instruction": "  ", "output": "x"}),
                    [0], {1: "must be a string (got int)", 2: "must be a string (got list)",
                          3: "not an object", 4: "not an object (got string)",
                          5: "fields 'instruction' and 'input' are both empty"}),
    "unknown_roles": ("c.jsonl", _jsonl(CHAT, {"messages": [{"role": "robot", "content": "a"},
                                               {"role": "assistant", "content": "b"}]}),
                      [0], {1: "unknown role 'robot' in turn 1"}),
    # Changed by data.repair=standard (the default): the empty reply is dropped, and what
    # remains has no assistant turn (strict mode said "turn 2 content is empty").
    "empty_turns": ("c.jsonl", _jsonl(CHAT, {"messages": []}, {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}), [0],
        {1: "field 'messages' is empty", 2: "no assistant turn"}),
    "missing_fields": ("c.jsonl", _jsonl(GOOD, {"instruction": "no answer"}, {}), [0],
                       {1: "missing field 'output'", 2: "missing field 'instruction'"}),
    # Changed by data.repair=standard: the leading assistant turn is dropped, and what remains
    # has no assistant turn (strict mode said "must start with a user turn").
    "bad_turn_order": ("c.jsonl", _jsonl(CHAT, {"messages": [
        {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": "only a question"}]}), [0],
        {1: "no assistant turn", 2: "no assistant turn"}),
    # The format is detected once per corpus (from its first recognisable row): rows in another
    # format are rejected with what they look like, so the user can split the file.
    # `auto` reads each row in its own format: none is lost.
    "mixed_formats": ("c.jsonl", _jsonl(GOOD, CHAT, {"conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}), [0, 1, 2], {}),
    "bom_and_crlf": ("c.jsonl", b"\xef\xbb\xbf" + _jsonl(GOOD, GOOD).replace(b"\n", b"\r\n"),
                     [0, 1], {}),
    "blank_lines_are_not_rows": ("c.jsonl", b"\n\n" + _jsonl(GOOD) + b"\n  \n" + _jsonl(GOOD),
                                 [0, 1], {}),
    "duplicate_ids_and_rows": ("c.jsonl", _jsonl({**GOOD, "id": 1}, {**GOOD, "id": 1}, GOOD),
                               [0, 1, 2], {}),
    "unicode_edges": ("c.jsonl", _jsonl({"instruction": "say \u2028 \u0000 \U0001f600 \u202e",
                                         "output": "ok\u2029"}), [0], {}),
    "huge_row": ("c.jsonl", _jsonl(GOOD, {"instruction": "count", "output": HUGE}), [0, 1], {}),
    "json_lines_named_json": ("c.json", _jsonl(GOOD, None, GOOD), [0, 2], {1: "not an object"}),
}
# fmt: on


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_bad_rows_are_counted_and_valid_rows_kept(case, tmp_path, capsys):
    name, data, valid, rejected = ROW_CASES[case]
    path = tmp_path / name
    path.write_bytes(data)
    assert main(["validate-data", "--data", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["total"] == report["valid"] + report["rejected"] == len(valid) + len(rejected)
    assert report["valid"] == len(valid)  # nothing valid lost
    reasons = {r["index"]: r["reason"] for r in report["rejections"]}
    assert sorted(reasons) == sorted(rejected)
    for index, text in rejected.items():
        assert text in reasons[index], reasons[index]
    assert "Traceback" not in captured.err


def test_parquet_with_wrong_column_types_and_nulls(tmp_path, capsys):
    path = tmp_path / "c.parquet"
    table = pa.table(
        {"instruction": ["a", None, "c", "d"], "output": pa.array([1, 2, None, 4], pa.int64())}
    )
    _parquet(path, table)
    assert main(["validate-data", "--data", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["total"], report["valid"], report["rejected"]) == (4, 0, 4)
    reasons = [r["reason"] for r in report["rejections"]]
    assert reasons == [
        "field 'output' must be a string (got int)",
        "fields 'instruction' and 'input' are both empty",  # a null instruction is empty
        "field 'output' must be a string (got null)",
        "field 'output' must be a string (got int)",
    ]


def test_parquet_turns_with_the_union_of_keys_are_read(tmp_path, capsys):
    """Parquet (and HF datasets) store a list of turns as one struct type: a row whose turns
    use from/value gets role/content too, as nulls, and the other way round. Both rows are
    valid (the second was rejected: "turn 1 role must be a string (got null)")."""
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"conversations": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "yo"}]},
    ]  # fmt: skip
    table = pa.Table.from_pylist(rows)
    assert set(table.schema.field("conversations").type.value_type.names) == {
        "from", "value", "role", "content"
    }  # fmt: skip
    _parquet(tmp_path / "c.parquet", table)
    assert main(["validate-data", "--data", str(tmp_path / "c.parquet"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["total"], report["valid"], report["rejected"]) == (2, 2, 0)


def test_directory_of_shards_counts_across_files(tmp_path, capsys):
    shards = tmp_path / "train"
    shards.mkdir()
    (shards / "part-0.jsonl").write_bytes(_jsonl(GOOD, None))
    _parquet(shards / "part-1.parquet", pa.Table.from_pylist([GOOD, GOOD]))
    (shards / "notes.md").write_text("ignored: not a data file")
    assert main(["validate-data", "--data", str(shards), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["total"], report["valid"], report["rejected"]) == (4, 3, 1)
    assert report["rejections"] == [{"index": 1, "reason": "row is not an object (got null)"}]


def test_a_directory_names_the_subfolders_it_does_not_read(tmp_path, capsys, caplog, monkeypatch):
    """A corpus directory's own files are its shards, in name order, hidden and `_` ones too;
    its subfolders are not read (one may hold the held-out rows, another split, or a run's
    OUT) but named in a warning: a dump kept by month was skipped without a word. Hidden and
    `_` folders (`.ipynb_checkpoints/`, Spark's `_temporary/`) are not named."""
    from sftmix_ray.data.readers import corpus_files

    corpus = tmp_path / "corpus"
    for name, rows in {
        "b.jsonl": [{**GOOD, "id": "b"}, None],
        "_part.jsonl": [{**GOOD, "id": "_"}],
        "2024-01/part-0.jsonl": [{**GOOD, "id": "m1"}],
        "lang=en/x.jsonl": [{**GOOD, "id": "en"}],
        ".ipynb_checkpoints/b-checkpoint.jsonl": [{**GOOD, "id": "copy"}],
        "_temporary/0/part-9.jsonl": [{**GOOD, "id": "partial"}],
    }.items():
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_bytes(_jsonl(*rows))
    _parquet(corpus / "a.parquet", pa.Table.from_pylist([{**GOOD, "id": "a"}]))
    with caplog.at_level("WARNING", logger="sftmix_ray.data.readers"):
        files = corpus_files(corpus)
    assert [Path(f).name for f in files] == ["_part.jsonl", "a.parquet", "b.jsonl"]
    assert (
        f"{corpus}: its subfolders are not read (2024-01/, lang=en/); name a folder as "
        "data.path to read it" in caplog.text
    )
    assert main(["validate-data", "--data", str(corpus), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["total"], report["valid"], report["rejected"]) == (4, 3, 1)
    # The current directory as data.path: its files, none lost to their names.
    monkeypatch.chdir(corpus)
    assert corpus_files(".") == ["_part.jsonl", "a.parquet", "b.jsonl"]


def test_prepare_through_the_cli_loses_no_valid_row(ray_local, tmp_path, capsys):
    """The same hostile rows through `sftmix-ray prepare`: every valid row reaches OUT/data, the
    2 MB one cut to data.max_length inside its response (data.truncation=turns, the default;
    `drop` rejected it before), and the counts add up."""
    rows = [
        GOOD, None, {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": 5, "output": "x"}, {**GOOD, "id": 1},
        {"instruction": "count", "output": HUGE}, {"instruction": "", "output": "x"},
        {**GOOD, "id": 1},
    ]  # fmt: skip
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _jsonl(*rows).replace(b"\n", b"\r\n"))
    out = tmp_path / "out"
    sets = [f"--set={o}" for o in TINY_OVERRIDES if not o.startswith("ray.")]
    code = main(["prepare", "--output-dir", str(out), *sets, f"--set=data.path={path}",
                 "--set=data.format=auto"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    train = json.loads((out / "summary.json").read_text())["stages"]["prepare"]["train"]
    assert train["input"] == 8 and train["written"] == 5 and train["rejected"] == 3
    assert train["input"] == train["written"] + train["rejected"] and train["truncated"] == 1
    rejections = [
        json.loads(line) for line in Path(train["rejections_file"]).read_text().splitlines()
    ]
    assert [r["index"] for r in rejections] == [1, 3, 6]
    assert {k: v["count"] for k, v in train["rejections_by_kind"].items()} == {
        "not_an_object": 1, "wrong_type": 1, "empty_field": 1,
    }  # fmt: skip
    data = pq.read_table(out / "data")
    assert data.column("example_id").to_pylist() == [0, 2, 4, 5, 7]
    assert max(len(x) for x in data.column("input_ids").to_pylist()) == 96  # data.max_length


def test_a_row_that_breaks_the_reader_is_an_error_naming_it(ray_local, tmp_path, capsys):
    """A value no JSON can hold (a Parquet date in a tool call's arguments) broke the
    tokenization task with a traceback naming neither the file nor the row; through
    `sftmix-ray prepare` it is now one line naming both, exit 1."""
    import datetime

    call = {"type": "function", "function": {"name": "book", "arguments": {"day": None}}}
    rows = [
        CHAT,
        {"messages": [{"role": "user", "content": "Book it."},
                      {"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "content": "booked"},
                      {"role": "assistant", "content": "Done."}]},
    ]  # fmt: skip
    rows[1]["messages"][1]["tool_calls"][0]["function"]["arguments"]["day"] = datetime.date(
        2024, 1, 2
    )
    path = tmp_path / "dates.parquet"
    pq.write_table(pa.Table.from_pylist([rows[1], rows[0], rows[0]]), path)
    sets = [f"--set={o}" for o in TINY_OVERRIDES if not o.startswith("ray.")]
    code = main(["prepare", "--output-dir", str(tmp_path / "out"), *sets,
                 f"--set=data.path={path}"])  # fmt: skip
    err = capsys.readouterr().err
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert code == 1
    assert last.startswith("sftmix-ray prepare: error: "), err[-2000:]
    assert f"{path}: row 1: unexpected TypeError" in last and "type date" in last, last


def test_unwritable_output_directory_is_a_clear_error(tmp_path):
    """Through the console script in its own process: in-process, after other tests of the
    pytest worker had run Ray there, this test failed once in a fresh clone (its error never
    shown: formatting it crashed the worker), and the process's state was the suspect."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "sftmix_ray.cli", "split", "--output-dir", str(blocker / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    last = proc.stderr.rstrip("\n").rsplit("\n", 1)[-1]
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr[-2000:]
    assert last == (
        f"sftmix-ray split: error: output directory {blocker / 'out'} is not writable: "
        "Not a directory"
    ), last
    assert "Traceback" not in proc.stderr


def test_full_output_disk_is_a_clear_error(tmp_path):
    """A write that fails with the disk full (here EFBIG from a file-size limit, which the
    kernel enforces like a quota) stops the stage with one line naming the file, exit 1."""
    out = tmp_path / "out"
    (out / "scores").mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 60
    scores = {
        "example_id": pa.array(np.arange(n), pa.int64()),
        "confidence": rng.uniform(0, 1, n),
        "variability": rng.uniform(0, 0.2, n),
    }
    pq.write_table(pa.table(scores), out / "scores" / "scores.parquet")
    limit = 16 * 1024  # the split's Parquet files fit; the cartography PNG does not

    def cap_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-m", "sftmix_ray.cli", "split", "--output-dir", str(out),
         *(f"--set={o}" for o in TINY_OVERRIDES)],
        capture_output=True, text=True, timeout=120, preexec_fn=cap_file_size,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "File too large" in proc.stderr and f"under {out}" in proc.stderr
    assert "Traceback" not in proc.stderr
    status = json.loads((out / "summary.json").read_text())["stages"]["split"]["status"]
    assert status == "failed"
    assert not (out / "split").exists(), "no partial split directory left in place"
