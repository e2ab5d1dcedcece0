"""Compute-constrained mode with a reference model that has its own tokenizer.

The base model is the tiny preset (vocabulary 400); the reference model is another seeded tiny
model whose BPE has 300 entries. `sftmix-ray reference` re-tokenizes OUT/data and OUT/heldout
for it, the score stage scores those ids, and `train` still reads the base tokenizer's ids.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from sftmix_ray.errors import SftmixError
from sftmix_ray.layout import RunDir
from tests.conftest import TINY_OVERRIDES, cli_env, result_json, sftmix_command, tiny_config

REF_VOCAB = 300
NLL_RTOL = 1e-4


def _cli(*args: str, sets: list[str]) -> subprocess.CompletedProcess:
    flags = [f"--set={item}" for item in [*TINY_OVERRIDES, *sets]]
    return subprocess.run(
        [*sftmix_command(), *args, *flags],
        capture_output=True, text=True, timeout=300, env=cli_env(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def cross(prepared_out: Path, ray_local, tmp_path_factory):
    """A run whose reference model reads another vocabulary: `sftmix-ray reference`, then score."""
    from sftmix_ray.modeling import materialize_tiny
    from sftmix_ray.pipeline import run_stage

    root = tmp_path_factory.mktemp("cross")
    out = root / "run"
    for name in ("data", "heldout", "base_model"):
        shutil.copytree(prepared_out / name, out / name)
    messages = pq.read_table(out / "data", columns=["messages_json"]).column("messages_json")
    texts = [m["content"] for raw in messages.to_pylist() for m in json.loads(raw)]
    small = tiny_config(f"model.tiny_vocab_size={REF_VOCAB}", "model.tiny_num_layers=1")
    reference_model = materialize_tiny(small.model, texts, root / "small-reference")
    # The paper's placement: a checkpoint at the end of each of C = 2 reference epochs.
    # 40 rows per step: 5 steps per epoch (at the tiny config's 8, the run took 50 steps).
    sets = [f"reference.model={reference_model}", "score.num_actors=1",
            "reference.checkpoints_at=epochs", "train.per_device_train_batch_size=40"]  # fmt: skip
    address = ["--output-dir", str(out), "--address", ray_local.get_runtime_context().gcs_address]
    results = {"reference": result_json(_cli("reference", *address, sets=sets))["reference"]}
    results["score"] = run_stage("score", tiny_config(*sets), out)  # as `sftmix-ray score` does
    return out, reference_model, sets, results


def test_reference_stage_retokenizes_every_row(cross):
    from transformers import AutoTokenizer

    out, reference_model, _, results = cross
    summary = results["reference"]["retokenized"]
    assert summary["tokenizer"] == str(reference_model)
    for name in ("data", "heldout"):
        base = pq.read_table(out / name).sort_by("example_id")
        ref = pq.read_table(RunDir(out).reference_data / name).sort_by("example_id")
        assert summary[name]["rows"] == ref.num_rows == base.num_rows
        assert np.array_equal(ref.column("example_id"), base.column("example_id"))
        ref_ids = ref.column("input_ids").to_pylist()
        assert max(max(ids) for ids in ref_ids) < REF_VOCAB
        assert sum(
            a != b for a, b in zip(ref_ids, base.column("input_ids").to_pylist())
        ) > 0.9 * len(ref_ids)
        # Every row keeps response tokens, and the text is the same under either tokenizer.
        assert all(any(label != -100 for label in row) for row in ref.column("labels").to_pylist())
    tokenizer = AutoTokenizer.from_pretrained(reference_model)
    base_tok = AutoTokenizer.from_pretrained(out / "base_model")
    row = pq.read_table(out / "data").sort_by("example_id").slice(0, 1)
    ref_row = pq.read_table(RunDir(out).reference_data / "data").sort_by("example_id").slice(0, 1)
    assert tokenizer.decode(ref_row.column("input_ids")[0].as_py()) == base_tok.decode(
        row.column("input_ids")[0].as_py()
    )
    # checkpoints_at=epochs: 200 rows / 40 per step = 5 steps per epoch, C = 2 epochs.
    assert results["reference"]["steps"] == 10
    names = [Path(c).name for c in results["reference"]["checkpoints"]]
    assert names == ["checkpoint-5", "checkpoint-10"]
    # The reference checkpoints carry the reference tokenizer and vocabulary.
    for checkpoint in results["reference"]["checkpoints"]:
        assert len(AutoTokenizer.from_pretrained(checkpoint)) == len(tokenizer)
        config = json.loads((Path(checkpoint) / "config.json").read_text())
        assert config["vocab_size"] == len(tokenizer) and config["num_hidden_layers"] == 1


def test_scores_use_the_reference_tokenization(cross):
    from transformers import AutoModelForCausalLM

    out, _, _, results = cross
    data = pq.read_table(RunDir(out).reference_data / "data").sort_by("example_id")
    scores = pq.read_table(RunDir(out).scores)
    assert np.array_equal(scores.column("example_id"), data.column("example_id"))
    assert results["score"]["scored"] == data.num_rows
    checkpoints = results["reference"]["checkpoints"]
    for t, checkpoint in enumerate(checkpoints):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        for row in (0, 17, data.num_rows - 1):
            ids = torch.tensor([data.column("input_ids")[row].as_py()])
            labels = torch.tensor(data.column("labels")[row].as_py())
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0]
            expected = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
            assert scores.column("nll")[row].as_py()[t] == pytest.approx(
                float(expected), rel=NLL_RTOL
            )
            n_response = int((labels[1:] != -100).sum())
            assert scores.column("n_response_tokens")[row].as_py() == n_response


def test_split_and_train_read_the_base_tokenization(cross):
    from sftmix_ray.pipeline import run_stage

    out, _, sets, _ = cross
    cfg = tiny_config(*sets, "train.max_steps=2")
    split = run_stage("split", cfg, out)
    assert split["confident"] + split["unconfident"] == pq.read_table(out / "data").num_rows
    train = run_stage("train", cfg, out)
    assert train["steps"] == 2 and np.isfinite(train["metrics"]["loss"])
    config = json.loads((out / "model" / "config.json").read_text())
    assert (
        config["vocab_size"]
        == json.loads((out / "base_model" / "config.json").read_text())["vocab_size"]
    )


def test_missing_or_stale_reference_data_is_a_clear_error(cross, tmp_path):
    from sftmix_ray.data.retokenize import build_reference_data, reference_data_dir

    out, _, sets, _ = cross
    copy = tmp_path / "run"
    for name in ("data", "base_model"):
        shutil.copytree(out / name, copy / name)
    cfg = tiny_config(*sets)
    with pytest.raises(
        SftmixError, match=r"reference_data/data does not exist.*sftmix-ray reference"
    ):
        reference_data_dir(cfg, copy)
    RunDir(copy).reference_data.mkdir(parents=True)
    table = pq.read_table(RunDir(out).reference_data / "data")
    pq.write_table(table.slice(1), RunDir(copy).reference_data / "data")
    with pytest.raises(SftmixError, match="does not hold the rows of"):
        reference_data_dir(cfg, copy)
    # OUT/data written before the messages were kept: re-prepare, not a silent mismatch.
    data = pq.read_table(copy / "data").drop_columns(["messages_json"])
    shutil.rmtree(copy / "data")
    pq.write_table(data, copy / "data.parquet")
    (copy / "data.parquet").rename(copy / "data")
    with pytest.raises(SftmixError, match=r"no messages_json column.*--force prepare"):
        build_reference_data(cfg, copy)
