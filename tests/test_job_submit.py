"""The pipeline as users run it, interrupted and resumed: drivers joined to a running Ray head
are stopped by Ctrl+C (SIGINT) or SIGTERM in each stage, the run is resumed with `ray job submit`,
then rerun against the same head.

A real head node on loopback (`ray start --head`, token authentication), the quickstart config
with a few steps. Each interrupted driver must exit 130/143 with one line, mark its stage
interrupted and leave no partial output in place; its actors and Ray Train workers die with it.
Each rerun goes on without redoing finished work (training from its checkpoints). The real
`ray job submit` CLI, shipping this checkout with `cluster/runtime_env.yaml`, finishes the run;
reruns with `--address` skip every finished stage, and `--force eval` redoes eval alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import TINY_OVERRIDES, cli_env, free_port, result_json

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = str(REPO / "configs" / "quickstart.yaml")
STEPS = 4  # reference steps
TRAIN_STEPS = 16  # steps are left to run when SIGTERM lands mid-training
# The quickstart shrunk to the tiny test model.
SETTINGS = [
    *(o for o in TINY_OVERRIDES if not o.startswith("ray.")),
    f"reference.max_steps={STEPS}",
    f"train.max_steps={TRAIN_STEPS}",
    "train.save_steps=1",  # a Ray Train checkpoint after every step: something to resume from
    "train.learning_rate=0.001",
    "data.num_workers=1",
    "score.num_actors=1",
    "eval.max_examples=8",
    "eval.max_new_tokens=4",
]

pytestmark = pytest.mark.slow


TOKEN_FILE = Path(tempfile.gettempdir()) / f"sftmix-test-ray-token-{os.getpid()}"


def _env() -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    # Token authentication, as a production head should run: the head and every client (CLI,
    # job driver, reruns) read the same token file; clients send it only when the mode is set.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(TOKEN_FILE)
    # A window between two scored checkpoints for the SIGTERM in `score` (one actor pool
    # scores the tiny model's next checkpoint in well under a second).
    env["SFTMIX_SCORE_PAUSE_AFTER_CHECKPOINT_S"] = "3"
    return env


def _start_head(log: Path, temp_dir: str) -> tuple[subprocess.Popen, int, int]:
    """`ray start --head --block` on free loopback ports; returns (process, GCS, dashboard).

    The head gets a temp dir of its own: a job's driver is given the address Ray reads from
    `<temp dir>/ray_current_cluster` ("auto"), which in the shared /tmp/ray names whichever
    cluster started last on the machine (the other pytest worker's, seen with 3 workers: the
    job's driver then knocked on that cluster without its token and failed)."""
    gcs, dashboard = free_port(), free_port()
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [
                str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                # Every other port too: the session's own local cluster (and the other pytest
                # worker's) already holds Ray's default agent ports, and a head whose dashboard
                # agent cannot bind answers every submission with "No available agent".
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}",
            ],
            env=_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return proc, gcs, dashboard


def _stop_head(proc: subprocess.Popen) -> None:
    # `ray stop` would also stop the test session's own cluster: kill this head's group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A Ray head on 127.0.0.1 with its dashboard (the job server); torn down afterwards.

    Free ports are picked, then bound by `ray start`: another cluster starting at the same
    moment (the other pytest worker's) can take one in between, and the head exits. Such a
    start is retried on fresh ports, twice at most; the head's own log is in every failure.
    """
    log = tmp_path_factory.mktemp("head") / "ray-start.log"
    TOKEN_FILE.write_text(secrets.token_hex(32))
    TOKEN_FILE.chmod(0o600)
    # Short: Ray's Unix socket paths under it must stay within 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    proc, gcs, dashboard = _start_head(log, temp_dir)
    starts = 1
    try:
        deadline = time.monotonic() + 300
        while True:
            address = f"http://127.0.0.1:{dashboard}"
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
            if proc.poll() is not None:
                head_log = log.read_text(errors="replace")[-3000:]
                assert starts < 3, f"ray start --head exited {starts} times:\n{head_log}"
                proc, gcs, dashboard = _start_head(log, temp_dir)
                starts += 1
                continue
            tail = (probe.stdout + probe.stderr).decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, f"the job server took no job in 300 s:\n{tail}"
            time.sleep(2)
        yield {"jobs": address, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        _stop_head(proc)
        TOKEN_FILE.unlink(missing_ok=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints

# stage -> (signal, what must exist before the signal: the stage is under way, mid-work)
PLAN = [
    ("prepare", signal.SIGINT, None),
    # Ctrl+C in training: Ray Train's own handler aborts the run gracefully first.
    ("reference", signal.SIGINT, f"ray_storage/reference-*/{SNAPSHOT}"),
    ("score", signal.SIGTERM, "work/scores/checkpoint-*.parquet"),
    ("train", signal.SIGTERM, f"ray_storage/train-*/{SNAPSHOT}"),
    # This driver resumes training first: Ray Train's SIGINT handler must not outlive its run.
    ("eval", signal.SIGINT, None),
]

OUTPUTS = {
    "prepare": ["data/*.parquet", "heldout/*.parquet", "base_model/model.safetensors"],
    "reference": ["reference/checkpoint-*/model.safetensors"],
    "score": ["work/scores/checkpoint-*.parquet", "scores/scores.parquet"],
    "split": ["split/*.parquet"],
    "train": ["model/model.safetensors"],
}


def _stage(out: Path, name: str) -> dict:
    path = out / "summary.json"
    try:
        return json.loads(path.read_text())["stages"].get(name, {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


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


def _pipeline_command(program: str, out: Path, *extra: str) -> list[str]:
    sets = [f"--set={o}" for o in SETTINGS]
    return [program, "pipeline", "--config", CONFIG, "--output-dir", str(out), *sets, *extra]


def _driver(out: Path, head: dict[str, str], *extra: str) -> subprocess.Popen:
    """`sftmix-ray pipeline` joined to the head (its processes print noise: cli_env)."""
    command = _pipeline_command(str(BIN / "sftmix-ray"), out, "--address", head["gcs"], *extra)
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(**_env())
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
    code = proc.returncode
    assert code == 128 + sig, f"{stage}: exit {code}, stderr:\n{stderr[-3000:]}"
    # One line from the driver, no traceback of its own (Ray forwards its actors' logs,
    # prefixed with the actor's name, to the same stream).
    assert "rerun to resume" in stderr, stderr[-3000:]
    assert "\nTraceback (most recent call last)" not in "\n" + stderr, stderr[-3000:]
    assert _stage(out, stage)["status"] == "interrupted"
    # Nothing of the interrupted stage is in place except whole, readable files.
    for path in out.rglob("*.parquet"):
        if not any(part.startswith(".") for part in path.relative_to(out).parts):
            pq.read_metadata(path)
    return stderr


def _mtimes(out: Path, stages) -> dict[str, int]:
    """Modification times of the outputs of `stages`."""
    patterns = [p for s in stages for p in OUTPUTS[s]]
    return {str(p): p.stat().st_mtime_ns for pat in patterns for p in sorted(out.glob(pat))}


def _again(files: dict[str, int]) -> dict[str, int]:
    """The same files' modification times now."""
    return {path: Path(path).stat().st_mtime_ns for path in files}


def _finished_outputs(out: Path) -> dict[str, int]:
    """Modification times of the outputs of every stage the summary calls completed."""
    return _mtimes(out, [s for s in OUTPUTS if _stage(out, s).get("status") == "completed"])


def _submit(head: dict[str, str], out: Path) -> str:
    """`ray job submit` of the pipeline, shipping this checkout; returns the job's log."""
    submit = subprocess.run(
        [
            str(BIN / "ray"), "job", "submit", "--address", head["jobs"],
            "--submission-id", "sftmix-quickstart-test", "--working-dir", str(REPO),
            "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"),
            "--", *_pipeline_command("sftmix-ray", out),  # the job's own PATH
        ],
        capture_output=True, text=True, env=_env(), timeout=900, cwd=REPO,
    )  # fmt: skip
    logs = submit.stdout + submit.stderr
    assert submit.returncode == 0, logs[-4000:]
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", head["jobs"], "sftmix-quickstart-test"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert "job 'sftmix-quickstart-test' succeeded" in status.stdout.lower()
    return logs


def test_interrupted_pipeline_resumes_as_a_ray_job_and_reruns_skip(head, tmp_path):
    out = tmp_path / "out"
    # 1. A signal in each stage that runs long enough to be hit; each rerun goes on from there.
    stderr = {}
    for stage, sig, marker in PLAN:
        finished = _finished_outputs(out)
        stderr[stage] = _interrupt_in(_driver(out, head), out, stage, sig, marker)
        # Stages that finished in earlier runs were not redone by this one.
        assert _again(finished) == finished, f"a finished stage was redone while in {stage}"
    assert "train loss=" in stderr["eval"], "rank 0's progress bar reached the driver's log"

    # 2. `ray job submit` finishes the run (eval and report) without redoing finished work.
    assert {s: _stage(out, s).get("status") for s in OUTPUTS} == dict.fromkeys(OUTPUTS, "completed")
    finished = _finished_outputs(out)
    logs = _submit(head, out)
    assert _again(finished) == finished, "the job redid finished work"
    assert "stage prepare: complete for this config, skipped" in logs
    assert "joining Ray cluster" in logs, "the job's driver joined the head, not a new cluster"
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert {s: stages[s]["status"] for s in (*OUTPUTS, "eval")} == dict.fromkeys(
        (*OUTPUTS, "eval"), "completed"
    )
    # Training resumed from the checkpoints the interrupted runs left: every step ran once.
    for mode, steps in (("reference", STEPS), ("train", TRAIN_STEPS)):
        assert stages[mode]["steps"] == steps
        history = json.loads(next((out / "logs").glob(f"{mode}-*history.json")).read_text())
        done = [h["step"] for h in history["history"]]
        assert done == list(range(1, steps + 1)), f"{mode} history {done}"
        assert stages[mode]["restarts"] >= 1, f"{mode} started over instead of resuming"
    assert stages["score"]["reused"], "the checkpoint scored before SIGTERM was not rescored"
    results = json.loads((out / "eval.json").read_text())
    assert results["sftmix"]["response_tokens"] > 0
    report = (out / "report.md").read_text()
    assert f"| sftmix | {results['sftmix']['response_nll']:.4g} |" in report
    assert (out / "loss_curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # 3. A rerun against the same head: with a logging-only change (the fingerprints cover only
    # the values a stage's results depend on) and `--force eval`, a finished pipeline reruns
    # eval and rewrites nothing before it (which stages a config change reruns, and
    # `--dry-run`, are test_pipeline.py's; eval, the last stage, keeps this test short).
    eval_json = str(out / "eval.json")
    stamps = {**_mtimes(out, OUTPUTS), eval_json: Path(eval_json).stat().st_mtime_ns}
    forced = _driver(out, head, "--set", "train.logging_steps=2", "--force", "eval")
    stdout, stderr = forced.communicate(timeout=600)
    assert forced.returncode == 0, stderr[-4000:]
    result = result_json(subprocess.CompletedProcess([], 0, stdout, stderr))["pipeline"]
    assert set(result) >= {"prepare", "train", "eval", "report"} and result["report"]
    now = _again(stamps)
    assert now[eval_json] > stamps.pop(eval_json), "eval.json was not redone"
    assert _again(stamps) == stamps, "a logging change or --force eval redid an earlier stage"
