"""Driver side of the `reference` and `train` stages: datasets, TorchTrainer, results."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from sftmix_ray.config import Config
from sftmix_ray.errors import SftmixError
from sftmix_ray.layout import RunDir
from sftmix_ray.train.spec import LossSpec, RunSpec

log = logging.getLogger(__name__)


def _read_table(path: Path, columns: list[str] | None = None) -> Any:
    """Columns of a stage's Parquet output as one Arrow table (the driver reads example ids)."""
    import pyarrow.parquet as pq

    if not path.exists():
        raise SftmixError(f"{path} does not exist; run the stage that writes it first")
    return pq.read_table(path, columns=columns)


def _subset(data: Any, split_file: Path, ratio: float) -> Any:
    """Rows of OUT/data whose example_id is listed in a split file made for `ratio`."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from sftmix_ray.split import RATIO_METADATA_KEY

    if not split_file.exists():
        raise SftmixError(f"{split_file} does not exist; run `sftmix-ray split` first")
    made_for = (pq.read_schema(split_file).metadata or {}).get(RATIO_METADATA_KEY)
    # A split without the key is a user's own; ours must match the config being trained.
    if made_for is not None and float(made_for) != ratio:
        raise SftmixError(
            f"{split_file} was made with split.ratio={float(made_for)} but this config has "
            f"split.ratio={ratio}; rerun `sftmix-ray split` with this config first"
        )
    ids = pq.read_table(split_file, columns=["example_id"]).column("example_id")
    return data.filter(pc.is_in(data.column("example_id"), value_set=ids.combine_chunks()))


def run_name(cfg: Config, mode: str, export_name: str, rows: dict[str, str], out: Path) -> str:
    """The Ray Train run's name: the same for a rerun that would train the same weights in the
    same checkpoint layout (it resumes from the run's checkpoints), new for any change of what
    the weights depend on or of the rows of a stream (`rows`: stream -> digest of its ids).
    Logging, sinks, eval and checkpoint cadence, storage and retries are left out.

    What the weights depend on includes the model and the corpus with its tokenization
    (`prepare_reads`: the ids alone are row numbers, the same for two corpora of one size),
    and the run directory `out`: the recipes share one `train.storage_path`, where two
    experiments of one config in two OUTs must not resume (or clean up) each other's runs."""
    from sftmix_ray.stages import prepare_reads, training_reads, training_topology

    key = {
        "mode": mode,
        "export": export_name,
        "reads": training_reads(cfg, mode),
        "corpus_and_model": prepare_reads(cfg),
        "topology": training_topology(cfg),
        "rows": rows,
        "out": str(out.resolve()),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return f"{mode}-{digest[:10]}"


def _remove_stale_exports(run: RunDir, steps: list[int]) -> tuple[int, list[Path]]:
    """Remove the HF checkpoints `score` would read (`list_checkpoints`) that this reference
    run did not export: a run with another C, length or corpus exported other steps, and
    `score` would average them in with this run's. Returns how many went, and the
    checkpoints kept (by step)."""
    import shutil

    from sftmix_ray.scoring import list_checkpoints

    found = list_checkpoints(run)
    if not steps:  # a history from before this was recorded: nothing to tell stale by
        return 0, [path for _, path in found]
    exported = set(steps)
    stale = [path for step, path in found if step not in exported]
    for path in stale:
        shutil.rmtree(path)
    return len(stale), [path for step, path in found if step in exported]


def _torch_threads(cfg: Config) -> int:
    """A cap on each worker's threads: its share of a local cluster's `ray.num_cpus`; 0 leaves
    it to the worker (its share of its own node's CPUs, `loop.worker_threads`). Not the
    driver's CPU count: on a cluster the driver's machine is not the workers'."""
    return max(1, cfg.ray.num_cpus // cfg.train.num_workers) if cfg.ray.num_cpus else 0


ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def _worker_env(cfg: Config) -> dict[str, str]:
    """Environment for the training workers."""
    from sftmix_ray.train.loop import FAULT_ENV, HOLD_ENV

    env = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Ray Train's print patch logs every print and, once a library has wrapped sys.stdout,
    # prints it too: the driver then got each progress-bar update twice, and the second copy
    # of the "closed" one made the bar again, never closed. A long-lived driver (a sweep, a
    # pipeline) redrew every finished run's bar at each update. The loop logs through
    # `logging`, which the patch does not touch.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    if not cfg.train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    else:  # variable-length batches fragment the caching allocator (a user's value wins)
        env[ALLOC_CONF] = os.environ.get(ALLOC_CONF, "expandable_segments:True")
    for hook in (FAULT_ENV, HOLD_ENV):  # the reliability tests' hooks
        if os.environ.get(hook):
            env[hook] = os.environ[hook]
    return env


def build_spec(
    cfg: Config, out_dir: Path | RunDir, mode: str, export_name: str = RunDir.MODEL
) -> RunSpec:
    """The run spec every worker of a `mode` ("reference" or "train") run receives."""
    from sftmix_ray.data.retokenize import reference_model_path
    from sftmix_ray.modeling import resolve_model_path

    run = RunDir(RunDir.of(out_dir).root.resolve())
    train = cfg.train
    chunking = {"chunk_size": train.loss_chunk_size, "chunk_mb": train.loss_chunk_mb}
    ntp = LossSpec("ntp", chunking)
    if mode == "reference":
        model_path = reference_model_path(cfg, run)
        if cfg.reference.learning_rate:
            train = dataclasses.replace(train, learning_rate=cfg.reference.learning_rate)
        streams: tuple[str, ...] = ("data",)
        loss = ntp
        ref = cfg.reference
        epochs, max_steps = ref.num_train_epochs, ref.max_steps
        if ref.checkpoints_at == "epochs":  # C epochs, a checkpoint at the end of each
            epochs, max_steps = float(ref.num_checkpoints), -1
        export_count, export_dir, final_export = ref.num_checkpoints, run.reference, None
        adapter_export = None  # reference checkpoints are merged HF models, as the scorer reads
    else:
        model_path = resolve_model_path(cfg.model.name_or_path, run)
        mixup = cfg.mixup
        loss = ntp
        if mixup.mu > 0:
            keys = ("alpha", "mu", "lambda_per", "align", "ntp_weight")
            kwargs = {k: getattr(mixup, k) for k in keys}
            loss = LossSpec("sftmix", {**kwargs, **chunking})
        # NTP and random pairing sample the whole corpus; SFTMix pairs confident/unconfident.
        uniform = mixup.mu == 0 or mixup.pairing == "random"
        streams = ("data",) if uniform else ("confident", "unconfident")
        epochs, max_steps = train.num_train_epochs, train.max_steps
        export_count, export_dir = 0, run.model(export_name)
        lora = train.lora.r > 0
        final_export = str(export_dir) if not lora or train.lora.merge else None
        adapter_export = str(run.adapter(export_name)) if lora else None
    return RunSpec(
        mode=mode,  # type: ignore[arg-type]
        train=train,
        loss=loss,
        streams=streams,
        model_path=model_path,
        tokenizer_path=model_path,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
        num_train_epochs=epochs,
        max_steps=max_steps,
        export_count=export_count,
        export_at=cfg.reference.checkpoints_at if mode == "reference" else "even",
        export_dir=str(export_dir),
        final_export=final_export,
        adapter_export=adapter_export,
        heldout=run.heldout.exists(),
        torch_threads=_torch_threads(cfg),
        history_path=str(run.history(mode, export_name)),
        starts_path=str(run.starts(mode, export_name)),
        tensorboard_dir=str(run.tensorboard(mode, export_name)),
    )


def storage_uri(path: str) -> str:
    """A local path made absolute; a URI (s3://, gs://, file://...) passed on to Ray Train's
    pyarrow filesystem layer unchanged."""
    return path if "://" in path else str(Path(path).resolve())


def mlflow_settings(
    cfg: Config, out_dir: Path | RunDir, run_key: str, run_name: str
) -> dict[str, Any]:
    """Where and under which names rank 0 logs to MLflow (config, then MLflow's env vars)."""
    from sftmix_ray.config import redacted
    from sftmix_ray.train.reporting import flat_params

    uri = cfg.train.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:  # MLflow 3 retired the file store; a local SQLite file is its default
        db_dir = RunDir.of(out_dir).mlruns.resolve()
        db_dir.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db_dir / 'mlflow.db'}"
    experiment = (
        cfg.train.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "sftmix-ray"
    )
    return {
        "tracking_uri": uri,
        "experiment": experiment,
        "run_key": run_key,
        "run_name": run_name,
        "params": flat_params(redacted(cfg.to_dict())),
    }


def wandb_settings(
    cfg: Config, out_dir: Path | RunDir, run_key: str, run_name: str
) -> dict[str, Any]:
    """Where and under which names rank 0 logs to Weights & Biases (config, then W&B's env).

    The run id is derived from the Ray Train run's name and OUT, so a restarted worker group
    or a rerun of the same command logs into the same W&B run, and two run directories with
    the same config do not share one. The API key is never here: wandb reads WANDB_API_KEY
    from the workers' environment (a Kubernetes Secret on KubeRay).
    """
    from sftmix_ray.config import redacted
    from sftmix_ray.train.reporting import flat_params

    run = RunDir.of(out_dir)
    train = cfg.train
    where = str(run.root.resolve())
    digest = hashlib.sha256(f"{where}\0{run_key}".encode()).hexdigest()[:12]
    return {
        "project": train.wandb_project or os.environ.get("WANDB_PROJECT") or "sftmix-ray",
        "entity": train.wandb_entity or os.environ.get("WANDB_ENTITY"),
        "mode": train.wandb_mode or os.environ.get("WANDB_MODE") or "online",
        "tags": list(train.wandb_tags),
        "dir": str(run.wandb.resolve()),
        "id": f"{run_key}-{digest}",
        "name": run_name,
        "params": flat_params(redacted(cfg.to_dict())),
    }


def _fit(trainer: Any, mode: str) -> Any:
    """`trainer.fit()`, with Ctrl+C surfacing as KeyboardInterrupt like in every other stage.

    Ray Train installs its own SIGINT handler in `fit()`: it aborts the run gracefully, then
    raises `SystemExit(0)`, and stays installed afterwards. We keep the graceful abort, turn the
    exit into KeyboardInterrupt (the stage is marked interrupted, the CLI exits 130) and put the
    previous handler back so later stages can be interrupted too.
    """
    import ray.train

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise SftmixError(f"{mode} training failed: {exc}") from None
    except SystemExit:
        raise KeyboardInterrupt(f"{mode} training aborted by SIGINT") from None
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def run_training(
    cfg: Config,
    out_dir: Path | RunDir,
    mode: str,
    export_name: str = RunDir.MODEL,
    callbacks: list[Any] | None = None,
) -> dict:
    """Run the reference or SFTMix training with Ray Train; returns the stage summary.

    `callbacks` are Ray Train `UserCallback`s for the run (a Tune sweep passes its reporter).
    Once it has exported, the run removes its resume checkpoints (the reference run always;
    a `train` run unless `train.keep_resume_checkpoints`).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from sftmix_ray.data.retokenize import build_reference_data, needs_retokenize
    from sftmix_ray.train.loop import train_loop_per_worker

    run = RunDir.of(out_dir)
    spec = build_spec(cfg, run, mode, export_name)
    data_dir, heldout_dir, retokenized = run.data, run.heldout, None
    if mode == "reference" and needs_retokenize(cfg, run):  # another tokenizer's ids
        retokenized = build_reference_data(cfg, run)
        source = RunDir(run.reference_data)
        data_dir, heldout_dir = source.data, source.heldout
    # The driver reads example ids only (for the run's name and the split checks); every
    # worker memory-maps the token columns from a node-local cache (`train.token_rows`).
    data = _read_table(data_dir, ["example_id"])
    tables: dict[str, Any] = {}
    sources: list[tuple[str, str | None]] = []
    if spec.streams == ("data",):
        tables["data"] = data
        sources.append((str(data_dir.resolve()), None))
    else:
        for side in ("confident", "unconfident"):
            tables[side] = _subset(data, run.split_file(side), cfg.split.ratio)
            sources.append((str(data_dir.resolve()), str(run.split_file(side).resolve())))
    if spec.heldout:
        tables["heldout"] = _read_table(heldout_dir, ["example_id"])
    spec = dataclasses.replace(
        spec,
        sources=tuple(sources),
        heldout_source=str(heldout_dir.resolve()) if spec.heldout else None,
    )
    storage = storage_uri(cfg.train.storage_path or str(run.ray_storage))
    # A rerun of the same run resumes from its checkpoints, while a new split or corpus
    # starts a fresh run.
    rows = {
        k: hashlib.sha256(t.column("example_id").to_numpy().tobytes()).hexdigest()
        for k, t in tables.items()
    }
    name = run_name(cfg, mode, export_name, rows, run.root)
    mlflow = None
    if "mlflow" in cfg.train.report_to:
        mlflow = mlflow_settings(cfg, run, name, f"{mode}-{export_name}")
    wandb = None
    if "wandb" in cfg.train.report_to:
        wandb = wandb_settings(cfg, run, name, f"{mode}-{export_name}")
    spec = dataclasses.replace(spec, run_name=name, mlflow=mlflow, wandb=wandb)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        # The process-group timeout covers the longest wait of one rank on another: rank 0
        # writing an exported HF checkpoint (tens of GB at 8B) while the others already sit in
        # the next step's collective. NCCL's watchdog kills the run past it.
        torch_config=TorchConfig(
            backend="nccl" if cfg.train.use_gpu else "gloo",
            timeout_s=cfg.train.collective_timeout_s,
        ),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=None if cfg.train.use_gpu else {"CPU": 1},
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.save_total_limit),
            worker_runtime_env={"env_vars": _worker_env(cfg)},
            callbacks=callbacks,
        ),
    )
    result = _fit(trainer, mode)
    history = json.loads(Path(spec.history_path).read_text(encoding="utf-8"))
    last = history["history"][-1] if history["history"] else {}
    if history.get("stopped"):  # its resume checkpoints stay: a rerun goes on from the last
        raise SftmixError(
            f"{mode} training stopped at step {int(last.get('step', 0))}: {history['stopped']}"
        )
    removed = 0
    if mode == "reference" or not cfg.train.keep_resume_checkpoints:
        # Its HF checkpoints or model are exported: the resume state (optimizer included,
        # ~96 GB per save at 8B) is of no further use, and a 1 TiB volume held ~5 such runs.
        from sftmix_ray.train.checkpointing import delete_checkpoints

        try:
            removed = delete_checkpoints(str(storage), name)
        except OSError as exc:  # the run is exported: its resume state is only disk now
            log.warning("%s/%s: could not remove the run's resume checkpoints (%s); remove "
                        "that directory to free its space", storage, name, exc)  # fmt: skip
    summary: dict[str, Any] = {
        "steps": int(last.get("step", 0)),
        "restarts": history["restarts"],
        "nodes": history["nodes"],
        # A non-finite value (a skipped step's norm, no held-out rows) is written as null.
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, float)},
        "run_name": name,
        "storage_path": str(storage),
        "resume_checkpoints_removed": removed,
        # Steps whose gradient was not finite: not applied; each with its rows' example_ids.
        "skipped_steps": history.get("skipped_steps", []),
    }
    if wandb:
        summary["wandb_run_id"] = wandb["id"]
    if retokenized:
        summary["retokenized"] = retokenized
    if mode == "reference":
        stale, kept = _remove_stale_exports(run, history.get("export_steps", []))
        summary["stale_checkpoints_removed"] = stale
        summary["checkpoints"] = [str(p) for p in kept]  # by step
    else:
        summary["model_dir"] = spec.final_export
        if spec.adapter_export:
            summary["adapter_dir"] = spec.adapter_export
    return summary
