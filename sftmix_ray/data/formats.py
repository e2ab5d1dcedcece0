"""Normalize one raw corpus row (alpaca, sharegpt or messages) to a list of chat messages.

The result is always `[{"role": "system"|"user"|"assistant", "content": str}, ...]` with an
optional leading system message, then user and assistant turns alternating, starting with a
user turn and ending with an assistant turn. A row that cannot be normalized raises
`RowRejected` with a precise reason; turns are numbered from 1 as they appear in the row.

Real dumps break these rules in a few recurring ways. With `repair="standard"` (the default of
`data.repair`) those are repaired and counted by kind (`REPAIRS`) instead of rejected:
assistant turns before the first user turn are dropped (the dump lost the first user message),
a trailing user turn with no reply is dropped, empty turns are dropped and then consecutive
turns of one role are merged (joined with a blank line), and `bing`/`bard` are read as assistant
like `gpt` and `chatgpt`. A repaired conversation must then satisfy every rule below, else the
row is rejected. `repair="none"` applies the rules strictly.

Rules (the same for every format):
- content is a string; user and assistant content must not be empty or only whitespace;
- an empty system prompt means "no system prompt" and is dropped (it changes nothing);
- roles are known (aliases from real dumps are mapped, case-insensitively); tool/function
  roles are not supported and are rejected by name;
- a system message may only come first; at least one assistant turn; the conversation
  starts with a user turn, alternates, and ends with an assistant turn (a trailing user turn
  would have no response to learn from, and chat templates reject non-alternating roles).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise
from typing import Any

from sftmix_ray.errors import DataError, RowRejected

FORMATS = ("auto", "alpaca", "sharegpt", "messages")
ROLES = ("system", "user", "assistant")
ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}
# Assistant names of real dumps that only the standard repairs accept (counted as a repair).
REPAIR_ROLE_ALIASES: dict[str, str] = {"bing": "assistant", "bard": "assistant"}
REPAIR_MODES = ("standard", "none")
REPAIRS = (
    "role_mapped",  # bing/bard read as assistant
    "empty_turn_dropped",  # user/assistant turns with empty content dropped
    "leading_assistant_dropped",  # assistant turns before the first user turn dropped
    "same_role_merged",  # consecutive turns of one role merged with a blank line
    "trailing_user_dropped",  # a last user turn without a reply dropped
)
# Key pairs a turn may use, the format's own first: (role key, content key).
_TURN_KEYS = {
    "sharegpt": (("from", "value"), ("role", "content")),
    "messages": (("role", "content"), ("from", "value")),
}
_LIST_FIELD = {"sharegpt": "conversations", "messages": "messages"}

Message = dict[str, str]


def json_type_name(value: Any) -> str:
    """The JSON name of `value`'s type: null, bool, int, float, string, list, object."""
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string"}
    names.update({list: "list", dict: "object"})
    return names.get(type(value), type(value).__name__)


def _typed(value: Any, kind: type, what: str) -> Any:
    """`value` if it is a `kind` (str or list); else the row is rejected as `wrong_type`."""
    if not isinstance(value, kind):
        noun = "a string" if kind is str else "a list"
        raise RowRejected(f"{what} must be {noun} (got {json_type_name(value)})", "wrong_type")
    return value


def row_format(row: Any) -> str | None:
    """The format a single row's keys point to, or None when they match none."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    return None


def detect_format(rows: Iterable[Any]) -> str:
    """The format of a corpus, from the keys of its first row that matches a known format."""
    for row in rows:
        fmt = row_format(row)
        if fmt is not None:
            return fmt
    raise DataError(
        "cannot detect the corpus format: no row has a 'messages', 'conversations' or "
        "'instruction' field; pass the format explicitly (alpaca, sharegpt or messages)"
    )


def normalize_row(row: Any, fmt: str) -> list[Message]:
    """Normalize one raw row to chat messages, strictly (no repairs); raise `RowRejected`."""
    return normalize_with_repairs(row, fmt, "none")[0]


def normalize_with_repairs(
    row: Any, fmt: str, repair: str = "standard"
) -> tuple[list[Message], list[str]]:
    """Normalize one raw row; return the messages and the repairs applied (kinds, each once).

    Raise `RowRejected` (with its `kind`) when the row is invalid even after the repairs.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if repair not in REPAIR_MODES:
        raise ValueError(f"unknown repair mode {repair!r}; choose one of {REPAIR_MODES}")
    if not isinstance(row, dict):
        raise RowRejected(f"row is not an object (got {json_type_name(row)})", "not_an_object")
    if fmt == "auto":
        detected = row_format(row)
        if detected is None:
            raise RowRejected(
                "row matches no format (no 'messages', 'conversations' or 'instruction' field)",
                "no_format",
            )
        fmt = detected
    if fmt == "alpaca":
        return _normalize_alpaca(row), []
    return _normalize_conversation(row, fmt, repair == "standard")


def _normalize_alpaca(row: dict[str, Any]) -> list[Message]:
    """instruction (+ "\\n\\n" + input) -> user, output -> assistant, optional system first."""
    instruction = _required_text(row, "instruction", "alpaca")
    output = _required_text(row, "output", "alpaca")
    extra_input = _optional_text(row, "input")
    system = _optional_text(row, "system")
    prompt = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": output})
    return messages


def _normalize_conversation(
    row: dict[str, Any], fmt: str, repair: bool
) -> tuple[list[Message], list[str]]:
    """Normalize a sharegpt `conversations` or a `messages` list of turns."""
    field = _LIST_FIELD[fmt]
    if field not in row:
        raise RowRejected(f"missing field {field!r}{_looks_like(row, fmt)}", "missing_field")
    turns = _typed(row[field], list, f"field {field!r}")
    if not turns:
        raise RowRejected(f"field {field!r} is empty", "empty_conversation")

    numbered: list[tuple[int, str, str]] = []  # (turn number, role, content)
    repairs: set[str] = set()
    system = _optional_text(row, "system") if fmt == "sharegpt" else ""
    if system.strip():
        numbered.append((0, "system", system))
    for number, turn in enumerate(turns, start=1):
        role, content, mapped = _parse_turn(turn, number, fmt, repair)
        if mapped:
            repairs.add("role_mapped")
        if not content.strip():
            if role == "system":
                continue
            if repair:
                repairs.add("empty_turn_dropped")
                continue
            raise RowRejected(f"turn {number} content is empty", "empty_turn")
        if role == "system" and system.strip():
            raise RowRejected(
                f"row has both a 'system' field and a system turn (turn {number})",
                "system_conflict",
            )
        numbered.append((number, role, content))
    if repair:
        numbered = _repair_order(numbered, repairs)
    _check_order(numbered)
    messages = [{"role": role, "content": content} for _, role, content in numbered]
    return messages, sorted(repairs)


def _repair_order(
    numbered: list[tuple[int, str, str]], repairs: set[str]
) -> list[tuple[int, str, str]]:
    """Drop leading assistant turns, merge runs of one role, drop a trailing user turn."""
    head = [t for t in numbered[:1] if t[1] == "system"]
    body = numbered[len(head) :]
    first_user = next((i for i, t in enumerate(body) if t[1] == "user"), None)
    if first_user is None:
        return numbered  # nothing to repair into a conversation: _check_order says why
    if first_user > 0 and all(t[1] == "assistant" for t in body[:first_user]):
        repairs.add("leading_assistant_dropped")
        body = body[first_user:]
    merged: list[tuple[int, str, str]] = []
    for number, role, content in body:
        if merged and merged[-1][1] == role and role in ("user", "assistant"):
            repairs.add("same_role_merged")
            merged[-1] = (merged[-1][0], role, f"{merged[-1][2]}\n\n{content}")
        else:
            merged.append((number, role, content))
    if len(merged) > 1 and merged[-1][1] == "user":
        repairs.add("trailing_user_dropped")
        merged = merged[:-1]
    return head + merged


def _parse_turn(turn: Any, number: int, fmt: str, repair: bool) -> tuple[str, str, bool]:
    """Read one turn's (canonical role, content, mapped by a repair); reject malformed turns."""
    if not isinstance(turn, dict):
        raise RowRejected(
            f"turn {number} is not an object (got {json_type_name(turn)})", "malformed_turn"
        )
    keys = _TURN_KEYS[fmt]
    role_key, content_key = next((pair for pair in keys if pair[0] in turn), keys[0])
    if role_key not in turn:
        raise RowRejected(f"turn {number} has no {role_key!r} field", "malformed_turn")
    raw_role = _typed(turn[role_key], str, f"turn {number} role")
    name = raw_role.strip().lower()
    role, mapped = ROLE_ALIASES.get(name), False
    if role is None and repair and name in REPAIR_ROLE_ALIASES:
        role, mapped = REPAIR_ROLE_ALIASES[name], True
    if role is None:
        raise RowRejected(f"unknown role {_show(raw_role)} in turn {number}", "unknown_role")
    if content_key not in turn:
        raise RowRejected(f"turn {number} has no {content_key!r} field", "malformed_turn")
    return role, _typed(turn[content_key], str, f"turn {number} content"), mapped


def _check_order(numbered: list[tuple[int, str, str]]) -> None:
    """System first; then user/assistant alternating, from user to assistant."""
    for position, (number, role, _) in enumerate(numbered):
        if role == "system" and position > 0:
            raise RowRejected(f"system message must come first (turn {number})", "system_not_first")
    body = [(number, role) for number, role, _ in numbered if role != "system"]
    if not body:
        raise RowRejected("no user or assistant turn", "no_turns")
    if all(role != "assistant" for _, role in body):
        raise RowRejected("no assistant turn", "no_assistant_turn")
    first_number, first_role = body[0]
    if first_role != "user":
        raise RowRejected(
            f"conversation must start with a user turn (turn {first_number} is {first_role})",
            "starts_with_assistant",
        )
    for (_, previous), (number, role) in pairwise(body):
        if role == previous:
            raise RowRejected(
                f"turn {number} repeats role {role!r} (user and assistant turns must alternate)",
                "repeated_role",
            )
    last_number, last_role = body[-1]
    if last_role != "assistant":
        raise RowRejected(
            f"conversation ends with a user turn (turn {last_number}) without a reply",
            "ends_with_user",
        )


def _required_text(row: dict[str, Any], key: str, fmt: str) -> str:
    """A required, non-empty string field."""
    if key not in row:
        raise RowRejected(f"missing field {key!r}{_looks_like(row, fmt)}", "missing_field")
    value = _typed(row[key], str, f"field {key!r}")
    if not value.strip():
        raise RowRejected(f"field {key!r} is empty", "empty_field")
    return value


def _optional_text(row: dict[str, Any], key: str) -> str:
    """An optional string field; absent or null reads as ""."""
    value = row.get(key)
    return "" if value is None else _typed(value, str, f"field {key!r}")


def _looks_like(row: dict[str, Any], fmt: str) -> str:
    """A hint when a row rejected as `fmt` has the keys of another format."""
    other = row_format(row)
    return f" (row looks like {other})" if other is not None and other != fmt else ""


def _show(value: str, limit: int = 40) -> str:
    """`repr` of a user-supplied string, shortened so reasons stay one readable line."""
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")
