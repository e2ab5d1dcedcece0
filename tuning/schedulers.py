"""ASHA whose rungs survive a resumed sweep.

`tune.Tuner.restore` restores the searcher's state but not the scheduler's: the scheduler comes
back as it was pickled when the sweep started, with empty rungs. After a resume, ASHA then
compared the new trials with each other only, and a trial worse at a rung than every trial
finished before the interruption trained on to the end. `ResumableASHA` writes its rungs to a
JSON file after every result, and reads them back when Tune unpickles it on restore.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from sftmix_ray.io_utils import atomic_write_json


class ResumableASHA(ASHAScheduler):
    """`ASHAScheduler` that keeps its rungs (the metric each trial reported at each rung, each
    trial's bracket, how many trials it stopped) in `state_path` as they change."""

    def __init__(self, state_path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_path = state_path

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        self._write_state()
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._write_state()

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_remove(tune_controller, trial)
        self._write_state()

    def _write_state(self) -> None:
        """The rungs as strict JSON, written whole (a non-finite metric is null)."""
        index = {id(bracket): i for i, bracket in enumerate(self._brackets)}
        state = {
            "num_stopped": self._num_stopped,
            "rungs": [[[m, dict(rec)] for m, rec in b._rungs] for b in self._brackets],
            "trial_bracket": {t: index[id(b)] for t, b in self._trial_info.items()},
        }
        atomic_write_json(Path(self._state_path), state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tune unpickles the scheduler it pickled at the sweep's start: the rungs as they were
        # when the sweep stopped are in the file (the brackets' shape is the config's, the same).
        self.__dict__.update(state)
        path = Path(self._state_path)
        if not path.exists():
            return
        saved = json.loads(path.read_text(encoding="utf-8"))
        for bracket, rungs in zip(self._brackets, saved["rungs"], strict=True):
            bracket._rungs = [
                (milestone, {t: math.nan if v is None else v for t, v in recorded.items()})
                for milestone, recorded in rungs
            ]
        self._trial_info = {t: self._brackets[i] for t, i in saved["trial_bracket"].items()}
        self._num_stopped = saved["num_stopped"]
