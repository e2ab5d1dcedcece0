"""Ray Train: DDP, FSDP2 and DeepSpeed agree with one worker; mu=0 is NTP; HF export loads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from sftmix_ray.summary import read_summary
from sftmix_ray.train.loop import FAULT_ENV, node_cpus, worker_threads
from tests.conftest import (
    BUCKET,
    TINY_OVERRIDES,
    cli_env,
    result_json,
    sftmix_command,
    tiny_config,
)

STEPS = 3
LR = 0.01
COMMON = [
    f"train.max_steps={STEPS}",
    f"train.learning_rate={LR}",
    "train.warmup_ratio=0",
    "train.save_steps=1",
]


def write_split(out: Path) -> None:
    """A fixed confident/unconfident split (even ids / odd ids) for training tests."""
    ids = pq.read_table(out / "data", columns=["example_id"]).column("example_id").to_pylist()
    (out / "split").mkdir(exist_ok=True)
    for name, keep in (("confident", 0), ("unconfident", 1)):
        chosen = [i for i in ids if i % 2 == keep]
        table = pa.table(
            {
                "example_id": pa.array(chosen, pa.int64()),
                "confidence": pa.array(np.linspace(1, 0, len(chosen))),
            }
        )
        pq.write_table(table, out / "split" / f"{name}.parquet")


def make_train_base(prepared_out: Path, out: Path) -> Path:
    """A run directory to train in: the prepared data and base model, and a fixed split."""
    for name in ("data", "heldout", "base_model"):
        shutil.copytree(prepared_out / name, out / name)
    write_split(out)
    return out


@pytest.fixture(scope="module")
def base_out(prepared_out: Path, tmp_path_factory) -> Path:
    return make_train_base(prepared_out, tmp_path_factory.mktemp("train_base"))


def run_train(
    base: Path, tmp: Path, *overrides: str, name: str = "run", common: bool = True
) -> tuple[Path, list]:
    """Train in a fresh copy of `base` (with COMMON's settings unless `common` is false);
    return OUT and the per-step history."""
    from sftmix_ray.pipeline import run_stage

    out = tmp / name
    shutil.copytree(base, out)
    run_stage("train", tiny_config(*(COMMON if common else ()), *overrides), out)
    history = json.loads((out / "logs" / "train-model-history.json").read_text())["history"]
    return out, history


def losses(history: list, key: str = "loss") -> np.ndarray:
    return np.array([h[key] for h in history])


@pytest.fixture(scope="module")
def single(base_out: Path, tmp_path_factory) -> tuple[Path, list]:
    """One worker, 8 rows (4 confident + 4 unconfident) per step: the reference trajectory.
    Its token cache (`train.token_cache_dir`) starts with an entry of another corpus and a
    stale one, under a budget smaller than any entry (see `test_export_is_a_loadable_hf_model`)."""
    from sftmix_ray.train.token_rows import open_token_rows

    tmp = tmp_path_factory.mktemp("single")
    cache = tmp / "token-cache"
    other = tmp / "other-corpus"
    shutil.copytree(base_out / "data", other)
    open_token_rows(other, root=cache)
    stale = cache / ("0" * 32)  # built from a corpus since removed
    stale.mkdir()
    (stale / "source.json").write_text(json.dumps({"source": str(tmp / "gone"), "keep": None}))
    return run_train(
        base_out,
        tmp,
        "train.per_device_train_batch_size=8",
        "train.report_to=tensorboard,mlflow",
        f"train.token_cache_dir={cache}",
        "train.token_cache_gb=0.000001",
    )


def test_a_finished_runs_progress_bar_is_gone_from_the_driver(single):
    """Rank 0's bar (`train.progress_bar`, Ray's distributed tqdm) closes with the run: its
    updates reach the driver once, so the "closed" one removes it. Ray Train's print patch
    sent each twice and the second "closed" made the bar again, never to close: a sweep's
    driver redrew every finished trial's bar at each update."""
    import time

    from ray.experimental import tqdm_ray

    def closed_but_shown() -> list[str]:
        groups = tqdm_ray.instance().bar_groups.values()
        return [
            b.state["desc"] for g in groups for b in g.bars_by_uuid.values() if b.state["closed"]
        ]

    deadline = time.monotonic() + 20  # the worker's last lines reach the driver after the run
    while closed_but_shown() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # a duplicate would come right after the "closed" update
    assert closed_but_shown() == []


# Kept after the export (removed by default) so that the test can see which saves were made.
ASYNC = [
    "train.async_checkpoint=true",
    "train.max_failures=1",
    "train.keep_resume_checkpoints=true",
]
FSDP = "train.strategy=fsdp"
ZERO3 = ["train.strategy=deepspeed", "train.deepspeed_stage=3"]
ONE_HELDOUT = "one-heldout-row"  # not a config value: this run's held-out set is 1 row


@pytest.mark.parametrize(
    "strategy",
    [
        ["train.strategy=ddp", "train.gradient_accumulation_steps=2", *ASYNC],
        [FSDP, *ASYNC],
        ["train.strategy=deepspeed", "train.deepspeed_stage=2", *ASYNC, ONE_HELDOUT],
        # Small loss chunks: the ranks' rows make different numbers of chunks (ZeRO-3 failed
        # at step 2 on that: its recorded module calls differed across ranks).
        [*ZERO3, "train.export_dtype=bfloat16", "train.loss_chunk_size=4"],
    ],
    ids=["ddp-accum2-async", "fsdp-async-kill", "zero2-async", "zero3"],
)
def test_two_workers_match_one(single, base_out, tmp_path, strategy, monkeypatch):
    """Every strategy on 2 workers follows the 1-worker trajectory. DDP, FSDP2 and ZeRO-2 save
    in the background (`train.async_checkpoint`): the step-1 save is registered at step 2
    (once written), the step-2 one is superseded by the final save and removed. Under FSDP2
    rank 0 dies after step 3, before its report: the step-2 save was still unregistered, so
    the restart resumes from step 1, removes the step-2 orphan, and the losses are still the
    1-worker run's."""
    _, one = single
    faulty = FSDP in strategy
    base = base_out
    if ONE_HELDOUT in strategy:  # fewer held-out rows than workers: rank 1 has none
        base = tmp_path / "base"
        shutil.copytree(base_out, base)
        heldout = pq.read_table(base / "heldout").slice(0, 1)
        shutil.rmtree(base / "heldout")
        (base / "heldout").mkdir()
        pq.write_table(heldout, base / "heldout" / "part-00000.parquet")
    if faulty:
        monkeypatch.setenv(FAULT_ENV, f"3:{tmp_path / 'fault-marker'}")
    accum = 2 if "train.gradient_accumulation_steps=2" in strategy else 1
    out, two = run_train(
        base,
        tmp_path,
        *(s for s in strategy if s != ONE_HELDOUT),
        "train.num_workers=2",
        f"train.per_device_train_batch_size={4 // accum}",
    )
    assert len(two) == STEPS
    # Same global batch, same lambdas, loss normalized by the global token count:
    # only the reduction order differs (fp32).
    np.testing.assert_allclose(losses(two), losses(one), rtol=2e-4)
    np.testing.assert_allclose(losses(two, "mix"), losses(one, "mix"), rtol=2e-4)
    assert losses(one)[-1] < losses(one)[0], "training lowers the loss"
    stage = read_summary(out)["stages"]["train"]
    assert stage["status"] == "completed" and stage["steps"] == STEPS
    assert stage["restarts"] == (1 if faulty else 0)
    record = json.loads((out / "logs" / "train-model-history.json").read_text())
    assert record["torch_threads"] == 1  # ray.num_cpus=2 shared by 2 workers
    if "train.export_dtype=bfloat16" in strategy:  # bf16 on disk (gathered from ZeRO-3), loads
        from transformers import AutoModelForCausalLM

        exported = load_file(str(out / "model" / "model.safetensors"))
        assert {v.dtype for v in exported.values()} == {torch.bfloat16}
        model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    if ONE_HELDOUT in strategy:  # the last eval is the exported model's NLL on that row
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
        row = pq.read_table(base / "heldout").to_pylist()[0]
        labels = torch.tensor([row["labels"]])
        with torch.no_grad():
            logits = model(torch.tensor([row["input_ids"]])).logits
        expected = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:])
        assert two[-1]["eval_loss"] == pytest.approx(float(expected), rel=1e-4)
    if faulty:
        assert [h["restarts"] for h in two] == [0.0, 1.0, 1.0]  # resumed from step 1
        assert record["orphan_checkpoints_removed"] == 1  # the killed attempt's step-2 save
    if ASYNC[0] in strategy:
        # The step-2 save was superseded by the final save and removed: storage holds the
        # registered steps 1 (in the background) and 3 (synchronous).
        assert record["async_checkpoints_registered"] == ([] if faulty else [1])
        (run_dir,) = (out / "ray_storage").iterdir()
        saved = sorted(p.name[len("checkpoint-") :][:8] for p in run_dir.glob("checkpoint-*"))
        assert saved == ["00000001", "00000003"], saved


def test_mu_zero_is_the_ntp_reference_loop(reference_out, base_out, tmp_path):
    """`mixup.mu=0` trains exactly like the NTP reference run (same sampler, same loss): the
    session's shared reference run (`reference_out`: the tiny config, 3 steps) is the oracle.
    The reference stage run again over a finished one trains again, to the same losses."""
    ntp_cfg = ["mixup.mu=0", "train.max_steps=3", "train.save_steps=1"]
    ntp_cfg.append("train.keep_resume_checkpoints=true")  # to count them below
    ntp_out, ntp = run_train(base_out, tmp_path, *ntp_cfg, name="ntp", common=False)
    assert len(ntp) == STEPS == tiny_config().reference.max_steps
    ref = json.loads((reference_out / "logs" / "reference-model-history.json").read_text())
    np.testing.assert_allclose(losses(ntp), losses(ref["history"]), rtol=1e-6)
    assert all("mix" not in h for h in ntp)
    assert (reference_out / "reference" / f"checkpoint-{STEPS}" / "model.safetensors").exists()
    # The export is fp32 by default (bf16 with train.export_dtype: the ZeRO-3 run above).
    exported = load_file(str(ntp_out / "model" / "model.safetensors"))
    assert {v.dtype for v in exported.values()} == {torch.float32}
    # Resume state went straight into storage (our names, no upload), at most
    # train.save_total_limit of them; the reference run's was removed after its exports.
    (run_dir,) = (ntp_out / "ray_storage").iterdir()
    saved = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
    assert len(saved) == 2, saved
    assert all(re.fullmatch(r"checkpoint-0000000[23]-[0-9a-f]{8}", n) for n in saved), saved
    ref_stage = read_summary(reference_out)["stages"]["reference"]
    assert ref_stage["resume_checkpoints_removed"] >= 1
    # Its Ray Train run directory went with them (a snapshot naming deleted checkpoints made the
    # next start fail): `reference` run again in a copy trains afresh and reproduces the run.
    assert not (reference_out / "ray_storage" / ref_stage["run_name"]).exists()
    again = tmp_path / "again"
    shutil.copytree(reference_out, again)
    from sftmix_ray.pipeline import run_stage

    # A checkpoint another reference run exported (another C or length) would be scored with
    # this run's: the rerun removes it.
    (again / "reference" / "checkpoint-99").mkdir()
    (again / "reference" / "checkpoint-99" / "config.json").write_text("{}")
    rerun_stage = run_stage("reference", tiny_config(), again)
    assert rerun_stage["steps"] == STEPS and rerun_stage["stale_checkpoints_removed"] == 1
    assert sorted(p.name for p in (again / "reference").glob("checkpoint-*")) == sorted(
        p.name for p in (reference_out / "reference").glob("checkpoint-*")
    )
    rerun = json.loads((again / "logs" / "reference-model-history.json").read_text())
    np.testing.assert_allclose(losses(rerun["history"]), losses(ref["history"]), rtol=1e-6)


def test_export_is_a_loadable_hf_model(single):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, history = single
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert (out / "model" / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    moved = [
        float((a - b).abs().max())
        for a, b in zip(model.state_dict().values(), base.state_dict().values())
    ]
    assert max(moved) > 1e-4, "exported weights are the trained ones, not the init"
    ids = tok("What is 2+2?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert np.isfinite(history[-1]["eval_loss"])
    events = list((out / "logs" / "tensorboard" / "train-model").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0, "rank 0 wrote TensorBoard scalars"
    # The worker's threads: its share of its node's CPUs, capped by ray.num_cpus=2 / 1 worker.
    record = json.loads((out / "logs" / "train-model-history.json").read_text())
    assert record["torch_threads"] == min(2, node_cpus())
    _assert_mlflow_run(out, history)
    # Its model is exported: the resume checkpoints (~96 GB each at 8B) are gone with the
    # Ray Train run directory (train.keep_resume_checkpoints=false, the default).
    stage = read_summary(out)["stages"]["train"]
    assert stage["resume_checkpoints_removed"] >= 1
    assert not (out / "ray_storage" / stage["run_name"]).exists()
    # The worker's token cache: its own two entries (the corpus, of which both split sides are
    # views, and the held-out rows) were kept whatever the budget; the other corpus's (beyond
    # the budget) and the stale one were removed.
    cache = out.parent / "token-cache"
    entries = sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    recorded = [json.loads((p / "source.json").read_text()) for p in entries]
    assert sorted(Path(r["source"]).name for r in recorded) == ["data", "heldout"]
    assert all(r["keep"] is None for r in recorded)


def _assert_mlflow_run(out: Path, history: list) -> None:
    """One finished MLflow run in OUT/mlruns holding every step's loss and the config."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sftmix-ray")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "train-model"
    assert run.data.params["mixup.mu"] == "0.2"
    assert run.data.params["train.report_to"] == "['tensorboard', 'mlflow']"
    logged = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in logged] == [h["step"] for h in history]
    np.testing.assert_allclose([m.value for m in logged], losses(history), rtol=1e-6)


# ------------------------------------------------------------------ checkpoints and resume


def _assert_same_run(out: Path, reference: Path) -> None:
    """Same per-step losses and the same final weights as the uninterrupted run."""
    history = json.loads((out / "logs" / "train-model-history.json").read_text())["history"]
    expected = json.loads((reference / "logs" / "train-model-history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses(history), losses(expected["history"]), rtol=1e-6)
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(reference / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    # The weights agree to a tenth of one step's update. Not bit for bit: a resumed run's
    # kernels work on other allocations and threads under load, and Adam's first steps move
    # every weight by about the learning rate whatever its gradient's size, so a 1e-9
    # difference in a near-zero gradient can flip a weight's first update (seen once in a
    # dozen suite runs: up to 4e-4, with learning rate 1e-2, and every loss equal to 1e-6).
    # A lost optimizer state, a skipped or repeated step, or weights restored from the wrong
    # checkpoint move weights by whole updates, and the losses above.
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=0, atol=0.1 * LR)


def test_killed_worker_resumes_from_checkpoint_in_s3(single, base_out, tmp_path, s3_env):
    """`sftmix-ray train` with its checkpoints in an object store (`train.storage_path=s3://`,
    moto's S3 server on loopback; the CLI starts its own cluster, so the S3 endpoint in its
    environment reaches the controller and the workers). Rank 0 dies after step 3, past the
    step-2 checkpoint: the restart resumes from the checkpoint read back from the bucket and the
    run ends with every step once and the losses and weights of an uninterrupted run. (A worker
    killed before the first checkpoint, a restart from scratch that counts as one too:
    `tests/test_lora.py`'s FSDP2 run.)
    """
    env, s3 = s3_env
    out = tmp_path / "run"
    shutil.copytree(base_out, out)
    after = tmp_path / "fault-after-checkpoint"
    sets = [
        *TINY_OVERRIDES, *COMMON, "train.per_device_train_batch_size=8", "train.save_steps=2",
        "train.max_failures=1", "train.report_to=tensorboard,mlflow",
        f"train.storage_path=s3://{BUCKET}/runs", "train.keep_resume_checkpoints=true",
    ]  # fmt: skip
    proc = subprocess.run(
        [*sftmix_command(), "train", "--output-dir", str(out), *[f"--set={s}" for s in sets]],
        capture_output=True, text=True, timeout=600,
        env=cli_env(**env, **{FAULT_ENV: f"3:{after}"}),
    )  # fmt: skip
    # stdout is only the result JSON: the raylet's note on the killed worker, the lines every
    # process printed (`cli_env`) and Ray's log deduplication notice at the shutdown of the
    # CLI's own cluster went to stderr.
    stage = result_json(proc)["train"]
    assert after.exists(), "the fault was injected"
    assert "A worker died or was killed" in proc.stderr
    assert "noisy-process" in proc.stderr and "noisy-process" not in proc.stdout
    assert stage["steps"] == STEPS and stage["restarts"] == 1
    assert read_summary(out)["stages"]["train"]["restarts"] == 1
    assert stage["storage_path"] == f"s3://{BUCKET}/runs"
    history = json.loads((out / "logs" / "train-model-history.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    # The restart resumed from the step-2 checkpoint (steps 1 and 2 come from it).
    assert [h["restarts"] for h in history] == [0.0, 0.0, 1.0]
    _assert_same_run(out, single[0])
    _assert_mlflow_run(out, history)  # the restarted workers continued the same MLflow run
    # The checkpoints live in the bucket, none on local disk.
    assert not (out / "ray_storage").exists()
    from pyarrow import fs

    files = s3.get_file_info(fs.FileSelector(f"{BUCKET}/runs", recursive=True))
    states = [f.path for f in files if f.path.endswith("train_state.json")]
    assert len(states) >= 2, [f.path for f in files][:20]
    steps = []
    for path in states:
        with s3.open_input_stream(path) as stream:
            steps.append(json.loads(stream.read())["step"])
    assert max(steps) == STEPS


def test_worker_threads_are_a_share_of_the_workers_own_node():
    assert worker_threads(0, cpus=96, local_workers=8) == 12  # a GPU node, auto
    assert worker_threads(2, cpus=96, local_workers=8) == 2  # capped by ray.num_cpus' share
    assert worker_threads(0, cpus=4, local_workers=8) == 1  # never 0
    assert worker_threads(16, cpus=8, local_workers=1) == 8  # never more than the node has


def test_metric_sink_writes_run_off_the_step_in_order_and_fail_loudly():
    """MLflow's writes run on one background thread (the step does not wait for the tracking
    server); `close` waits for all of them, in order, and a failed write fails the run."""
    import threading
    import time

    from sftmix_ray.train.reporting import _Background

    done: list[int] = []
    gate = threading.Event()
    writer = _Background("test")
    writer.submit(lambda: (gate.wait(5), done.append(1)))
    writer.submit(lambda: done.append(2))
    start = time.monotonic()
    writer.submit(lambda: done.append(3))
    assert time.monotonic() - start < 1.0 and done == []  # submit never waits for a write
    gate.set()
    writer.close()
    assert done == [1, 2, 3]

    failing = _Background("failing")
    failing.submit(lambda: 1 / 0)
    with pytest.raises(RuntimeError, match="a metric sink failed: division by zero"):
        failing.close()
