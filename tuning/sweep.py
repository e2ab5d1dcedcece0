"""`sftmix-ray tune`: Ray Tune sweeps over SFTMix training (+ the confidence split).

Train V2 style: a `Tuner` over a driver function. Each trial's driver applies the trial's params
to the Config, recomputes the split from OUT/scores into its own directory when `split.ratio` is
swept (no rescoring), and fits a `TorchTrainer` whose reports reach Tune through
`TuneReportCallback`. The driver holds no CPU (its Ray Train workers hold theirs).

    OUT/tune/ray/               the Tune experiment (restored when a sweep is rerun)
    OUT/tune/trials/<trial_id>/ one trial's own run directory (tuning/trial.py)
    OUT/tune/results.csv|.parquet, best_config.yaml, metric_vs_params.png (tuning/results.py)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from ray import tune

from sftmix_ray.config import Config, save_config
from sftmix_ray.errors import ConfigError, SftmixError
from sftmix_ray.io_utils import atomic_write_json, ensure_writable_dir
from sftmix_ray.layout import RunDir
from sftmix_ray.summary import update_stage
from tuning.ray_compat import check_ray_version, controller_trials
from tuning.results import (
    STATUS_ORDER,
    best_row,
    plot_metric_vs_params,
    results_frame,
    trial_rows,
)
from tuning.schedulers import ResumableASHA
from tuning.space import Domain, apply_params, distinct_points, load_space
from tuning.trial import (
    ReleaseFinishedTrials,
    join_checkpoint_removals,
    release_placement_groups,
    remove_finished_checkpoints,
    removed_checkpoints,
    trial_dirname,
    trial_driver,
)
from tuning.worker_exit import wait_for_workers

log = logging.getLogger(__name__)

EXPERIMENT = "ray"  # OUT/tune/ray: Tune's experiment directory
RESULTS = "results"  # results.csv and results.parquet
BEST_CONFIG = "best_config.yaml"
PLOT = "metric_vs_params.png"
SWEEP_FILE = "sweep.json"  # what the sweep in OUT/tune/ray was started with
ASHA_STATE = "asha_state.json"  # ASHA's rungs, read back by a resumed sweep (schedulers.py)
DRIVER_MEMORY = 256 * 1024**2  # bytes reserved for a 0-CPU driver (Ray needs some resource)
IDENTITY_KEYS = ("search", "scheduler", "metric", "mode", "num_samples", "seed")  # tune.*


class SweepInterrupted(SftmixError):
    """The sweep stopped before every trial finished; rerunning the command resumes it."""


def _search_alg(cfg: Config, points: list[dict[str, Any]] | None) -> Any:
    from ray.tune.search import BasicVariantGenerator

    if cfg.tune.search != "optuna":
        # Tune ignores TuneConfig.max_concurrent_trials for a generator passed in: set it here.
        # `points` (distinct draws from a discrete space) replace Tune's own sampling, which
        # draws with replacement and ran one (alpha, mu, ratio) twice in 3 samples of 27.
        return BasicVariantGenerator(
            random_state=cfg.tune.seed,
            max_concurrent=cfg.tune.max_concurrent_trials,
            points_to_evaluate=points,
        )
    try:
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.tune.seed)
    except (ImportError, AssertionError):
        raise ConfigError(
            "config key 'tune.search' = 'optuna' needs the optuna package: "
            "pip install 'sftmix-ray[optuna]' (or use tune.search=random|grid)"
        ) from None


def _scheduler(cfg: Config, state_path: Path) -> Any:
    """FIFO, or ASHA keeping its rungs in `state_path` for a resumed sweep (schedulers.py)."""
    from ray.tune.schedulers import FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    grace = cfg.tune.grace_period or cfg.train.eval_steps or 1
    # Rungs are counted in optimizer steps (the loop's `step`), so eval_steps sets how often
    # ASHA can compare trials; with train.eval_steps=0 it sees one eval, at the end.
    max_t = cfg.train.max_steps if cfg.train.max_steps > 0 else 10**9
    # A trial that reaches max_t finishes on its own (stop_last_trials=False): stopping it at
    # its last report would kill it before it exports its model.
    return ResumableASHA(
        str(state_path),
        time_attr="step",
        max_t=max_t,
        grace_period=min(grace, max_t),
        stop_last_trials=False,
    )


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


def random_points(cfg: Config, domains: list[Domain]) -> list[dict[str, Any]] | None:
    """The trials' params of a random search over a discrete space, all different; None
    where Tune samples (continuous domains, grid or Optuna search)."""
    if cfg.tune.search != "random":
        return None
    points = distinct_points(domains, cfg.tune.num_samples, cfg.tune.seed)
    if points is not None and len(points) < cfg.tune.num_samples:
        log.warning(
            "tune.num_samples=%d exceeds the %d different points of the search space: "
            "running each point once", cfg.tune.num_samples, len(points),
        )  # fmt: skip
    return points


def expected_trials(cfg: Config, domains: list[Domain]) -> int:
    """How many trials the sweep makes: num_samples (at most every point of a discrete space
    under random search), times every grid axis under grid search."""
    points = random_points(cfg, domains)
    total = len(points) if points is not None else cfg.tune.num_samples
    for domain in domains:
        if domain.kind == "grid" or (domain.kind == "choice" and cfg.tune.search == "grid"):
            total *= len(domain.values)
    return total


def _remove_left_checkpoints(storage_path: str | None, trial_dir: Path) -> int:
    """The sweep's last pass over a finished trial: what the trial and the callback left."""
    try:
        return remove_finished_checkpoints(storage_path, RunDir(trial_dir))
    except OSError as exc:  # the sweep is done: its results are written all the same
        log.warning("could not remove the checkpoints of trial %s: %s", trial_dir.name, exc)
        return 0


def _split_is_current(out: Path, cfg: Config) -> bool:
    """Whether OUT/split exists and was made for this config: what `pipeline` decides, by
    the recorded fingerprints of split and the stages before it, which cover the ratio, the
    confidence measure and everything upstream (the ratio alone let trials train on a split
    made with another measure or corpus)."""
    from sftmix_ray.pipeline import plan_pipeline

    split = next(entry for entry in plan_pipeline(cfg, out) if entry["stage"] == "split")
    return RunDir.of(out).split_dir.is_dir() and not split["run"]


def _check_inputs(cfg: Config, out: Path, recompute_split: bool) -> None:
    """Fail before any trial when a stage the sweep reads has not run."""
    run = RunDir.of(out)
    if not run.data.exists():
        raise SftmixError(f"{run.data} does not exist; run `sftmix-ray prepare` first")
    if recompute_split and not run.scores.exists():
        raise SftmixError(
            f"{run.scores} does not exist; sweeping split.ratio recomputes the split from "
            "the scores: run `sftmix-ray score` first"
        )
    if cfg.tune.metric.startswith("eval_") and not run.heldout.exists():
        raise SftmixError(
            f"tune.metric={cfg.tune.metric} needs held-out data, and {run.heldout} does not "
            "exist; set data.eval_path or data.eval_fraction and rerun `sftmix-ray prepare`"
        )


# Swept keys that set how many optimizer steps a trial trains.
STEP_KEYS = frozenset(
    {
        "train.num_train_epochs", "train.max_steps", "train.per_device_train_batch_size",
        "train.gradient_accumulation_steps", "train.num_workers",
    }
)  # fmt: skip


def _equal_steps_across_ratios(cfg: Config, out: Path, keys: list[str]) -> int | None:
    """The `train.max_steps` every trial trains when `split.ratio` is swept by epochs.

    An epoch is one pass over the larger side, so with `train.max_steps` 0 a ratio of 0.3 or
    0.7 trains 40% more steps than 0.5 and the sweep compares training budgets, not ratios.
    Every trial then trains the steps the base config's ratio makes in its epochs instead.
    None when nothing needs pinning: `train.max_steps` set, the ratio not swept, or random
    pairing (one stream, which the ratio does not size); and when the sweep itself varies how
    many steps a trial trains (epochs, batch, workers), which a pin would override (a warning
    says the ratios then differ in steps too)."""
    if "split.ratio" not in keys or cfg.train.max_steps > 0:
        return None
    varied = sorted(STEP_KEYS.intersection(keys))
    if varied:
        log.warning(
            "split.ratio is swept by epochs together with %s: each trial trains its own "
            "number of steps, and ratios far from 0.5 train more of them per epoch",
            ", ".join(varied),
        )
        return None
    import pyarrow.dataset as ds

    from sftmix_ray.split import confident_count
    from sftmix_ray.train.launch import build_spec
    from sftmix_ray.train.sampling import BatchPlan, total_steps

    if build_spec(cfg, out, "train").streams == ("data",):  # NTP or random pairing
        return None
    n = ds.dataset(str(RunDir.of(out).scores), format="parquet").count_rows()
    confident = confident_count(n, cfg.split.ratio)
    plan = BatchPlan(
        sizes=(confident, n - confident),
        rows_per_device=cfg.train.per_device_train_batch_size,
        world_size=cfg.train.num_workers,
        grad_accum=cfg.train.gradient_accumulation_steps,
        seed=cfg.train.seed,
    )
    return total_steps(plan, cfg.train.num_train_epochs, 0)


def _build_tuner(
    cfg: Config, out: Path, domains: list[Domain], recompute_split: bool, callbacks: list | None
) -> tuple[Any, bool]:
    """A fresh Tuner, or the one restored from OUT/tune/ray; returns (tuner, resumed)."""
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_driver, base=cfg.to_dict(), out_dir=str(out), recompute_split=recompute_split
        ),
        _trial_resources(cfg),
    )
    run = RunDir.of(out)
    experiment = run.tune / EXPERIMENT
    # Tune pickles the callbacks with the experiment: a restored sweep keeps them.
    release = ReleaseFinishedTrials(str(run.trials), cfg.train.storage_path)
    callbacks = [release, *(callbacks or [])]
    if tune.Tuner.can_restore(str(experiment)):
        log.info("resuming the sweep in %s (finished trials are kept)", experiment)
        tuner = tune.Tuner.restore(
            str(experiment), trainable, resume_unfinished=True, resume_errored=True
        )
        return tuner, True
    points = random_points(cfg, domains)
    asha_state = run.tune / ASHA_STATE
    asha_state.unlink(missing_ok=True)  # an earlier sweep's rungs, if its experiment was removed
    tuner = tune.Tuner(
        trainable,
        param_space={d.key: d.to_tune(cfg.tune.search) for d in domains},
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            search_alg=_search_alg(cfg, points),
            scheduler=_scheduler(cfg, asha_state),
            # Samples (each a whole grid under grid search); the distinct points, when drawn.
            num_samples=len(points) if points is not None else cfg.tune.num_samples,
            # Optuna is wrapped in a ConcurrencyLimiter; the generator limits itself.
            max_concurrent_trials=(
                cfg.tune.max_concurrent_trials if cfg.tune.search == "optuna" else None
            ),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(run.tune),
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
            callbacks=callbacks,
        ),
    )
    return tuner, False


def run_tune(cfg: Config, out_dir: Path, callbacks: list | None = None) -> dict[str, Any]:
    """Sweep the space in `tune.space` over OUT's prepared and scored data; resume if stopped.

    Writes OUT/tune/results.{csv,parquet}, best_config.yaml and metric_vs_params.png, and
    returns a summary. `callbacks` are extra Ray Tune callbacks for the experiment.
    """
    from sftmix_ray.ray_utils import init_ray

    out = Path(out_dir).resolve()
    tune_dir = ensure_writable_dir(RunDir(out).tune)
    domains = load_space(cfg.tune.space, cfg.to_dict())
    keys = [d.key for d in domains]
    recompute_split = "split.ratio" in keys or not _split_is_current(out, cfg)
    _check_inputs(cfg, out, recompute_split)
    pinned = _equal_steps_across_ratios(cfg, out, keys)
    if pinned is not None:
        log.warning(
            "split.ratio is swept and train.max_steps is 0: every trial trains %d steps, the "
            "%s epochs of split.ratio=%s (an epoch follows the larger side, so ratios would "
            "otherwise train for different numbers of steps); set train.max_steps to choose",
            pinned, cfg.train.num_train_epochs, cfg.split.ratio,
        )  # fmt: skip
        cfg = apply_params(cfg.to_dict(), {"train.max_steps": pinned})
    identity = sweep_identity(cfg, domains)
    _check_same_sweep(tune_dir, identity)
    init_ray(cfg.ray)
    check_ray_version()
    tuner, resumed = _build_tuner(cfg, out, domains, recompute_split, callbacks)
    if not resumed:
        atomic_write_json(tune_dir / SWEEP_FILE, {"identity": identity})
    save_config(cfg, tune_dir / "config.yaml")
    update_stage(out, "tune", status="running")
    start = time.time()
    try:
        grid = tuner.fit()
        trials = controller_trials(grid, tune_dir / EXPERIMENT)
        rows = trial_rows(trials, keys, cfg.tune.metric, out)
    except BaseException as exc:
        update_stage(out, "tune", status="failed", error=str(exc) or type(exc).__name__)
        raise
    finally:
        # Trials stopped by an interruption leave their worker groups too; a stopped trial's
        # workers may still be saving, so their checkpoints are removed once they are gone.
        trial_outs = sorted(RunDir(out).trials.glob("*"))
        for trial_out in trial_outs:
            release_placement_groups(trial_out)
        wait_for_workers(trial_outs)
        still_removing = join_checkpoint_removals()
    # Finished trials (ASHA's stopped ones too) are never resumed: their checkpoints go, most
    # already once the trial was over (`ReleaseFinishedTrials`); a trial that trained to the
    # end removed its own after its export (`run_training`).
    finished = [
        Path(r["trial_dir"]) for r in rows if r["status"] == "TERMINATED" and r.get("trial_dir")
    ]
    removed = 0
    for trial_dir in finished:
        if trial_dir.name not in still_removing:
            removed += _remove_left_checkpoints(cfg.train.storage_path, trial_dir)
        removed += removed_checkpoints(trial_dir)
    frame = results_frame(rows, keys)
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
        "resume_checkpoints_removed": removed,
        **({"train_max_steps_pinned": pinned} if pinned is not None else {}),
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
        "model_dir": str(RunDir(Path(best["trial_dir"])).model()),
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
