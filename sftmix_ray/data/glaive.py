"""Glaive's original function-calling rows (glaiveai/glaive-function-calling-v2, 113k rows).

A row is two texts. `system`: "SYSTEM: You are a helpful assistant with access to the following
functions. Use them if required -" then the function definitions as JSON objects (often
pretty-printed over several lines), or a plain system prompt ("... with no access to external
functions."). `chat`: the transcript, turns started by `USER:`, `ASSISTANT:` and `FUNCTION
RESPONSE:` at the start of a line, each assistant turn ended by `<|endoftext|>`; an assistant
turn that calls a function is `<functioncall> {"name": ..., "arguments": '{...}'}`, the
arguments JSON text in single quotes (so the call is not JSON as written).

`glaive_row` turns that into the OpenAI shape the formats read (turns with `tool_calls`, `tool`
turns, a `tools` list); formats.py then applies the same rules and repairs as to every row.
With definitions, glaive's preamble is left out: the chat template writes its own tool
instructions around them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sftmix_ray.errors import RowRejected


# A label starts a turn at the start of the text, after a blank line (glaive separates turns
# with "\n\n\n"; a label on a line of its own inside a turn is text) or right after an
# assistant turn's `<|endoftext|>` (the dump sometimes runs on on the same line).
def _labels(separator: str) -> re.Pattern[str]:
    """Turn labels at the start of the text, after `separator` or after `<|endoftext|>`."""
    return re.compile(
        rf"(?:^|{separator}|<\|endoftext\|>)\s*(USER|ASSISTANT|FUNCTION RESPONSE)[ \t]*:[ \t]*"
    )


_TURN = _labels(r"\n[ \t]*\n")
_ROLES = {"USER": "user", "ASSISTANT": "assistant", "FUNCTION RESPONSE": "tool"}
_END = "<|endoftext|>"
_GLAIVE_PREAMBLE = "You are a helpful assistant with access to the following functions"
_CALL = "<functioncall>"
# `{"name": "f", "arguments": '{...}'}`: the arguments' JSON text in single quotes.
_QUOTED_CALL = re.compile(
    r'^\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*\'(.*)\'\s*\}$', re.S
)


def glaive_row(row: dict[str, Any]) -> dict[str, Any]:
    """A glaive row as a `messages` row (with `system` and `tools` when it has them); raise
    `RowRejected` when its texts cannot be read."""
    chat = row.get("chat")
    if not isinstance(chat, str):
        kind = "missing_field" if chat is None else "wrong_type"
        raise RowRejected("field 'chat' must be the transcript text", kind)
    system, defined = _system(row.get("system"))
    tools: Any = defined or row.get("tools")  # a conversion may keep them in their own column
    out: dict[str, Any] = {"messages": _turns(chat)}
    if system:
        out["system"] = system
    if tools:
        out["tools"] = tools
    return out


def _system(value: Any) -> tuple[str, list[Any]]:
    """The system prompt (without glaive's `SYSTEM:` label) and the function definitions in
    it; with definitions, the prompt is "" (it only introduces them)."""
    if value is None:
        return "", []
    if not isinstance(value, str):
        raise RowRejected("field 'system' must be a string", "wrong_type")
    text = re.sub(r"^\s*SYSTEM\s*:\s*", "", value)
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    preamble = text[: max(start, 0)].strip()
    if start < 0 or "function" not in preamble.lower():
        return text.strip(), []  # a plain prompt (braces in it are its own)
    decoder, tools, at = json.JSONDecoder(strict=False), [], start
    while at < len(text):
        try:
            item, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            raise RowRejected(
                "field 'system' has function definitions that are not valid JSON",
                "malformed_tools",
            ) from None
        tools.extend(item if isinstance(item, list) else [item])
        while at < len(text) and text[at].isspace():
            at += 1
    # glaive's own preamble only introduces the definitions; another one is the system prompt.
    return ("" if preamble.startswith(_GLAIVE_PREAMBLE) else preamble), tools


# A transcript with no blank line before any label but the first (a conversion that joined
# turns with single newlines) is split at every label that starts a line.
_LINE_TURN = _labels(r"\n")


def _turns(chat: str) -> list[dict[str, Any]]:
    """The transcript's turns, in order."""
    marks = list(_TURN.finditer(chat))
    if len(marks) < 2:
        marks = list(_LINE_TURN.finditer(chat))
    if not marks:
        raise RowRejected("field 'chat' has no USER: or ASSISTANT: turn", "no_turns")
    if chat[: marks[0].start()].strip():
        raise RowRejected("field 'chat' has text before its first turn label", "malformed_turn")
    turns = []
    for number, (mark, after) in enumerate(zip(marks, [*marks[1:], None]), start=1):
        content = chat[mark.end() : after.start() if after else len(chat)].strip()
        role = _ROLES[mark.group(1)]
        if role == "assistant":
            content = content.removesuffix(_END).rstrip()
            turns.append(_assistant(content, number))
        else:
            turns.append({"role": role, "content": content})
    return turns


def _assistant(content: str, number: int) -> dict[str, Any]:
    """An assistant turn; `<functioncall> {...}` (after any text) is its call."""
    at = content.find(_CALL)
    if at < 0:
        return {"role": "assistant", "content": content}
    text, call = content[:at].strip(), content[at + len(_CALL) :].strip()
    unreadable = RowRejected(
        f"turn {number} (assistant) has a function call that cannot be read",
        "malformed_tool_call",
    )
    try:
        parsed = json.loads(call, strict=False)  # raw newlines in strings, as dumps have
    except RecursionError:
        raise unreadable from None
    except ValueError:
        quoted = _QUOTED_CALL.match(call)
        if quoted is None:
            raise unreadable from None
        try:  # the name as JSON text; the arguments stay text (formats.py parses them)
            name = json.loads(quoted.group(1), strict=False)
        except ValueError:
            raise unreadable from None
        parsed = {"name": name, "arguments": quoted.group(2).replace("\\'", "'")}
    return {"role": "assistant", "content": text, "function_call": parsed}
