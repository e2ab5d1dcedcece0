"""The pipeline as users run it: `ray job submit` to a running Ray head, then reruns against it.

A real head node on loopback (`ray start --head`), the real `ray job submit` CLI shipping this
checkout with `cluster/runtime_env.yaml`, the quickstart config with a few steps. The reruns
join the same cluster with `--address` and must skip finished stages, or redo only from
`--force eval` on.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sftmix_ray.summary import read_summary
from tests.conftest import TINY_OVERRIDES, result_json

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The quickstart shrunk to the tiny test model (a handful of steps per training stage), with
# the tiny config's learning rate so that `prepare` and `reference` are those of the session's
# shared `reference_out`: the job finds them complete and skips them (which also tests that a
# rerun on another cluster skips finished stages), and runs score, split, train and eval.
QUICK = [
    *(o for o in TINY_OVERRIDES if not o.startswith("ray.")),
    "train.learning_rate=0.001",
    "score.num_actors=1",
    "eval.max_examples=8",
    "eval.max_new_tokens=4",
]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOKEN_FILE = Path(tempfile.gettempdir()) / f"sftmix-test-ray-token-{os.getpid()}"


def _env() -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    # Token authentication, as a production head should run: the head and every client (CLI,
    # job driver, reruns) read the same token file; clients send it only when the mode is set.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(TOKEN_FILE)
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A Ray head on 127.0.0.1 with its dashboard (the job server); torn down afterwards."""
    gcs, dashboard = _free_port(), _free_port()
    TOKEN_FILE.write_text(secrets.token_hex(32))
    TOKEN_FILE.chmod(0o600)
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            # Every other port too: the session's own local cluster (and the other pytest
            # worker's) already holds Ray's default agent ports, and a head whose dashboard
            # agent cannot bind answers every submission with "No available agent".
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            "--num-cpus=2",
            "--disable-usage-stats",
        ],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 300
        while True:
            # `ray job list` answers before the head's job agent is up ("No available agent
            # to submit job"): a trivial job submitted and finished is the real readiness probe.
            probe = subprocess.run(
                [str(BIN / "ray"), "job", "submit", f"--address={address}", "--no-wait", "true"],
                capture_output=True,
                env=_env(),
                timeout=120,
            )
            if probe.returncode == 0:
                break
            assert proc.poll() is None, "ray start --head exited"
            tail = (probe.stdout + probe.stderr).decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, f"the job server took no job in 300 s:\n{tail}"
            time.sleep(2)
        yield {"jobs": address, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        # `ray stop` would also stop the test session's own cluster: kill this head's group.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        TOKEN_FILE.unlink(missing_ok=True)


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def test_ray_job_submit_runs_the_pipeline_and_reruns_skip(head, reference_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference_out, out)  # prepare + reference done, with their summary
    before = read_summary(out)["stages"]
    prepared_at = {s: before[s]["updated_at"] for s in ("prepare", "reference")}
    sets = [arg for o in QUICK for arg in ("--set", o)]
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            head["jobs"],
            "--submission-id",
            "sftmix-quickstart-test",
            "--working-dir",
            str(REPO),
            "--runtime-env",
            str(REPO / "cluster" / "runtime_env.yaml"),
            "--",
            "sftmix-ray",
            "pipeline",
            "--config",
            "configs/quickstart.yaml",
            "--output-dir",
            str(out),
            *sets,
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=900,
        cwd=REPO,
    )
    logs = submit.stdout + submit.stderr
    assert submit.returncode == 0, logs[-4000:]
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", head["jobs"], "sftmix-quickstart-test"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert "job 'sftmix-quickstart-test' succeeded" in status.stdout.lower()

    summary = read_summary(out)
    stages = summary["stages"]
    assert [stages[s]["status"] for s in ("prepare", "reference", "score", "split", "train")] == [
        "completed"
    ] * 5
    assert stages["train"]["steps"] == 3 and stages["reference"]["steps"] == 3
    # The finished stages of the copied run were skipped by the job, not redone.
    assert {s: stages[s]["updated_at"] for s in prepared_at} == prepared_at
    assert "stage prepare: complete for this config, skipped" in logs
    results = json.loads((out / "eval.json").read_text())
    assert results["sftmix"]["response_tokens"] > 0
    assert (out / "model" / "model.safetensors").exists()
    report = (out / "report.md").read_text()
    assert f"| sftmix | {results['sftmix']['response_nll']:.4g} |" in report
    assert (out / "loss_curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "joining Ray cluster" in logs, "the job's driver joined the head, not a new cluster"
    assert "train loss=" in logs, "rank 0's progress bar reached the driver's log"

    def rerun(*extra: str) -> dict:
        result = subprocess.run(
            [
                str(BIN / "sftmix-ray"),
                "pipeline",
                "--config",
                str(REPO / "configs" / "quickstart.yaml"),
                "--output-dir",
                str(out),
                "--address",
                head["gcs"],
                *sets,
                *extra,
            ],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=600,
        )
        assert set(result_json(result)["pipeline"]) >= {"prepare", "train", "eval", "report"}
        return read_summary(out)

    stamps = {
        p: _mtime(out / p)
        for p in (
            "scores/scores.parquet",
            "split/confident.parquet",
            "model/model.safetensors",
            "eval.json",
        )
    }
    rerun()
    assert {p: _mtime(out / p) for p in stamps} == stamps, "a finished pipeline rewrote outputs"

    # --force reruns that stage and the ones after it, nothing before (which stages a config
    # change reruns is test_pipeline.py's): eval, the last stage, keeps this test short.
    rerun("--force", "eval")
    for path in ("scores/scores.parquet", "split/confident.parquet", "model/model.safetensors"):
        assert _mtime(out / path) == stamps[path], f"{path} was redone by --force eval"
    assert _mtime(out / "eval.json") > stamps["eval.json"], "eval.json was not redone"
