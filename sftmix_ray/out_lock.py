"""One run at a time per output directory: an exclusive lock on `OUT/.sftmix.lock`.

Two drivers on one OUT destroy each other's work without a word: Ctrl+C on `ray job submit`
stops only its log tail, the job runs on, and the same command submitted again starts a second
driver. Its `prepare` cleared the first one's parts in `OUT/.data.tmp` while both wrote there,
and each renamed a mix into `OUT/data` with the full row count in `summary.json`; its `train`
removed the other's checkpoint as an orphan mid-write. The lock is `flock`'s: the kernel drops
it when its process exits, however it exits (SIGKILL included), so a dead run never blocks the
next one, and a stale file means nothing. It holds across hosts where the filesystem carries
locks (local disks, NFSv4, EFS, most PVCs); on a mount without them (an NFS `nolock` mount,
some FUSE object-store mounts) it holds on one host only, or, where `flock` fails, a warning
says that nothing guards OUT.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from sftmix_ray.errors import SftmixError
from sftmix_ray.io_utils import ensure_writable_dir

log = logging.getLogger(__name__)

LOCK_FILE = ".sftmix.lock"


@contextlib.contextmanager
def output_lock(out: Path, command: str) -> Iterator[None]:
    """Hold OUT's lock for the block; a SftmixError naming the holder when another run has
    it. The file keeps who holds it (host, pid, command, since when) for that message."""
    path = ensure_writable_dir(out) / LOCK_FILE
    try:  # writable by the group (the umask permitting): a team's shared OUT
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError as exc:  # another user's lock file: still a run, unguarded
        log.warning("%s: cannot be opened (%s): nothing stops a second run from writing this "
                    "output directory at the same time", path, exc.strerror)  # fmt: skip
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SftmixError(
                f"{out}: in use by another sftmix-ray run ({_holder(path)}); two runs on one "
                "output directory overwrite each other's work. Wait for it to finish or stop it "
                "(`ray job list`, `ray job stop ID`, Ctrl+C), or give another --output-dir"
            ) from None
        except OSError as exc:  # a filesystem without locks
            log.warning(
                "%s: cannot be locked (%s): nothing stops a second run from writing this "
                "output directory at the same time", path, exc.strerror or exc,
            )  # fmt: skip
        else:
            since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({**holder, "since": since}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    """Who holds the lock, as its file says ("unknown" while it is being written)."""
    try:
        who = json.loads(path.read_text(encoding="utf-8"))
        return f"`{who['command']}`, pid {who['pid']} on {who['host']}, since {who['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
