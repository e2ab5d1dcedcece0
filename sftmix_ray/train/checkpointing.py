"""Training-state checkpoints through Ray Train, written where they are kept.

On POSIX storage (a shared filesystem, the usual `OUT/ray_storage` or an NFS/EFS
`train.storage_path`) every rank writes its part straight into the run's directory in storage
and Ray Train registers it without copying (`CheckpointUploadMode.NO_UPLOAD`): an 8B FSDP2
checkpoint with Adam state is ~96 GB, which a temporary directory then an upload would write
twice while training waits. Object stores (`s3://`, `gs://`) keep a local temporary directory
that Ray Train uploads. Each save gets a fresh directory name (step and a token rank 0 draws),
so a save cut short by a crash never mixes with a later one of the same step; Ray Train keeps
`train.save_total_limit` of them and deletes the rest.

With `train.async_checkpoint` (POSIX storage; every strategy) the save is copied to host
memory and written by a background thread while training goes on; Ray Train learns of it only
once every rank has finished writing (`CheckpointReporter`), so a crash mid-write resumes from
the checkpoint before it, never from a partial one.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PREFIX = "checkpoint-"


def _shared_token(world: int) -> str:
    """A token drawn by rank 0 and known to every rank."""
    import torch.distributed as dist

    token = [uuid.uuid4().hex[:8]]
    if world > 1:
        dist.broadcast_object_list(token, src=0)
    return str(token[0])


@dataclass
class _Direct:
    """A checkpoint directory in the run's POSIX storage."""

    name: str
    path: Path


@dataclass
class _InFlight:
    """An asynchronous save under way: its directory and the future of this rank's part."""

    step: int
    target: _Direct
    future: Future


class CheckpointReporter:
    """Every report of a run to Ray Train, its checkpoints included.

    Without `save_async`, a save step saves and reports at once. With it,
    a save step starts the save in the background and reports the metrics alone; the save is
    attached to the first later report at which every rank has finished writing (one
    all-reduce of a done flag per report while a save is in flight), and at the latest to the
    next save step's report, which waits for it first: one save is in flight at a time, so
    host memory holds at most one staged copy. The last step saves synchronously (the export
    follows); a save still in flight then is superseded, waited for and removed.
    """

    def __init__(
        self,
        world: int,
        rank: int,
        device: torch.device,
        save: Callable[[Path], None],
        save_async: Callable[[Path], Future] | None = None,
    ):
        self.world, self.rank, self.device = world, rank, device
        self._save, self._save_async = save, save_async
        self._pending: _InFlight | None = None
        self.async_registered: list[int] = []  # steps of the background saves registered

    def report(self, metrics: dict[str, Any], step: int, *, save: bool, final: bool) -> None:
        import ray.train

        finished = self._finished(wait=save or final)
        if save and (final or self._save_async is None):
            if finished is not None:  # superseded by this save
                self._remove(finished)
            target = self._target(step)
            if target is not None:
                self._save(target.path)
                self._report_direct(metrics, target)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    self._save(Path(tmp))
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                    ray.train.report(metrics, checkpoint=checkpoint)
            return
        if save:
            self._pending = self._start(step)
        if finished is None:
            ray.train.report(metrics)
            return
        self._report_direct(metrics, finished.target)
        self.async_registered.append(finished.step)

    def _target(self, step: int) -> _Direct | None:
        """A fresh checkpoint directory in storage, or None where storage is an object store."""
        import pyarrow.fs as pafs
        import ray.train

        storage = ray.train.get_context().get_storage()
        if not isinstance(storage.storage_filesystem, pafs.LocalFileSystem):
            return None
        name = f"{CHECKPOINT_PREFIX}{step:08d}-{_shared_token(self.world)}"
        path = Path(storage.build_checkpoint_path_from_name(name))
        path.mkdir(parents=True, exist_ok=True)
        return _Direct(name, path)

    def _report_direct(self, metrics: dict[str, Any], target: _Direct) -> None:
        import pyarrow.fs as pafs
        import ray.train

        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint(str(target.path), filesystem=pafs.LocalFileSystem()),
            checkpoint_dir_name=target.name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )

    def settle(self, metrics: dict[str, Any]) -> None:
        """Register a save still in flight, once written, with a last report (every rank): a
        run that stops early (too many skipped steps) keeps its newest checkpoint to resume
        from, where `close` would remove it."""
        finished = self._finished(wait=True)
        if finished is not None:
            self._report_direct(metrics, finished.target)
            self.async_registered.append(finished.step)

    def close(self) -> None:
        """Wait for a save still in flight (a run that ends without a final report)."""
        finished = self._finished(wait=True)
        if finished is not None:
            self._remove(finished)

    def _start(self, step: int) -> _InFlight:
        assert self._save_async is not None
        target = self._target(step)
        if target is None:
            raise RuntimeError(
                "train.async_checkpoint writes straight into POSIX storage; this run's "
                "storage is an object store"
            )
        return _InFlight(step, target, self._save_async(target.path))

    def _finished(self, *, wait: bool) -> _InFlight | None:
        """The save in flight once every rank has written its part (None if none is, or,
        without `wait`, if some rank is still writing). Raises a failed save's error."""
        from sftmix_ray.train.collectives import all_reduce_sum

        pending = self._pending
        if pending is None:
            return None
        if not wait:
            busy = 0.0 if pending.future.done() else 1.0
            if float(all_reduce_sum([busy], self.device).item()) > 0:
                return None
        pending.future.result()
        self._pending = None
        return pending

    def _remove(self, finished: _InFlight) -> None:
        """Remove a superseded save that Ray Train never heard of (every rank calls this)."""
        from sftmix_ray.train.collectives import all_reduce_sum

        # `_finished` waited for this rank's part only (DDP and DeepSpeed ranks write their
        # files alone): meet first, so that no rank is still writing into the directory.
        all_reduce_sum([0.0], self.device)
        if self.rank == 0:
            shutil.rmtree(finished.target.path, ignore_errors=True)


# Ray Train's record of a run's registered checkpoints (`checkpoint_manager_snapshot.json`).
SNAPSHOT_PREFIX = "checkpoint_manager_snapshot"
_OURS = re.compile(rf"{CHECKPOINT_PREFIX}(\d{{8}})-[0-9a-f]{{8}}")


def remove_orphans(resumed: str | None) -> int:
    """Remove this run's checkpoint directories that Ray Train never registered: saves a
    crashed attempt left behind (cut short, or written in the background and not yet
    registered), up to a whole checkpoint each (~96 GB at 8B). Ray Train resumes from the
    latest checkpoint it registered (`resumed`, None for a start from scratch) and steps only
    grow, so every directory of ours with a later step, or the same step and another name, is
    an orphan. Rank 0 calls this at start, before any rank saves; returns how many it removed.
    Object-store storage is left alone (Ray Train names and uploads those checkpoints)."""
    import pyarrow.fs as pafs
    import ray.train

    storage = ray.train.get_context().get_storage()
    if not isinstance(storage.storage_filesystem, pafs.LocalFileSystem):
        return 0
    run_dir = Path(storage.build_checkpoint_path_from_name("x")).parent
    keep = Path(resumed).name if resumed else None
    last = -1
    if keep is not None:
        resumed_match = _OURS.fullmatch(keep)
        if resumed_match is None:  # not a name of ours: nothing to order the others by
            return 0
        last = int(resumed_match.group(1))
    removed = 0
    for path in run_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        match = _OURS.fullmatch(path.name)
        if path.is_dir() and match and int(match.group(1)) >= last and path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def delete_checkpoints(storage_uri: str, run_name: str) -> int:
    """Remove a finished run's training-state checkpoints from storage (the reference run's,
    once its HF checkpoints are exported); returns how many were removed.

    The whole run directory goes, Ray Train's snapshot of its checkpoints first: a snapshot
    that lists deleted checkpoints makes the next run of that name fail at start
    (`CheckpointManagerInitializationError`), so `sftmix-ray reference` run again, or
    `pipeline --force reference`, could not start. A removal cut short (an NFS error, the
    driver killed) leaves checkpoints without a snapshot, which the next run of that name
    starts without (on a local or NFS path removing them as orphans; on an object store they
    stay), never a snapshot without its checkpoints."""
    import pyarrow.fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(storage_uri)
    return delete_run_dir(filesystem, f"{root.rstrip('/')}/{run_name}")


def delete_run_dir(filesystem: Any, run_dir: str) -> int:
    """`delete_checkpoints` on a `pyarrow.fs` filesystem and the run's directory in it."""
    import pyarrow.fs as pafs

    entries = filesystem.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    removed = 0
    for entry in entries:
        name = entry.path.rsplit("/", 1)[-1]
        resume_state = name.startswith((CHECKPOINT_PREFIX, "checkpoint_"))  # ours, Ray's own
        if entry.type == pafs.FileType.Directory and resume_state:
            removed += 1
        elif entry.type == pafs.FileType.File and name.startswith(SNAPSHOT_PREFIX):
            filesystem.delete_file(entry.path)  # first: the snapshot names the checkpoints
    if filesystem.get_file_info(run_dir).type == pafs.FileType.Directory:
        filesystem.delete_dir(run_dir)
    return removed
