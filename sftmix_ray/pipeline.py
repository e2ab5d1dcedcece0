"""Runs stages: one at a time (`sftmix-ray STAGE`) or in order (`sftmix-ray pipeline`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sftmix_ray.config import Config, save_config
from sftmix_ray.errors import ConfigError, SftmixError
from sftmix_ray.io_utils import ensure_writable_dir
from sftmix_ray.summary import read_summary, update_stage

log = logging.getLogger(__name__)

STAGES = ("prepare", "reference", "score", "split", "train", "eval")
# The config sections each stage's outputs depend on (cumulative down the pipeline), so a
# change reruns the stage that reads it and every stage after it.
STAGE_SECTIONS = {
    "prepare": ("data", "model"),
    "reference": ("reference", "train"),
    "score": ("score",),
    "split": ("split",),
    "train": ("mixup", "train"),
    "eval": ("eval",),
}
NEEDS_RAY = {"prepare", "reference", "score", "train", "eval"}


def _prepare(cfg: Config, out: Path) -> dict[str, Any]:
    from sftmix_ray.data.prepare import run_prepare

    return run_prepare(cfg, out)


def _reference(cfg: Config, out: Path) -> dict[str, Any]:
    from sftmix_ray.train.launch import run_training

    return run_training(cfg, out, "reference")


def _score(cfg: Config, out: Path) -> dict[str, Any]:
    from sftmix_ray.scoring import run_score

    return run_score(cfg, out)


def _split(cfg: Config, out: Path) -> dict[str, Any]:
    from sftmix_ray.split import run_split

    return run_split(cfg, out)


def _train(cfg: Config, out: Path) -> dict[str, Any]:
    """SFTMix training; with `eval.compare_ntp` also the NTP baseline (mu=0) to OUT/model_ntp."""
    from sftmix_ray.train.launch import run_training

    result = run_training(cfg, out, "train")
    if cfg.eval.compare_ntp and cfg.mixup.mu > 0:
        ntp = dataclasses.replace(cfg, mixup=dataclasses.replace(cfg.mixup, mu=0.0))
        result["ntp_baseline"] = run_training(ntp, out, "train", export_name="model_ntp")
    return result


def _eval(cfg: Config, out: Path) -> dict[str, Any]:
    from sftmix_ray.evaluation import run_eval

    return run_eval(cfg, out)


STAGE_FUNCS: dict[str, Callable[[Config, Path], dict[str, Any]]] = {
    "prepare": _prepare,
    "reference": _reference,
    "score": _score,
    "split": _split,
    "train": _train,
    "eval": _eval,
}


def stage_fingerprint(cfg: Config, stage: str) -> str:
    """Hash of the config sections `stage` and the stages before it depend on."""
    raw = cfg.to_dict()
    sections: list[str] = []
    for name in STAGES[: STAGES.index(stage) + 1]:
        sections.extend(STAGE_SECTIONS[name])
    picked = {s: raw[s] for s in sorted(set(sections))}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def run_stage(name: str, cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Run one stage, recording its status and results in OUT/summary.json."""
    out_dir = ensure_writable_dir(Path(out_dir))
    save_config(cfg, out_dir / "config.yaml")
    if name in NEEDS_RAY:
        from sftmix_ray.ray_utils import init_ray

        init_ray(cfg.ray)
    update_stage(out_dir, name, status="running")
    start = time.time()
    try:
        result = STAGE_FUNCS[name](cfg, out_dir)
    except KeyboardInterrupt:  # Ctrl+C or SIGTERM (the CLI raises it): not a failure
        update_stage(out_dir, name, status="interrupted")
        raise
    except OSError as exc:  # a full disk, a vanished mount: one line naming where
        where = f" ({exc.filename})" if exc.filename else ""
        reason = exc.strerror or str(exc)
        message = f"stage {name} stopped by an OS error under {out_dir}{where}: {reason}"
        update_stage(out_dir, name, status="failed", error=message)
        raise SftmixError(message) from exc
    except BaseException as exc:
        update_stage(out_dir, name, status="failed", error=str(exc) or type(exc).__name__)
        raise
    update_stage(
        out_dir,
        name,
        status="completed",
        seconds=round(time.time() - start, 2),
        config_fingerprint=stage_fingerprint(cfg, name),
        **result,
    )
    return result


def run_pipeline(cfg: Config, out_dir: Path, force: str | None = None) -> dict[str, Any]:
    """Run every stage in order, skipping those already completed for the same config.

    `force` reruns that stage and every stage after it.
    """
    if force is not None and force not in STAGES:
        raise ConfigError(f"--force {force!r} is not a stage; one of {', '.join(STAGES)}")
    out_dir = Path(out_dir)
    forced = STAGES.index(force) if force else len(STAGES)
    results: dict[str, Any] = {}
    rerun_rest = False
    for i, name in enumerate(STAGES):
        done = read_summary(out_dir)["stages"].get(name, {})
        fresh = done.get("status") == "completed" and done.get(
            "config_fingerprint"
        ) == stage_fingerprint(cfg, name)
        if fresh and not rerun_rest and i < forced:
            log.info("stage %s: complete for this config, skipped", name)
            results[name] = {"status": "skipped"}
            continue
        rerun_rest = True
        results[name] = run_stage(name, cfg, out_dir)
    from sftmix_ray.report import write_report

    results["report"] = str(write_report(out_dir))
    return results
