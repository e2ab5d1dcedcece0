"""The prepare stage on a local Ray cluster: Parquet contract, counts, rejections."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sftmix_ray.data.tokenize import IGNORE_INDEX
from sftmix_ray.errors import DataError
from sftmix_ray.summary import read_summary
from tests.conftest import tiny_config


def test_prepare_writes_the_data_contract(prepared_out: Path):
    table = pq.read_table(prepared_out / "data")
    assert set(table.column_names) == {
        "example_id",
        "input_ids",
        "labels",
        "messages_json",
        "tools_json",
    }
    assert set(table.column("tools_json").to_pylist()) == {None}  # the demo has no tools
    ids = table.column("example_id").to_pylist()
    assert len(ids) == 200 and len(set(ids)) == 200
    for input_ids, labels in zip(
        table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    ):
        assert len(input_ids) == len(labels) <= 96
        supervised = [x for x in labels if x != IGNORE_INDEX]
        assert supervised, "every row has a supervised token"
        assert len(supervised) < len(labels), "every row has some prompt (-100) tokens"
        assert all(y == x for x, y in zip(input_ids, labels) if y != IGNORE_INDEX)
    # The conversation itself stays, for re-tokenizing under another reference tokenizer.
    first = json.loads(table.column("messages_json")[0].as_py())
    assert [m["role"] for m in first][-1] == "assistant" and first[-1]["content"]
    heldout = pq.read_table(prepared_out / "heldout")
    assert heldout.num_rows == 24 and "answer" in heldout.column_names
    assert (prepared_out / "base_model" / "model.safetensors").exists()
    stage = read_summary(prepared_out)["stages"]["prepare"]
    assert stage["status"] == "completed"
    assert stage["train"]["input"] == 200 and stage["train"]["written"] == 200
    assert stage["train"]["rejected"] == 0


def test_prepare_counts_every_rejection(ray_local, tmp_path: Path):
    from sftmix_ray.pipeline import run_stage

    rows = [{"instruction": f"Echo {i}", "output": f"{i}"} for i in range(40)]
    rows[3] = {"instruction": "missing output"}
    long_text = " ".join(f"word{i}" for i in range(300))
    rows[7] = {"instruction": "x", "output": long_text}  # too long for max_length
    rows[9] = "not an object"
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    cfg = tiny_config(f"data.path={path}", "data.format=alpaca", "data.truncation=drop")
    result = run_stage("prepare", cfg, out)
    train = result["train"]
    assert train["input"] == 40 and train["written"] == 37 and train["rejected"] == 3
    assert train["input"] == train["written"] + train["rejected"]
    rejections = [json.loads(x) for x in Path(train["rejections_file"]).read_text().splitlines()]
    assert [r["index"] for r in rejections] == [3, 7, 9]
    assert rejections[1]["kind"] == "too_long" and "too long" in rejections[1]["reason"]
    assert {k: v["count"] for k, v in train["rejections_by_kind"].items()} == {
        "missing_field": 1, "too_long": 1, "not_an_object": 1,
    }  # fmt: skip
    kept = pq.read_table(out / "data").column("example_id").to_pylist()
    assert kept == [i for i in range(40) if i not in (3, 7, 9)]


def test_on_invalid_error_fails(ray_local, tmp_path: Path):
    from sftmix_ray.pipeline import run_stage

    path = tmp_path / "c.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(DataError, match=r"c.jsonl: 1 invalid rows.*row 1"):
        run_stage("prepare", tiny_config(f"data.path={path}", "data.on_invalid=error"), tmp_path)
    assert read_summary(tmp_path)["stages"]["prepare"]["status"] == "failed"


def test_a_tokenizer_larger_than_the_models_embedding_fails_before_tokenizing(
    ray_local, tmp_path: Path
):
    """A local model whose tokenizer has tokens past its embedding (added, never resized):
    `prepare` names the model, both sizes and the fix before any worker starts. (A local model
    whose embedding covers its tokenizer prepares in `test_gpu_path.py`'s pipeline part.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftmix_ray.errors import SftmixError
    from sftmix_ray.modeling import train_tiny_tokenizer
    from sftmix_ray.pipeline import run_stage

    tokenizer = train_tiny_tokenizer(["what is two plus two? four."] * 50, 300)
    config = LlamaConfig(
        vocab_size=len(tokenizer) - 5, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "short")
    tokenizer.save_pretrained(tmp_path / "short")
    path = tmp_path / "c.jsonl"
    path.write_text('{"instruction": "what is two plus two?", "output": "four."}\n' * 4)
    short = tiny_config(f"data.path={path}", f"model.name_or_path={tmp_path / 'short'}")
    message = (
        rf"tokenizer of '{tmp_path / 'short'}' has {len(tokenizer)} tokens but the model's "
        rf"embedding has {len(tokenizer) - 5} rows .*resize_token_embeddings"
    )
    with pytest.raises(SftmixError, match=message):
        run_stage("prepare", short, tmp_path / "out-short")
    assert not (tmp_path / "out-short" / "data").exists()


def test_a_worker_reloads_a_tokenizer_saved_again_at_the_same_path(tmp_path: Path):
    """`prepare`'s Ray Data tasks run in worker processes that Ray keeps between the tasks of a
    job, and each keeps its tokenizer: one saved again at the same path (a rerun of `prepare`
    whose tiny tokenizer has another vocabulary) must be loaded again, not served stale."""
    from sftmix_ray.data.chunk_worker import ChunkJob, prepare_chunks
    from sftmix_ray.data.chunks import plan_chunks
    from sftmix_ray.data.tokenize import tokenize_conversation
    from sftmix_ray.modeling import train_tiny_tokenizer

    rows = [
        [{"role": "user", "content": f"what is {i} plus {i}?"},
         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}"}]
        for i in range(20)
    ]  # fmt: skip
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    (chunk,), _ = plan_chunks(str(corpus), hf_split="train", work_dir=tmp_path, parts=1)
    saved = tmp_path / "tokenizer"

    def prepare_with(vocab_size: int, name: str) -> tuple[list, list]:
        tok = train_tiny_tokenizer([json.dumps(m) for m in rows] * 5, vocab_size)
        tok.save_pretrained(saved)
        dirs = {"train": str(tmp_path / name)}
        job = ChunkJob(
            str(corpus), "messages", "standard", "train", 0, dirs, {"train": f"{saved}-rej"}
        )
        batch = {"job": [0], "chunk_no": [0], "chunk": [chunk.to_json()]}
        (result,) = prepare_chunks(batch, [job], str(saved), 256, "drop")["stats"]
        stats = json.loads(result)
        assert stats["error"] is None and stats["train"]["written"] == len(rows), stats
        expected = [tokenize_conversation(tok, m, 256, "drop")[0] for m in rows]
        return pq.read_table(tmp_path / name).column("input_ids").to_pylist(), expected

    first, expected_first = prepare_with(400, "first")
    assert first == expected_first
    second, expected_second = prepare_with(300, "second")
    assert expected_second != expected_first, "the two vocabularies must tokenize differently"
    assert second == expected_second


# ------------------------------------------------------------- a tokenization worker that dies

COMPARED = ["example_id", "input_ids", "labels", "messages_json"]


def test_a_tokenization_worker_that_dies_once_repeats_and_loses_no_row(
    prepared_out: Path, ray_local, tmp_path: Path, monkeypatch
):
    """The worker process of chunk 1's task dies as the chunk starts (a real exit, no cleanup):
    Ray runs the task again (`data.max_retries`), and OUT/data and OUT/heldout are row for row
    the session's prepared run's (every row once, none lost). No attempt marker is left."""
    from sftmix_ray.data.chunk_worker import FAULT_ENV
    from sftmix_ray.pipeline import run_stage

    marker = tmp_path / "fault-marker"
    monkeypatch.setenv(FAULT_ENV, f"1:{marker}")
    out = tmp_path / "out"
    result = run_stage("prepare", tiny_config(), out)
    assert marker.exists(), "the fault was injected"
    assert result["train"]["written"] == 200 and result["train"]["rejected"] == 0
    for name in ("data", "heldout"):
        mine = pq.read_table(out / name).sort_by("example_id").select(COMPARED)
        theirs = pq.read_table(prepared_out / name).sort_by("example_id").select(COMPARED)
        assert mine.num_rows == len(set(mine.column("example_id").to_pylist())) > 0
        assert mine.equals(theirs), name
    assert not list(out.rglob(".chunk-attempts*"))


@pytest.mark.parametrize(
    ("fault", "max_retries", "runs"),
    [("0:always", 1, "each of its 2 runs"), ("tokenizer:always", 0, "its one run")],
    ids=["in-the-chunk", "loading-the-tokenizer"],
)
def test_a_chunk_whose_worker_always_dies_fails_naming_its_rows(
    ray_local, tmp_path: Path, monkeypatch, fault: str, max_retries: int, runs: str
):
    """The worker of the training corpus' chunk (chunk 0, all 200 demo rows) dies every time,
    in the chunk or while loading the tokenizer (every chunk's, then): after
    `data.max_retries` runs that died `prepare` fails with an error naming the corpus and the
    chunk's rows (the first failed chunk in corpus order), where Ray Data alone retries forever;
    nothing is left in OUT/data's place, and no attempt marker."""
    from sftmix_ray.data.chunk_worker import FAULT_ENV
    from sftmix_ray.pipeline import run_stage

    monkeypatch.setenv(FAULT_ENV, fault)
    out = tmp_path / "out"
    with pytest.raises(DataError) as error:
        run_stage("prepare", tiny_config(f"data.max_retries={max_retries}"), out)
    message = str(error.value)
    assert message.startswith("demo:train: "), message
    assert ": 200 rows from line 1 (corpus rows 0-199): " in message, message
    assert f"worker process died in {runs} (data.max_retries={max_retries})" in message, message
    stage = read_summary(out)["stages"]["prepare"]
    assert stage["status"] == "failed" and stage["error"] == message
    assert not (out / "data").exists()
    assert not list(out.rglob(".chunk-attempts*"))


def _chunk_task(tmp_path: Path, files: dict[str, str], tokenizer: Path, **task: object):
    """A one-file-a-chunk alpaca corpus of `files` and a function running the tokenization
    task (`prepare_chunks`) on its chunk n in this process, returning the chunk's stats; the
    task's attempts directory. Outputs go to tmp_path/d."""
    from sftmix_ray.data.chunk_worker import ChunkJob, prepare_chunks
    from sftmix_ray.data.chunks import plan_chunks

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in files.items():
        (corpus / name).write_text(text)
    chunks, _ = plan_chunks(str(corpus), hf_split="train", work_dir=tmp_path / "w", parts=3)
    assert [Path(c.path).name for c in chunks] == sorted(files)
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    job = ChunkJob(str(corpus), "alpaca", "standard", "train", 0,
                   {"train": str(tmp_path / "d")}, {"train": str(tmp_path / "r")})  # fmt: skip

    def run(chunk_no: int) -> dict:
        batch = {"job": [0], "chunk_no": [chunk_no], "chunk": [chunks[chunk_no].to_json()]}
        (stats,) = prepare_chunks(
            batch, [job], str(tokenizer), 64, "turns", attempts_dir=str(attempts), **task
        )["stats"]
        return json.loads(stats)

    return run, attempts


def test_once_a_chunk_gives_up_the_chunks_still_to_run_return_its_error_unrun(tmp_path: Path):
    """`prepare_chunks`, the tokenization task, in this process: a chunk whose runs died more
    than `data.max_retries` times returns its error and records it; a chunk run after that
    returns the same error without loading the tokenizer or reading a row (the tokenizer path
    does not exist: loading it would raise). A worker that dies loading the tokenizer thus
    costs `max_retries + 1` deaths for the stage, not for each of its chunks."""
    from sftmix_ray.data.chunk_worker import GIVEN_UP, attempt_marker

    row = json.dumps({"instruction": "q", "output": "a"}) + "\n"  # two files: two chunks
    files = {"a.jsonl": row, "b.jsonl": row}
    run, attempts = _chunk_task(tmp_path, files, tmp_path / "no-tokenizer", max_retries=1)
    attempt_marker(str(attempts), 0).write_text("101\n102\n")  # two runs that died
    first = run(0)
    assert "died in each of its 2 runs (data.max_retries=1)" in first["error"]
    assert (attempts / GIVEN_UP).read_text() == first["error"]
    second = run(1)
    assert second["error"] == first["error"] and second["train"]["input"] == 0
    assert not (tmp_path / "d").exists()


def test_after_an_unreadable_line_the_later_chunks_return_its_error_unrun(tmp_path: Path):
    """`prepare_chunks` in this process over three one-file chunks, the middle file broken at
    its second line: that chunk notes its error, the chunk after it returns the error without
    reading a row (its rows would be written), and the chunk before it still runs: the stage
    reports the first error in corpus order, and stops tokenizing the rest of a large corpus
    for nothing once one is met."""
    from sftmix_ray.data.chunk_worker import DATA_ERROR
    from sftmix_ray.modeling import train_tiny_tokenizer

    row = json.dumps({"instruction": "what is two plus two?", "output": "four"}) + "\n"
    train_tiny_tokenizer([row] * 20, 300).save_pretrained(tmp_path / "tok")
    files = {"a.jsonl": row, "b.jsonl": row + '{"instruction": \n', "c.jsonl": row}
    run, attempts = _chunk_task(tmp_path, files, tmp_path / "tok")
    broken = run(1)
    assert "b.jsonl" in broken["error"] and "line 2" in broken["error"], broken["error"]
    assert (attempts / f"{DATA_ERROR}.1").read_text() == broken["error"]
    after = run(2)
    assert after["error"] == broken["error"] and after["train"]["input"] == 0
    before = run(0)
    assert before["error"] is None and before["train"]["written"] == 1
    written = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert written == ["part-00000.parquet", "part-00001.parquet"]  # none for chunk 2
