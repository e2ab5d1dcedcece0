"""Ctrl+C and SIGTERM in the driver never abort it or hang it (no Ray here: the handler and the
exit watchdog themselves; tests/test_job_submit.py signals the real pipeline in every stage).

Raising KeyboardInterrupt in the middle of an import aborted the driver (exit -6, from torch's
`c10d_init`) or left an import lock held so that `ray.shutdown()` hung; the CLI's handler now
delivers a signal that lands mid-import again once the import is done.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

# A module that signals its own process, then keeps executing for half a second.
SLOW_MODULE = """
import os, signal, time
os.kill(os.getpid(), signal.{sig})
t = time.monotonic()
while time.monotonic() - t < 0.5:
    pass
DONE = True
"""

DRIVER = """
import signal, sys, time
from sftmix_ray import cli
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, cli._on_signal)
sys.path.insert(0, {site!r})
try:
    import slow_module
    sys.stdout.write("imported\\n")  # one write: the signal may land right after the import
    time.sleep(5)
    print("not interrupted", flush=True)
except KeyboardInterrupt as exc:
    done = getattr(sys.modules.get("slow_module"), "DONE", False)
    print(type(exc).__name__, "module complete" if done else "module cut short", flush=True)
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_an_import_is_delivered_after_it(tmp_path, sig):
    (tmp_path / "slow_module.py").write_text(SLOW_MODULE.format(sig=sig))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER.format(site=str(tmp_path)))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = "Terminated" if sig == "SIGTERM" else "KeyboardInterrupt"
    # The import ran to its end, then the signal stopped the sleep right after it.
    assert proc.stdout.splitlines() == ["imported", f"{expected} module complete"], proc.stdout
    assert elapsed < 4.5, f"the deferred signal took {elapsed:.1f} s to arrive"


def test_a_signal_outside_imports_raises_at_once(tmp_path):
    code = """
import os, signal, sys, time
from sftmix_ray import cli
signal.signal(signal.SIGINT, cli._on_signal)
t = time.monotonic()
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
except KeyboardInterrupt:
    print(f"{time.monotonic() - t:.3f}")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout) < 0.5


def test_clean_up_past_the_grace_period_exits_with_the_status_and_line():
    code = """
import time
from sftmix_ray import cli
cli._exit_watchdog(143, "sftmix-ray train: terminated (SIGTERM); rerun to resume", 0.5)
time.sleep(30)  # a clean-up that never ends
print("still here")
"""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143 and proc.stdout == ""
    assert time.monotonic() - start < 10
    assert proc.stderr.splitlines()[-1] == (
        "sftmix-ray train: terminated (SIGTERM); rerun to resume (clean-up exceeded 0.5 s)"
    )
