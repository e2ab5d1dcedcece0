"""`sftmix-ray show-config`: every config key with its value, its default and its meaning.

The meanings are the comments beside each field in `sftmix_ray/config.py` (the one place they
are written), read from its source.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from typing import Any

from sftmix_ray.config import Config

_FIELD = re.compile(r"^\s{4}(\w+):[^#\n]*(?:#\s*(.*))?$")


def _meanings(section: type) -> dict[str, str]:
    """Field name -> the comment on its line (or the comment lines right above it)."""
    meanings: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(section).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
            continue
        match = _FIELD.match(line)
        if match and not stripped.startswith(("def ", "return")):
            text = match.group(2) or " ".join(pending)
            if text:
                meanings.setdefault(match.group(1), text.strip())
        pending = []
    return meanings


def describe(cfg: Config) -> list[dict[str, Any]]:
    """One entry per config key: `key`, `value` (in `cfg`), `default` and `meaning`; nested
    sections (`train.lora`) by their dotted keys."""
    return _rows(cfg, Config(), "")


def _rows(current: Any, default: Any, prefix: str) -> list[dict[str, Any]]:
    meanings = _meanings(type(default))
    rows: list[dict[str, Any]] = []
    for f in dataclasses.fields(default):
        value, default_value = getattr(current, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(default_value):
            rows.extend(_rows(value, default_value, f"{prefix}{f.name}."))
        elif prefix:
            rows.append(
                {"key": f"{prefix}{f.name}", "value": value, "default": default_value,
                 "meaning": meanings.get(f.name, "")}
            )  # fmt: skip
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Human text: `key = value` (and the default when it differs), the meaning below."""
    lines = []
    for row in rows:
        value = json.dumps(row["value"], default=str)
        changed = row["value"] != row["default"]
        suffix = f"   (default {json.dumps(row['default'], default=str)})" if changed else ""
        lines.append(f"{row['key']} = {value}{suffix}")
        if row["meaning"]:
            lines.append(f"    {row['meaning']}")
    return "\n".join(lines)
