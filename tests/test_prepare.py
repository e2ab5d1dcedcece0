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
    assert set(table.column_names) == {"example_id", "input_ids", "labels", "messages_json"}
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
