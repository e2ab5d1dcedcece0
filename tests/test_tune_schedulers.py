"""Ray Tune schedulers and resumed sweeps: an interrupted sweep resumes only its remaining trial
and ASHA stops the worse trial across the resume (Optuna: test_tune.py's CLI sweep).

Split from test_tune_sweeps.py so that pytest-xdist (`--dist loadfile`) runs them beside it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
from ray import tune

from sftmix_ray.summary import read_summary
from tests.conftest import tiny_config
from tests.test_tune import SWEEP, _attempts, _copy_base, _history
from tuning.space import load_space
from tuning.sweep import SweepInterrupted, random_points, run_tune
from tuning.trial import REMOVED_FILE

# ---------------------------------------------------------------------------------------------
# A sweep interrupted after its first trial and resumed: only the remaining trials run, and ASHA
# stops a trial that is worse at its first rung across the resume


class InterruptOnce(tune.Callback):
    """Sends the sweep's process SIGUSR1 (Tune's graceful stop, like Ctrl+C) once, after the
    first trial completes. Tune restores its callbacks on resume: the marker keeps it quiet."""

    def __init__(self, marker: str):
        self.marker = marker

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_interrupted_asha_sweep_resumes_the_remaining_trial_and_stops_the_worse_one(
    scored_base, ray_local, tmp_path
):
    """Random search over a discrete space, one trial at a time, interrupted once its first
    trial has finished and then resumed: the finished trial is not run again, the other starts
    once, and the rungs the first trial set are read back (Tune restores the searcher, not the
    scheduler: the resumed ASHA had no rungs and let the worse trial train to the end). A rerun
    of the finished sweep trains nothing."""
    out = _copy_base(scored_base, tmp_path / "out")
    space = tmp_path / "space.yaml"
    # The sane learning rate sets rung 1 (step 1), then a learning rate that wrecks the model
    # after one Adam step is measured against it.
    space.write_text("train.learning_rate: {choice: [0.01, 0.5]}\n")
    # Random search draws without repeats: 5 samples of 2 points run each point once (Tune's
    # own sampling would repeat one); seed 1 draws the sane point first.
    cfg = tiny_config(
        *SWEEP, "train.max_steps=3", "train.warmup_ratio=0", f"tune.space={space}",
        "train.save_steps=1", "tune.search=random", "tune.num_samples=5", "tune.seed=1",
        "tune.scheduler=asha", "tune.grace_period=1",
    )  # fmt: skip
    points = random_points(cfg, load_space(str(space), cfg.to_dict()))
    assert points == [{"train.learning_rate": 0.01}, {"train.learning_rate": 0.5}]
    marker = tmp_path / "interrupted"
    with pytest.raises(SweepInterrupted, match="rerun the same command"):
        run_tune(cfg, out, callbacks=[InterruptOnce(str(marker))])
    first = marker.read_text()
    partial = pd.read_csv(out / "tune" / "results.csv").set_index("train.learning_rate")
    assert partial.loc[0.01, "status"] == "TERMINATED" and partial.loc[0.01, "reports"] == 3
    assert (partial["status"] == "TERMINATED").sum() == 1  # the wrecked one had not reported
    assert partial.loc[0.01, "trial_id"] == first
    assert not (out / "tune" / "best_config.yaml").exists()
    assert read_summary(out)["stages"]["tune"]["status"] == "interrupted"

    resumed_at = time.time()
    result = run_tune(cfg, out)
    assert result["resumed"] and result["terminated"] == result["trials"] == 2
    table = pd.read_csv(out / "tune" / "results.csv").set_index("train.learning_rate")
    assert sorted(table.index) == [0.01, 0.5] and table["trial_id"].is_unique
    assert set(table["status"]) == {"TERMINATED"}
    trials = out / "tune" / "trials"
    assert sorted(p.name for p in trials.iterdir()) == sorted(table["trial_id"])
    # The finished trial did not run again; the other started exactly once after the resume.
    assert len(_attempts(trials / first)) == 1 and _attempts(trials / first)[0] < resumed_at
    (other,) = set(table["trial_id"]) - {first}
    assert len([t for t in _attempts(trials / other) if t >= resumed_at]) == 1
    sane, wrecked = table.loc[0.01], table.loc[0.5]
    assert sane["reports"] == 3 and sane["completed_training"]  # ran to max_t
    assert wrecked["reports"] == 1 and not wrecked["completed_training"]  # stopped at rung 1
    # A stopped trial's only report is its step-1 eval; the sane trial's is in its history.
    sane_step1 = _history(Path(sane["trial_dir"]))[0]["eval_loss"]
    assert wrecked["eval_loss"] > sane_step1, "ASHA stopped the trial that was worse at step 1"
    assert result["best"]["params"]["train.learning_rate"] == 0.01
    assert (out / "tune" / "best_config.yaml").exists()
    # Both trials are over, the stopped one too: their resume checkpoints are gone (the sane
    # trial's 2 or 3, as far as Ray Train had pruned them to save_total_limit, and the stopped
    # one's step-1 save).
    assert result["resume_checkpoints_removed"] >= 3
    assert not list(trials.glob("*/ray_storage/*/checkpoint-*"))
    # The stopped trial's went as soon as its workers had exited, not at the end of the sweep
    # (at 8B, ~24 of 32 ASHA trials' checkpoints filled the volume while the others trained):
    # the callback that Tune calls for it removed and counted them.
    by_callback = json.loads((Path(wrecked["trial_dir"]) / REMOVED_FILE).read_text())
    assert by_callback["resume_checkpoints_removed"] >= 1

    # A finished sweep rerun trains nothing and reports the same best trial.
    again_at = time.time()
    again = run_tune(cfg, out)
    assert again["best"] == result["best"]
    assert all(t < again_at for p in trials.iterdir() for t in _attempts(p))


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
