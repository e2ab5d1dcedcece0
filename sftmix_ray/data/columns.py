"""Column mapping (`data.columns`): a corpus whose columns have other names than the formats'.

`{field: column}` reads the corpus column `column` as the format's field `field`: Dolly's
`context` and `response` as alpaca's `input` and `output`, OpenOrca's `system_prompt`,
`question` and `response` as `system`, `instruction` and `output`; as LLaMA-Factory's
`dataset_info.json` `columns` and Axolotl's `field_*` settings do. Mapped columns are
renamed (the source name is gone from the row), before the format is detected, so a mapped
corpus is detected like one written with the formats' own names.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

# Every top-level field a format reads (formats.py), and the held-out `answer` eval reads.
FIELDS = (
    "instruction", "input", "output", "system", "history",  # alpaca (LLaMA-Factory's too)
    "conversations", "messages",  # sharegpt, messages
    "prompt", "completion",  # TRL's prompt-completion
    "query", "answers",  # xLAM
    "chat",  # glaive's transcript (its `system` is the field above)
    "text",  # TRL's language-modeling rows (format text)
    "tools", "functions",  # tool definitions
    "answer",  # the expected final answer of a held-out row (eval's exact match)
)  # fmt: skip


def column_errors(columns: Mapping[str, Any]) -> list[str]:
    """What is wrong with a `data.columns` mapping (empty when it is usable)."""
    errors = []
    for field, column in columns.items():
        if field not in FIELDS:
            guess = difflib.get_close_matches(str(field), FIELDS, n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            errors.append(f"{field!r} is not a field any format reads{hint}")
        if not isinstance(column, str) or not column:
            errors.append(f"{field!r} must name a column (got {column!r})")
    return errors


def rename_columns(row: Any, columns: Mapping[str, str] | None) -> Any:
    """`row` with each mapped column under its field's name (a new dict; `row` unchanged).
    A row without a mapped column keeps what it has; one that has both a mapped column and
    the field's own name keeps the mapped column's value. One column may fill several fields
    (GSM8K's `answer` as `output` and as eval's `answer`: `{output: answer, answer: answer}`)."""
    if not columns or not isinstance(row, dict):
        return row
    sources = set(columns.values())
    renamed = {key: value for key, value in row.items() if key not in sources}
    for field, column in columns.items():
        if column in row:
            renamed[field] = row[column]
    return renamed
