"""Connect to Ray: an existing cluster (`ray.address` / RAY_ADDRESS) or a local one."""

from __future__ import annotations

import logging
import os
import signal
import threading

from sftmix_ray.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray once per process; the local dashboard stays on loopback."""
    import ray

    if ray.is_initialized():
        return
    on_sigterm = signal.getsignal(signal.SIGTERM)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            address="local",  # a fresh local cluster, never an unrelated one on the machine
            num_cpus=cfg.num_cpus,
            include_dashboard=cfg.include_dashboard,
            dashboard_host=cfg.dashboard_host,
            log_to_driver=True,
            configure_logging=False,
        )
    # Ray's core worker installs its own SIGTERM handler (it logs and aborts); the CLI's handler
    # turns SIGTERM into a clean stop that marks the stage interrupted, so it goes back on top.
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
