"""Shared fixtures: one local Ray cluster per session, and a tiny prepared run directory."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Faster failure detection and shutdown of Ray Train runs on a small test cluster.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Spot-preemption observability: one more process per Ray Train run, nothing to observe here.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# A run small enough for 2 CPU cores: 200 demo rows, a 2-layer 64-wide model.
TINY_OVERRIDES = [
    "data.demo_train_size=200",
    "data.demo_eval_size=24",
    "data.max_length=96",
    "data.num_workers=1",  # one tokenization task at a time (prepared_out: two)
    "model.tiny_hidden_size=64",
    "model.tiny_num_layers=2",
    "model.tiny_vocab_size=400",
    "reference.max_steps=3",
    "reference.num_checkpoints=2",
    "train.max_steps=3",
    "train.per_device_train_batch_size=8",
    "train.logging_steps=1",
    "ray.num_cpus=2",
]


# Heaviest files first: pytest-xdist (`--dist loadfile --no-loadscope-reorder`) hands out
# whole files in collection order, so a long file left for last would keep one worker busy
# while the other idles. (`--dist loadgroup` does not group under pytest 9: xdist 3.8 tags the
# node ids, which pytest 9 no longer lets a plugin change.)
HEAVY_FIRST = [  # by their time in a suite run, longest first (longest-processing-time order)
    "test_train.py", "test_job_submit.py", "test_gpu_path.py", "test_lora.py",
    "test_multinode.py", "test_cross_tokenizer.py", "test_skipped_steps.py",
    "test_tune_schedulers.py", "test_tune.py", "test_scoring.py", "test_tune_sweeps.py",
    "test_cli_stdout.py",
    "test_loss_distributed.py", "test_hostile_input.py", "test_repairs.py",
]  # fmt: skip


RAY_FIXTURES = {"ray_local", "prepared_out", "reference_out", "scored_base"}


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
    # `make test-fast` (-m "not slow") runs what needs no Ray cluster: anything that uses the
    # session's cluster or a stage's outputs is slow, whatever its own marks say.
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# Loaded by every Python process of a CLI run (driver, raylet helpers, Ray Train workers, Ray
# Data actors) through PYTHONPATH: each prints the same lines to stdout at start, from a thread
# and at exit, so Ray forwards and deduplicates them ("[repeated Nx across cluster]", with its
# log-deduplication notice at shutdown), exactly the output that must never reach the CLI's
# stdout. The driver's own first print comes 1 s after the interpreter starts: the console
# script points stdout away within about 0.1 s (nothing heavy is imported before), and what
# prints before a program's first line cannot be kept out by any program.
NOISY_SITECUSTOMIZE = """
import atexit, os, sys, threading, time
if os.environ.get("SFTMIX_TEST_NOISY") == "1":
    def _tick():
        time.sleep(1.0)
        for _ in range(3):
            print("noisy-process: tick from a thread", flush=True)
            time.sleep(1.0)
    threading.Thread(target=_tick, daemon=True).start()
    atexit.register(lambda: print("noisy-process: at exit", flush=True))
"""


@functools.cache
def _noisy_site_dir() -> str:
    path = Path(tempfile.mkdtemp(prefix="sftmix-noisy-site-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)  # when this pytest process ends
    (path / "sitecustomize.py").write_text(NOISY_SITECUSTOMIZE)
    return str(path)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for the real console script: noisy worker processes (see above)."""
    env = {**os.environ, "SFTMIX_TEST_NOISY": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_noisy_site_dir(), env.get("PYTHONPATH")) if p)
    return env


def trained_runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    """Each run of consecutive supervised tokens, decoded on its own (an answer's labels)."""
    from sftmix_ray.labels import IGNORE_INDEX

    runs, run = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs, run = [*runs, tok.decode(run)], []
    return [*runs, tok.decode(run)] if run else runs


def result_json(proc: subprocess.CompletedProcess) -> dict:
    """The CLI's stdout as one JSON document: stdout must hold nothing else."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        message = f"stdout is not one JSON document ({exc}):\n{proc.stdout[-3000:]}"
        raise AssertionError(message) from None


def sftmix_command() -> list[str]:
    """The real `sftmix-ray` console script (`python -m sftmix_ray.cli` where none is installed)."""
    script = Path(sys.executable).with_name("sftmix-ray")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sftmix_ray.cli"]


def free_port() -> int:
    """A TCP port free on loopback now (another process may take it before it is bound)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What every rank of the torch.distributed tests imports: loaded once per pytest worker by the
# fork server that `spawn_ranks` starts its ranks from (a spawned rank imported them again, about
# 5 CPU-s each, some twenty ranks in the suite), with the module of the first rank function.
RANK_PRELOAD = [
    "torch", "torch.distributed.fsdp", "transformers.modeling_utils", "deepspeed",
    "sftmix_ray.train.strategies", "sftmix_ray.train.loop",
]  # fmt: skip


def _rank_main(rank: int, fn, env: dict[str, str], *args) -> None:
    """A forked rank: the caller's environment (the server has the one it started with), then
    `fn(rank, *args)`."""
    os.environ.clear()
    os.environ.update(env)
    fn(rank, *args)


def spawn_ranks(fn, args: tuple, nprocs: int) -> None:
    """`torch.multiprocessing.spawn` of `fn(rank, *args)` on `nprocs` ranks, joined; the ranks
    fork from a fork server (a fresh interpreter with no test's state), not a new interpreter
    each. Each rank gets the caller's environment; what the preloaded modules read at import
    time is the session's (conftest's settings)."""
    import multiprocessing

    import torch.multiprocessing as mp

    # No effect once this process's server runs (a later caller's module is imported per rank).
    multiprocessing.set_forkserver_preload([*RANK_PRELOAD, fn.__module__])
    mp.start_processes(
        _rank_main, args=(fn, dict(os.environ), *args), nprocs=nprocs, join=True,
        start_method="forkserver",
    )  # fmt: skip


def tiny_config(*extra: str):
    """The tiny test config with extra `key=value` overrides."""
    from sftmix_ray.config import load_config

    return load_config(None, [*TINY_OVERRIDES, *extra])


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster shared by the session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _shared_dir(tmp_path_factory, worker_id: str, name: str, build) -> Path:
    """A directory built once per test session and shared by every pytest-xdist worker.

    The first worker to get here builds it (under a file lock); the others wait and read it.
    Tests treat these directories as read-only and copy what they change.
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent  # one session's folder
    target, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            build(target)
            done.touch()
    return target


@pytest.fixture(scope="session")
def prepared_out(ray_local, tmp_path_factory, worker_id) -> Path:
    """OUT with data/, heldout/ and base_model/ from `prepare` on the tiny demo."""
    from sftmix_ray.pipeline import run_stage

    return _shared_dir(
        tmp_path_factory,
        worker_id,
        "prepared",
        # Two tokenization tasks at a time here, the default (one in every other test's prepare).
        lambda out: run_stage("prepare", tiny_config("data.num_workers=2"), out),
    )


@pytest.fixture(scope="session")
def reference_out(prepared_out: Path, tmp_path_factory, worker_id) -> Path:
    """A copy of `prepared_out` plus two reference checkpoints (3 NTP steps)."""
    from sftmix_ray.pipeline import run_stage

    def build(out: Path) -> None:
        shutil.copytree(prepared_out, out)
        run_stage("reference", tiny_config(), out)

    return _shared_dir(tmp_path_factory, worker_id, "reference", build)


@pytest.fixture(scope="session")
def scored_base(prepared_out: Path, tmp_path_factory, worker_id) -> Path:
    """The tiny prepared run with OUT/scores in the score stage's schema (seeded NLLs for two
    checkpoints; the score stage itself is tested in test_scoring.py), in its own OUT."""
    return _shared_dir(
        tmp_path_factory, worker_id, "scored", lambda out: _write_scored_base(prepared_out, out)
    )


def _write_scored_base(prepared_out: Path, out: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sftmix_ray.losses import confidence_and_variability

    out.mkdir(parents=True)
    for name in ("data", "heldout", "base_model"):
        shutil.copytree(prepared_out / name, out / name)
    ids = pq.read_table(out / "data", columns=["example_id"]).column("example_id").to_numpy()
    nll = np.random.default_rng(0).uniform(0.5, 4.0, size=(len(ids), 2))
    confidence, variability = confidence_and_variability(nll)
    (out / "scores").mkdir()
    scores = {
        "example_id": pa.array(ids, pa.int64()),
        "confidence": confidence,
        "variability": variability,
        "n_response_tokens": pa.array(np.full(len(ids), 4), pa.int64()),
        "nll": nll.tolist(),
    }
    pq.write_table(pa.table(scores), out / "scores" / "scores.parquet")


_SUITE_START = time.monotonic()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The suite's wall time on its own line, just above pytest's summary line."""
    if not hasattr(config, "workerinput"):  # the controller, not an xdist worker
        seconds = time.monotonic() - _SUITE_START
        terminalreporter.write_line(f"suite wall time: {seconds:.0f} s ({seconds / 60:.1f} min)")


BUCKET = "sftmix-checkpoints"


@pytest.fixture(scope="session")
def s3_env():
    """A moto S3 server on loopback with one bucket; the environment that points at it."""
    pytest.importorskip("moto", reason="moto (dev extra) serves S3 locally")
    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per S3 request

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
    }
    s3 = fs.S3FileSystem(
        access_key="testing", secret_key="testing", region="us-east-1",
        endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True,
    )  # fmt: skip
    s3.create_dir(BUCKET)
    yield env, s3
    server.stop()
