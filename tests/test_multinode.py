"""Several raylet nodes (ray.cluster_utils.Cluster): STRICT_SPREAD workers train across two
nodes; one node gets a reclaim notice (a drain for preemption, as a spot instance's), is
removed a moment later and a new one added, and training finishes from the checkpoint saved on
the notice, in the shared storage path."""

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
    import json, os, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from sftmix_ray.pipeline import run_stage
    from tests.conftest import tiny_config

    out, storage, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    # Ray Train's controller looks for node drains every 0.2 s (5 s by default); the nodes'
    # processes inherit it from here.
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"  # the suite turns it off
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.2"
    # The ranks wait after step 2 until the notice is out (a tiny step takes milliseconds).
    go_on = out / "go-on"
    os.environ["SFTMIX_HOLD_AFTER_STEP"] = f"2:{go_on}"
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
        # No periodic save before the end: the one checkpoint to resume from is the one saved
        # on the reclaim notice.
        "train.save_steps=100", "train.preemption_check_steps=1",
        "train.max_failures=1", "train.keep_resume_checkpoints=true",
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
    from ray._private import state

    def watching():  # Ray Train's PreemptionWatcher actor is up (it starts with the workers)
        actors = state.actors().values()
        return any(a["ActorClassName"].endswith("PreemptionWatcher") and a["State"] == "ALIVE"
                   for a in actors)

    while not watching() and trainer.is_alive():
        time.sleep(0.05)
    # The second node gets a reclaim notice, as a spot instance does: a drain for preemption
    # with a deadline (the GCS API `ray drain-node` calls, which Ray's autoscaler v2 uses for
    # preemption-based termination), and is removed a moment later.
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=cluster.address)
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    deadline_ms = time.time_ns() // 1_000_000 + 120_000
    accepted, why = gcs.drain_node(doomed.node_id, reason, "spot reclaim", deadline_ms)
    assert accepted, why
    time.sleep(3)  # the watcher sees the drain (every 0.2 s) and tells every worker
    go_on.write_text("")
    # The checkpoint saved on the notice (checkpoint-<step>-..., straight into the storage),
    # once Ray Train has registered it (every rank reported it).
    def registered():
        for snapshot in local.glob("train-*/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snapshot.read_text()).get("checkpoint_results"):
                    return True
            except ValueError:  # being written
                pass
        return False

    while not registered() and trainer.is_alive():
        time.sleep(0.05)
    # The reclaimed node goes away (its raylet and the worker on it die without grace) and a
    # fresh node joins in its place.
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
    said = "\n".join(x for x in result.stderr.splitlines() if "preempt" in x or "step " in x)
    assert summary["restarts"] == 1 and summary["steps"] == STEPS, said[-4000:]
    head = next(n for n in report["first_nodes"] if n != report["removed"])
    assert sorted(summary["nodes"]) == sorted([head, report["added"]])
    history = json.loads((out / "logs" / "train-model-history.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1)), "resumed, no step redone"
    assert np.isfinite([h["loss"] for h in history]).all()
    # The checkpoint saved on the reclaim notice (no periodic save before the last step) is the
    # one the run resumed from: the steps up to it ran in the first attempt (restarts 0), the
    # rest after the restart. Without it the run started again from step 1.
    states = [
        json.loads(p.read_text()) for p in storage.glob("train-*/checkpoint-*/train_state.json")
    ]
    noticed = min(s["step"] for s in states)
    assert noticed in (1, 2) and max(s["step"] for s in states) == STEPS, said[-4000:]
    restarts = [int(h["restarts"]) for h in history]
    assert restarts == [0] * noticed + [1] * (STEPS - noticed), (noticed, restarts)
    assert (out / "model" / "model.safetensors").exists()
