"""Atomic file writes: a reader never sees a partial file, a crash never leaves one."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sftmix_ray.errors import SftmixError


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` if needed and check we can write there; clear error otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise SftmixError(f"output directory {path} is not writable: {exc.strerror}") from None
    return path


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """Call `write(file)` on a temporary file beside `path` opened with `mode`, sync it to
    disk, then rename it into place: a crash leaves the previous file or none, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise SftmixError(f"cannot write {path}: {exc.strerror}") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and an atomic rename."""
    _atomic_write(path, lambda fh: fh.write(text), "w")


def atomic_write_parquet(path: Path, table: Any) -> None:
    """Write an Arrow table as one Parquet file, atomically (synced, then renamed)."""
    import pyarrow.parquet as pq

    _atomic_write(path, lambda fh: pq.write_table(table, fh), "wb")


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as strict JSON (`strict_json`) atomically: sorted keys, indented, trailing
    newline."""
    atomic_write_text(path, strict_json(obj, indent=2, sort_keys=True) + "\n")


def strict_json(obj: Any, **kwargs: Any) -> str:
    """`json.dumps(obj, **kwargs)` as strict JSON: a non-finite float (a skipped step's loss
    and gradient norm, the exact match of no rows) is null, not Python's `NaN` literal, which
    `jq`, JavaScript and most JSON parsers refuse. Every file and every stdout result here."""
    return json.dumps(_finite_or_null(obj), allow_nan=False, **kwargs)


def _finite_or_null(obj: Any) -> Any:
    """`obj` with every non-finite float in it (nested in dicts, lists, tuples) as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_null(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_null(value) for value in obj]
    return obj


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a finished temporary directory into place, replacing any previous one."""
    if final_dir.exists():
        trash = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def fresh_tmp_dir(final_dir: Path) -> Path:
    """An empty sibling directory to build `final_dir` in before `replace_dir`."""
    tmp = final_dir.with_name(f".{final_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp
