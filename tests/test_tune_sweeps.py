"""Ray Tune sweeps beyond the CLI run: interrupt and resume, failed trials (ASHA and Optuna:
test_tune_schedulers.py).

Split from test_tune.py so that pytest-xdist can run the two halves on different workers.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
from ray import tune

from sftmix_ray.errors import SftmixError
from sftmix_ray.summary import read_summary
from tests.conftest import tiny_config
from tests.test_tune import SWEEP, _attempts, _copy_base
from tuning.sweep import SweepInterrupted, run_tune

# ---------------------------------------------------------------------------------------------
# Interrupt after the first trial, then resume: only the remaining trials run


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
def test_interrupted_sweep_resumes_only_the_remaining_trials(scored_base, ray_local, tmp_path):
    out = _copy_base(scored_base, tmp_path / "out")
    space = tmp_path / "space.yaml"
    space.write_text("mixup.mu: {choice: [0.1, 0.4]}\n")
    # Random search over a discrete space draws without repeats: 5 samples of 2 points run
    # each point once (Tune's own sampling would repeat one).
    cfg = tiny_config(*SWEEP, "tune.search=random", "tune.num_samples=5", f"tune.space={space}")
    marker = tmp_path / "interrupted"
    with pytest.raises(SweepInterrupted, match="rerun the same command"):
        run_tune(cfg, out, callbacks=[InterruptOnce(str(marker))])
    first = marker.read_text()
    partial = pd.read_csv(out / "tune" / "results.csv")
    assert (partial["status"] == "TERMINATED").sum() == 1
    assert partial.loc[partial["status"] == "TERMINATED", "trial_id"].item() == first
    assert not (out / "tune" / "best_config.yaml").exists()
    assert read_summary(out)["stages"]["tune"]["status"] == "interrupted"

    resumed_at = time.time()
    result = run_tune(cfg, out)
    assert result["resumed"] and result["terminated"] == result["trials"] == 2
    table = pd.read_csv(out / "tune" / "results.csv")
    assert len(table) == 2 and table["trial_id"].is_unique
    assert sorted(table["mixup.mu"]) == [0.1, 0.4] and set(table["status"]) == {"TERMINATED"}
    trials = out / "tune" / "trials"
    assert sorted(p.name for p in trials.iterdir()) == sorted(table["trial_id"])
    # The finished trial did not run again; every other trial started exactly once after resume.
    assert len(_attempts(trials / first)) == 1 and _attempts(trials / first)[0] < resumed_at
    for trial_id in set(table["trial_id"]) - {first}:
        assert len([t for t in _attempts(trials / trial_id) if t >= resumed_at]) == 1
    assert (out / "tune" / "best_config.yaml").exists()

    # A finished sweep rerun trains nothing and reports the same table.
    again_at = time.time()
    again = run_tune(cfg, out)
    assert again["best"] == result["best"]
    assert all(t < again_at for p in trials.iterdir() for t in _attempts(p))


# ---------------------------------------------------------------------------------------------
# Failures are retried by Tune and reported, never lost


@pytest.mark.slow
def test_failed_trial_is_retried_and_reported(scored_base, ray_local, tmp_path):
    out = _copy_base(scored_base, tmp_path / "out")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    space = tmp_path / "space.yaml"
    space.write_text("mixup.mu: {choice: [0.2]}\n")
    cfg = tiny_config(
        *SWEEP, f"tune.space={space}", "tune.num_samples=1", "tune.max_failures=1",
        f"train.storage_path={blocker}",  # every trial's Ray Train storage is unwritable
    )  # fmt: skip
    with pytest.raises(SftmixError, match="no trial finished"):
        run_tune(cfg, out)
    table = pd.read_csv(out / "tune" / "results.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert row["status"] == "ERROR" and row["attempts"] == 2 and row["tune_failures"] == 2
    assert "not-a-directory" in row["error"] or "Not a directory" in row["error"]
    assert read_summary(out)["stages"]["tune"]["status"] == "failed"
