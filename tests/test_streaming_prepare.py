"""Streaming prepare: the corpus is cut into chunks that Ray Data tasks read on their own.

Row ids, outputs and errors must not depend on how the corpus is cut: chunks cover every row
exactly once with its whole-file index, `sftmix-ray prepare` writes the same OUT/data whether
the rows come as one JSON array or as a directory of JSON Lines and multi-row-group Parquet
cut into many chunks, and a broken line deep in a later chunk is reported with its file,
line and column.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftmix_ray.cli import main
from sftmix_ray.data import chunks as chunks_module
from sftmix_ray.data.chunks import iter_chunk, iter_chunk_located, plan_chunks
from sftmix_ray.data.readers import read_records
from sftmix_ray.errors import DataError
from tests.conftest import TINY_OVERRIDES

SETS = [f"--set={o}" for o in TINY_OVERRIDES if not o.startswith("ray.")]
SETS.append("--set=data.num_workers=2")  # two actors reading chunks side by side


def _rows(n: int) -> list[object]:
    """Chat rows of varied length, with some invalid ones and raw U+2028 inside strings."""
    rows: list[object] = []
    for i in range(n):
        turns = [
            {"from": "human", "value": f"question {i} \u2028" + " more" * (i % 13)},
            {"from": "gpt", "value": f"answer {i}" + " words" * (i % 7)},
        ]
        rows.append({"conversations": turns, "id": f"r{i}"})
    rows[17] = None
    rows[40] = {"conversations": []}
    rows[77] = {"conversations": [{"from": "gpt", "value": "lost prompt"}, *turns]}  # repaired
    return rows


def _jsonl_bytes(rows: list[object]) -> bytes:
    """JSON Lines with a BOM, CRLF line ends and blank lines between some rows."""
    lines = []
    for i, row in enumerate(rows):
        lines.append(json.dumps(row, ensure_ascii=False))
        if i % 9 == 0:
            lines.append("   ")
    return b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n"


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few hundred bytes, so that a small corpus is cut into many."""
    monkeypatch.setattr(chunks_module, "MIN_CHUNK_BYTES", 512)


def test_chunks_cover_every_row_once_with_its_whole_file_index(tmp_path, small_chunks):
    rows = _rows(120)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(_jsonl_bytes(rows))
    array = tmp_path / "c.json"
    array.write_text(json.dumps(rows, indent=1))
    parquet_dir = tmp_path / "shards"
    parquet_dir.mkdir()
    valid = [r for r in rows if r is not None]
    pq.write_table(pa.Table.from_pylist(valid[:70]), parquet_dir / "a.parquet", row_group_size=9)
    (parquet_dir / "b.jsonl").write_bytes(_jsonl_bytes(valid[70:]))
    for path in (jsonl, array, parquet_dir):
        chunks, total = plan_chunks(str(path), hf_split="train", work_dir=tmp_path / "w", parts=8)
        assert len(chunks) >= 6, (path, len(chunks))
        assert total == sum(c.rows for c in chunks)
        got = [pair for chunk in chunks for pair in iter_chunk(chunk)]
        expected = list(enumerate(read_records(path)))
        assert got == expected, path
        firsts = [c.first_row for c in chunks]
        assert firsts == [sum(c.rows for c in chunks[:k]) for k in range(len(chunks))]
        # Each row says where it is in the file the user gave: that place holds that row.
        for chunk in chunks:
            for _, row, where in iter_chunk_located(chunk):
                assert _row_at(where) == row, where


def _row_at(where: dict) -> object:
    """The row at a location `iter_chunk_located` reports, read straight from the file."""
    path = Path(where["file"])
    if "line" in where:
        lines = path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n")
        return json.loads(lines[where["line"] - 1])
    if "element" in where:
        return json.loads(path.read_text())[where["element"] - 1]
    return pq.read_table(path).slice(where["row"] - 1, 1).to_pylist()[0]


def _prepare(out: Path, *sets: str, capsys) -> tuple[int, str]:
    code = main(["prepare", "--output-dir", str(out), *SETS, *sets])
    return code, capsys.readouterr().err


def test_prepare_output_does_not_depend_on_how_the_corpus_is_cut(
    ray_local, tmp_path, small_chunks, capsys
):
    rows = _rows(150)
    array = tmp_path / "one.json"
    array.write_text(json.dumps(rows))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_bytes(_jsonl_bytes(rows[:64]))
    pq.write_table(
        pa.Table.from_pylist([r for r in rows[64:]]), shards / "b.parquet", row_group_size=7
    )  # rows[64:] has no None: Parquet needs objects
    outs = {}
    for name, path in (("array", array), ("shards", shards)):
        out = tmp_path / f"out-{name}"
        code, err = _prepare(
            out, f"--set=data.path={path}", "--set=data.eval_fraction=0.1", capsys=capsys
        )
        assert code == 0, err
        outs[name] = out
    tables = {n: pq.read_table(o / "data").sort_by("example_id") for n, o in outs.items()}
    assert tables["array"].equals(tables["shards"])
    heldout = {n: pq.read_table(o / "heldout").sort_by("example_id") for n, o in outs.items()}
    assert heldout["array"].equals(heldout["shards"])
    # Ids are whole-corpus row indices; every 10th row (id % 10 == 9) is held out.
    train_ids = tables["array"].column("example_id").to_pylist()
    held_ids = heldout["array"].column("example_id").to_pylist()
    assert all(i % 10 == 9 for i in held_ids) and not any(i % 10 == 9 for i in train_ids)
    assert sorted(train_ids + held_ids) == [i for i in range(150) if i not in (17, 40)]
    summary = json.loads((outs["shards"] / "summary.json").read_text())["stages"]["prepare"]
    train, held = summary["train"], summary["heldout"]
    assert train["input"] + held["input"] == 150
    for side in (train, held):
        assert side["input"] == side["written"] + side["rejected"]
    assert train["repairs"] == {"leading_assistant_dropped": 1}  # row 77
    assert {k: v["examples"] for k, v in train["rejections_by_kind"].items()} == {
        "not_an_object": [17], "empty_conversation": [40],
    }  # fmt: skip
    lines = Path(train["rejections_file"]).read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [17, 40]
    # The part files sort in row order (one or two per chunk), so a plain read is ordered.
    assert pq.read_table(outs["shards"] / "data").column("example_id").to_pylist() == train_ids
    assert len(list((outs["shards"] / "data").glob("*.parquet"))) >= 6
    # Rerun without a held-out split: the earlier held-out rows are trained on now, so the
    # earlier OUT/heldout goes (eval and training's eval_loss measured on it, as held out).
    code, err = _prepare(outs["shards"], f"--set=data.path={shards}", capsys=capsys)
    assert code == 0, err
    assert pq.read_table(outs["shards"] / "data").num_rows == len(train_ids) + len(held_ids)
    assert not (outs["shards"] / "heldout").exists()
    assert not (outs["shards"] / "rejections" / "heldout.jsonl").exists()


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("json", "invalid JSON at line {line}, column 2: Expecting property name"),
        ("utf8", "not valid UTF-8 at byte {offset} (line {line}): unexpected byte 0xff"),
    ],
)
def test_a_broken_line_in_a_later_chunk_names_file_line_and_byte(
    ray_local, tmp_path, small_chunks, capsys, damage, expected
):
    good = [json.dumps(r) for r in _rows(200) if r is not None]
    line = 160  # well past the first chunks of ~512 bytes
    broken = "{oops}" if damage == "json" else None
    data = "\n".join(good[: line - 1]).encode() + b"\n"
    offset = len(data) + 2
    data += (broken.encode() if broken else b'{"\xff": 1}') + b"\n"
    data += "\n".join(good[line:]).encode() + b"\n"
    path = tmp_path / "c.jsonl"
    path.write_bytes(data)
    code, err = _prepare(tmp_path / "out", f"--set=data.path={path}", capsys=capsys)
    assert code == 1
    assert f"{path}: " + expected.format(line=line, offset=offset) in err, err
    assert "Traceback" not in err and not (tmp_path / "out" / "data").exists()


def test_an_object_store_corpus_reads_like_the_local_one(
    tmp_path, s3_env, monkeypatch, small_chunks, caplog
):
    """`s3://` through pyarrow.fs (moto's S3 server on loopback): a directory of shards lists,
    streams and cuts into the same rows and chunks as its local copy."""
    from tests.conftest import BUCKET

    env, s3 = s3_env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rows = [r for r in _rows(80) if r is not None][:60]
    local = tmp_path / "corpus"
    local.mkdir()
    rows[3] = {"conversations": []}  # Parquet needs one type: no None, but an invalid row
    (local / "a.jsonl").write_bytes(_jsonl_bytes(rows[:25]))
    pq.write_table(pa.Table.from_pylist(rows[25:]), local / "b.parquet", row_group_size=10)
    (local / "notes.txt").write_text("not data")
    (local / "sub").mkdir()  # a subfolder: not read, named
    (local / "sub" / "c.jsonl").write_bytes(_jsonl_bytes(rows[:2]))
    for name in ("a.jsonl", "b.parquet", "notes.txt", "sub/c.jsonl"):
        with s3.open_output_stream(f"{BUCKET}/corpus/{name}") as out:
            out.write((local / name).read_bytes())
    uri = f"s3://{BUCKET}/corpus"
    expected = read_records(local)
    with caplog.at_level("WARNING", logger="sftmix_ray.data.readers"):
        assert len(expected) == len(rows) and read_records(uri) == expected
    assert f"{uri}: its subfolders are not read (sub/)" in caplog.text
    remote, total = plan_chunks(uri, hf_split="train", work_dir=tmp_path / "w", parts=4)
    assert total == len(rows) and len(remote) >= 3
    assert [r for c in remote for r in iter_chunk(c)] == list(enumerate(expected))
    with pytest.raises(Exception, match="no such file or directory"):
        read_records(f"s3://{BUCKET}/missing.jsonl")


def test_an_object_store_file_is_read_in_large_requests(tmp_path, s3_env, monkeypatch, caplog):
    """A 3 MiB JSON Lines file and a 1-row-group Parquet file on S3 (moto's server, which
    logs each request): planning and reading make a handful of GETs per file, not one per
    8 KiB (Python's default buffer: 380 GETs for the JSON Lines file)."""
    import logging

    from tests.conftest import BUCKET

    env, s3 = s3_env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    text = "x" * 1000
    rows = [{"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "y"}]}]
    data = _jsonl_bytes(rows * 3000)
    assert len(data) > 3 << 20
    table = pa.Table.from_pylist(rows * 3000)
    pq.write_table(table, tmp_path / "b.parquet", compression="none")  # one row group
    with s3.open_output_stream(f"{BUCKET}/big/a.jsonl") as out:
        out.write(data)
    with s3.open_output_stream(f"{BUCKET}/big/b.parquet") as out:
        out.write((tmp_path / "b.parquet").read_bytes())
    caplog.set_level(logging.INFO, logger="werkzeug")
    uri = f"s3://{BUCKET}/big"
    chunks, total = plan_chunks(uri, hf_split="train", work_dir=tmp_path / "w", parts=2)
    assert total == 6000
    read = [row for c in chunks for _, row in iter_chunk(c)]
    assert read == rows * 6000
    gets = {name: 0 for name in ("a.jsonl", "b.parquet")}
    for record in caplog.records:
        line = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # werkzeug's colours
        for name in gets:
            gets[name] += f'"GET /{BUCKET}/big/{name} ' in line
    assert 0 < gets["a.jsonl"] <= 8 and 0 < gets["b.parquet"] <= 8, gets


def test_an_object_store_directory_keeps_its_options_and_odd_key_names(
    tmp_path, s3_env, monkeypatch
):
    """A bucket named with its endpoint in the URI (`?endpoint_override=...`, as for MinIO,
    with no endpoint in the environment) holding keys with a space, a `%` and a `+`: every
    file is listed, planned and read through the directory's options, and one S3 client is
    built for the whole corpus, not one per file opened. Before, the listed names dropped the
    options (each file was looked for at AWS) and were not valid URIs (a space)."""
    from sftmix_ray.data import readers
    from tests.conftest import BUCKET

    env, s3 = s3_env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    endpoint = env["AWS_ENDPOINT_URL_S3"].removeprefix("http://")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    rows = [r for r in _rows(80) if r is not None][:48]
    names = ["a b.jsonl", "c%20d.jsonl", "e+f.jsonl", "g.json"]
    for n, name in enumerate(names):
        part = rows[12 * n : 12 * (n + 1)]
        data = json.dumps(part).encode() if name.endswith(".json") else _jsonl_bytes(part)
        with s3.open_output_stream(f"{BUCKET}/odd/{name}") as out:
            out.write(data)
    built: list[str] = []
    new_filesystem = readers._new_filesystem
    monkeypatch.setattr(readers, "_STORES", {})
    monkeypatch.setattr(
        readers, "_new_filesystem", lambda uri: built.append(uri) or new_filesystem(uri)
    )
    uri = f"s3://{BUCKET}/odd?endpoint_override={endpoint}&scheme=http"
    chunks, total = plan_chunks(uri, hf_split="train", work_dir=tmp_path / "w", parts=8)
    assert total == len(rows) and len(chunks) >= len(names)
    assert [row for c in chunks for _, row in iter_chunk(c)] == rows
    assert read_records(uri) == rows
    assert len(built) == 1, built  # one client for every file, planned and read
    sources = {c.source or c.path for c in chunks}
    assert f"s3://{BUCKET}/odd/a%20b.jsonl?endpoint_override={endpoint}&scheme=http" in sources
    # Credentials in the URI (`s3://KEY:SECRET@bucket`): read again through the cached client
    # (its path was looked for in a bucket named `KEY:SECRET@bucket`), and kept out of the
    # rows' locations, which go to the rejections file.
    secret = f"s3://testing:testing@{BUCKET}/odd?endpoint_override={endpoint}&scheme=http"
    planned, _ = plan_chunks(secret, hf_split="train", work_dir=tmp_path / "w2", parts=8)
    located = [where for c in planned for _, _, where in iter_chunk_located(c)]
    assert [row for c in planned for _, row in iter_chunk(c)] == rows
    assert located[0]["file"].startswith(f"s3://***@{BUCKET}/odd/a%20b.jsonl?")
    assert not any("testing:testing" in where["file"] for where in located)
    # One file named with its options reads too (its suffix is read without them).
    assert (
        read_records(f"s3://{BUCKET}/odd/e%2Bf.jsonl?endpoint_override={endpoint}&scheme=http")
        == rows[24:36]
    )


def test_planning_many_files_reports_the_first_bad_file_in_corpus_order(tmp_path):
    """Files are planned several at a time; an error is still the first one in corpus
    order, not the first to happen: file 1 fails at its end, after ~20,000 good lines, while
    file 2 fails at its first byte. No chunk of a later file is kept."""
    corpus = tmp_path / "many"
    corpus.mkdir()
    rows = [r for r in _rows(80) if r is not None][:30]
    for n in range(40):
        (corpus / f"part-{n:03d}.jsonl").write_bytes(_jsonl_bytes(rows))
    (corpus / "part-001.jsonl").write_bytes(_jsonl_bytes(rows * 700) + b"\xff\xfe\n")
    (corpus / "part-002.jsonl").write_bytes(b"\xff\n" + _jsonl_bytes(rows))
    with pytest.raises(DataError) as err:
        plan_chunks(str(corpus), hf_split="train", work_dir=tmp_path / "w", parts=4)
    assert str(err.value).startswith(f"{corpus / 'part-001.jsonl'}: not valid UTF-8"), err.value
    (corpus / "part-001.jsonl").write_bytes(_jsonl_bytes(rows))
    (corpus / "part-002.jsonl").write_bytes(_jsonl_bytes(rows))
    chunks, total = plan_chunks(str(corpus), hf_split="train", work_dir=tmp_path / "w", parts=4)
    assert total == 40 * len(rows) and [c.first_row for c in chunks] == sorted(
        c.first_row for c in chunks
    )
    assert [c.path for c in chunks] == sorted(c.path for c in chunks)
    assert [row for c in chunks for _, row in iter_chunk(c)] == rows * 40


def test_after_a_bad_file_the_files_being_planned_stop(tmp_path):
    """When a file fails, the files planned beside it stop at their next rows instead of
    finishing first (a 1M-row CSV's rewrite took minutes, and the error waited for it): the
    CSV's Parquet copy is cut short, not written to its end."""
    import threading
    import time

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_bytes(b"\xff\n")
    lines = ["instruction,output", *(f"question {i},answer {i}" for i in range(200_000))]
    (corpus / "b.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        plan_chunks(str(corpus), hf_split="train", work_dir=tmp_path / "w", parts=4)
    deadline = time.monotonic() + 60  # the planner's threads end at their next check
    while any(t.name.startswith("ThreadPoolExecutor") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a planning thread still runs"
        time.sleep(0.05)
    copy = tmp_path / "w" / "00001.parquet"
    assert not copy.exists() or pq.ParquetFile(copy).metadata.num_rows < 200_000


def test_a_parquet_file_in_one_row_group_is_cut_into_many_chunks(tmp_path):
    """pandas and pyarrow write up to 1M rows as one row group, and chunks are cut between row
    groups: such a file was one task. It is rewritten in row groups of 4096 rows under the
    work dir and cut like any other; its rows keep their order and name the file as given,
    with their row numbers in it."""
    from sftmix_ray.data.chunks import PARQUET_ROW_GROUP

    rows = [{"instruction": f"question {i} " * 5, "output": f"answer {i}"} for i in range(20_000)]
    path = tmp_path / "one-group.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)  # pyarrow's defaults: one row group
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    chunks, total = plan_chunks(str(path), hf_split="train", work_dir=tmp_path / "w", parts=4)
    assert total == len(rows) and len(chunks) >= 4, [c.rows for c in chunks]
    assert {c.source for c in chunks} == {str(path)} and {c.unit for c in chunks} == {"row"}
    located = [item for c in chunks for item in iter_chunk_located(c)]
    assert [(index, row) for index, row, _ in located] == list(enumerate(rows))
    assert located[7000][2] == {"file": str(path), "row": 7001}
    regrouped = pq.ParquetFile(chunks[0].path).metadata
    assert regrouped.row_group(0).num_rows == PARQUET_ROW_GROUP
    # Row groups already small enough are read where they are.
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "small.parquet", row_group_size=2000)
    small, _ = plan_chunks(
        str(tmp_path / "small.parquet"), hf_split="train", work_dir=tmp_path / "w2", parts=4
    )
    assert {c.path for c in small} == {str(tmp_path / "small.parquet")} and len(small) >= 4
    # Files that give the tasks alone are read where they are, however coarse each one is.
    many = tmp_path / "many"
    many.mkdir()
    for part in range(8):
        pq.write_table(pa.Table.from_pylist(rows[:5000]), many / f"part-{part}.parquet")
    planned, _ = plan_chunks(str(many), hf_split="train", work_dir=tmp_path / "w3", parts=4)
    assert len(planned) == 8 and all(c.path.startswith(str(many)) for c in planned)


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from sftmix_ray.data.chunks import plan_chunks
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
try:
    plan_chunks(sys.argv[1], hf_split="train", work_dir=Path(sys.argv[2]), parts=4)
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_full_work_disk_while_regrouping_is_not_called_an_unreadable_file(tmp_path):
    """A one-row-group Parquet file is rewritten under the work dir; a write that fails there
    (a full disk: EFBIG from `RLIMIT_FSIZE` here) is an OS error about the copy, not "not a
    readable Parquet file" about the user's file."""
    import subprocess
    import sys

    rows = [{"instruction": f"question {i} " * 5, "output": f"answer {i}"} for i in range(20_000)]
    path = tmp_path / "one-group.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path), str(tmp_path / "w")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.stdout.startswith("OSError "), proc.stdout + proc.stderr[-2000:]
    assert "not a readable Parquet file" not in proc.stdout
