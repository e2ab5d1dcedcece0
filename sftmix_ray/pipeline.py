"""Runs stages: one at a time (`sftmix-ray STAGE`) or in order (`sftmix-ray pipeline`)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from sftmix_ray.config import Config, save_config
from sftmix_ray.errors import ConfigError, SftmixError
from sftmix_ray.io_utils import ensure_writable_dir
from sftmix_ray.layout import RunDir
from sftmix_ray.stages import STAGE_NAMES, STAGES, changed_reads, get_stage, stage_fingerprint
from sftmix_ray.summary import read_summary, update_stage

log = logging.getLogger(__name__)


def _recorded(values: dict[str, Any]) -> dict[str, Any]:
    """`values` as summary.json stores them (a JSON round trip: tuples become lists, ...)."""
    return json.loads(json.dumps(values, default=str))


def completion_record(cfg: Config, name: str) -> dict[str, Any]:
    """What summary.json keeps of a completed stage to tell later whether it is still current:
    its fingerprint, and the values it covers (for `pipeline --dry-run` to name changes)."""
    return {
        "config_fingerprint": stage_fingerprint(cfg, name),
        "reads": _recorded(get_stage(name).reads(cfg)),
    }


def run_stage(name: str, cfg: Config, out_dir: Path | RunDir) -> dict[str, Any]:
    """Run one stage, recording its status, results and the values it read in summary.json."""
    run = RunDir(ensure_writable_dir(RunDir.of(out_dir).root))
    out_dir = run.root
    stage = get_stage(name)
    save_config(cfg, run.config)
    if stage.needs_ray:
        from sftmix_ray.ray_utils import init_ray

        init_ray(cfg.ray)
    update_stage(out_dir, name, status="running")
    start = time.time()
    try:
        result = stage.run(cfg, run)
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
        **completion_record(cfg, name),
        **result,
    )
    return result


def plan_pipeline(cfg: Config, out_dir: Path | RunDir, force: str | None = None) -> list[dict]:
    """Which stages `pipeline` would run and why: one entry per stage, in order, with `run`
    (bool) and `reason` (a stage reruns when it is not complete for this config, is forced,
    or a stage before it reruns; `changed` lists the values it reads that differ)."""
    if force is not None and force not in STAGE_NAMES:
        raise ConfigError(f"--force {force!r} is not a stage; one of {', '.join(STAGE_NAMES)}")
    done_stages = read_summary(RunDir.of(out_dir).root)["stages"]
    forced = STAGE_NAMES.index(force) if force else len(STAGES)
    plan: list[dict] = []
    rerun_rest = None
    for i, stage in enumerate(STAGES):
        done = done_stages.get(stage.name, {})
        entry: dict[str, Any] = {"stage": stage.name, "run": True}
        recorded = done.get("reads")
        if recorded is not None:
            entry["changed"] = changed_reads(recorded, _recorded(stage.reads(cfg)))
        if done.get("status") != "completed":
            entry["reason"] = f"not completed (status: {done.get('status', 'never run')})"
        elif rerun_rest is not None:
            entry["reason"] = f"a stage before it reruns ({rerun_rest})"
        elif i >= forced:
            entry["reason"] = f"--force {force}"
        elif done.get("config_fingerprint") != stage_fingerprint(cfg, stage.name):
            entry["reason"] = (
                "the values it reads changed"
                if entry.get("changed")
                else ("its recorded fingerprint differs (no record of the values it read)")
            )
        else:
            entry.update(run=False, reason="complete for this config")
        if entry["run"] and rerun_rest is None:
            rerun_rest = stage.name
        plan.append(entry)
    return plan


def drop_forced_cache(entry: dict[str, Any], force: str | None, run: RunDir) -> bool:
    """Remove the reusable work of the stage `--force` names (score's per-checkpoint NLLs),
    so that forcing it redoes it; returns whether something was removed."""
    cache = get_stage(entry["stage"]).cache
    if force != entry["stage"] or cache is None or not cache(run).exists():
        return False
    shutil.rmtree(cache(run))
    return True


def run_pipeline(
    cfg: Config, out_dir: Path | RunDir, force: str | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Run every stage in order, skipping those already completed for the same config.

    `force` reruns that stage and every stage after it; `dry_run` runs nothing and returns the
    plan (see `plan_pipeline`).
    """
    plan = plan_pipeline(cfg, out_dir, force)
    if dry_run:
        return {"dry_run": True, "stages": plan}
    run = RunDir.of(out_dir)
    results: dict[str, Any] = {}
    for entry in plan:
        name = entry["stage"]
        if not entry["run"]:
            log.info("stage %s: complete for this config, skipped", name)
            results[name] = {"status": "skipped"}
            continue
        log.info("stage %s: runs, %s", name, entry["reason"])
        drop_forced_cache(entry, force, run)
        results[name] = run_stage(name, cfg, run)
    from sftmix_ray.report import write_report

    results["report"] = str(write_report(run.root))
    return results
