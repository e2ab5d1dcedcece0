"""Ray Train checkpoints in an object store: S3 served by moto on loopback, through the CLI.

`train.storage_path=s3://bucket/prefix` goes to Ray Train's pyarrow filesystem layer. The CLI
starts its own local Ray cluster, so the S3 endpoint and credentials in its environment reach
the train controller and the workers. A worker dies after step 2; the restarted worker group
must resume from the checkpoint it reads back from the bucket.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from sftmix_ray.train.loop import FAULT_ENV
from tests.conftest import TINY_OVERRIDES, cli_env, result_json, sftmix_command
from tests.test_train import write_split

pytest.importorskip("moto", reason="moto (dev extra) serves S3 locally")
BUCKET, STEPS = "sftmix-checkpoints", 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on loopback with one bucket; the environment that points at it."""
    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per S3 request

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
    }
    s3 = fs.S3FileSystem(
        access_key="testing", secret_key="testing", region="us-east-1",
        endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True,
    )  # fmt: skip
    s3.create_dir(BUCKET)
    yield env, s3
    server.stop()


def test_checkpoints_in_s3_survive_a_killed_worker(prepared_out: Path, s3_env, tmp_path):
    env, s3 = s3_env
    out = tmp_path / "run"
    for name in ("data", "heldout", "base_model"):
        shutil.copytree(prepared_out / name, out / name)
    write_split(out)
    marker = tmp_path / "fault-marker"
    sets = [
        *TINY_OVERRIDES,
        f"train.max_steps={STEPS}",
        "train.save_steps=1",
        "train.max_failures=1",
        f"train.storage_path=s3://{BUCKET}/runs",
    ]
    proc = subprocess.run(
        [*sftmix_command(), "train", "--output-dir", str(out), *[f"--set={s}" for s in sets]],
        capture_output=True, text=True, timeout=600,
        env=cli_env(**env, **{FAULT_ENV: f"2:{marker}"}),
    )  # fmt: skip
    # stdout is only the result JSON; the raylet's note on the killed worker went to stderr.
    stage = result_json(proc)["train"]
    assert marker.exists(), "the fault was injected"
    assert "A worker died or was killed" in proc.stderr
    assert stage["steps"] == STEPS and stage["restarts"] == 1
    assert stage["storage_path"] == f"s3://{BUCKET}/runs"
    history = json.loads((out / "logs" / "train-model-history.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))  # each step once
    # The checkpoints live in the bucket, none on local disk.
    assert not (out / "ray_storage").exists()
    from pyarrow import fs

    files = s3.get_file_info(fs.FileSelector(f"{BUCKET}/runs", recursive=True))
    states = [f.path for f in files if f.path.endswith("train_state.json")]
    assert len(states) >= 2, [f.path for f in files][:20]
    steps = []
    for path in states:
        with s3.open_input_stream(path) as stream:
            steps.append(json.loads(stream.read())["step"])
    assert max(steps) == STEPS
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.vocab_size > 0
