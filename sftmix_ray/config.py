"""Typed, validated configuration for every stage: YAML files plus `--set key=value` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from sftmix_ray.data.columns import column_errors
from sftmix_ray.errors import ConfigError


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError naming the key, the value and what is allowed."""
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: {allowed}")


def _at_least(section: str, obj: Any, **lows: float) -> None:
    """Every named field of `obj` is >= its bound; a ConfigError names the first that is not."""
    for name, low in lows.items():
        value = getattr(obj, name)
        _check(value >= low, f"{section}.{name}", value, f">= {low:g}")


@dataclass(kw_only=True)
class DataConfig:
    """Where the corpus comes from and how it is tokenized."""

    path: str = "demo"  # file, directory, HF dataset id, or "demo" (the bundled generator)
    # row format; auto detects it per file (alpaca, sharegpt, messages, prompt_completion, ...)
    format: Literal[
        "auto", "alpaca", "sharegpt", "messages", "prompt_completion", "xlam", "glaive", "text"
    ] = "auto"
    # {field: corpus column}: read a column of another name as a format's field, e.g. Dolly's
    # {input: context, output: response} (sftmix_ray/data/columns.py); renamed before detection
    columns: dict[str, str] = field(default_factory=dict)
    hf_split: str = "train"  # split used when `path` is a Hugging Face dataset id
    eval_path: str | None = None  # held-out file; "demo" data brings its own held-out split
    eval_fraction: float = 0.0  # else hold out this fraction of `path` (by example id)
    on_invalid: Literal["skip", "error"] = "skip"  # rejected rows: report and skip, or fail
    # standard: repair what real dumps break (leading assistant turns, a trailing user turn,
    # empty turns, runs of one role, bing/bard roles), counted by kind; none: strict.
    repair: Literal["standard", "none"] = "standard"
    # true: train only each conversation's last answer, earlier ones are context
    # (LLaMA-Factory's mask_history); a row whose last answer is marked weight 0 is rejected
    mask_history: bool = False
    # An answer's reasoning (reasoning_content, reasoning, thinking): keep trains it (under the
    # template's key, or inline in <think> tags); drop leaves it out (counted).
    reasoning: Literal["keep", "drop"] = "keep"
    # Format text (one `text` field, trained as written, no chat template): train only what
    # follows this marker, e.g. "### Assistant:" (TRL's response_template); unset: every token
    response_template: str | None = None
    # Format text, with response_template: where a human turn starts ("### Human:"); from it to
    # the next response marker is context, so every answer of a transcript is trained
    instruction_template: str | None = None
    max_length: int = 512  # tokens per example
    # Longer examples: turns keeps the longest prefix of whole exchanges that fits (or cuts the
    # first response; leading exchanges that train nothing, as under mask_history, go first);
    # truncate cuts at max_length; drop rejects the row.
    truncation: Literal["turns", "truncate", "drop"] = "turns"
    demo_train_size: int = 4000  # rows of the bundled demo corpus (data.path: demo)
    demo_eval_size: int = 400  # held-out rows of the demo corpus
    tokenize_batch_size: int = 256  # rows per Ray Data tokenization batch
    num_workers: int = 2  # Ray Data tokenization tasks at once
    # Times a tokenization task runs again after its worker process died (a crash, a lost
    # node); then `prepare` fails naming the chunk's rows (Ray Data's own default: forever)
    max_retries: int = 3

    def __post_init__(self) -> None:
        _at_least("data", self, max_length=8, demo_eval_size=0, num_workers=1, max_retries=0)
        _check(
            0.0 <= self.eval_fraction < 1.0,
            "data.eval_fraction",
            self.eval_fraction,
            "a number in [0, 1)",
        )
        _check(self.demo_train_size > 0, "data.demo_train_size", self.demo_train_size, "> 0")
        for key in ("response_template", "instruction_template"):
            value = getattr(self, key)
            _check(value is None or value.strip() != "", f"data.{key}", value, "unset or text")
        _check(
            self.instruction_template is None or self.response_template is not None,
            "data.instruction_template",
            self.instruction_template,
            "unset unless data.response_template is set (it marks where answers start)",
        )
        problems = column_errors(self.columns)
        _check(not problems, "data.columns", self.columns, "; ".join(problems))
        _check(
            self.tokenize_batch_size > 0,
            "data.tokenize_batch_size",
            self.tokenize_batch_size,
            "> 0",
        )


@dataclass(kw_only=True)
class ModelConfig:
    """The base model SFTMix trains."""

    name_or_path: str = "tiny"  # HF id, local HF directory, or "tiny" (built-in offline preset)
    trust_remote_code: bool = False  # off unless set: remote code runs arbitrary Python
    attn_implementation: str = "sdpa"  # sdpa, eager or flash_attention_2 (HF attn_implementation)
    tiny_hidden_size: int = 256  # sizes of the "tiny" preset (seeded random init)
    tiny_num_layers: int = 4  # decoder layers of the tiny preset
    tiny_vocab_size: int = 2048  # BPE vocab trained locally on the corpus
    tiny_seed: int = 0  # seed of the tiny preset's random init

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path), "model.name_or_path", self.name_or_path, "non-empty")
        _check(
            self.tiny_hidden_size % 32 == 0 and self.tiny_hidden_size > 0,
            "model.tiny_hidden_size",
            self.tiny_hidden_size,
            "a positive multiple of 32",
        )
        _check(self.tiny_num_layers > 0, "model.tiny_num_layers", self.tiny_num_layers, "> 0")
        _check(
            self.tiny_vocab_size >= 300,
            "model.tiny_vocab_size",
            self.tiny_vocab_size,
            ">= 300 (byte alphabet plus merges)",
        )


@dataclass(kw_only=True)
class ReferenceConfig:
    """The reference NTP run whose checkpoints score confidence."""

    model: str | None = None  # smaller reference model (compute-constrained mode); None = base
    num_checkpoints: int = 3  # C checkpoints the confidence averages over
    # even: the C checkpoints spread evenly over a run of num_train_epochs (or max_steps);
    # epochs: at the ends of C epochs (the run lasts C epochs; num_train_epochs is not read).
    checkpoints_at: Literal["even", "epochs"] = "even"
    num_train_epochs: float = 1.0  # length of the reference run (max_steps > 0 wins)
    max_steps: int = -1  # > 0 overrides num_train_epochs (checkpoints_at: even)
    learning_rate: float | None = None  # None = train.learning_rate

    def __post_init__(self) -> None:
        _check(
            self.num_checkpoints >= 1,
            "reference.num_checkpoints",
            self.num_checkpoints,
            "an integer >= 1",
        )
        _check(
            self.num_train_epochs > 0,
            "reference.num_train_epochs",
            self.num_train_epochs,
            "> 0",
        )
        _check(
            self.learning_rate is None or self.learning_rate > 0,
            "reference.learning_rate",
            self.learning_rate,
            "> 0 or null",
        )


@dataclass(kw_only=True)
class ScoreConfig:
    """Ray Data confidence scoring."""

    num_actors: int = 2  # scorer actors (one per GPU on GPU clusters)
    num_gpus_per_actor: float = 0.0  # GPUs per scorer actor (0 = CPU)
    batch_tokens: int = 8192  # token budget per forward (after sorting by length)
    chunk_size: int = 0  # positions per log-sum-exp chunk; 0 = as many as chunk_mb holds
    chunk_mb: float = 128.0  # fp32 logits per chunk (MB) when chunk_size is 0
    # neg_mean_perplexity: the paper's -(1/C) sum_c exp(nll_c); mean_inverse_perplexity: the
    # Dataset Cartography form mean_c exp(-nll_c). Both rank "more confident" higher.
    confidence: Literal["neg_mean_perplexity", "mean_inverse_perplexity"] = "neg_mean_perplexity"

    def __post_init__(self) -> None:
        _at_least("score", self, num_actors=1, batch_tokens=64, num_gpus_per_actor=0)
        _check(self.chunk_size >= 0, "score.chunk_size", self.chunk_size, ">= 0 (0 = chunk_mb)")
        _check(self.chunk_mb > 0, "score.chunk_mb", self.chunk_mb, "> 0")


@dataclass(kw_only=True)
class SplitConfig:
    """Confidence split."""

    ratio: float = 0.5  # fraction of examples (highest confidence first) that are "confident"

    def __post_init__(self) -> None:
        _check(
            0.0 < self.ratio < 1.0, "split.ratio", self.ratio, "a number in the open range (0, 1)"
        )


@dataclass(kw_only=True)
class MixupConfig:
    """The SFTMix regularizer; mu = 0 with uniform sampling is the NTP baseline."""

    alpha: float = 0.5  # Beta(alpha, alpha) for the interpolation weight lambda
    mu: float = 0.2  # weight of L_mix in L = L_ntp + mu * L_mix
    # one lambda per confident/unconfident pair, or one per batch
    lambda_per: Literal["pair", "batch"] = "pair"
    pairing: Literal["confidence", "random"] = "confidence"  # random = ablation
    # response: mix the n-th response token of each pair (the paper's); position: equal
    # absolute positions of the padded batch (the earlier variant, kept as an ablation).
    align: Literal["response", "position"] = "response"
    ntp_weight: float = 1.0  # L = ntp_weight * L_ntp + mu * L_mix; 0 = "Mixup only" ablation

    def __post_init__(self) -> None:
        _check(self.alpha > 0, "mixup.alpha", self.alpha, "a number > 0")
        _check(self.mu >= 0, "mixup.mu", self.mu, "a number >= 0 (0 = NTP baseline)")
        _check(self.ntp_weight >= 0, "mixup.ntp_weight", self.ntp_weight, "a number >= 0")
        _check(
            self.mu > 0 or self.ntp_weight > 0, "mixup.ntp_weight", self.ntp_weight,
            "> 0 when mixup.mu = 0 (nothing would be trained)",
        )  # fmt: skip


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapters through peft (`r` = 0: full fine-tuning), for the reference run and SFTMix
    training alike. The Mixup term needs nothing else: hidden states and head are the model's."""

    r: int = 0  # adapter rank; 0 = off (every weight trains)
    alpha: float = 16.0  # scaling numerator: updates are scaled by alpha / r
    # dropout on the adapter's input; 0 keeps runs identical whatever the worker count
    dropout: float = 0.0
    # modules that get adapters: all-linear (every linear layer but the LM head) or names
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # also write the merged HF model to OUT/model (the adapter always goes to OUT/adapter);
    # false: only the adapter, and eval loads base + adapter
    merge: bool = True
    # QLoRA: a 4-bit base through bitsandbytes (CUDA GPUs, strategy ddp); untested here
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        _check(self.r >= 0, "train.lora.r", self.r, "an integer >= 0 (0 = off)")
        _check(self.alpha > 0, "train.lora.alpha", self.alpha, "a number > 0")
        _check(0 <= self.dropout < 1, "train.lora.dropout", self.dropout, "in [0, 1)")
        _check(
            bool(self.target_modules),
            "train.lora.target_modules",
            self.target_modules,
            "a non-empty list of module names, or all-linear",
        )
        _check(
            not self.load_in_4bit or self.r > 0,
            "train.lora.load_in_4bit",
            self.load_in_4bit,
            "false unless train.lora.r > 0 (QLoRA trains adapters)",
        )


@dataclass(kw_only=True)
class TrainConfig:
    """Ray Train settings shared by the reference run and SFTMix training."""

    # ddp, fsdp (FSDP2) or deepspeed (ZeRO, train.deepspeed_stage)
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    num_workers: int = 1  # Ray Train workers (one per GPU)
    use_gpu: bool = False  # one GPU per worker, NCCL
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # workers on nodes
    per_device_train_batch_size: int = 8  # rows per device per micro-step (SFTMix: b + b)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    # Batches of similar length (less padding), sorted within windows of length_group_steps
    # steps, batches in shuffled order: pairs (random confident/unconfident pairs, sorted by
    # the longer row), rows (each side by length, partners random within a batch), or none.
    group_by_length: Literal["pairs", "rows", "none"] = "pairs"
    length_group_steps: int = 64  # optimizer steps per length-grouping window
    learning_rate: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.05  # fraction of steps of linear warm-up
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    # Optimizer steps whose gradient norm is inf or NaN are skipped (no update, counted, their
    # rows named); more than this many stops the run with an error (-1 = no limit)
    max_skipped_steps: int = 10
    num_train_epochs: float = 1.0  # passes over the larger stream (max_steps > 0 wins)
    max_steps: int = -1  # > 0 overrides num_train_epochs
    max_failures: int = 0  # Ray Train FailureConfig(max_failures)
    seed: int = 42  # model init aside, every random draw: batches, lambdas, dropout
    bf16: bool = False  # autocast on GPU
    # dtype of exported HF models and reference checkpoints: auto is bfloat16 under bf16
    # (half the bytes and write time at 8B; training keeps fp32 master weights), else float32
    export_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gradient_checkpointing: bool = False  # recompute decoder layers in backward (less memory)
    logging_steps: int = 10  # metrics to the sinks every N steps
    # Metric sinks on rank 0: OUT/logs/tensorboard, MLflow, Weights & Biases ("none" = none).
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = field(
        default_factory=lambda: ["tensorboard"]
    )
    mlflow_tracking_uri: str | None = None  # else $MLFLOW_TRACKING_URI, else OUT/mlruns
    mlflow_experiment: str | None = None  # else $MLFLOW_EXPERIMENT_NAME, else "sftmix-ray"
    wandb_project: str | None = None  # else $WANDB_PROJECT, else "sftmix-ray"
    wandb_entity: str | None = None  # else $WANDB_ENTITY, else the API key's default entity
    wandb_tags: list[str] = field(default_factory=list)  # tags on every W&B run
    # online, offline (OUT/wandb, `wandb sync` later) or disabled; else $WANDB_MODE, else online
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    progress_bar: bool = True  # a tqdm bar on the driver for rank 0's steps
    eval_steps: int = 0  # held-out eval_loss every N steps (0 = only at the end); Tune/ASHA
    save_steps: int = 0  # 0 = only at the end (reference checkpoints are separate)
    save_total_limit: int = 2  # Ray Train checkpoints kept
    # Every N steps the ranks ask Ray Train whether a node of the run is being reclaimed (a
    # spot or preemptible node's notice; GCP gives 30 s); on a notice a checkpoint is saved at
    # once, so the restart loses the steps since then, not those since the last save_steps.
    # One call per rank to Ray Train's synchronization actor per check (its cost at 64 ranks
    # is not measured). 0 = never ask.
    preemption_check_steps: int = 1
    # After a successful export the run's resume checkpoints are removed (~96 GB each at 8B
    # with Adam; nothing resumes a finished run); true keeps them, as TRL's output_dir does.
    keep_resume_checkpoints: bool = False
    # POSIX storage: write save_steps checkpoints from host memory in the background while
    # training goes on (holds one copy of each rank's part: its weight and optimizer shards
    # under FSDP2/ZeRO, the whole state on rank 0 under DDP)
    async_checkpoint: bool = False
    # FSDP2: reduce-scatter gradients after every micro-batch (default). True defers it to the
    # last micro-batch, which keeps unsharded fp32 gradients of the whole model meanwhile.
    fsdp_defer_grad_sync: bool = False
    deepspeed_stage: Literal[2, 3] = 2  # ZeRO stage under strategy deepspeed
    deepspeed_config: str | None = None  # a user's DeepSpeed JSON replaces ours
    # positions per log-sum-exp chunk of the loss; 0 = as many as loss_chunk_mb holds
    loss_chunk_size: int = 0
    # fp32 logits per loss chunk (MB) when loss_chunk_size is 0: positions = MB / (4 x vocab),
    # 261 at a 128256 vocabulary; the chunk's logits and their gradient exist once at a time
    loss_chunk_mb: float = 128.0
    # Node-local token cache (see train/token_rows.py): after a worker builds an entry, the
    # least recently opened others are removed while the cache holds more than this (GiB; one
    # entry is about 8 bytes per token of its rows); 0 = no size limit. Stale entries (their
    # corpus or split re-made or removed) go whatever the limit.
    token_cache_gb: float = 64.0
    # Where each node keeps that cache (a node-local path, e.g. a local NVMe mount); default
    # $SFTMIX_TOKEN_CACHE, else <temp dir>/sftmix-token-cache.
    token_cache_dir: str | None = None
    # Process-group timeout: must outlast rank 0 writing an HF export to shared storage.
    collective_timeout_s: int = 3600
    storage_path: str | None = None  # shared storage for checkpoints; default OUT/ray_storage
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (train.lora.*)

    def __post_init__(self) -> None:
        _at_least(
            "train",
            self,
            num_workers=1,
            per_device_train_batch_size=1,
            length_group_steps=1,
            gradient_accumulation_steps=1,
            max_failures=-1,
            max_grad_norm=0,
            max_skipped_steps=-1,
            logging_steps=1,
            save_steps=0,
            save_total_limit=1,
            preemption_check_steps=0,
            collective_timeout_s=60,
        )
        _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "> 0")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", self.warmup_ratio, "in [0, 1)")
        _check(self.num_train_epochs > 0, "train.num_train_epochs", self.num_train_epochs, "> 0")
        _check(self.eval_steps >= 0, "train.eval_steps", self.eval_steps, ">= 0 (0 = at the end)")
        _check(
            not self.async_checkpoint
            or "://" not in (storage := self.storage_path or "") or storage.startswith("file://"),
            "train.async_checkpoint", self.async_checkpoint,
            f"false with an object-store train.storage_path ({self.storage_path}): background "
            "saves write straight into POSIX storage; object stores get synchronous uploads",
        )  # fmt: skip
        _check(
            self.loss_chunk_size >= 0,
            "train.loss_chunk_size", self.loss_chunk_size, ">= 0 (0 = from loss_chunk_mb)",
        )  # fmt: skip
        _check(self.loss_chunk_mb > 0, "train.loss_chunk_mb", self.loss_chunk_mb, "> 0")
        _check(
            self.token_cache_gb >= 0,
            "train.token_cache_gb", self.token_cache_gb, ">= 0 (0 = no size limit)",
        )  # fmt: skip
        _check(
            not self.lora.load_in_4bit or (self.use_gpu and self.strategy == "ddp"),
            "train.lora.load_in_4bit",
            self.lora.load_in_4bit,
            "false unless train.use_gpu=true and train.strategy=ddp (bitsandbytes' 4-bit "
            "kernels need CUDA; sharding a 4-bit base is not supported here)",
        )


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation."""

    compare_ntp: bool = False  # also train an NTP baseline (mixup.mu = 0) and evaluate it
    exact_match: bool = True  # greedy generation vs the demo corpus's answers
    max_new_tokens: int = 32  # greedy generation length for exact match
    max_examples: int = 200  # held-out rows evaluated
    # lm-eval-harness tasks run on each trained model (results in OUT/eval.json and the report)
    lm_eval_tasks: list[str] = field(default_factory=list)
    # a directory of your own lm-eval task YAMLs (relative paths in them resolve against it)
    lm_eval_include_path: str | None = None
    lm_eval_chat_template: bool = False  # format lm-eval prompts with the model's chat template
    lm_eval_limit: int | None = None  # at most this many documents per task (None = all)
    lm_eval_num_fewshot: int | None = None  # few-shot examples (None = each task's default)
    lm_eval_batch_size: int = 8  # lm-eval's batch size
    # questions to answer for judging: AlpacaEval's instruction list (JSON) or MT-Bench's
    # question.jsonl (question_id, category, turns); answers go to OUT/answers
    questions: str | None = None
    # answer layouts: alpaca_eval (OUT/answers/alpaca_eval.json), mt_bench (FastChat's
    # OUT/answers/mt_bench/<model_id>.jsonl); empty = the layout of the questions file
    answer_formats: list[Literal["alpaca_eval", "mt_bench"]] = field(default_factory=list)
    answer_model_id: str = "sftmix-ray"  # generator / model_id of the SFTMix model (NTP: -ntp)
    answer_temperature: float = 0.0  # 0 = greedy; > 0 samples (seeded by train.seed)
    answer_max_new_tokens: int = 1024  # per answer (per turn for MT-Bench)
    # MT-Bench's own temperature per question category (writing 0.7, roleplay 0.7, stem 0.1,
    # humanities 0.1, others 0) instead of answer_temperature
    answer_mt_bench_temperatures: bool = False
    answer_batch_size: int = 16  # questions generated together (left padding)

    def __post_init__(self) -> None:
        _at_least(
            "eval",
            self,
            max_new_tokens=1,
            max_examples=1,
            lm_eval_batch_size=1,
            answer_batch_size=1,
        )
        _check(
            self.lm_eval_limit is None or self.lm_eval_limit >= 1,
            "eval.lm_eval_limit", self.lm_eval_limit, ">= 1 or null",
        )  # fmt: skip
        _check(
            self.answer_temperature >= 0,
            "eval.answer_temperature", self.answer_temperature, ">= 0 (0 = greedy)",
        )  # fmt: skip
        _check(
            self.answer_max_new_tokens >= 1,
            "eval.answer_max_new_tokens", self.answer_max_new_tokens, ">= 1",
        )  # fmt: skip
        _check(
            bool(self.questions) or not self.answer_formats,
            "eval.answer_formats", self.answer_formats, "empty unless eval.questions is set",
        )  # fmt: skip
        _check(bool(self.answer_model_id), "eval.answer_model_id", self.answer_model_id,
               "a non-empty name")  # fmt: skip


@dataclass(kw_only=True)
class TuneConfig:
    """Ray Tune sweep over train (+ split)."""

    num_samples: int = 3  # random/optuna: trials; grid: repeats of the whole grid
    max_concurrent_trials: int = 1  # trials run side by side
    # grid, random (seeded, without repeats) or optuna
    search: Literal["grid", "random", "optuna"] = "random"
    space: str | None = None  # search-space YAML, or "default" / "wide" (tuning/*_space.yaml)
    # fifo, or asha (stops poor trials at eval_steps rungs)
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: str = "eval_loss"  # what trials are compared by (eval_loss needs held-out data)
    mode: Literal["min", "max"] = "min"  # whether lower or higher metric is better
    max_failures: int = 0  # Tune retries of a failed trial (train.max_failures retries workers)
    driver_cpus: float = 0.0  # CPUs held by each trial's driver; its Ray Train workers hold theirs
    grace_period: int = 0  # ASHA: steps before a trial may be stopped (0 = train.eval_steps or 1)
    seed: int = 0  # random search sampling seed (a rerun samples the same trials)

    def __post_init__(self) -> None:
        _at_least(
            "tune",
            self,
            num_samples=1,
            max_concurrent_trials=1,
            max_failures=-1,
            driver_cpus=0,
            grace_period=0,
        )
        _check(bool(self.metric), "tune.metric", self.metric, "a reported metric name")


@dataclass(kw_only=True)
class RayConfig:
    """How to reach Ray: an existing cluster, or a local one."""

    address: str | None = None  # None: RAY_ADDRESS if set, else start a local cluster
    num_cpus: int | None = None  # local cluster only
    include_dashboard: bool = False  # local cluster only
    dashboard_host: str = "127.0.0.1"  # never exposed beyond loopback by default


@dataclass(kw_only=True)
class Config:
    """The whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        _check(
            self.mixup.mu == 0 or self.train.per_device_train_batch_size % 2 == 0,
            "train.per_device_train_batch_size",
            self.train.per_device_train_batch_size,
            "an even number when mixup.mu > 0 (each micro-batch is b pairs: 2b rows)",
        )
        _check(
            self.tune.scheduler != "asha" or self.train.eval_steps > 0,
            "tune.scheduler", self.tune.scheduler,
            "fifo while train.eval_steps=0: ASHA compares trials at their evals, and with one "
            "eval at the end it would stop a trial there, before it exports its model; set "
            "train.eval_steps to the rung spacing",
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe), as written to OUT/config.yaml."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building configs from dicts, YAML and --set overrides


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce `value` to the annotated type `tp`, or raise a ConfigError naming `key`."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"config key '{key}' = {value!r} is invalid")
    if origin is list:
        # A YAML list, or "a,b" from --set; "none" is the empty list (as in HF report_to).
        if isinstance(value, str):
            value = [] if value.strip().lower() == "none" else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected a list")
        (inner,) = get_args(tp)
        items = [_coerce(v.strip() if isinstance(v, str) else v, inner, key) for v in value]
        return list(dict.fromkeys(items))
    if origin is dict:
        # A YAML mapping, or "a=b,c=d" from --set; "none" (or a YAML key left empty) is {}.
        if value is None:
            value = {}
        if isinstance(value, str):
            pairs = [p for p in value.split(",") if p.strip()]
            if value.strip().lower() == "none":
                pairs = []
            if not all("=" in p for p in pairs):
                raise ConfigError(
                    f"config key '{key}' = {value!r} is invalid: expected key=value pairs"
                )
            value = dict(p.split("=", 1) for p in pairs)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected a mapping")
        _, inner = get_args(tp)
        return {str(k).strip(): _coerce(v.strip() if isinstance(v, str) else v, inner, key)
                for k, v in value.items()}  # fmt: skip
    if origin is Literal:
        allowed = get_args(tp)
        for a in allowed:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise ConfigError(
            f"config key '{key}' = {value!r} is invalid: one of {', '.join(map(repr, allowed))}"
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected an integer")
        try:
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(value)
        except ValueError:
            raise ConfigError(
                f"config key '{key}' = {value!r} is invalid: expected an integer"
            ) from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected a number")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(
                f"config key '{key}' = {value!r} is invalid: expected a number"
            ) from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected a string")
        return str(value)
    return value


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    guess = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f" (did you mean '{prefix}{guess[0]}'?)" if guess else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping, got {raw!r}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown_key(prefix + str(key), names)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, prefix + key + ".")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict; errors name the offending key."""
    return _build(Config, raw or {}, "")


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, as `--set a.b.c=value` does."""
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


# Keys whose `--set` value is text as written (markers such as "[/INST]" or "Assistant:" read
# as YAML would be a list or a mapping); quoted, it is unquoted as YAML reads it.
TEXT_KEYS = frozenset({"data.response_template", "data.instruction_template"})


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `--set key=value`; the value is read as YAML (so 0.5, true, null work),
    except for TEXT_KEYS."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw_value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    quoted = len(raw_value) > 1 and raw_value[0] == raw_value[-1] and raw_value[0] in "'\""
    if key in TEXT_KEYS and not quoted and raw_value.strip() not in ("null", "Null", "NULL", "~"):
        return key, raw_value
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (optional), apply `key=value` overrides, validate, return it."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        raw = loaded or {}
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return config_from_dict(raw)


def trains_ntp_baseline(cfg: Config) -> bool:
    """Whether `train` also trains the NTP baseline to OUT/model_ntp (`eval.compare_ntp`; at
    `mixup.mu` 0 the trained model is the NTP one)."""
    return cfg.eval.compare_ntp and cfg.mixup.mu > 0


def exports_adapter_only(cfg: Config) -> bool:
    """Whether `train` exports a LoRA adapter (OUT/adapter) without a merged model."""
    return cfg.train.lora.r > 0 and not cfg.train.lora.merge


# Keys whose values are secrets: `token`, `hf_token`, `api_key`, `password`, `aws_secret`, ...
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key|access_key)$", re.IGNORECASE)


# Credentials inside a URL: `https://user:password@host`, `s3://KEY:SECRET@bucket`.
URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redacted(obj: Any) -> Any:
    """Copy of a nested dict with values of secret-looking keys and URL credentials replaced."""
    if isinstance(obj, dict):
        return {
            k: ("***" if SECRET_KEY.search(str(k)) and v else redacted(v)) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redacted(v) for v in obj]
    if isinstance(obj, str):
        return URL_CREDENTIALS.sub("***@", obj)
    return obj


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (secrets redacted) atomically."""
    from sftmix_ray.io_utils import atomic_write_text

    text = yaml.safe_dump(redacted(config.to_dict()), sort_keys=False)
    atomic_write_text(Path(path), text)
