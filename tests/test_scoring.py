"""The score stage on a real local Ray cluster: exact NLLs, every example exactly once, resume.

The NLL oracle is plain transformers: full logits of one unpadded row and `F.cross_entropy`
over its response tokens. The scorer batches rows by a token budget with right padding and
computes only target log-probs, so the two agree up to float32 rounding: rtol 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from ray.data import DataContext

from sftmix_ray.layout import RunDir
from sftmix_ray.scorer import Scorer, token_budget_batches
from sftmix_ray.scoring import _META, _complete, fingerprint, list_checkpoints, run_score
from sftmix_ray.summary import read_summary
from tests.conftest import TINY_OVERRIDES, cli_env, result_json, sftmix_command, tiny_config

# The results directories documented as datasets (README, sftmix_ray/layout.py).
RESULT_DIRS = (RunDir.DATA, RunDir.SCORES, RunDir.SPLIT)

NLL_RTOL = 1e-4  # scorer vs plain transformers, both float32
# A small token budget forces many micro-batches that mix lengths, so padding is exercised.
SCORE_OVERRIDES = ["score.num_actors=2", "score.batch_tokens=256", "score.chunk_size=16"]
# Tests only: dispatch no batch before the whole pool is up, so both actors get work for sure.
WAIT_FOR_ACTORS = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real `sftmix-ray` console script."""
    sets = [f"--set={item}" for item in [*TINY_OVERRIDES, *SCORE_OVERRIDES]]
    env = cli_env(RAY_DATA_DISABLE_PROGRESS_BARS="1", **WAIT_FOR_ACTORS)
    return subprocess.run(
        [*sftmix_command(), *args, *sets], capture_output=True, text=True, timeout=300, env=env
    )


def _copy_run(source: Path, target: Path) -> Path:
    """A private copy of a run directory's stage outputs (data, models, scores)."""
    for name in (RunDir.DATA, RunDir.BASE_MODEL, RunDir.REFERENCE, RunDir.SCORES, RunDir.WORK):
        if (source / name).exists():
            shutil.copytree(source / name, target / name)
    return target


@dataclass
class ScoredRun:
    """A scored copy of the tiny reference run, and what its crash left behind."""

    out: Path
    first: str  # first checkpoint's name, scored before the crash
    last: str  # last checkpoint's name, scored by the rerun
    first_mtime: int
    stale_tmp: Path
    partial: dict
    cli: dict
    killed: list[int]  # the scorer actor SIGKILLed while it scored the first checkpoint


@pytest.fixture(scope="module")
def scored(reference_out: Path, ray_local, tmp_path_factory) -> ScoredRun:
    """Score the tiny run as a crash and a rerun would, the rerun through `sftmix-ray score`;
    one of the two scorer actors is SIGKILLed mid-batch while the first checkpoint is scored."""
    out = _copy_run(reference_out, tmp_path_factory.mktemp("scored"))
    (_, first), (_, last) = list_checkpoints(out)
    per = RunDir(out).checkpoint_scores_dir
    # A run killed while scoring the last checkpoint leaves the first checkpoint's file, a
    # half-written temporary file of the last one, and no assembled scores. Make that state:
    # score with the last checkpoint out of sight, then drop scores.parquet, add the tmp file.
    aside = out / f"{last.name}.aside"
    last.rename(aside)
    context = DataContext.get_current()
    default_wait = context.wait_for_min_actors_s
    context.wait_for_min_actors_s = int(WAIT_FOR_ACTORS["RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S"])
    killed: list[int] = []
    scoring_over = threading.Event()
    killer = threading.Thread(target=_kill_one_scorer, args=(killed, scoring_over), daemon=True)
    killer.start()
    try:
        partial = run_score(tiny_config(*SCORE_OVERRIDES), out)
    finally:
        context.wait_for_min_actors_s = default_wait
        scoring_over.set()
        killer.join(timeout=5)
    aside.rename(last)
    RunDir(out).scores.unlink()
    stale_tmp = per / f".{last.name}.parquet.x1y2.tmp"
    stale_tmp.write_bytes(b"PAR1 half a file")
    first_mtime = (per / f"{first.name}.parquet").stat().st_mtime_ns
    # The rerun: the real CLI, joining the session's cluster (2 actors).
    address = ray_local.get_runtime_context().gcs_address
    proc = _cli("score", "--output-dir", str(out), "--address", address)
    cli = result_json(proc)
    return ScoredRun(out, first.name, last.name, first_mtime, stale_tmp, partial, cli, killed)


def _data(out: Path):
    return pq.read_table(out / "data").sort_by("example_id")


def test_every_example_is_scored_exactly_once(scored: ScoredRun):
    out = scored.out
    scores = pq.read_table(RunDir(out).scores)
    ids = _data(out).column("example_id").to_numpy()
    assert scores.column_names == [
        "example_id", "confidence", "variability", "n_response_tokens", "nll"
    ]  # fmt: skip
    assert np.array_equal(scores.column("example_id").to_numpy(), ids)
    assert all(len(row) == 2 for row in scores.column("nll").to_pylist())
    stage = read_summary(out)["stages"]["score"]
    assert stage["status"] == "completed" and stage["scored"] == len(ids)
    # Two actors over several blocks, and still every id once (checked again in the stage).
    passes = scored.partial["passes"] + stage["passes"]
    assert len(passes) == 2 and all(p["batches"] >= 2 and p["actors"] == 2 for p in passes)
    assert stage["tokens_per_s"] > 0
    for name in (scored.first, scored.last):
        per = pq.read_table(RunDir(out).checkpoint_scores_dir / f"{name}.parquet")
        assert np.array_equal(per.column("example_id").to_numpy(), ids)


def test_rerun_after_crash_keeps_finished_checkpoints(scored: ScoredRun):
    assert scored.partial["rescored"] == [scored.first]
    stage = scored.cli["score"]
    assert stage["reused"] == [scored.first] and stage["rescored"] == [scored.last]
    per = RunDir(scored.out).checkpoint_scores_dir
    assert (per / f"{scored.first}.parquet").stat().st_mtime_ns == scored.first_mtime
    assert not scored.stale_tmp.exists()
    # Everything complete: another run redoes nothing and rewrites no per-checkpoint file.
    mtimes = sorted((p.name, p.stat().st_mtime_ns) for p in per.iterdir())
    again = run_score(tiny_config(*SCORE_OVERRIDES), scored.out)
    assert again["rescored"] == [] and again["tokens_per_s"] is None
    assert sorted((p.name, p.stat().st_mtime_ns) for p in per.iterdir()) == mtimes


def test_nll_matches_plain_transformers(scored: ScoredRun):
    from transformers import AutoModelForCausalLM

    data = _data(scored.out)
    scores = pq.read_table(RunDir(scored.out).scores)
    lengths = np.array([len(x) for x in data.column("input_ids").to_pylist()])
    rows = sorted({int(lengths.argmin()), int(lengths.argmax()), 0, 7, 55, len(lengths) - 1})
    for t, (_, checkpoint) in enumerate(list_checkpoints(scored.out)):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        for row in rows:
            ids = torch.tensor([data.column("input_ids")[row].as_py()])
            labels = torch.tensor(data.column("labels")[row].as_py())
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].float()
            expected = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
            stored = scores.column("nll")[row].as_py()[t]
            assert stored == pytest.approx(float(expected), rel=NLL_RTOL), (checkpoint, row)
            n_response = int((labels[1:] != -100).sum())
            assert scores.column("n_response_tokens")[row].as_py() == n_response


def test_confidence_and_variability_follow_stored_nll(scored: ScoredRun, tmp_path):
    """The paper's measure by default, named in the file; the split recomputes the other one
    from the stored NLL without rescoring."""
    from sftmix_ray.scoring import MEASURE_METADATA_KEY
    from sftmix_ray.split import run_split

    scores = pq.read_table(RunDir(scored.out).scores)
    assert scores.schema.metadata[MEASURE_METADATA_KEY] == b"neg_mean_perplexity"
    ppl = np.exp(np.array(scores.column("nll").to_pylist()))
    np.testing.assert_allclose(scores.column("confidence").to_numpy(), -ppl.mean(1))
    np.testing.assert_allclose(scores.column("variability").to_numpy(), ppl.std(1))
    out = _copy_run(scored.out, tmp_path)
    result = run_split(tiny_config("score.confidence=mean_inverse_perplexity"), out)
    assert result["confidence_measure"] == "mean_inverse_perplexity"
    confident = pq.read_table(out / "split" / "confident.parquet").to_pandas()
    inverse = dict(zip(scores.column("example_id").to_pylist(), np.exp(-np.log(ppl)).mean(1)))
    np.testing.assert_allclose(
        confident["confidence"], [inverse[i] for i in confident["example_id"]], rtol=1e-12
    )


def test_incomplete_or_stale_checkpoint_files_are_redone(scored: ScoredRun, tmp_path):
    out = _copy_run(scored.out, tmp_path)
    ids = _data(out).column("example_id").to_numpy()
    path = RunDir(out).checkpoint_scores_dir / f"{scored.first}.parquet"
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[_META])
    assert _complete(path, ids, meta)
    assert meta["checkpoint"] == fingerprint(out / "reference" / scored.first)
    pq.write_table(table.slice(0, len(ids) - 3), path)  # rows missing
    assert not _complete(path, ids, meta)
    pq.write_table(table, path)
    assert not _complete(path, ids, {**meta, "checkpoint": "retrained"})  # checkpoint changed
    path.write_bytes(b"not parquet")
    assert not _complete(path, ids, meta)


def test_token_budget_batches_cover_each_row_once_within_budget():
    lengths = np.random.default_rng(0).integers(1, 90, size=500)
    batches = token_budget_batches(lengths, 256)
    rows = np.concatenate(batches)
    assert np.array_equal(np.sort(rows), np.arange(500))
    assert np.all(np.diff(lengths[rows]) >= 0)  # sorted by length
    for batch in batches:
        assert len(batch) * lengths[batch].max() <= 256 or len(batch) == 1
    assert len(token_budget_batches(np.array([300, 5]), 256)) == 2  # too long: alone
    # Two length groups: one forward would pad 30 short rows to 100; two forwards cost less.
    lengths = np.array([100, *[10] * 30, 100, 100])
    assert [sorted(lengths[b]) for b in token_budget_batches(lengths, 4096)] == [
        [10] * 30,
        [100] * 3,
    ]
    assert len(token_budget_batches(np.full(64, 10), 4096)) == 1  # one length: one forward


def test_cli_split_after_score(scored: ScoredRun, tmp_path):
    out = _copy_run(scored.out, tmp_path)
    summary = result_json(_cli("split", "--output-dir", str(out)))["split"]
    n = _data(out).num_rows
    assert summary["confident"] + summary["unconfident"] == n
    assert summary["mean_confidence_confident"] >= summary["mean_confidence_unconfident"]
    run = RunDir(out)
    assert run.cartography.read_bytes().startswith(b"\x89PNG")
    # Every results directory reads as one dataset (intermediates live under OUT/work).
    datasets = {d: pads.dataset(out / d, format="parquet").to_table() for d in RESULT_DIRS}
    assert datasets["data"].num_rows == n and datasets["scores"].num_rows == n
    split = datasets["split"]
    assert split.num_rows == n and pc.sum(split.column("confident")).as_py() == summary["confident"]
    assert pd.read_parquet(out / "scores").shape[0] == n  # what users type first
    assert len(list(run.checkpoint_scores_dir.glob("checkpoint-*.parquet"))) == 2


def _scorer_busy_in_this_cluster() -> int | None:
    """The pid of one of this session's scorer actors while it is scoring a batch."""
    import psutil

    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith("ray::MapWorker(MapBatches(ScoreItems)).submit"):
            try:
                if me in (p.pid for p in proc.parents()):  # our local cluster, not another's
                    return proc.info["pid"]
            except psutil.NoSuchProcess:
                continue
    return None


def _kill_one_scorer(killed: list[int], scoring_over: threading.Event) -> None:
    """SIGKILL the first of this session's scorer actors seen scoring a batch; record its pid."""
    while not killed and not scoring_over.is_set():
        pid = _scorer_busy_in_this_cluster()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.05)


def test_killed_scorer_actor_mid_job_still_scores_every_example_once(scored: ScoredRun):
    """One of two scorer actors SIGKILLed while it scored a batch of the first checkpoint: Ray
    restarts it and retries the batch; every example comes back exactly once, every NLL the
    plain-transformers one."""
    from transformers import AutoModelForCausalLM

    assert scored.killed, "no scorer actor was caught scoring"
    assert not psutil_pid_exists(scored.killed[0])
    assert scored.partial["rescored"] == [scored.first]
    data = _data(scored.out)
    per = pq.read_table(RunDir(scored.out).checkpoint_scores_dir / f"{scored.first}.parquet")
    per = per.sort_by("example_id")
    assert np.array_equal(per.column("example_id"), data.column("example_id"))
    checkpoint = scored.out / "reference" / scored.first
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for row in range(data.num_rows):
        ids = torch.tensor([data.column("input_ids")[row].as_py()])
        labels = torch.tensor(data.column("labels")[row].as_py())
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        expected = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
        assert per.column("nll")[row].as_py() == pytest.approx(float(expected), rel=NLL_RTOL)


def psutil_pid_exists(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_one_actor_pool_scores_every_checkpoint(reference_out: Path, ray_local, tmp_path):
    """Both checkpoints in one pass: the two scorer actors that score the first also score the
    second (they swap weights between checkpoints; a pool per checkpoint would have started
    four), every id comes once per checkpoint, with the NLL of a scorer that loaded that
    checkpoint alone."""
    out = _copy_run(reference_out, tmp_path / "one-pool")
    context = DataContext.get_current()
    default_wait = context.wait_for_min_actors_s
    context.wait_for_min_actors_s = int(WAIT_FOR_ACTORS["RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S"])
    try:
        summary = run_score(tiny_config(*SCORE_OVERRIDES), out)
    finally:
        context.wait_for_min_actors_s = default_wait
    passes = summary["passes"]
    assert [p["checkpoint"] for p in passes] == [c.name for _, c in list_checkpoints(out)]
    assert all(p["batches"] >= 2 for p in passes) and passes[0]["actors"] == 2, passes
    assert len({a for p in passes for a in p["actor_ids"]}) == 2, passes
    data = _data(out)
    for step, checkpoint in list_checkpoints(out):
        stored = pq.read_table(RunDir(out).checkpoint_scores(step)).sort_by("example_id")
        assert stored.column("example_id").to_pylist() == data.column("example_id").to_pylist()
        alone = Scorer(str(checkpoint), batch_tokens=256, chunk_size=16).score(data.slice(0, 40))
        np.testing.assert_allclose(
            stored.column("nll").to_numpy()[:40], alone.column("nll").to_numpy(), rtol=1e-5
        )


def test_per_checkpoint_nll_is_reused_only_for_the_same_scorer_and_never_when_not_finite(
    tmp_path,
):
    """A per-checkpoint file records the scorer's device and precision (GPU bf16 and CPU fp32
    give other NLLs: switching rescored nothing); a pass with a NaN NLL stops the stage before
    anything is written (a stored NaN was reused, and failed, on every rerun)."""
    import pyarrow as pa

    from sftmix_ray.errors import SftmixError
    from sftmix_ray.scoring import _META, _check_finite, _complete

    ids = np.arange(4)
    meta = {"data": "d", "checkpoint": "c", "step": "1", "scorer": "gpu:bf16"}
    table = pa.table({"example_id": ids, "nll": [0.5, 1.0, 1.5, 2.0]})
    path = tmp_path / "checkpoint-1.parquet"
    pq.write_table(table.replace_schema_metadata({_META: json.dumps(meta)}), path)
    assert _complete(path, ids, meta)
    assert not _complete(path, ids, {**meta, "scorer": "cpu:fp32"})
    _check_finite(table, "checkpoint-1")
    broken = table.set_column(1, "nll", pa.array([0.5, float("nan"), 1.5, float("inf")]))
    with pytest.raises(SftmixError, match=r"checkpoint-1: 2 examples .* \[1, 3\]"):
        _check_finite(broken, "checkpoint-1")


def test_scorer_actors_fit_on_one_node():
    """Actors are sized from the cluster's CPUs but never beyond its largest node's."""
    from sftmix_ray.scoring import actor_resources

    assert actor_resources(64.0, 16.0, 2, 0) == (16.0, 16)  # 4 nodes x 16: was (31.5, 32)
    assert actor_resources(2.0, 2.0, 1, 0) == (1.0, 2)  # one small node: leave a CPU spare
    assert actor_resources(64.0, 16.0, 8, 1) == (1.0, 8)  # GPU actors: a feeder CPU each


def test_scorers_compute_in_bf16_only_on_a_gpu_when_asked():
    from sftmix_ray.scorer import scorer_precision

    assert scorer_precision(on_gpu=True, bf16_on_gpu=True) == "bfloat16"
    assert {scorer_precision(g, b) for g, b in ((True, False), (False, True), (False, False))} == {
        "float32"
    }
