"""Metric sinks on rank 0: TensorBoard, MLflow and Weights & Biases (when configured) and a
progress bar.

The loop calls `log(step, metrics)` every step and `close()` at the end; which sinks exist is
read from `train.report_to` in the run spec. Sinks only run on rank 0: other ranks pay nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sftmix_ray.train.spec import RunSpec

log = logging.getLogger(__name__)

MLFLOW_RUN_TAG = "sftmix.run_key"


class MetricSinks:
    """Fan-out of per-step metrics to the configured sinks (rank 0 only)."""

    def __init__(self, spec: RunSpec, rank: int, start_step: int, total_steps: int):
        self.prefix = spec.mode
        self.sinks: list[Any] = []
        if rank != 0:
            return
        report_to = spec.train.report_to
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.sinks.append(_TensorBoard(SummaryWriter(log_dir=spec.tensorboard_dir)))
        if "mlflow" in report_to:
            self.sinks.append(_MLflow(spec))
        if "wandb" in report_to:
            self.sinks.append(_WandB(spec))
        if spec.train.progress_bar:
            self.sinks.append(_Progress(self.prefix, start_step, total_steps))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(self.prefix, step, metrics)

    def replay(self, history: list[dict[str, float]]) -> None:
        """After a restart from a checkpoint: the steps before it, to the sinks that may have
        lost them (W&B buffers in a helper process that dies with a killed worker)."""
        for sink in self.sinks:
            if hasattr(sink, "replay"):
                sink.replay(self.prefix, history)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class _TensorBoard:
    def __init__(self, writer: Any):
        self.writer = writer

    def log(self, prefix: str, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    """One MLflow run per training run; a restarted worker group continues the same run."""

    def __init__(self, spec: RunSpec):
        try:
            import mlflow
        except ImportError as exc:  # config validation cannot see the worker's environment
            raise RuntimeError(
                "train.report_to includes 'mlflow' but mlflow is not installed on the workers: "
                "pip install 'sftmix-ray[mlflow]' (or add mlflow to the runtime_env)"
            ) from exc
        cfg = spec.mlflow
        if cfg is None:
            raise RuntimeError("train.report_to includes 'mlflow' but the run has no settings")
        self.client = mlflow.MlflowClient(tracking_uri=cfg["tracking_uri"])
        experiment = self.client.get_experiment_by_name(cfg["experiment"])
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(cfg["experiment"])
        )
        # The run key is the Ray Train run name: a rerun or restart of the same run logs into
        # the MLflow run it started instead of opening a new one.
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{MLFLOW_RUN_TAG}` = '{cfg['run_key']}'"
        )
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                experiment_id, run_name=cfg["run_name"], tags={MLFLOW_RUN_TAG: cfg["run_key"]}
            )
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in sorted(cfg["params"].items())]
            for i in range(0, len(params), 100):  # MLflow's batch limit is 100 params
                self.client.log_batch(self.run_id, params=params[i : i + 100])

        # Off the step's critical path: a tracking server's round trip per step would stall
        # rank 0, and every other rank with it at the next collective.
        self.writer = _Background("mlflow")

    def log(self, prefix: str, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [Metric(f"{prefix}/{k}", float(v), now, step) for k, v in metrics.items()]
        self.writer.submit(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def close(self) -> None:
        self.writer.close()  # every step logged (or the first error raised) before finishing
        self.client.set_terminated(self.run_id, status="FINISHED")


class _Background:
    """One thread that runs submitted calls in order; `close` waits for them and raises the
    first error any of them raised (a metric sink that fails fails the run, late)."""

    def __init__(self, name: str) -> None:
        import queue
        import threading

        self._queue: queue.Queue[Any] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"sink-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (call := self._queue.get()) is not None:
            if self._error is None:
                try:
                    call()
                except Exception as exc:  # kept for close(): the training step goes on
                    self._error = exc

    def submit(self, call: Any) -> None:
        if self._error is not None:
            raise RuntimeError(f"a metric sink failed: {self._error}") from self._error
        self._queue.put(call)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"a metric sink failed: {self._error}") from self._error


class _WandB:
    """One W&B run per training run; a restarted worker group resumes the same run id."""

    def __init__(self, spec: RunSpec):
        from sftmix_ray.extras import require

        wandb = require("wandb", "train.report_to: wandb")
        cfg = spec.wandb
        if cfg is None:
            raise RuntimeError("train.report_to includes 'wandb' but the run has no settings")
        Path(cfg["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg["project"],
            entity=cfg["entity"],
            id=cfg["id"],
            name=cfg["name"],
            tags=cfg["tags"] or None,
            dir=cfg["dir"],
            mode=cfg["mode"],
            resume="allow",
            config=cfg["params"],  # redacted on the driver
            # No console capture (worker output may hold anything) and no code snapshot.
            settings=wandb.Settings(console="off", save_code=False, silent=True),
        )

    def log(self, prefix: str, step: int, metrics: dict[str, float]) -> None:
        # A step below the run's last (re-run after a restart from an earlier checkpoint) is
        # dropped by W&B: the first value of each step stays.
        self.run.log({f"{prefix}/{k}": float(v) for k, v in metrics.items()}, step=step)

    def replay(self, prefix: str, history: list[dict[str, float]]) -> None:
        """The restored steps this run does not have yet: all of them in a new offline file,
        those after the server's last step for a resumed online run (`run.step`)."""
        for metrics in history:
            step = int(metrics["step"])
            if step >= self.run.step:
                self.log(prefix, step, metrics)

    def close(self) -> None:
        self.run.finish()


class _Progress:
    """A progress bar rendered on the driver (Ray's distributed tqdm)."""

    def __init__(self, prefix: str, start_step: int, total_steps: int):
        from ray.experimental.tqdm_ray import tqdm

        self.bar = tqdm(desc=prefix, total=total_steps, unit="step")
        self.bar.update(start_step)

    def log(self, prefix: str, step: int, metrics: dict[str, float]) -> None:
        loss = metrics.get("loss")
        if loss is not None:
            self.bar.set_description(f"{prefix} loss={loss:.4f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted `section.key -> str(value)` pairs of a (redacted) config dict, for run params."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = str(value)[:500]  # MLflow caps param values
    return out
