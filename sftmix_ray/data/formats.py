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
- content is a string, or a list of text parts (`[{"type": "text", "text": ...}]`, OpenAI's
  shape; joined with newlines; an image or other non-text part rejects the row); user and
  assistant content must not be empty or only whitespace; text must be valid Unicode (a lone
  surrogate, an emoji cut in half by a dump, is replaced by U+FFFD as a repair);
- an empty system prompt means "no system prompt" and is dropped (it changes nothing); a
  top-level `system` field is the system prompt (sharegpt and messages rows);
- alpaca: `instruction` and `input` (either may be empty, not both) make the user turn, and an
  optional `history` of `[instruction, response]` pairs (LLaMA-Factory's) the turns before it;
- roles are known (aliases from real dumps are mapped, case-insensitively); tool/function
  roles are not supported and are rejected by name;
- a system message may only come first; at least one assistant turn; the conversation
  starts with a user turn, alternates, and ends with an assistant turn (a trailing user turn
  would have no response to learn from, and chat templates reject non-alternating roles).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

from sftmix_ray.errors import DataError, RowRejected

FORMATS = ("auto", "alpaca", "sharegpt", "messages")
ROLES = ("system", "user", "assistant")
ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system prompt
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}
# Tool-calling turns (OpenAI's `tool`/`function`, Llama 3.1's `ipython`, LLaMA-Factory's
# `function_call`/`observation`): rejected by name, as kind `tool_calls`, not trained on.
TOOL_ROLES = frozenset(
    {"tool", "function", "ipython", "function_call", "observation", "tool_call", "tool_response"}
)
# Assistant names of real dumps that only the standard repairs accept (counted as a repair).
REPAIR_ROLE_ALIASES: dict[str, str] = {"bing": "assistant", "bard": "assistant"}
REPAIR_MODES = ("standard", "none")
REPAIRS = (
    "role_mapped",  # bing/bard read as assistant
    "empty_turn_dropped",  # user/assistant turns with empty content dropped
    "leading_assistant_dropped",  # assistant turns before the first user turn dropped
    "same_role_merged",  # consecutive turns of one role merged with a blank line
    "trailing_user_dropped",  # a last user turn without a reply dropped
    "invalid_unicode_replaced",  # lone surrogates (cut emoji) replaced by U+FFFD
    "null_content_dropped",  # a turn whose content is null dropped (like an empty one)
)
# Key pairs a turn may use, the format's own first: (role key, content key).
_TURN_KEYS = {
    "sharegpt": (("from", "value"), ("role", "content")),
    "messages": (("role", "content"), ("from", "value")),
}
_LIST_FIELD = {"sharegpt": "conversations", "messages": "messages"}

Message = dict[str, str]
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    repairs: set[str] = set()
    text = _TextReader(repair == "standard", repairs)
    if fmt == "alpaca":
        messages = _normalize_alpaca(row, text)
    else:
        messages = _normalize_conversation(row, fmt, text)
    return messages, sorted(repairs)


class _TextReader:
    """Reads text values under one repair mode, noting the repairs it applies."""

    def __init__(self, repair: bool, repairs: set[str]) -> None:
        self.repair, self.repairs = repair, repairs

    def __call__(self, value: Any, what: str, parts: bool = False) -> str:
        """A string (or, with `parts`, a list of text parts, joined); lone surrogates replaced
        (a repair) or rejected."""
        if parts and isinstance(value, list):
            value = _join_text_parts(value, what)
        text: str = _typed(value, str, what)
        try:
            if not text.isascii():  # no copy of the common all-ASCII text
                text.encode("utf-8")
        except UnicodeEncodeError:
            if not self.repair:
                raise RowRejected(
                    f"{what} is not valid Unicode (a lone surrogate)", "invalid_unicode"
                ) from None
            self.repairs.add("invalid_unicode_replaced")
            # A surrogate in a str is always a lone one (json pairs them into one code point).
            text = _SURROGATE.sub("\ufffd", text)
        return text

    def optional(self, row: dict[str, Any], key: str) -> str:
        """An optional text field; absent or null reads as ""."""
        value = row.get(key)
        return "" if value is None else self(value, f"field {key!r}")


def _join_text_parts(parts: list[Any], what: str) -> str:
    """OpenAI-style content parts: the text parts joined with newlines; other parts reject."""
    texts = []
    for number, part in enumerate(parts, start=1):
        if isinstance(part, dict) and part.get("type", "text") == "text":
            texts.append(_typed(part.get("text"), str, f"{what} part {number} text"))
        else:
            kind = part.get("type") if isinstance(part, dict) else json_type_name(part)
            raise RowRejected(
                f"{what} part {number} is not text ({_show(str(kind))}); only text is supported",
                "non_text_content",
            )
    return "\n".join(texts)


def _normalize_alpaca(row: dict[str, Any], text: _TextReader) -> list[Message]:
    """history pairs, then instruction (+ "\\n\\n" + input) -> user, output -> assistant;
    optional system first."""
    if "instruction" not in row:
        raise RowRejected(
            f"missing field 'instruction'{_looks_like(row, 'alpaca')}", "missing_field"
        )
    instruction = text.optional(row, "instruction")
    extra_input = text.optional(row, "input")
    prompt = "\n\n".join(part for part in (instruction, extra_input) if part.strip())
    if not prompt:
        raise RowRejected("fields 'instruction' and 'input' are both empty", "empty_field")
    output = _required_text(row, "output", "alpaca", text)
    system = text.optional(row, "system")
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages.extend(_alpaca_history(row.get("history"), text))
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": output})
    return messages


def _alpaca_history(history: Any, text: _TextReader) -> list[Message]:
    """LLaMA-Factory's `history`: earlier `[instruction, response]` pairs, oldest first."""
    if history is None:
        return []
    turns: list[Message] = []
    for number, pair in enumerate(_typed(history, list, "field 'history'"), start=1):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RowRejected(
                f"history item {number} is not an [instruction, response] pair", "malformed_turn"
            )
        for role, value in zip(("user", "assistant"), pair):
            content = text(value, f"history item {number} {role} text")
            if not content.strip():
                raise RowRejected(f"history item {number} has an empty {role} text", "empty_turn")
            turns.append({"role": role, "content": content})
    return turns


def _normalize_conversation(row: dict[str, Any], fmt: str, text: _TextReader) -> list[Message]:
    """Normalize a sharegpt `conversations` or a `messages` list of turns."""
    field = _LIST_FIELD[fmt]
    if field not in row:
        raise RowRejected(f"missing field {field!r}{_looks_like(row, fmt)}", "missing_field")
    turns = _typed(row[field], list, f"field {field!r}")
    if not turns:
        raise RowRejected(f"field {field!r} is empty", "empty_conversation")

    numbered: list[tuple[int, str, str]] = []  # (turn number, role, content)
    repair, repairs = text.repair, text.repairs
    # sharegpt rows carry their system prompt in this field; for messages rows it is a
    # fallback, used (when a string) only if no turn is a system one, as before it was read.
    if fmt == "sharegpt" or isinstance(row.get("system"), str):
        system = text.optional(row, "system")
    else:
        system = ""
    if system.strip():
        numbered.append((0, "system", system))
    for number, turn in enumerate(turns, start=1):
        role, content, mapped = _parse_turn(turn, number, fmt, text)
        if mapped:
            repairs.add("role_mapped")
        if content is None:  # a repair (strict reading rejects it as wrong_type)
            repairs.add("null_content_dropped")
            continue
        if not content.strip():
            if role == "system":
                continue
            if repair:
                repairs.add("empty_turn_dropped")
                continue
            raise RowRejected(f"turn {number} content is empty", "empty_turn")
        if role == "system" and system.strip() and fmt == "messages":
            numbered = [t for t in numbered if t[0] != 0]  # the turn wins over the field
            system = ""
        elif role == "system" and system.strip():
            raise RowRejected(
                f"row has both a 'system' field and a system turn (turn {number})",
                "system_conflict",
            )
        numbered.append((number, role, content))
    if repair:
        numbered = _repair_order(numbered, repairs)
    _check_order(numbered)
    return [{"role": role, "content": content} for _, role, content in numbered]


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


def _parse_turn(
    turn: Any, number: int, fmt: str, text: _TextReader
) -> tuple[str, str | None, bool]:
    """Read one turn's (canonical role, content, mapped by a repair); reject malformed turns.
    Content is None for a null content that the repairs drop."""
    if not isinstance(turn, dict):
        raise RowRejected(
            f"turn {number} is not an object (got {json_type_name(turn)})", "malformed_turn"
        )
    keys = _TURN_KEYS[fmt]
    # By value, not by key: Parquet and HF datasets give every turn the union of the keys
    # their rows use, with nulls where a row's turn had none.
    role_key, content_key = next(
        (pair for pair in keys if turn.get(pair[0]) is not None),
        next((pair for pair in keys if pair[0] in turn), keys[0]),
    )
    if role_key not in turn:
        raise RowRejected(f"turn {number} has no {role_key!r} field", "malformed_turn")
    raw_role = _typed(turn[role_key], str, f"turn {number} role")
    name = raw_role.strip().lower()
    role, mapped = ROLE_ALIASES.get(name), False
    if role is None and text.repair and name in REPAIR_ROLE_ALIASES:
        role, mapped = REPAIR_ROLE_ALIASES[name], True
    if name in TOOL_ROLES or turn.get("tool_calls") or turn.get("function_call"):
        raise RowRejected(
            f"turn {number} is a tool call or tool result ({_show(raw_role)}): tool-calling "
            "conversations are not supported yet (system, user and assistant text turns only)",
            "tool_calls",
        )
    if role is None:
        raise RowRejected(f"unknown role {_show(raw_role)} in turn {number}", "unknown_role")
    if content_key not in turn:
        raise RowRejected(f"turn {number} has no {content_key!r} field", "malformed_turn")
    content = turn[content_key]
    if content is None and text.repair:
        return role, None, mapped
    return role, text(content, f"turn {number} content", parts=True), mapped


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


def _required_text(row: dict[str, Any], key: str, fmt: str, text: _TextReader) -> str:
    """A required, non-empty text field."""
    if key not in row:
        raise RowRejected(f"missing field {key!r}{_looks_like(row, fmt)}", "missing_field")
    value = text(row[key], f"field {key!r}")
    if not value.strip():
        raise RowRejected(f"field {key!r} is empty", "empty_field")
    return value


def _looks_like(row: dict[str, Any], fmt: str) -> str:
    """A hint when a row rejected as `fmt` has the keys of another format."""
    other = row_format(row)
    return f" (row looks like {other})" if other is not None and other != fmt else ""


def _show(value: str, limit: int = 40) -> str:
    """`repr` of a user-supplied string, shortened so reasons stay one readable line."""
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")
