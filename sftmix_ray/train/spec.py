"""What the driver sends each Ray Train worker: one typed, frozen run spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sftmix_ray.config import TrainConfig


@dataclass(frozen=True)
class LossSpec:
    """The training loss, built on the worker by `losses.build_loss(name, **kwargs)`."""

    name: Literal["ntp", "sftmix"]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    """One reference or SFTMix training run, as every worker runs it."""

    mode: Literal["reference", "train"]
    # The Train section as this run uses it (the reference run's learning rate already applied).
    train: TrainConfig
    loss: LossSpec
    streams: tuple[str, ...]  # ("data",) or ("confident", "unconfident")
    model_path: str  # HF id or directory the weights are loaded from
    tokenizer_path: str
    trust_remote_code: bool
    attn_implementation: str | None
    num_train_epochs: float
    max_steps: int  # > 0 overrides num_train_epochs
    export_count: int  # HF checkpoints over the run (the reference run's), else 0
    export_at: Literal["even", "epochs"]  # spread evenly, or at the ends of export_count epochs
    export_dir: str  # where they go: <export_dir>/checkpoint-<step>
    final_export: str | None  # the trained HF model's directory (SFTMix training)
    # A LoRA run's adapter directory (`PeftModel.from_pretrained` over `model_path`)
    adapter_export: str | None
    heldout: bool  # there is a held-out split (held-out eval_loss)
    torch_threads: int  # cap on intra-op threads per worker; 0: its share of its node's CPUs
    history_path: str  # per-step metrics, restarts and nodes, written by rank 0 at the end
    starts_path: str  # worker-group starts per run name (the `restarts` count)
    tensorboard_dir: str
    # The resume key: the Ray Train run's name, the same for a rerun that trains the same
    # weights in the same layout (`launch.run_name`), so it resumes from its checkpoints.
    run_name: str = ""
    mlflow: dict[str, Any] | None = None  # tracking URI, experiment, names, params
    wandb: dict[str, Any] | None = None  # project, entity, run id and name, tags, mode, dir
    # Per stream: (Parquet directory, split file whose example_ids it keeps, or None); read by
    # every worker through a node-local memory-mapped cache (`train.token_rows`).
    sources: tuple[tuple[str, str | None], ...] = ()
    heldout_source: str | None = None  # the held-out Parquet directory when `heldout`
