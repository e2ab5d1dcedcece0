"""Read a W&B offline run file (`run-<id>.wandb`) in tests.

wandb 0.31 no longer ships a Python reader for it. The file is wandb's header (`:W&B`, magic,
version: 7 bytes) followed by LevelDB log records in 32 KiB blocks: each record a 7-byte
header (crc32c, little-endian length, type: full/first/middle/last) and a piece of one
serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK, HEADER = 32768, 7
FULL, FIRST, LAST = 1, 2, 4


def records(path: Path) -> list[Any]:
    """Every record of an offline run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def offline_run(path: Path) -> dict[str, Any]:
    """An offline run as `{"id", "project", "name", "tags", "config", "history"}`; history
    holds one `{key: value}` dict per logged step (with `_step`)."""
    # The id is also in the file's name (`run-<id>.wandb`): a run whose process was killed
    # before wandb flushed anything has a file with the header alone.
    run: dict[str, Any] = {"id": path.stem.removeprefix("run-"), "history": []}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(id=r.run_id, project=r.project, name=r.display_name, tags=list(r.tags))
            run["config"] = {i.key: json.loads(i.value_json) for i in r.config.update}
        elif kind == "history":
            items = record.history.item
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in items})  # fmt: skip
    return run


def offline_runs(wandb_dir: Path) -> list[dict[str, Any]]:
    """Every offline run under a W&B `dir` (OUT/wandb), oldest first."""
    files = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    return [offline_run(f) for f in files]
