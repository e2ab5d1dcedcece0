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
from tuning.worker_exit import WORKERS_FILE

log = logging.getLogger(__name__)

ATTEMPTS_FILE = "attempts.json"  # one entry per start of a trial's driver
RESULT_FILE = "result.json"  # written when the trial's training finished
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
    """Removes leftover worker placement groups of trials Tune finished, stopped or restarts.

    Checked again every few seconds: a run being stopped can still create a group.
    """

    def __init__(self, trials_dir: str, every_s: float = 2.0):
        self.trials_dir = trials_dir
        self.every_s = every_s
        self.finished: set[str] = set()
        self.last = 0.0

    def _finish(self, trial: Any) -> None:
        self.finished.add(trial.trial_id)
        self.last = 0.0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial)

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
