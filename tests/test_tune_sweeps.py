"""Ray Tune sweeps beyond the CLI run: failed trials are retried and reported (an interrupted
sweep resumed, random search without repeats, ASHA: test_tune_schedulers.py; Optuna:
test_tune.py's CLI sweep).

Split from test_tune.py so that pytest-xdist can run the two halves on different workers.
"""

from __future__ import annotations

import pandas as pd
import pytest

from sftmix_ray.errors import SftmixError
from sftmix_ray.summary import read_summary
from tests.conftest import tiny_config
from tests.test_tune import SWEEP, _copy_base
from tuning.sweep import run_tune

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
