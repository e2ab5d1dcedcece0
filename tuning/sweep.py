"""`sftmix-ray tune`: Ray Tune sweeps over SFTMix training (+ the confidence split).

Train V2 style: a `Tuner` over a driver function. Each trial's driver applies the trial's params
to the Config, recomputes the split from OUT/scores into its own directory when `split.ratio` is
swept (no rescoring), and fits a `TorchTrainer` whose reports reach Tune through
`TuneReportCallback`. The driver holds no CPU (its Ray Train workers hold theirs).

    OUT/tune/ray/               the Tune experiment (restored when a sweep is rerun)
    OUT/tune/trials/<trial_id>/ one trial's own split/, model/, logs/, Ray Train storage,
                                config.yaml, and links to OUT's data/, heldout/, base_model/
    OUT/tune/results.csv|.parquet, best_config.yaml, metric_vs_params.png
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from sftmix_ray.config import Config, save_config
from sftmix_ray.errors import ConfigError, SftmixError
from sftmix_ray.io_utils import atomic_write_json, ensure_writable_dir
from sftmix_ray.summary import read_summary, update_stage
from sftmix_ray.tune_space import Domain, apply_params, load_space

log = logging.getLogger(__name__)

TUNE_DIR = "tune"
EXPERIMENT = "ray"  # OUT/tune/ray: Tune's experiment directory
TRIALS_DIR = "trials"
RESULTS = "results"  # results.csv and results.parquet
BEST_CONFIG = "best_config.yaml"
PLOT = "metric_vs_params.png"
SWEEP_FILE = "sweep.json"  # what the sweep in OUT/tune/ray was started with
ATTEMPTS_FILE = "attempts.json"  # one entry per start of a trial's driver
LINKED_INPUTS = ("data", "heldout", "base_model")
DRIVER_MEMORY = 256 * 1024**2  # bytes reserved for a 0-CPU driver (Ray needs some resource)
IDENTITY_KEYS = ("search", "scheduler", "metric", "mode", "num_samples", "seed")  # tune.*
STATUS_ORDER = ("TERMINATED", "ERROR", "RUNNING", "PAUSED", "PENDING")


class SweepInterrupted(SftmixError):
    """The sweep stopped before every trial finished; rerunning the command resumes it."""


# ---------------------------------------------------------------------------------------------
# Trial side


def _trial_dirname(trial: Any) -> str:
    """Tune's directory for a trial: its id (params live in results.csv, not in paths)."""
    return f"trial_{trial.trial_id}"


def _link(source: Path, target: Path) -> None:
    """`target` -> `source` (a symlink), unless it already points there."""
    if target.is_symlink() and target.resolve() == source.resolve():
        return
    if target.is_symlink() or target.is_file():
        target.unlink()
    target.symlink_to(source, target_is_directory=source.is_dir())


def _record_attempt(trial_out: Path) -> int:
    """Append this start of the driver to attempts.json; returns the attempt number."""
    path = trial_out / ATTEMPTS_FILE
    attempts = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    attempts.append({"started": time.time(), "pid": os.getpid()})
    atomic_write_json(path, attempts)
    return len(attempts)


class MetricReportCallback(TuneReportCallback):
    """A TuneReportCallback that forwards only the reports holding the sweep's metric.

    Tune checks that every result carries the metric it optimizes, while the loop also reports
    plain training steps; the held-out evals (every `train.eval_steps` and at the end) do.
    """

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def trial_driver(
    params: dict[str, Any], *, base: dict[str, Any], out_dir: str, recompute_split: bool
) -> None:
    """One trial: params -> Config, the trial's own split and run directory, a TorchTrainer."""
    from ray import tune

    from sftmix_ray.split import run_split
    from sftmix_ray.train.launch import run_training

    cfg = apply_params(base, params)
    trial_id = tune.get_context().get_trial_id()
    out = Path(out_dir)
    trial_out = out / TUNE_DIR / TRIALS_DIR / trial_id
    trial_out.mkdir(parents=True, exist_ok=True)
    attempt = _record_attempt(trial_out)
    log.info("trial %s (attempt %d): %s", trial_id, attempt, params)
    save_config(cfg, trial_out / "config.yaml")
    for name in LINKED_INPUTS:
        if (out / name).exists():
            _link(out / name, trial_out / name)
    if recompute_split or "split.ratio" in params:
        _link(out / "scores", trial_out / "scores")
        run_split(cfg, trial_out)
    else:
        _link(out / "split", trial_out / "split")
    # Own Ray Train storage per trial: two trials with equal params must not share a run.
    storage = (
        f"{cfg.train.storage_path.rstrip('/')}/tune/{trial_id}"
        if cfg.train.storage_path
        else str(trial_out / "ray_storage")
    )
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, storage_path=storage))
    summary = run_training(
        run_cfg, trial_out, "train", callbacks=[MetricReportCallback(cfg.tune.metric)]
    )
    atomic_write_json(trial_out / "result.json", {"attempt": attempt, **summary})


# ---------------------------------------------------------------------------------------------
# Driver side: building the Tuner


def _require_train_v2() -> None:
    try:
        from ray.train.v2._internal.constants import is_v2_enabled
    except ImportError:  # pragma: no cover - Ray without Train V2
        raise SftmixError("sftmix-ray tune needs Ray Train V2 (Ray >= 2.50)") from None
    if not is_v2_enabled():
        raise SftmixError(
            "sftmix-ray tune needs Ray Train V2: unset RAY_TRAIN_V2_ENABLED=0 "
            "(TuneReportCallback reports from V2 runs only)"
        )


def _search_alg(cfg: Config) -> Any:
    from ray.tune.search import BasicVariantGenerator

    if cfg.tune.search != "optuna":
        # Tune ignores TuneConfig.max_concurrent_trials for a generator passed in: set it here.
        return BasicVariantGenerator(
            random_state=cfg.tune.seed, max_concurrent=cfg.tune.max_concurrent_trials
        )
    try:
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.tune.seed)
    except (ImportError, AssertionError):
        raise ConfigError(
            "config key 'tune.search' = 'optuna' needs the optuna package: "
            "pip install 'sftmix-ray[optuna]' (or use tune.search=random|grid)"
        ) from None


def _scheduler(cfg: Config) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    grace = cfg.tune.grace_period or cfg.train.eval_steps or 1
    # Rungs are counted in optimizer steps (the loop's `step`), so eval_steps sets how often
    # ASHA can compare trials; with train.eval_steps=0 it sees one eval, at the end.
    max_t = cfg.train.max_steps if cfg.train.max_steps > 0 else 10**9
    return ASHAScheduler(time_attr="step", max_t=max_t, grace_period=min(grace, max_t))


def _trial_resources(cfg: Config) -> dict[str, float]:
    """What Tune reserves for a trial's driver: no CPU by default (Ray Train reserves workers)."""
    if cfg.tune.driver_cpus > 0:
        return {"CPU": cfg.tune.driver_cpus}
    # A placement group bundle cannot be empty; memory alone keeps every CPU for the workers.
    return {"CPU": 0, "memory": DRIVER_MEMORY}


def sweep_identity(cfg: Config, domains: list[Domain]) -> dict[str, Any]:
    """What makes two sweeps the same one (so a rerun resumes it rather than mixing runs)."""
    base = cfg.to_dict()
    tune_cfg = base.pop("tune")
    base.pop("ray")
    identity = {
        "config_sha": hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:16],
        "space": {d.key: dataclasses.asdict(d) for d in domains},
        **{k: tune_cfg[k] for k in IDENTITY_KEYS},
    }
    return json.loads(json.dumps(identity))  # as stored in sweep.json (tuples -> lists)


def _check_same_sweep(tune_dir: Path, identity: dict[str, Any]) -> None:
    path = tune_dir / SWEEP_FILE
    if not path.exists():
        return
    stored = json.loads(path.read_text(encoding="utf-8"))["identity"]
    changed = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
    if changed:
        raise ConfigError(
            f"{tune_dir / EXPERIMENT} holds a sweep started with a different "
            f"{', '.join(changed)}; rerun it with the same config to resume it, or move "
            f"{tune_dir} away (or pick another --output-dir) to start a new sweep"
        )


def expected_trials(cfg: Config, domains: list[Domain]) -> int:
    """How many trials the sweep makes: num_samples, times every grid axis under grid search."""
    total = cfg.tune.num_samples
    for domain in domains:
        if domain.kind == "grid" or (domain.kind == "choice" and cfg.tune.search == "grid"):
            total *= len(domain.values)
    return total


def _split_is_current(out: Path, ratio: float) -> bool:
    """Whether OUT/split exists and was made with `ratio` (per OUT/summary.json)."""
    stage = read_summary(out)["stages"].get("split", {})
    return (out / "split").is_dir() and stage.get("ratio", ratio) == ratio


def _check_inputs(cfg: Config, out: Path, recompute_split: bool) -> None:
    """Fail before any trial when a stage the sweep reads has not run."""
    if not (out / "data").exists():
        raise SftmixError(f"{out / 'data'} does not exist; run `sftmix-ray prepare` first")
    if recompute_split and not (out / "scores").exists():
        raise SftmixError(
            f"{out / 'scores'} does not exist; sweeping split.ratio recomputes the split from "
            "the scores: run `sftmix-ray score` first"
        )
    if cfg.tune.metric.startswith("eval_") and not (out / "heldout").exists():
        raise SftmixError(
            f"tune.metric={cfg.tune.metric} needs held-out data, and {out / 'heldout'} does not "
            "exist; set data.eval_path or data.eval_fraction and rerun `sftmix-ray prepare`"
        )


def _build_tuner(
    cfg: Config, out: Path, domains: list[Domain], recompute_split: bool, callbacks: list | None
) -> tuple[Any, bool]:
    """A fresh Tuner, or the one restored from OUT/tune/ray; returns (tuner, resumed)."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(
            trial_driver, base=cfg.to_dict(), out_dir=str(out), recompute_split=recompute_split
        ),
        _trial_resources(cfg),
    )
    experiment = out / TUNE_DIR / EXPERIMENT
    if tune.Tuner.can_restore(str(experiment)):
        log.info("resuming the sweep in %s (finished trials are kept)", experiment)
        tuner = tune.Tuner.restore(
            str(experiment), trainable, resume_unfinished=True, resume_errored=True
        )
        return tuner, True
    tuner = tune.Tuner(
        trainable,
        param_space={d.key: d.to_tune(cfg.tune.search) for d in domains},
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            search_alg=_search_alg(cfg),
            scheduler=_scheduler(cfg),
            num_samples=cfg.tune.num_samples,
            # Optuna is wrapped in a ConcurrencyLimiter; the generator limits itself.
            max_concurrent_trials=(
                cfg.tune.max_concurrent_trials if cfg.tune.search == "optuna" else None
            ),
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(out / TUNE_DIR),
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
            callbacks=callbacks,
        ),
    )
    return tuner, False


# ---------------------------------------------------------------------------------------------
# Results


def _short_error(text: str | None) -> str | None:
    """The last line of a traceback that names the exception (the whole message if shorter)."""
    if not text:
        return None
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if ":" in ln and not ln.startswith(("File ", "^", "~"))]
    return (named[-1] if named else lines[-1])[:1000]


def _trials(grid: Any, experiment: Path) -> list[Any]:
    """The sweep's Tune trials as the run left them.

    The ResultGrid's analysis holds the controller's own trials; experiment_state.json can
    lag behind them (Ray 2.60 may leave a trial that errored on its last retry as RUNNING).
    """
    analysis = getattr(grid, "_experiment_analysis", None)
    if analysis is None:  # pragma: no cover - a Ray without it: read the saved state
        from ray.tune import ExperimentAnalysis

        analysis = ExperimentAnalysis(str(experiment))
    return list(analysis.trials)


def _trial_rows(trials: list[Any], keys: list[str], metric: str, out: Path) -> list[dict]:
    """One row per trial: id, status, params, last reported metrics, error, attempts."""
    rows = []
    for trial in trials:
        last = trial.last_result or {}
        trial_out = out / TUNE_DIR / TRIALS_DIR / trial.trial_id
        attempts_file = trial_out / ATTEMPTS_FILE
        attempts = json.loads(attempts_file.read_text()) if attempts_file.exists() else []
        error = trial.get_error() if trial.status == "ERROR" else None
        row: dict[str, Any] = {"trial_id": trial.trial_id, "status": trial.status}
        row.update({key: trial.config.get(key) for key in keys})
        row.update(
            {
                metric: last.get(metric),
                "step": last.get("step"),
                "loss": last.get("loss"),
                "reports": last.get("training_iteration"),
                "time_total_s": last.get("time_total_s"),
                "attempts": len(attempts),
                "tune_failures": trial.num_failures,
                "train_restarts": last.get("restarts"),
                "error": _short_error(str(error)) if error else None,
                "trial_dir": str(trial_out),
            }
        )
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def _frame(rows: list[dict], keys: list[str]) -> Any:
    """The rows as a DataFrame whose columns Parquet can hold (one type per column)."""
    import pandas as pd

    from sftmix_ray.tune_space import is_finite_number

    frame = pd.DataFrame(rows)
    for key in keys:
        values = [v for v in frame[key] if v is not None]
        numeric = values and all(is_finite_number(v) for v in values)
        frame[key] = frame[key].astype(float) if numeric else frame[key].astype("string")
    return frame


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The finished trial with the best last-reported metric (ties: lowest trial id)."""
    done = [
        r for r in rows
        if r["status"] == "TERMINATED" and isinstance(r[metric], (int, float))
        and math.isfinite(r[metric])
    ]  # fmt: skip
    if not done:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(done, key=lambda r: (sign * r[metric], r["trial_id"]))


def plot_metric_vs_params(
    rows: list[dict], domains: list[Domain], metric: str, best: dict | None, path: Path
) -> Path:
    """One panel per swept param: the metric of every finished trial against its value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sftmix_ray.tune_space import is_finite_number

    swept = [d for d in domains if d.kind != "fixed"] or domains
    fig = Figure(figsize=(4.2 * len(swept), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(swept), squeeze=False)[0]
    scored = [r for r in rows if is_finite_number(r.get(metric))]
    for ax, domain in zip(axes, swept):
        values = [r[domain.key] for r in scored]
        numeric = all(is_finite_number(v) for v in values)
        labels = sorted({str(v) for v in values})
        xs = [v if numeric else labels.index(str(v)) for v in values]
        ax.scatter(xs, [r[metric] for r in scored], c="tab:blue", alpha=0.7, label="trial")
        if best is not None:
            bx = best[domain.key] if numeric else labels.index(str(best[domain.key]))
            ax.scatter([bx], [best[metric]], marker="*", s=220, c="tab:red", label="best")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        elif domain.log_scale:
            ax.set_xscale("log")
        ax.set(xlabel=domain.key, ylabel=metric, title=f"{metric} vs {domain.key}")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------------------------------------
# Entry point


def run_tune(cfg: Config, out_dir: Path, callbacks: list | None = None) -> dict[str, Any]:
    """Sweep the space in `tune.space` over OUT's prepared and scored data; resume if stopped.

    Writes OUT/tune/results.{csv,parquet}, best_config.yaml and metric_vs_params.png, and
    returns a summary. `callbacks` are extra Ray Tune callbacks for the experiment.
    """
    from sftmix_ray.ray_utils import init_ray

    out = Path(out_dir).resolve()
    tune_dir = ensure_writable_dir(out / TUNE_DIR)
    domains = load_space(cfg.tune.space, cfg.to_dict())
    keys = [d.key for d in domains]
    recompute_split = "split.ratio" in keys or not _split_is_current(out, cfg.split.ratio)
    _check_inputs(cfg, out, recompute_split)
    identity = sweep_identity(cfg, domains)
    _check_same_sweep(tune_dir, identity)
    init_ray(cfg.ray)
    _require_train_v2()
    tuner, resumed = _build_tuner(cfg, out, domains, recompute_split, callbacks)
    if not resumed:
        atomic_write_json(tune_dir / SWEEP_FILE, {"identity": identity})
    save_config(cfg, tune_dir / "config.yaml")
    update_stage(out, "tune", status="running")
    start = time.time()
    try:
        grid = tuner.fit()
        trials = _trials(grid, tune_dir / EXPERIMENT)
        rows = _trial_rows(trials, keys, cfg.tune.metric, out)
    except BaseException as exc:
        update_stage(out, "tune", status="failed", error=str(exc) or type(exc).__name__)
        raise
    frame = _frame(rows, keys)
    frame.to_csv(tune_dir / f"{RESULTS}.csv", index=False)
    frame.to_parquet(tune_dir / f"{RESULTS}.parquet", index=False)
    best = best_row(rows, cfg.tune.metric, cfg.tune.mode)
    plot = plot_metric_vs_params(rows, domains, cfg.tune.metric, best, tune_dir / PLOT)
    counts = {s.lower(): sum(r["status"] == s for r in rows) for s in STATUS_ORDER}
    # Trials are created as they start, so an interrupted sweep may hold fewer rows than it
    # will: count the trials it makes, not the rows.
    total = max(expected_trials(cfg, domains), len(rows))
    summary: dict[str, Any] = {
        "trials": total,
        **{k: v for k, v in counts.items() if v or k in ("terminated", "error")},
        "resumed": resumed,
        "metric": cfg.tune.metric,
        "mode": cfg.tune.mode,
        "results": str(tune_dir / f"{RESULTS}.csv"),
        "plot": str(plot),
        "experiment_path": str(tune_dir / EXPERIMENT),
        "seconds": round(time.time() - start, 2),
    }
    unfinished = total - counts["terminated"] - counts["error"]
    if unfinished:
        update_stage(out, "tune", status="interrupted", **summary)
        message = (
            f"sweep interrupted with {unfinished} of {total} trials unfinished; "
            "rerun the same command to finish them"
        )
        log.warning(message)
        raise SweepInterrupted(message)
    if best is None:
        update_stage(out, "tune", status="failed", **summary)
        raise SftmixError(
            f"no trial finished with a finite {cfg.tune.metric}; see {summary['results']} "
            "for each trial's status and error"
        )
    best_cfg = apply_params(cfg.to_dict(), {k: best[k] for k in keys})
    save_config(best_cfg, tune_dir / BEST_CONFIG)
    summary["best"] = {
        "trial_id": best["trial_id"],
        cfg.tune.metric: best[cfg.tune.metric],
        "params": {k: best[k] for k in keys},
        "model_dir": str(Path(best["trial_dir"]) / "model"),
    }
    summary["best_config"] = str(tune_dir / BEST_CONFIG)
    # OUT/split holds the split of the base ratio: a swept ratio needs its own split first.
    args = f"--config {tune_dir / BEST_CONFIG} --output-dir {out}"
    stages = ("split", "train") if "split.ratio" in keys else ("train",)
    summary["next"] = " && ".join(f"sftmix-ray {stage} {args}" for stage in stages)
    update_stage(out, "tune", status="completed", **summary)
    if counts["error"]:
        log.warning("%d of %d trials failed; their errors are in %s", counts["error"],
                    len(rows), summary["results"])  # fmt: skip
    return summary
