"""Checkpoints and resume: a killed worker or a failed run resumes exactly where it stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from sftmix_ray.errors import SftmixError
from sftmix_ray.summary import read_summary
from sftmix_ray.train.loop import FAULT_ENV
from tests.conftest import tiny_config
from tests.test_train import base_out, write_split  # noqa: F401  (fixture reuse)

STEPS = 4
RUN = [
    f"train.max_steps={STEPS}",
    "train.save_steps=1",
    "train.learning_rate=0.01",
    "train.per_device_train_batch_size=4",
]


def _train(base: Path, out: Path, *extra: str) -> dict:
    from sftmix_ray.pipeline import run_stage

    if not out.exists():
        shutil.copytree(base, out)
    return run_stage("train", tiny_config(*RUN, *extra), out)


def _history(out: Path) -> list[dict]:
    return json.loads((out / "logs" / "train-model-history.json").read_text())["history"]


@pytest.fixture(scope="module")
def uninterrupted(base_out, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    _train(base_out, out)
    return out


def _assert_same_run(out: Path, reference: Path) -> None:
    ours, theirs = _history(out), _history(reference)
    assert [h["step"] for h in ours] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [h["loss"] for h in ours], [h["loss"] for h in theirs], rtol=1e-6
    )
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(reference / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-5, atol=1e-7)


def test_killed_worker_resumes_from_checkpoint(uninterrupted, base_out, tmp_path, monkeypatch):  # noqa: F811
    marker = tmp_path / "fault-marker"
    monkeypatch.setenv(FAULT_ENV, f"2:{marker}")
    out = tmp_path / "out"
    summary = _train(base_out, out, "train.max_failures=1")
    assert marker.exists(), "the fault was injected"
    assert summary["steps"] == STEPS and summary["restarts"] == 1
    assert read_summary(out)["stages"]["train"]["restarts"] == 1
    _assert_same_run(out, uninterrupted)


def test_failed_run_exits_then_rerun_resumes(uninterrupted, base_out, tmp_path, monkeypatch):  # noqa: F811
    marker = tmp_path / "fault-marker"
    monkeypatch.setenv(FAULT_ENV, f"3:{marker}")
    out = tmp_path / "out"
    with pytest.raises(SftmixError, match="train training failed"):
        _train(base_out, out, "train.max_failures=0")
    assert read_summary(out)["stages"]["train"]["status"] == "failed"
    monkeypatch.delenv(FAULT_ENV)
    summary = _train(base_out, out, "train.max_failures=0")  # same config: resumes
    assert summary["restarts"] == 1 and summary["steps"] == STEPS
    _assert_same_run(out, uninterrupted)
