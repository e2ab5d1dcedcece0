"""The only place that touches Ray internals (names outside Ray's public API), each with the
reason it is needed. Checked against Ray 2.60 (`constraints.txt`); `check_ray_version` refuses
a Ray older than the oldest these were written for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftmix_ray.errors import SftmixError

MIN_RAY = (2, 50)  # Ray Train V2 with Tune's Ray Train integration (TuneReportCallback)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_ray_version() -> None:
    """Raise unless Ray is new enough and runs Ray Train V2 (what the sweep is built on)."""
    import ray

    if _version(ray.__version__) < MIN_RAY:
        wanted = ".".join(map(str, MIN_RAY))
        raise SftmixError(f"sftmix-ray tune needs Ray >= {wanted}; this is Ray {ray.__version__}")
    try:
        # Internal: the switch itself has no public accessor (RAY_TRAIN_V2_ENABLED).
        from ray.train.v2._internal.constants import is_v2_enabled
    except ImportError:  # pragma: no cover - a Ray that moved it: V2 is the only Train there
        return
    if not is_v2_enabled():
        raise SftmixError(
            "sftmix-ray tune needs Ray Train V2: unset RAY_TRAIN_V2_ENABLED=0 "
            "(TuneReportCallback reports from V2 runs only)"
        )


def worker_group_callback_base() -> type:
    """Ray Train V2's `WorkerGroupCallback`, the base of callbacks told when a worker group
    starts. Internal, but accepted in `RunConfig.callbacks`; the sweep uses it to record each
    trial's worker placement groups, which Tune does not remove when it stops a trial early
    under Train V2 (ray-project/ray#54305; Ray's own PlacementGroupCleaner, ray-project/ray
    PR #58515, needs the dashboard's state API, which local clusters often run without)."""
    try:
        from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    except ImportError as exc:  # pragma: no cover - depends on the installed Ray
        raise SftmixError(
            f"this Ray has no Train V2 WorkerGroupCallback ({exc}); sftmix-ray tune is "
            "tested with the Ray pinned in constraints.txt"
        ) from None
    return WorkerGroupCallback


def controller_trials(grid: Any, experiment: Path) -> list[Any]:
    """The sweep's trials as Tune's controller left them.

    `ResultGrid` keeps them on a private attribute; the public alternative, reading
    experiment_state.json back (`ExperimentAnalysis`), can lag behind: Ray 2.60 may leave a
    trial that errored on its last retry as RUNNING there (no upstream issue found).
    """
    analysis = getattr(grid, "_experiment_analysis", None)
    if analysis is None:  # a Ray without it: read the saved state
        from ray.tune import ExperimentAnalysis

        analysis = ExperimentAnalysis(str(experiment))
    return list(analysis.trials)


def actor_id_hex(handle: Any) -> str:
    """An actor handle's id. Internal: `ActorHandle._actor_id` (no public accessor on a handle
    that another process made; Ray Train's worker group holds its workers' handles)."""
    return str(handle._actor_id.hex())


def actor_info(actor_id: str) -> dict[str, Any] | None:
    """The GCS's record of an actor ("State": "ALIVE", "DEAD", ...; "Pid"; "Address" with its
    "NodeID"), None when unknown. Internal: `ray._private.state.actors`, because the public
    state API (`ray.util.state`) needs the dashboard, which local clusters often run
    without."""
    from ray._private import state

    info = state.actors(actor_id=actor_id)
    return dict(info) if info else None
