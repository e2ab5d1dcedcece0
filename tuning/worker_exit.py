"""Waiting until a trial's Ray Train workers are gone, their processes included.

A trial that Tune stopped (ASHA) dies with its driver; its workers go a moment later and
meanwhile train on and may write a checkpoint, so the sweep removes a trial's checkpoints only
once they are gone. The GCS marks an actor DEAD before its process exits, and the process runs
its training thread until then: an actor in a removed placement group was DEAD after 13 ms
and still wrote a file 161 ms later (exit at 209 ms) on an idle 2-core machine, longer under
load; a checkpoint written in that window outlived the removal (~96 GB at 8B).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from tuning.ray_compat import actor_info

log = logging.getLogger(__name__)

WORKERS_FILE = "workers.txt"  # the actor ids of a trial's workers, one per line


@functools.cache
def _boot_time() -> int:
    """When this machine booted (seconds since the epoch), read once: the polls below ask
    every 50 ms."""
    with open("/proc/stat", encoding="utf-8") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("btime "))


def _stat(pid: int) -> tuple[str, float] | None:
    """Process `pid`'s state letter and start time (seconds since the epoch), from /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        boot = _boot_time()
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def pid_running(pid: int, started_by: float | None = None) -> bool:
    """Whether process `pid` of this machine runs (a zombie, which cannot write, does not).
    With `started_by` (seconds since the epoch), a process that started later is another one
    that reused the pid (a trial that finished long before the sweep ends)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _stat(pid)
    if stat is None:  # gone meanwhile, or no /proc (not Linux): running unless it is gone
        return not os.path.isdir("/proc") or os.path.exists(f"/proc/{pid}")
    state, started = stat
    if state == "Z":
        return False
    return started_by is None or started <= started_by + 2.0  # clock ticks, clocks of 2 nodes


def wait_for_pids(pids: list[tuple[int, float | None]], timeout_s: float) -> list[int]:
    """Wait until none of `pids` ((pid, started by) pairs of this machine) runs; returns those
    still running."""
    deadline = time.monotonic() + timeout_s
    running = [p for p in pids if pid_running(*p)]
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = [p for p in running if pid_running(*p)]
    return [pid for pid, _ in running]


def _exited_elsewhere(
    nodes: dict[str, list[tuple[int, float | None]]], timeout_s: float
) -> list[int]:
    """`wait_for_pids` run on each node of `nodes` (node id -> pids), all at once; returns
    those still running. A node that is gone has none of them running."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(wait_for_pids)
    refs = {
        node_id: remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
        ).remote(pids, timeout_s)
        for node_id, pids in nodes.items()
    }
    deadline = time.monotonic() + timeout_s + 60
    running: list[int] = []
    for node_id, ref in refs.items():
        try:
            left: list[int] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            running += left
        except GetTimeoutError:
            running += [pid for pid, _ in nodes[node_id]]
        except RayError:  # the node died (and its processes with it) or cannot be reached
            pass
    return running


def wait_for_workers(trial_outs: Iterable[Path], timeout_s: float = 120.0) -> bool:
    """Wait until every Ray Train worker the trials started (their `WORKERS_FILE`) is dead and
    its process has exited, all trials under one deadline, each node's processes checked once;
    returns whether they all have (False after `timeout_s`, warned)."""
    import ray

    pending: set[str] = set()
    for trial_out in trial_outs:
        path = trial_out / WORKERS_FILE
        if path.exists():
            pending.update(path.read_text(encoding="utf-8").split())
    deadline = time.monotonic() + timeout_s
    # node id -> (pid, when the actor started: its process started before)
    processes: dict[str, list[tuple[int, float | None]]] = defaultdict(list)
    while pending:
        for actor_id in sorted(pending):
            info = actor_info(actor_id)
            if info is None or info["State"] == "DEAD":
                pending.discard(actor_id)
                if info and info.get("Pid"):
                    started = info.get("StartTime") or None  # ms since the epoch
                    entry = (int(info["Pid"]), started / 1000 if started else None)
                    processes[info["Address"]["NodeID"]].append(entry)
        if pending and time.monotonic() > deadline:
            log.warning("%d trial worker(s) still alive after %.0f s", len(pending), timeout_s)
            return False
        if pending:
            time.sleep(0.2)
    here = ray.get_runtime_context().get_node_id() if processes else ""
    elsewhere = {node: pids for node, pids in processes.items() if node != here}
    running = _exited_elsewhere(elsewhere, max(0.0, deadline - time.monotonic()))
    running += wait_for_pids(processes.get(here, []), max(0.0, deadline - time.monotonic()))
    if running:
        log.warning("trial worker process(es) %s still running after %.0f s", running, timeout_s)
    return not running
