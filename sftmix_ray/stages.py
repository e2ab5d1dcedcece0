"""The stage registry: every stage's name, function, help text, Ray need and the config values
its results depend on. The CLI, the pipeline and the fingerprints are derived from `STAGES`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftmix_ray.config import Config, TrainConfig, trains_ntp_baseline
from sftmix_ray.layout import RunDir

Reads = dict[str, Any]  # dotted config key -> the value the stage uses

# Train settings that leave the trained weights as they are: logging and metric sinks, eval and
# checkpoint cadence, storage, timeouts, retries and the skipped-step limit, placement, the
# loss's chunking, activation recomputation, the token cache. Strategy, worker count, micro-batch
# and accumulation are replaced by the global batch they make (test_train.py: every strategy on
# 2 workers matches 1 worker at equal global batch). Their changes rerun nothing and resume the
# same Ray Train run.
TRAIN_NEUTRAL = frozenset(
    {
        "logging_steps", "report_to", "mlflow_tracking_uri", "mlflow_experiment",
        "wandb_project", "wandb_entity", "wandb_tags", "wandb_mode",
        "progress_bar", "eval_steps", "save_steps", "save_total_limit", "async_checkpoint",
        "keep_resume_checkpoints", "storage_path", "preemption_check_steps",
        "collective_timeout_s", "max_failures", "max_skipped_steps", "placement_strategy",
        "loss_chunk_size", "loss_chunk_mb", "token_cache_gb", "token_cache_dir",
        "fsdp_defer_grad_sync", "gradient_checkpointing", "strategy", "num_workers",
        "per_device_train_batch_size", "gradient_accumulation_steps", "deepspeed_stage",
    }
)  # fmt: skip
# How a run is laid out over workers: not part of its results, but its checkpoints are stored
# in that layout, so a Ray Train run resumes only with the same topology.
TRAIN_TOPOLOGY = (
    "strategy", "num_workers", "per_device_train_batch_size", "gradient_accumulation_steps",
    "deepspeed_stage", "fsdp_defer_grad_sync",
)  # fmt: skip


def _train_values(train: TrainConfig, *, skip: tuple[str, ...] = ()) -> Reads:
    values = {
        f"train.{k}": v
        for k, v in dataclasses.asdict(train).items()
        if k not in TRAIN_NEUTRAL and k not in skip
    }
    values["train.global_batch_size"] = (
        train.per_device_train_batch_size * train.num_workers * train.gradient_accumulation_steps
    )
    if train.strategy != "deepspeed" or train.deepspeed_config is None:
        values.pop("train.deepspeed_config")  # a user's DeepSpeed JSON, read under DeepSpeed
    lora = values.pop("train.lora")
    if train.lora.r > 0:  # off: none of its settings is read (and old runs keep their prints)
        values.update({f"train.lora.{k}": v for k, v in lora.items()})
    return values


# Settings added after the first release, each left out of prepare's fingerprint while at its
# default, so that a run prepared before the setting existed is not redone.
_LATER_DATA_KEYS: dict[str, Any] = {
    "data.columns": {},
    "data.mask_history": False,
    "data.reasoning": "keep",
    "data.response_template": None,
    "data.instruction_template": None,
}


def prepare_reads(cfg: Config) -> Reads:
    """The corpus, its validation and tokenization, and the tokenizer (the tiny preset's is
    trained on the corpus and its weights initialized here). Not the Ray Data batch size or
    task count or retries: rows are sorted by example_id."""
    data = {f"data.{k}": v for k, v in dataclasses.asdict(cfg.data).items()}
    for k in ("data.tokenize_batch_size", "data.num_workers", "data.max_retries"):
        data.pop(k)
    for key, default in _LATER_DATA_KEYS.items():  # at their defaults: earlier prints kept
        if data[key] == default:
            data.pop(key)
    model = {f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()}
    model.pop("model.attn_implementation")
    if cfg.model.name_or_path != "tiny":
        model = {k: v for k, v in model.items() if not k.startswith("model.tiny_")}
    return {**data, **model}


def training_reads(cfg: Config, mode: str) -> Reads:
    """The values a `reference` or `train` run's weights depend on (after overrides)."""
    if mode == "reference":
        values = _train_values(cfg.train, skip=("num_train_epochs", "max_steps"))
        # The value used: reference.learning_rate, else train.learning_rate.
        values.pop("train.learning_rate")
        ref = cfg.reference
        values["reference.learning_rate"] = ref.learning_rate or cfg.train.learning_rate
        values.update(
            {
                "reference.model": ref.model,
                "reference.num_checkpoints": ref.num_checkpoints,
                "reference.checkpoints_at": ref.checkpoints_at,
            }
        )
        if ref.checkpoints_at == "even":  # under epochs the run's length is C epochs
            values["reference.num_train_epochs"] = ref.num_train_epochs
            values["reference.max_steps"] = ref.max_steps
        return values
    values = _train_values(cfg.train)
    mixup = cfg.mixup
    if mixup.mu == 0:  # plain NTP: nothing else of the Mixup section is read
        values["mixup.mu"] = 0.0
    else:
        values.update({f"mixup.{k}": v for k, v in dataclasses.asdict(mixup).items()})
    return values


def training_topology(cfg: Config) -> Reads:
    """How a training run is spread over workers (its checkpoints' layout)."""
    return {f"train.{k}": getattr(cfg.train, k) for k in TRAIN_TOPOLOGY}


def _reference_reads(cfg: Config) -> Reads:
    return training_reads(cfg, "reference")


def _score_reads(cfg: Config) -> Reads:
    values: Reads = {"score.confidence": cfg.score.confidence}
    if cfg.score.num_gpus_per_actor > 0:  # bf16 applies to scorers on GPUs only
        values["train.bf16"] = cfg.train.bf16
    return values


def _split_reads(cfg: Config) -> Reads:
    return {"split.ratio": cfg.split.ratio}


def _train_reads(cfg: Config) -> Reads:
    values = training_reads(cfg, "train")
    values["eval.compare_ntp"] = cfg.eval.compare_ntp
    return values


def _eval_reads(cfg: Config) -> Reads:
    values = {f"eval.{k}": v for k, v in dataclasses.asdict(cfg.eval).items()}
    # lm-eval and answer settings count only when used (and earlier runs keep their prints)
    for key in list(values):
        unused_lm_eval = key.startswith("eval.lm_eval_") and not cfg.eval.lm_eval_tasks
        answering = key.startswith(("eval.answer_", "eval.questions"))
        unused_answers = answering and not cfg.eval.questions
        if unused_lm_eval or unused_answers:
            values.pop(key)
    values.update({"train.use_gpu": cfg.train.use_gpu, "train.bf16": cfg.train.bf16})
    return values


def _prepare(cfg: Config, out: RunDir) -> dict[str, Any]:
    from sftmix_ray.data.prepare import run_prepare

    return run_prepare(cfg, out)


def _reference(cfg: Config, out: RunDir) -> dict[str, Any]:
    from sftmix_ray.train.launch import run_training

    return run_training(cfg, out, "reference")


def _score(cfg: Config, out: RunDir) -> dict[str, Any]:
    from sftmix_ray.scoring import run_score

    return run_score(cfg, out)


def _split(cfg: Config, out: RunDir) -> dict[str, Any]:
    from sftmix_ray.split import run_split

    return run_split(cfg, out)


def _train(cfg: Config, out: RunDir) -> dict[str, Any]:
    """SFTMix training; with `eval.compare_ntp` also the NTP baseline (mu=0) to OUT/model_ntp."""
    from sftmix_ray.train.launch import run_training

    result = run_training(cfg, out, "train")
    if trains_ntp_baseline(cfg):
        ntp = dataclasses.replace(cfg, mixup=dataclasses.replace(cfg.mixup, mu=0.0))
        result["ntp_baseline"] = run_training(ntp, out, "train", export_name=RunDir.NTP_MODEL)
    return result


def _eval(cfg: Config, out: RunDir) -> dict[str, Any]:
    from sftmix_ray.evaluation import run_eval

    return run_eval(cfg, out)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline."""

    name: str
    run: Callable[[Config, RunDir], dict[str, Any]]  # (config, OUT) -> the stage's result
    reads: Callable[[Config], Reads]  # the config values its results depend on
    needs_ray: bool
    help: str
    # Work it reuses across runs when its inputs match (score: per-checkpoint NLLs); dropped
    # when the stage is forced, so that `--force` really redoes it.
    cache: Callable[[RunDir], Path] | None = None


STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare", _prepare, prepare_reads, True,
        "validate, repair, template and tokenize the corpus into OUT/data (Ray Data)",
    ),
    Stage(
        "reference", _reference, _reference_reads, True,
        "train the reference model with NTP, keeping T checkpoints (Ray Train)",
    ),
    Stage(
        "score", _score, _score_reads, True,
        "score every example's confidence with each reference checkpoint (Ray Data)",
        cache=lambda run: run.checkpoint_scores_dir,
    ),
    Stage("split", _split, _split_reads, False,
          "split the corpus into confident and unconfident halves"),
    Stage(
        "train", _train, _train_reads, True,
        "train the base model with SFTMix, or NTP with mixup.mu=0 (Ray Train)",
    ),
    Stage("eval", _eval, _eval_reads, True, "held-out response NLL, perplexity and exact match"),
)  # fmt: skip
STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    """The stage called `name`."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(name)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def stage_fingerprint(cfg: Config, name: str) -> str:
    """Hash of the values `name` reads and, through the previous stage's fingerprint, of what
    every stage before it reads: a change reruns the stage that reads it and the ones after."""
    upstream = ""
    for stage in STAGES:
        upstream = _digest({"reads": stage.reads(cfg), "upstream": upstream})[:16]
        if stage.name == name:
            return upstream
    raise KeyError(name)


def changed_reads(before: Reads, now: Reads) -> list[str]:
    """'key: old -> new' for every value that differs (a key on one side only included)."""
    missing = object()
    lines = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key, missing), now.get(key, missing)
        if old != new:
            shown = ["(unset)" if v is missing else json.dumps(v, default=str) for v in (old, new)]
            lines.append(f"{key}: {shown[0]} -> {shown[1]}")
    return lines
