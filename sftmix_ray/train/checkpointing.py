"""Training-state checkpoints through Ray Train, written where they are kept.

On POSIX storage (a shared filesystem, the usual `OUT/ray_storage` or an NFS/EFS
`train.storage_path`) every rank writes its part straight into the run's directory in storage
and Ray Train registers it without copying (`CheckpointUploadMode.NO_UPLOAD`): an 8B FSDP2
checkpoint with Adam state is ~96 GB, which a temporary directory then an upload would write
twice while training waits. Object stores (`s3://`, `gs://`) keep a local temporary directory
that Ray Train uploads. Each save gets a fresh directory name (step and a token rank 0 draws),
so a save cut short by a crash never mixes with a later one of the same step; Ray Train keeps
`train.save_total_limit` of them and deletes the rest.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKPOINT_PREFIX = "checkpoint-"


def _shared_token(world: int) -> str:
    """A token drawn by rank 0 and known to every rank."""
    import torch.distributed as dist

    token = [uuid.uuid4().hex[:8]]
    if world > 1:
        dist.broadcast_object_list(token, src=0)
    return str(token[0])


def report_checkpoint(
    metrics: dict[str, Any], step: int, save: Callable[[Path], None], world: int
) -> str:
    """Save with `save(directory)` on every rank and report it to Ray Train; returns the way
    it went to storage ("direct" or "upload")."""
    import pyarrow.fs as pafs
    import ray.train

    storage = ray.train.get_context().get_storage()
    filesystem = storage.storage_filesystem
    if isinstance(filesystem, pafs.LocalFileSystem):
        name = f"{CHECKPOINT_PREFIX}{step:08d}-{_shared_token(world)}"
        path = storage.build_checkpoint_path_from_name(name)
        Path(path).mkdir(parents=True, exist_ok=True)
        save(Path(path))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint(path, filesystem=filesystem),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )
        return "direct"
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    return "upload"


def delete_checkpoints(storage_uri: str, run_name: str) -> int:
    """Remove a finished run's training-state checkpoints from storage (the reference run's,
    once its HF checkpoints are exported); returns how many were removed."""
    import pyarrow.fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(storage_uri)
    run_dir = f"{root.rstrip('/')}/{run_name}"
    entries = filesystem.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    removed = 0
    for entry in entries:
        name = entry.path.rsplit("/", 1)[-1]
        resume_state = name.startswith((CHECKPOINT_PREFIX, "checkpoint_"))  # ours, Ray's own
        if entry.type == pafs.FileType.Directory and resume_state:
            filesystem.delete_dir(entry.path)
            removed += 1
    return removed
