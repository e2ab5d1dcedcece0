"""The whole pipeline: stages in order, completed stages skipped, --force reruns from a stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sftmix_ray.errors import ConfigError
from sftmix_ray.summary import read_summary
from tests.conftest import tiny_config

RUN = ["eval.max_examples=8", "eval.max_new_tokens=4"]


def _mtime(path: Path) -> float:
    return path.stat().st_mtime_ns


def test_pipeline_runs_skips_and_forces(reference_out: Path, tmp_path: Path):
    from sftmix_ray.pipeline import run_pipeline

    out = tmp_path / "out"
    shutil.copytree(reference_out, out)  # prepare + reference done for the same tiny config
    cfg = tiny_config(*RUN)
    first = run_pipeline(cfg, out)
    assert first["prepare"] == {"status": "skipped"} and first["reference"] == {"status": "skipped"}
    for stage in ("score", "split", "train", "eval"):
        assert read_summary(out)["stages"][stage]["status"] == "completed"
    results = json.loads((out / "eval.json").read_text())
    assert results["sftmix"]["response_tokens"] > 0
    assert 0.0 <= results["sftmix"]["exact_match"] <= 1.0
    assert results["sftmix"]["perplexity"] == pytest.approx(
        2.718281828 ** results["sftmix"]["response_nll"], rel=1e-6
    )

    stamps = {
        p: _mtime(out / p)
        for p in (
            "scores/scores.parquet",
            "split/confident.parquet",
            "model/model.safetensors",
            "eval.json",
        )
    }
    again = run_pipeline(cfg, out)
    assert all(r == {"status": "skipped"} for r in again.values())
    assert {p: _mtime(out / p) for p in stamps} == stamps, "nothing rewritten"

    forced = run_pipeline(cfg, out, force="split")
    assert [s for s, r in forced.items() if r == {"status": "skipped"}] == [
        "prepare",
        "reference",
        "score",
    ]
    assert _mtime(out / "scores/scores.parquet") == stamps["scores/scores.parquet"]
    for path in ("split/confident.parquet", "model/model.safetensors", "eval.json"):
        assert _mtime(out / path) > stamps[path], f"{path} was redone"


def test_changed_config_reruns_from_the_first_affected_stage(reference_out, tmp_path):
    from sftmix_ray.pipeline import stage_fingerprint

    a, b = tiny_config(*RUN), tiny_config(*RUN, "split.ratio=0.3")
    same = [
        s
        for s in ("prepare", "reference", "score")
        if stage_fingerprint(a, s) == stage_fingerprint(b, s)
    ]
    assert same == ["prepare", "reference", "score"]
    assert stage_fingerprint(a, "split") != stage_fingerprint(b, "split")
    assert stage_fingerprint(a, "eval") != stage_fingerprint(b, "eval")


def test_force_unknown_stage_is_a_clear_error(tmp_path):
    from sftmix_ray.pipeline import run_pipeline

    with pytest.raises(ConfigError, match="--force 'trian' is not a stage"):
        run_pipeline(tiny_config(), tmp_path, force="trian")
