"""Pipeline bookkeeping: which stages a config change reruns (fingerprints of the values each
stage reads), the Ray Train run a rerun resumes, `pipeline --dry-run`, and --force validation.

The whole pipeline end to end (interrupted in each stage, resumed, finished by `ray job submit`,
rerun: skip, --force eval) is test_job_submit.py's.
"""

from __future__ import annotations

import json

import pytest

from sftmix_ray.cli import main
from sftmix_ray.errors import ConfigError
from sftmix_ray.pipeline import completion_record
from sftmix_ray.stages import STAGE_NAMES, stage_fingerprint
from sftmix_ray.summary import update_stage
from tests.conftest import TINY_OVERRIDES, tiny_config

RUN = ["eval.max_examples=8", "eval.max_new_tokens=4"]

# Changes that leave every stage's results as they are (test_train.py shows strategies and
# worker counts at equal global batch train the same weights).
NEUTRAL = [
    ["train.logging_steps=3"],
    ["train.report_to=tensorboard,mlflow", "train.mlflow_experiment=other"],
    ["train.eval_steps=2", "train.save_steps=1", "train.save_total_limit=5"],
    ["train.preemption_check_steps=7"],
    ["train.storage_path=/tmp/elsewhere", "train.max_failures=3", "train.progress_bar=false"],
    ["train.num_workers=2", "train.per_device_train_batch_size=4"],
    ["train.strategy=deepspeed", "train.gradient_accumulation_steps=2",
     "train.per_device_train_batch_size=4", "train.gradient_checkpointing=true"],
    ["data.num_workers=1", "data.tokenize_batch_size=7", "score.num_actors=1",
     "score.batch_tokens=512", "model.attn_implementation=eager"],
]  # fmt: skip


def _first_changed(a, b) -> str | None:
    """The first stage whose fingerprint differs between configs `a` and `b`."""
    for name in STAGE_NAMES:
        if stage_fingerprint(a, name) != stage_fingerprint(b, name):
            return name
    return None


@pytest.mark.parametrize("change", NEUTRAL, ids=lambda c: c[0].split("=")[0])
def test_changes_that_leave_results_alone_rerun_nothing(change):
    assert _first_changed(tiny_config(*RUN), tiny_config(*RUN, *change)) is None


@pytest.mark.parametrize(
    "change, first",
    [
        (["data.max_length=64"], "prepare"),
        (["model.tiny_seed=1"], "prepare"),
        (["train.learning_rate=0.002"], "reference"),  # the reference run inherits it
        (["train.per_device_train_batch_size=4"], "reference"),  # another global batch
        (["reference.num_checkpoints=3"], "reference"),
        (["reference.checkpoints_at=epochs"], "reference"),
        (["score.confidence=mean_inverse_perplexity"], "score"),
        (["split.ratio=0.3"], "split"),
        (["train.max_steps=7"], "train"),  # the reference run has its own length
        (["mixup.alpha=0.3"], "train"),
        (["eval.max_examples=9"], "eval"),
    ],
)
def test_a_change_reruns_from_the_first_stage_that_reads_it(change, first):
    a, b = tiny_config(*RUN), tiny_config(*RUN, *change)
    assert _first_changed(a, b) == first
    later = STAGE_NAMES[STAGE_NAMES.index(first) :]
    assert all(stage_fingerprint(a, s) != stage_fingerprint(b, s) for s in later)


def test_reference_fingerprint_uses_the_learning_rate_it_trains_with():
    lr = tiny_config().train.learning_rate
    # Naming the inherited value explicitly changes nothing; overriding it reruns reference.
    same = tiny_config(f"reference.learning_rate={lr}")
    assert _first_changed(tiny_config(), same) is None
    pinned = [f"reference.learning_rate={lr}"]
    # With the reference rate pinned, train.learning_rate no longer reaches the reference run.
    assert _first_changed(tiny_config(*pinned), tiny_config(*pinned, "train.learning_rate=1")) == (
        "train"
    )
    # checkpoints_at=epochs runs C epochs: the run length keys are not read.
    epochs = ["reference.checkpoints_at=epochs"]
    same = tiny_config(*epochs, "reference.num_train_epochs=5", "reference.max_steps=9")
    assert _first_changed(tiny_config(*epochs), same) is None
    # mu = 0 is plain NTP: the Mixup settings it does not read change nothing.
    ntp = ["mixup.mu=0"]
    assert _first_changed(tiny_config(*ntp), tiny_config(*ntp, "mixup.alpha=0.9")) is None


def test_ray_train_run_name_ignores_logging_but_not_results_or_layout(tmp_path):
    from sftmix_ray.train.launch import run_name

    rows = {"confident": "c", "unconfident": "u"}

    def name(*change: str, mode: str = "train", streams: dict = rows, out=tmp_path) -> str:
        return run_name(tiny_config(*change), mode, "model", streams, out)

    base = name()
    assert name("train.logging_steps=3", "train.report_to=mlflow", "train.eval_steps=5") == base
    assert name("train.save_steps=2", "train.storage_path=/elsewhere") == base
    assert name("train.learning_rate=0.5") != base
    assert name("mixup.mu=0.5") != base
    # The checkpoints of a run are laid out by its topology: another one starts a fresh run.
    assert name("train.num_workers=2", "train.per_device_train_batch_size=4") != base
    assert name(streams={**rows, "confident": "other rows"}) != base
    assert name(mode="reference") != base
    # The ids are row numbers: another model or corpus of the same size, or the same config in
    # another OUT sharing train.storage_path, must not resume this run's checkpoints.
    assert name("model.name_or_path=org/another-model") != base
    assert name("data.path=another.jsonl") != base and name("data.max_length=64") != base
    assert name(out=tmp_path / "another-out") != base
    assert name("mixup.mu=0", "model.name_or_path=org/m") != name("mixup.mu=0")  # NTP too


def test_run_spec_is_typed_and_applies_what_each_run_uses(tmp_path):
    import dataclasses

    from sftmix_ray.train.launch import build_spec
    from sftmix_ray.train.spec import LossSpec

    (tmp_path / "base_model").mkdir()
    (tmp_path / "base_model" / "config.json").write_text("{}")  # the tiny preset's place
    cfg = tiny_config("reference.learning_rate=0.5", "train.report_to=mlflow", "mixup.mu=0.3")
    ref = build_spec(cfg, tmp_path, "reference")
    assert ref.train.learning_rate == 0.5
    assert ref.loss == LossSpec("ntp", {"chunk_size": 0, "chunk_mb": 128.0})
    assert ref.streams == ("data",) and ref.export_count == 2 and ref.final_export is None
    assert ref.max_steps == 3 and ref.train.report_to == ["mlflow"]
    assert ref.export_at == "even"
    epochs = build_spec(tiny_config("reference.checkpoints_at=epochs"), tmp_path, "reference")
    assert (epochs.num_train_epochs, epochs.max_steps, epochs.export_at) == (2.0, -1, "epochs")
    train = build_spec(cfg, tmp_path, "train")
    assert train.train.learning_rate == cfg.train.learning_rate
    assert train.loss.name == "sftmix" and train.loss.kwargs["mu"] == 0.3
    assert train.streams == ("confident", "unconfident")
    assert train.final_export == str((tmp_path / "model").resolve())
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.run_name = "other"  # type: ignore[misc]
    # The random-pairs ablation reads the uniform stream NTP reads (the same batches, drawn by
    # the same seeded plan), with the SFTMix loss: Mixup pairs row i of each half of a batch.
    ntp = build_spec(tiny_config("mixup.mu=0"), tmp_path, "train")
    rand = build_spec(tiny_config("mixup.pairing=random"), tmp_path, "train")
    assert rand.streams == ntp.streams == ("data",)
    assert rand.loss.name == "sftmix" and ntp.loss.name == "ntp"
    assert rand.train == ntp.train and (rand.max_steps, rand.num_train_epochs) == (
        ntp.max_steps,
        ntp.num_train_epochs,
    )


def _completed(out, cfg) -> None:
    """A summary.json as a finished pipeline with `cfg` leaves it."""
    for name in STAGE_NAMES:
        update_stage(out, name, status="completed", **completion_record(cfg, name))


def _dry_run(out, *args: str, capsys) -> list[dict]:
    flags = [f"--set={o}" for o in [*TINY_OVERRIDES, *RUN]]
    code = main(["pipeline", "--dry-run", "--output-dir", str(out), *flags, *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out)["pipeline"]
    assert result["dry_run"] is True
    return result["stages"]


def test_dry_run_names_the_stages_that_would_run_and_why(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    _completed(out, tiny_config(*RUN))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    plan = _dry_run(out, "--set=train.logging_steps=3", capsys=capsys)
    assert [p["run"] for p in plan] == [False] * len(STAGE_NAMES)
    assert {p["reason"] for p in plan} == {"complete for this config"}

    plan = _dry_run(out, "--set=train.learning_rate=0.002", capsys=capsys)
    assert [p["stage"] for p in plan if p["run"]] == [
        "reference",
        "score",
        "split",
        "train",
        "eval",
    ]
    by_stage = {p["stage"]: p for p in plan}
    assert by_stage["reference"]["reason"] == "the values it reads changed"
    assert by_stage["reference"]["changed"] == ["reference.learning_rate: 0.001 -> 0.002"]
    assert by_stage["train"]["changed"] == ["train.learning_rate: 0.001 -> 0.002"]
    assert by_stage["score"]["reason"] == "a stage before it reruns (reference)"
    assert by_stage["prepare"]["run"] is False

    plan = _dry_run(out, "--force=eval", capsys=capsys)
    assert [p["stage"] for p in plan if p["run"]] == ["eval"]
    assert plan[-1]["reason"] == "--force eval"
    # A dry run starts nothing and writes nothing.
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_dry_run_of_an_unfinished_run(tmp_path, capsys):
    out = tmp_path / "out"
    update_stage(
        out, "prepare", status="completed", **completion_record(tiny_config(*RUN), "prepare")
    )
    update_stage(out, "reference", status="interrupted")
    plan = _dry_run(out, capsys=capsys)
    assert [p["run"] for p in plan] == [False, True, True, True, True, True]
    assert plan[1]["reason"] == "not completed (status: interrupted)"
    assert plan[2]["reason"] == "not completed (status: never run)"


def test_force_unknown_stage_is_a_clear_error(tmp_path):
    from sftmix_ray.pipeline import run_pipeline

    with pytest.raises(ConfigError, match="--force 'trian' is not a stage"):
        run_pipeline(tiny_config(), tmp_path, force="trian")


def test_force_score_drops_its_per_checkpoint_cache(tmp_path):
    """`--force score` really rescores: score reuses per-checkpoint NLLs whose inputs match,
    so forcing it must drop them; forcing another stage (or none) keeps them."""
    from sftmix_ray.layout import RunDir
    from sftmix_ray.pipeline import drop_forced_cache

    run = RunDir(tmp_path)
    run.checkpoint_scores_dir.mkdir(parents=True)
    (run.checkpoint_scores_dir / "checkpoint-1.parquet").write_bytes(b"x")
    assert not drop_forced_cache({"stage": "score"}, None, run)
    assert not drop_forced_cache({"stage": "score"}, "reference", run)  # reran for a change
    assert not drop_forced_cache({"stage": "split"}, "split", run)  # no cache of its own
    assert run.checkpoint_scores_dir.exists()
    assert drop_forced_cache({"stage": "score"}, "score", run)
    assert not run.checkpoint_scores_dir.exists()
