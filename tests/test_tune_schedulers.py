"""Ray Tune schedulers: ASHA stops the worse trial (Optuna: test_tune.py's CLI sweep).

Split from test_tune_sweeps.py so that pytest-xdist (`--dist loadfile`) runs them beside it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import tiny_config
from tests.test_tune import SWEEP, _copy_base, _history
from tests.test_tune_sweeps import InterruptOnce
from tuning.sweep import SweepInterrupted, run_tune

# ---------------------------------------------------------------------------------------------
# ASHA stops a trial that is worse at its first rung, across a resumed sweep


@pytest.mark.slow
def test_asha_stops_the_worse_trial_at_its_first_rung(scored_base, ray_local, tmp_path):
    """The sweep is interrupted once its first trial has finished and then resumed: the
    rungs that trial set are read back (Tune restores the searcher, not the scheduler: the
    resumed ASHA had no rungs and let the worse trial train to the end)."""
    out = _copy_base(scored_base, tmp_path / "out")
    space = tmp_path / "space.yaml"
    # Grid order, one trial at a time: the sane learning rate sets rung 1 (step 1), then a
    # learning rate that wrecks the model after one Adam step is measured against it.
    space.write_text("train.learning_rate: {grid: [0.01, 0.5]}\n")
    cfg = tiny_config(
        *SWEEP, "train.max_steps=3", "train.warmup_ratio=0", f"tune.space={space}",
        "train.save_steps=1",
        "tune.search=grid", "tune.num_samples=1", "tune.scheduler=asha", "tune.grace_period=1",
    )  # fmt: skip
    marker = tmp_path / "interrupted"
    with pytest.raises(SweepInterrupted):
        run_tune(cfg, out, callbacks=[InterruptOnce(str(marker))])
    partial = pd.read_csv(out / "tune" / "results.csv").set_index("train.learning_rate")
    assert partial.loc[0.01, "status"] == "TERMINATED" and partial.loc[0.01, "reports"] == 3
    assert (partial["status"] == "TERMINATED").sum() == 1  # the wrecked one had not reported
    result = run_tune(cfg, out)
    assert result["resumed"]
    table = pd.read_csv(out / "tune" / "results.csv").set_index("train.learning_rate")
    assert set(table["status"]) == {"TERMINATED"} and result["terminated"] == 2
    sane, wrecked = table.loc[0.01], table.loc[0.5]
    assert sane["reports"] == 3 and sane["completed_training"]  # ran to max_t
    assert wrecked["reports"] == 1 and not wrecked["completed_training"]  # stopped at rung 1
    # A stopped trial's only report is its step-1 eval; the sane trial's is in its history.
    sane_step1 = _history(Path(sane["trial_dir"]))[0]["eval_loss"]
    assert wrecked["eval_loss"] > sane_step1, "ASHA stopped the trial that was worse at step 1"
    assert result["best"]["params"]["train.learning_rate"] == 0.01
    # Both trials are over, the stopped one too: their resume checkpoints are gone (the sane
    # trial's 2 or 3, as far as Ray Train had pruned them to save_total_limit, and the stopped
    # one's step-1 save).
    assert result["resume_checkpoints_removed"] >= 3
    assert not list((out / "tune" / "trials").glob("*/ray_storage/*/checkpoint-*"))


@pytest.mark.slow
def test_the_sweep_waits_for_a_stopped_trials_workers_to_exit(ray_local, tmp_path):
    """`wait_for_workers` (run before a sweep removes its trials' checkpoints) returns only
    once the actors the trial recorded are dead and their processes have exited, and gives up
    with a warning after its timeout. A worker of a stopped trial keeps training in its thread
    after the GCS calls it DEAD: a checkpoint it wrote then outlived the removal (seen in a
    suite run of the ASHA test above)."""
    import os
    import threading
    import time

    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from tuning.ray_compat import actor_id_hex
    from tuning.worker_exit import WORKERS_FILE, pid_running, wait_for_workers

    @ray_local.remote(num_cpus=1)
    class Worker:
        def train(self, path: str) -> int:
            def steps() -> None:  # a training thread: not a daemon, never stops by itself
                while True:
                    Path(path).write_text(str(time.time()))
                    time.sleep(0.01)

            threading.Thread(target=steps).start()
            return os.getpid()

    group = placement_group([{"CPU": 1}])
    ray_local.get(group.ready())
    worker = Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group)).remote()
    written = tmp_path / "written"
    pid = ray_local.get(worker.train.remote(str(written)))
    (tmp_path / WORKERS_FILE).write_text(actor_id_hex(worker) + "\n")
    start = time.monotonic()
    assert not wait_for_workers([tmp_path], timeout_s=0.5)  # alive: it waited, then gave up
    assert time.monotonic() - start >= 0.5
    remove_placement_group(group)  # what the sweep does to a stopped trial's worker group
    assert wait_for_workers([tmp_path], timeout_s=60)
    assert not pid_running(pid)
    last = written.read_text()
    time.sleep(0.5)
    assert written.read_text() == last, "the worker wrote after wait_for_workers returned"
    assert wait_for_workers([tmp_path / "no-trial"])  # nothing recorded: nothing to wait for


@pytest.mark.slow
def test_worker_processes_on_another_node_are_waited_for_there(ray_local):
    """A worker on another node is looked for by a task on that node (here: this node, by its
    id, the same code path); a node that is gone has nothing running. A process that started
    after the actor did reused its pid (a trial that finished an hour before the sweep ends)
    and is not waited for."""
    import subprocess
    import time

    from tuning.worker_exit import _exited_elsewhere, pid_running

    node = ray_local.get_runtime_context().get_node_id()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        now = time.time()
        assert pid_running(proc.pid, started_by=now) and pid_running(proc.pid)
        assert not pid_running(proc.pid, started_by=now - 3600)  # the pid of a later process
        assert _exited_elsewhere({node: [(proc.pid, now)]}, timeout_s=0.5) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
    assert _exited_elsewhere({node: [(proc.pid, now)]}, timeout_s=5) == []
    gone = "ab" * 28  # no such node; asked together with a live one
    assert _exited_elsewhere({gone: [(proc.pid, now)], node: [(1, None)]}, timeout_s=1) == [1]
