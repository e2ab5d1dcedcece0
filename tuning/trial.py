"""One sweep trial: the driver function Tune runs, and the cleanup of what a stopped trial leaves.

Each trial trains in OUT/tune/trials/<trial_id>/: links to OUT's data/, heldout/, base_model/
(and scores/ when it recomputes the split), its own split/, model/, logs/, Ray Train storage,
config.yaml, attempts.json (one entry per start of its driver) and result.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from sftmix_ray.config import save_config
from sftmix_ray.io_utils import atomic_write_json
from sftmix_ray.layout import RunDir
from tuning.ray_compat import actor_id_hex, worker_group_callback_base
from tuning.space import apply_params
from tuning.worker_exit import WORKERS_FILE, wait_for_workers

log = logging.getLogger(__name__)

ATTEMPTS_FILE = "attempts.json"  # one entry per start of a trial's driver
RESULT_FILE = "result.json"  # written when the trial's training finished
# How many resume checkpoints the sweep removed once the trial was over (ASHA's stopped ones).
REMOVED_FILE = "checkpoints_removed.json"
PLACEMENT_GROUPS_FILE = "placement_groups.txt"  # the trial's Ray Train worker groups
LINKED_INPUTS = (RunDir.DATA, RunDir.HELDOUT, RunDir.BASE_MODEL)


def trial_dirname(trial: Any) -> str:
    """Tune's directory for a trial: its id (params live in results.csv, not in paths)."""
    return f"trial_{trial.trial_id}"


def _link(source: Path, target: Path) -> None:
    """`target` -> `source` (a symlink), unless it already points there."""
    if target.is_symlink() and target.resolve() == source.resolve():
        return
    if target.is_symlink() or target.is_file():
        target.unlink()
    target.symlink_to(source, target_is_directory=source.is_dir())


def _record_attempt(trial_out: Path) -> int:
    """Append this start of the driver to attempts.json; returns the attempt number."""
    path = trial_out / ATTEMPTS_FILE
    attempts = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    attempts.append({"started": time.time(), "pid": os.getpid()})
    atomic_write_json(path, attempts)
    return len(attempts)


class MetricReportCallback(TuneReportCallback):
    """A TuneReportCallback that forwards only the reports holding the sweep's metric.

    Tune checks that every result carries the metric it optimizes, while the loop also reports
    plain training steps; the held-out evals (every `train.eval_steps` and at the end) do.
    """

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class PlacementGroupRecorder(worker_group_callback_base()):  # type: ignore[misc]
    """Appends the id of each worker placement group the trial's run creates to a file.

    A trial that Tune stops early (ASHA) is killed with its Train controller, which leaves the
    workers' placement group behind until Ray Train's PlacementGroupCleaner removes it; that
    cleaner needs the state API (the dashboard), which local clusters often run without, and
    the leaked CPUs then stall every later trial. The sweep removes them (see below).
    """

    def __init__(self, trial_out: str):
        self.trial_out = Path(trial_out)

    def after_worker_group_start(self, worker_group: Any) -> None:
        state = worker_group.get_worker_group_state()
        pg_id = state.placement_group_handle.placement_group.id.hex()
        with open(self.trial_out / PLACEMENT_GROUPS_FILE, "a", encoding="utf-8") as fh:
            fh.write(pg_id + "\n")
        with open(self.trial_out / WORKERS_FILE, "a", encoding="utf-8") as fh:
            fh.writelines(actor_id_hex(worker.actor) + "\n" for worker in state.workers)


def _train_callbacks(metric: str, trial_out: Path) -> list[Any]:
    return [
        MetricReportCallback(metric),
        PlacementGroupRecorder(str(trial_out)),
    ]


def release_placement_groups(trial_out: Path) -> int:
    """Remove the worker placement groups a finished trial left behind; returns how many."""
    import ray
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    path = trial_out / PLACEMENT_GROUPS_FILE
    if not path.exists():
        return 0
    released = 0
    for pg_id in path.read_text(encoding="utf-8").split():
        pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id)))
        if placement_group_table(pg).get("state") not in (None, "REMOVED"):
            remove_placement_group(pg)
            released += 1
    if released:
        log.info("released %d placement group(s) left by trial %s", released, trial_out.name)
    return released


class ReleaseFinishedTrials(tune.Callback):
    """Removes leftover worker placement groups of trials Tune finished, stopped or restarts,
    and the resume checkpoints of those it finished or stopped, once their workers are gone.

    Placement groups are checked again every few seconds: a run being stopped can still
    create a group.
    """

    def __init__(self, trials_dir: str, storage_path: str | None = None, every_s: float = 2.0):
        self.trials_dir = trials_dir
        self.storage_path = storage_path
        self.every_s = every_s
        self.finished: set[str] = set()
        self.last = 0.0

    def _finish(self, trial: Any) -> None:
        self.finished.add(trial.trial_id)
        self.last = 0.0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial that trained to the end, or that the scheduler stopped (ASHA): nothing
        resumes it. Its checkpoints went only at the end of the sweep, so every stopped
        trial's (up to `train.save_total_limit` x ~96 GB at 8B, ~24 of 32 trials under ASHA)
        filled the shared volume while the others trained."""
        self._finish(trial)
        storage = getattr(self, "storage_path", None)  # a sweep pickled before it was kept
        remove_checkpoints_once_exited(storage, Path(self.trials_dir) / trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        release_placement_groups(Path(self.trials_dir) / trial.trial_id)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self.finished or time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        for trial_id in self.finished:
            release_placement_groups(Path(self.trials_dir) / trial_id)


# The cleanups started by `ReleaseFinishedTrials` in this process (the sweep's driver): the
# callback itself is pickled with the experiment, so they are kept here.
_CLEANUPS: list[threading.Thread] = []


def remove_checkpoints_once_exited(storage_path: str | None, trial_out: Path) -> None:
    """In a thread: wait until the trial's Ray Train workers have exited (a stopped trial's
    worker may still be saving), then remove its resume checkpoints and record how many in
    `REMOVED_FILE`. Workers still alive after `wait_for_workers`' timeout leave them to the
    sweep's last pass. Never raises into Tune's loop."""

    def clean() -> None:
        try:
            if wait_for_workers([trial_out]):
                removed = remove_finished_checkpoints(storage_path, RunDir(trial_out))
                if removed:
                    atomic_write_json(
                        trial_out / REMOVED_FILE, {"resume_checkpoints_removed": removed}
                    )
                    log.info("removed %d resume checkpoint(s) of trial %s", removed, trial_out.name)
        except Exception as exc:  # the sweep's last pass tries again
            log.warning("could not remove the checkpoints of trial %s: %s", trial_out.name, exc)

    thread = threading.Thread(target=clean, name=f"remove-{trial_out.name}", daemon=True)
    thread.start()
    _CLEANUPS.append(thread)


def join_checkpoint_removals(timeout_s: float = 300.0) -> set[str]:
    """Wait for the removals `remove_checkpoints_once_exited` started (before the sweep's own
    pass over every finished trial); returns the trials whose removal still runs after
    `timeout_s`, which that pass leaves alone (two removals of one directory race)."""
    deadline = time.monotonic() + timeout_s
    running = set()
    while _CLEANUPS:
        thread = _CLEANUPS.pop()
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            running.add(thread.name.removeprefix("remove-"))
    return running


def removed_checkpoints(trial_out: Path) -> int:
    """How many resume checkpoints went with a trial: those its training removed after its
    export (`RESULT_FILE`) and those the sweep removed once it was over (`REMOVED_FILE`)."""
    total = 0
    for name in (RESULT_FILE, REMOVED_FILE):
        if (trial_out / name).exists():
            record = json.loads((trial_out / name).read_text(encoding="utf-8"))
            total += int(record.get("resume_checkpoints_removed", 0))
    return total


def trial_storage(storage_path: str | None, trial: RunDir) -> str:
    """A trial's own Ray Train storage (two trials with equal params must not share a run):
    under `train.storage_path`/tune/<trial id>, or the trial's own OUT/.../ray_storage."""
    if storage_path:
        return f"{storage_path.rstrip('/')}/tune/{trial.root.name}"
    return str(trial.ray_storage)


def remove_finished_checkpoints(storage_path: str | None, trial: RunDir) -> int:
    """Remove a finished trial's Ray Train runs (resume checkpoints and snapshots); returns
    how many checkpoints went. Nothing resumes a finished trial, and at 8B each keeps up to
    `train.save_total_limit` x ~96 GB."""
    import pyarrow.fs as pafs

    from sftmix_ray.train.checkpointing import delete_checkpoints
    from sftmix_ray.train.launch import storage_uri

    root = storage_uri(trial_storage(storage_path, trial))
    filesystem, path = pafs.FileSystem.from_uri(root)
    runs = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = [r.path.rsplit("/", 1)[-1] for r in runs if r.type == pafs.FileType.Directory]
    return sum(delete_checkpoints(root, name) for name in names)


def trial_driver(
    params: dict[str, Any], *, base: dict[str, Any], out_dir: str, recompute_split: bool
) -> None:
    """One trial: params -> Config, the trial's own split and run directory, a TorchTrainer."""
    from sftmix_ray.split import run_split
    from sftmix_ray.train.launch import run_training

    cfg = apply_params(base, params)
    trial_id = tune.get_context().get_trial_id()
    out = RunDir.of(out_dir)
    trial = out.trial(trial_id)
    trial_out = trial.root
    trial_out.mkdir(parents=True, exist_ok=True)
    attempt = _record_attempt(trial_out)
    log.info("trial %s (attempt %d): %s", trial_id, attempt, params)
    save_config(cfg, trial.config)
    for name in LINKED_INPUTS:
        if (out / name).exists():
            _link(out / name, trial / name)
    if recompute_split or "split.ratio" in params:
        _link(out.scores_dir, trial.scores_dir)
        run_split(cfg, trial)
    else:
        _link(out.split_dir, trial.split_dir)
    storage = trial_storage(cfg.train.storage_path, trial)
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, storage_path=storage))
    summary = run_training(
        run_cfg, trial, "train", callbacks=_train_callbacks(cfg.tune.metric, trial_out)
    )
    atomic_write_json(trial_out / RESULT_FILE, {"attempt": attempt, **summary})
