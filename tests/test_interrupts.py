"""Ctrl+C (SIGINT) and SIGTERM to the `sftmix-ray pipeline` driver in each stage that runs long
enough to be hit: the driver exits 130/143 with one line, the stage is marked interrupted, no
partial output is left in place, and the rerun goes on without redoing finished work.

The drivers join the session's Ray cluster (`--address`), as they would a production one; each
interrupted driver's actors and Ray Train workers die with it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import TINY_OVERRIDES, cli_env

BIN = Path(sys.executable).with_name("sftmix-ray")
STEPS = 4
SETTINGS = [
    *(o for o in TINY_OVERRIDES if not o.startswith("ray.")),
    f"reference.max_steps={STEPS}",
    f"train.max_steps={STEPS}",
    "train.save_steps=1",  # a Ray Train checkpoint after every step: something to resume from
    "data.num_workers=1",
    "score.num_actors=1",
    "eval.max_examples=8",
    "eval.max_new_tokens=4",
]


def _stage(out: Path, name: str) -> dict:
    path = out / "summary.json"
    try:
        return json.loads(path.read_text())["stages"].get(name, {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints


def _has(out: Path, pattern: str) -> bool:
    """A file matching `pattern` exists; for Ray Train's checkpoint-manager snapshot, one that
    lists a checkpoint (a checkpoint directory alone may still be uploading, unregistered)."""
    for path in out.glob(pattern):
        if path.name != SNAPSHOT:
            return True
        try:
            if json.loads(path.read_text()).get("checkpoint_results"):
                return True
        except (OSError, ValueError):  # being rewritten
            pass
    return False


# stage -> (signal, what must exist before the signal: the stage is under way, mid-work)
PLAN = [
    ("prepare", signal.SIGINT, None),
    # Ctrl+C in training: Ray Train's own handler aborts the run gracefully first.
    ("reference", signal.SIGINT, f"ray_storage/reference-*/{SNAPSHOT}"),
    ("score", signal.SIGTERM, "scores/per_checkpoint/checkpoint-*.parquet"),
    ("train", signal.SIGTERM, f"ray_storage/train-*/{SNAPSHOT}"),
    # After a training stage: Ray Train's SIGINT handler must not outlive its run.
    ("eval", signal.SIGINT, None),
]


def _pipeline(out: Path, address: str) -> subprocess.Popen:
    sets = [f"--set={o}" for o in SETTINGS]
    env = cli_env(DS_ACCELERATOR="cpu", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    command = [str(BIN), "pipeline", "--output-dir", str(out), "--address", address, *sets]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _interrupt_in(proc: subprocess.Popen, out: Path, stage: str, sig: int, marker: str | None):
    deadline = time.monotonic() + 300
    while _stage(out, stage).get("status") != "running" or (marker and not _has(out, marker)):
        assert proc.poll() is None, f"the pipeline ended before {stage} was interrupted"
        assert time.monotonic() < deadline, f"{stage} did not get under way in 300 s"
        time.sleep(0.2)
    if marker is None:
        time.sleep(1.0)  # into the stage's work, past its start
    proc.send_signal(sig)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        message = f"{stage}: no exit 120 s after the signal:\n{stderr[-3000:]}"
        raise AssertionError(message) from None
    return proc.returncode, stderr


def _mtimes(out: Path, patterns: list[str]) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for pat in patterns for p in sorted(out.glob(pat))}


OUTPUTS = {
    "prepare": ["data/*.parquet", "heldout/*.parquet", "base_model/model.safetensors"],
    "reference": ["reference/checkpoint-*/model.safetensors"],
    "score": ["scores/per_checkpoint/checkpoint-*.parquet"],
    "split": ["split/*.parquet"],
    "train": ["model/model.safetensors"],
}


def _again(files: dict[str, int]) -> dict[str, int]:
    """The same files' modification times now."""
    return {path: Path(path).stat().st_mtime_ns for path in files}


def _finished_outputs(out: Path) -> dict[str, int]:
    """Modification times of the outputs of every stage the summary calls completed."""
    done = [s for s in OUTPUTS if _stage(out, s).get("status") == "completed"]
    return _mtimes(out, [p for s in done for p in OUTPUTS[s]])


@pytest.mark.slow
def test_signals_in_each_stage_then_rerun_finishes_without_redoing_work(ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    out = tmp_path / "out"
    for stage, sig, marker in PLAN:
        finished = _finished_outputs(out)
        proc = _pipeline(out, address)
        code, stderr = _interrupt_in(proc, out, stage, sig, marker)
        assert code == 128 + sig, f"{stage}: exit {code}, stderr:\n{stderr[-3000:]}"
        # One line from the driver, no traceback of its own (Ray forwards its actors' logs,
        # prefixed with the actor's name, to the same stream).
        assert "rerun to resume" in stderr, stderr[-3000:]
        assert "\nTraceback (most recent call last)" not in "\n" + stderr, stderr[-3000:]
        assert _stage(out, stage)["status"] == "interrupted"
        # Stages that finished in earlier runs were not redone by this one.
        assert _again(finished) == finished, f"a finished stage was redone while in {stage}"
        # Nothing of the interrupted stage is in place except whole, readable files.
        for path in out.rglob("*.parquet"):
            if not any(part.startswith(".") for part in path.relative_to(out).parts):
                pq.read_metadata(path)

    finished = _finished_outputs(out)
    proc = _pipeline(out, address)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    assert json.loads(stdout)["pipeline"]["report"].endswith("report.md"), stdout[-2000:]
    assert _again(finished) == finished, "the final rerun redid finished work"
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert {s: stages[s]["status"] for s in (*OUTPUTS, "eval")} == dict.fromkeys(
        (*OUTPUTS, "eval"), "completed"
    )
    # Training resumed from the checkpoints the interrupted runs left: every step ran once.
    for mode in ("reference", "train"):
        assert stages[mode]["steps"] == STEPS
        history = json.loads(next((out / "logs").glob(f"{mode}-*history.json")).read_text())
        steps = [h["step"] for h in history["history"]]
        assert steps == list(range(1, STEPS + 1)), f"{mode} history {steps}"
        assert stages[mode]["restarts"] >= 1, f"{mode} started over instead of resuming"
    assert stages["score"]["reused"], "the checkpoint scored before SIGINT was not rescored"
    assert (out / "eval.json").exists() and (out / "report.md").exists()
