"""OUT/summary.json: per stage its status, row counts, metrics, and for training steps/restarts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sftmix_ray.io_utils import atomic_write_json
from sftmix_ray.layout import RunDir


def read_summary(out_dir: Path | RunDir) -> dict[str, Any]:
    """The current summary, or an empty one."""
    path = RunDir.of(out_dir).summary
    if not path.exists():
        return {"stages": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def update_stage(out_dir: Path | RunDir, stage: str, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into the stage's entry (status, counts, metrics, ...) and save."""
    summary = read_summary(out_dir)
    entry = summary["stages"].setdefault(stage, {})
    entry.update(fields)
    entry["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(RunDir.of(out_dir).summary, summary)
    return entry
