"""Two raylet nodes (ray.cluster_utils.Cluster): SPREAD workers train across both nodes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.test_train import write_split

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from sftmix_ray.pipeline import run_stage
    from tests.conftest import tiny_config

    out, storage = Path(sys.argv[1]), sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    cfg = tiny_config(
        "train.num_workers=2", "train.placement_strategy=STRICT_SPREAD",
        "train.per_device_train_batch_size=4", "train.max_steps=3", "train.save_steps=1",
        f"train.storage_path={storage}", f"ray.address={cluster.address}",
    )
    summary = run_stage("train", cfg, out)
    print("RESULT " + json.dumps({"nodes": nodes, "summary": summary}))
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_training_spreads_over_two_nodes(prepared_out: Path, tmp_path: Path):
    out = tmp_path / "out"
    for name in ("data", "heldout", "base_model"):
        shutil.copytree(prepared_out / name, out / name)
    write_split(out)
    storage = tmp_path / "shared_storage"  # one path every node sees (a shared FS in prod)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out), str(storage)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    report = json.loads(line.removeprefix("RESULT "))
    assert len(report["nodes"]) == 2
    summary = report["summary"]
    assert sorted(summary["nodes"]) == report["nodes"], "one worker on each node"
    assert summary["steps"] == 3 and summary["restarts"] == 0
    checkpoints = [p for p in storage.glob("train-*/checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == 2, "num_to_keep=2 checkpoints kept in the shared storage path"
    assert all((c / "train_state.json").exists() for c in checkpoints)
    assert (out / "model" / "model.safetensors").exists()
