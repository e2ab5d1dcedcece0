"""Runs stages: one at a time (`sftmix-ray STAGE`) or in order (`sftmix-ray pipeline`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sftmix_ray.config import Config, save_config
from sftmix_ray.errors import NotImplementedStage
from sftmix_ray.io_utils import ensure_writable_dir
from sftmix_ray.summary import update_stage

log = logging.getLogger(__name__)

STAGES = ("prepare", "reference", "score", "split", "train", "eval")


def _prepare(cfg: Config, out: Path) -> dict[str, Any]:
    from sftmix_ray.data.prepare import run_prepare

    return run_prepare(cfg, out)


def _reference(cfg: Config, out: Path) -> dict[str, Any]:
    from sftmix_ray.train.launch import run_training

    return run_training(cfg, out, "reference")


def _train(cfg: Config, out: Path) -> dict[str, Any]:
    from sftmix_ray.train.launch import run_training

    return run_training(cfg, out, "train")


def _not_yet(stage: str) -> Callable[[Config, Path], dict[str, Any]]:
    def run(cfg: Config, out: Path) -> dict[str, Any]:
        raise NotImplementedStage(f"stage '{stage}' is not implemented yet")

    return run


STAGE_FUNCS: dict[str, Callable[[Config, Path], dict[str, Any]]] = {
    "prepare": _prepare,
    "reference": _reference,
    "score": lambda cfg, out: __import__("sftmix_ray.scoring").scoring.run_score(cfg, out),
    "split": lambda cfg, out: __import__("sftmix_ray.split").split.run_split(cfg, out),
    "train": _train,
    "eval": _not_yet("eval"),
}
NEEDS_RAY = {"prepare", "reference", "score", "train", "eval"}


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
    except BaseException as exc:
        update_stage(out_dir, name, status="failed", error=str(exc) or type(exc).__name__)
        raise
    update_stage(out_dir, name, status="completed", seconds=round(time.time() - start, 2), **result)
    return result


def run_pipeline(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Run every stage in order."""
    return {name: run_stage(name, cfg, out_dir) for name in STAGES}
