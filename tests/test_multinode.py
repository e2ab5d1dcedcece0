"""Several raylet nodes (ray.cluster_utils.Cluster): STRICT_SPREAD workers train across two
nodes; one node is removed mid-run and a new one added, and training finishes from the last
checkpoint in the shared storage path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.test_train import write_split

STEPS = 8
SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from sftmix_ray.pipeline import run_stage
    from tests.conftest import tiny_config

    out, storage, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    # Fast node-death detection (defaults take ~30 s): the GCS declares a silent raylet dead
    # after 3 missed 500 ms health checks.
    fast = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    head = {"num_cpus": 1, "_system_config": fast, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    doomed = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    first_nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    cfg = tiny_config(
        "train.num_workers=2", "train.placement_strategy=STRICT_SPREAD",
        "train.per_device_train_batch_size=4", f"train.max_steps={steps}",
        "train.save_steps=1", "train.max_failures=1", "train.keep_resume_checkpoints=true",
        f"train.storage_path={storage}", f"ray.address={cluster.address}",
    )
    result = {}

    def train():
        try:
            result["summary"] = run_stage("train", cfg, out)
        except BaseException as exc:
            result["error"] = repr(exc)

    # Training runs in a thread; the cluster is changed from the main thread (Cluster's node
    # start-up is not thread-safe).
    trainer = threading.Thread(target=train)
    trainer.start()
    local = Path(storage.removeprefix("file://"))
    # Checkpoint directories (written straight into the shared storage: checkpoint-<step>-...).
    while len(list(local.glob("train-*/checkpoint-*/"))) < 2 and trainer.is_alive():
        time.sleep(0.1)
    # Two checkpoints are in the shared storage: the second node goes away (its raylet and
    # the worker on it die) and a fresh node joins in its place.
    cluster.remove_node(doomed, allow_graceful=False)
    added = cluster.add_node(num_cpus=1).node_id
    trainer.join()
    report = {"first_nodes": first_nodes, "removed": doomed.node_id, "added": added, **result}
    print("RESULT " + json.dumps(report))
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_training_survives_losing_a_node(prepared_out: Path, tmp_path: Path):
    out = tmp_path / "out"
    for name in ("data", "heldout", "base_model"):
        shutil.copytree(prepared_out / name, out / name)
    write_split(out)
    storage = tmp_path / "shared_storage"  # one path every node sees (a shared FS in prod)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        # A file:// URI: the storage path goes through Ray Train's pyarrow filesystem layer,
        # as s3:// or gs:// would.
        [sys.executable, "-c", SCRIPT, str(out), storage.as_uri(), str(STEPS)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    report = json.loads(line.removeprefix("RESULT "))
    assert len(report["first_nodes"]) == 2 and report["removed"] in report["first_nodes"]
    assert "error" not in report, report.get("error")
    summary = report["summary"]
    # The run restarted once, on the surviving node and the new one, one worker on each.
    assert summary["restarts"] == 1 and summary["steps"] == STEPS
    head = next(n for n in report["first_nodes"] if n != report["removed"])
    assert sorted(summary["nodes"]) == sorted([head, report["added"]])
    history = json.loads((out / "logs" / "train-model-history.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1)), "resumed, no step redone"
    assert np.isfinite([h["loss"] for h in history]).all()
    # The last checkpoints are whole in the shared storage (the lost attempt may leave one
    # more directory behind, which Ray Train never registered).
    states = [
        json.loads(p.read_text()) for p in storage.glob("train-*/checkpoint-*/train_state.json")
    ]
    assert len(states) >= 2 and max(s["step"] for s in states) == STEPS
    assert (out / "model" / "model.safetensors").exists()
