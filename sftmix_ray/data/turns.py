"""One turn of a corpus row read into a chat message: role names and their aliases, text
(content parts, invalid Unicode), the marks that keep an answer out of training, tool calls,
tool results and tool definitions. The rules a whole conversation must satisfy are in
`conversation.py`; the row formats that hold turns in `formats.py`."""

from __future__ import annotations

import json
import re
from typing import Any

from sftmix_ray.data.reasoning import ROW_KEYS
from sftmix_ray.errors import RowRejected

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
# Tool results: OpenAI's `tool` (and older `function`), Llama 3.1's `ipython`, LLaMA-Factory's
# `observation`; read as role `tool`. Tool calls as turns of their own (LLaMA-Factory's
# `function_call`): an assistant turn whose content is the JSON call(s).
TOOL_RESULT_ROLES = frozenset(
    {"tool", "function", "ipython", "observation", "tool_response", "function_response"}
)
TOOL_CALL_ROLES = frozenset({"function_call", "tool_call"})
# Assistant names of real dumps that only the standard repairs accept (counted as a repair).
REPAIR_ROLE_ALIASES: dict[str, str] = {"bing": "assistant", "bard": "assistant"}
# Key pairs a turn may use, the format's own first: (role key, content key).
TURN_KEYS = {
    "sharegpt": (("from", "value"), ("role", "content")),
    "messages": (("role", "content"), ("from", "value")),
}
Message = dict[str, Any]
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_type_name(value: Any) -> str:
    """The JSON name of `value`'s type: null, bool, int, float, string, list, object."""
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string"}
    names.update({list: "list", dict: "object"})
    return names.get(type(value), type(value).__name__)


def typed(value: Any, kind: type, what: str) -> Any:
    """`value` if it is a `kind` (str or list); else the row is rejected as `wrong_type`."""
    if not isinstance(value, kind):
        noun = "a string" if kind is str else "a list"
        raise RowRejected(f"{what} must be {noun} (got {json_type_name(value)})", "wrong_type")
    return value


class TextReader:
    """Reads text values under one repair mode, noting the repairs it applies."""

    def __init__(self, repair: bool, repairs: set[str]) -> None:
        self.repair, self.repairs = repair, repairs

    def __call__(self, value: Any, what: str, parts: bool = False) -> str:
        """A string (or, with `parts`, a list of text parts, joined); lone surrogates replaced
        (a repair) or rejected."""
        if parts and isinstance(value, list):
            value = _join_text_parts(value, what)
        text: str = typed(value, str, what)
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
        if isinstance(part, dict) and part.get("type") in (None, "text"):  # null: a union's
            texts.append(typed(part.get("text"), str, f"{what} part {number} text"))
        else:
            kind = part.get("type") if isinstance(part, dict) else json_type_name(part)
            raise RowRejected(
                f"{what} part {number} is not text ({show(str(kind))}); only text is supported",
                "non_text_content",
            )
    return "\n".join(texts)


def parse_turn(turn: Any, number: int, fmt: str, text: TextReader) -> tuple[Message | None, bool]:
    """Read one turn as (message with its canonical role, mapped by a repair); reject
    malformed turns. The message is None for a null content that the repairs drop; an
    assistant turn marked not to be trained carries `"train": False`."""
    message, mapped = _read_turn(turn, number, fmt, text)
    if message is not None and message["role"] == "assistant" and not _trains(turn, number):
        message["train"] = False
    return message, mapped


def _trains(turn: dict[str, Any], number: int) -> bool:
    """False for a turn marked context only: `weight` 0 (Axolotl's sharegpt, SlimOrca's and
    OpenHermes' dumps; null or 1 train), `train` false (Axolotl's chat_template) or `loss`
    false (AgentInstruct's and AgentTuning's sharegpt: its few-shot answers; null or true
    train)."""
    flags = {key: turn.get(key) for key in ("train", "loss")}
    if any(flag is False for flag in flags.values()):
        return False  # context (a TRL prompt's answers are marked so): its weight is moot
    weight = turn.get("weight")
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise RowRejected(f"turn {number} weight must be 0 or 1 (got {weight!r})", "malformed_turn")
    for key, flag in flags.items():
        if flag is not None and not isinstance(flag, bool):
            raise RowRejected(
                f"turn {number} {key} must be true or false (got {json_type_name(flag)})",
                "malformed_turn",
            )
    return weight != 0


def _read_turn(turn: Any, number: int, fmt: str, text: TextReader) -> tuple[Message | None, bool]:
    """`parse_turn` without the training mark."""
    if not isinstance(turn, dict):
        raise RowRejected(
            f"turn {number} is not an object (got {json_type_name(turn)})", "malformed_turn"
        )
    keys = TURN_KEYS[fmt]
    # By value, not by key: Parquet and HF datasets give every turn the union of the keys
    # their rows use, with nulls where a row's turn had none.
    role_key, content_key = next(
        (pair for pair in keys if turn.get(pair[0]) is not None),
        next((pair for pair in keys if pair[0] in turn), keys[0]),
    )
    if role_key not in turn:
        raise RowRejected(f"turn {number} has no {role_key!r} field", "malformed_turn")
    raw_role = typed(turn[role_key], str, f"turn {number} role")
    name = raw_role.strip().lower()
    role, mapped = ROLE_ALIASES.get(name), False
    if role is None and text.repair and name in REPAIR_ROLE_ALIASES:
        role, mapped = REPAIR_ROLE_ALIASES[name], True
    tool_name = name.replace("-", "_")  # `function-call` / `function-response` in some dumps
    if tool_name in TOOL_CALL_ROLES:  # the turn's content is the call(s)
        calls = parse_calls(turn.get(content_key), number)
        return {"role": "assistant", "content": "", "tool_calls": calls}, False
    if tool_name in TOOL_RESULT_ROLES:
        return _tool_result(turn, content_key, number, text), False
    if role is None:
        raise RowRejected(f"unknown role {show(raw_role)} in turn {number}", "unknown_role")
    raw_calls = turn.get("tool_calls") or turn.get("function_call")
    if raw_calls and role != "assistant":
        raise RowRejected(f"turn {number} ({role}) has tool calls", "malformed_tool_call")
    if content_key not in turn and not raw_calls:
        raise RowRejected(f"turn {number} has no {content_key!r} field", "malformed_turn")
    content = turn.get(content_key)
    extra: Message = {}  # an answer's reasoning (reasoning.py)
    if role == "assistant":
        content, thought = _reasoning_of(turn, content, number, text)
        if thought.strip():
            extra["reasoning"] = thought
    if raw_calls:
        text_ = "" if content is None else text(content, f"turn {number} content", parts=True)
        return {
            "role": role,
            "content": text_,
            "tool_calls": parse_calls(raw_calls, number),
            **extra,
        }, mapped
    if content is None and role == "assistant" and isinstance(turn.get("refusal"), str):
        content = turn["refusal"]  # OpenAI's refusal: the answer's text, content left null
    if content is None and text.repair:
        return None, mapped
    content = text(content, f"turn {number} content", parts=True)
    return {"role": role, "content": content, **extra}, mapped


def _reasoning_of(
    turn: dict[str, Any], content: Any, number: int, text: TextReader
) -> tuple[Any, str]:
    """An answer's content without its thinking parts (Anthropic's `{"type": "thinking"}`),
    and its reasoning: the first of the turn's reasoning fields that is set, else those
    parts' text ("" for none)."""
    thoughts: list[str] = []
    if isinstance(content, list) and any(
        isinstance(p, dict) and p.get("type") == "thinking" for p in content
    ):
        thoughts = [
            text(p.get("thinking"), f"turn {number} thinking part")
            for p in content
            if isinstance(p, dict) and p.get("type") == "thinking"
        ]
        content = [p for p in content if not (isinstance(p, dict) and p.get("type") == "thinking")]
    for key in ROW_KEYS:  # text only: a flag (`"thinking": false`) is not a trace
        if isinstance(turn.get(key), str | list) and turn[key]:
            return content, text(turn[key], f"turn {number} {key}", parts=True)
    return content, "\n\n".join(thoughts)


def _tool_result(turn: dict[str, Any], content_key: str, number: int, text: TextReader) -> Message:
    """A tool result turn: its text ("" when null: a tool may return nothing), and the tool's
    `name` and the `tool_call_id` it answers when the row gives them (some templates need
    the id, e.g. Mistral's)."""
    content = turn.get(content_key)
    text_parts = (  # OpenAI's content parts (other keys: a Parquet union's nulls, cache marks)
        isinstance(content, list)
        and bool(content)
        and all(isinstance(p, dict) and _is_text_part(p) for p in content)
    )
    if isinstance(content, dict | list | int | float | bool) and not text_parts:
        # A structured result (records, a number, an empty list) as its JSON text.
        content = json_value(content, f"turn {number} content", "malformed_turn", dump=True)
    result = "" if content is None else text(content, f"turn {number} content", parts=True)
    message: Message = {"role": "tool", "content": result}
    for key in ("name", "tool_call_id"):
        if isinstance(turn.get(key), str) and turn[key]:
            message[key] = turn[key]
    return message


def _is_text_part(part: dict[str, Any]) -> bool:
    """A text part (`{"type": "text", "text": str}`, or `{"text": str}` alone), as opposed to
    a record of a structured tool result (`{"type": "city", "name": ...}`)."""
    text = isinstance(part.get("text"), str)
    if part.get("type") == "text":
        return text
    return (
        text and part.get("type") is None and all(v is None for k, v in part.items() if k != "text")
    )


def parse_calls(value: Any, number: int, what: str = "") -> list[dict[str, Any]]:
    """Tool calls in the shape chat templates read (`{"type": "function", "function": {"name",
    "arguments": dict}}`, with the row's `id` when given) from OpenAI's `tool_calls` list, its
    older single `function_call`, or LLaMA-Factory's `function_call` turn (JSON text of a call
    or a list of calls); arguments given as JSON text are parsed."""
    what = what or f"turn {number} tool call"
    from_text = isinstance(value, str)  # JSON text: its nulls are the row's, kept
    value = json_value(value, what, "malformed_tool_call")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RowRejected(f"{what} list is empty", "malformed_tool_call")
    calls = []
    for item in items:
        function = _function_of(item)
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise RowRejected(f"{what} has no function name", "malformed_tool_call")
        # Either key, whichever is set (a Parquet struct may carry both, one of them null).
        arguments = function.get("arguments")
        arguments = function.get("parameters") if arguments is None else arguments
        if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
            arguments = {}
        if not from_text or isinstance(arguments, str):  # text in text: parsed, nulls kept
            what_ = f"{what} {show(name)}: arguments"
            arguments = json_value(arguments, what_, "malformed_tool_call")
        if not isinstance(arguments, dict):
            raise RowRejected(
                f"{what} {show(name)}: arguments must be an object "
                f"(got {json_type_name(arguments)})",
                "malformed_tool_call",
            )
        call: dict[str, Any] = {
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        if isinstance(item.get("id"), str) and item["id"]:
            call["id"] = item["id"]
        calls.append(call)
    return calls


def _function_of(item: Any) -> Any:
    """The function of a call or a tool definition: OpenAI's `{"type": "function", "function":
    {...}}` wraps it, LLaMA-Factory and xLAM give it bare."""
    function = item.get("function") if isinstance(item, dict) else None
    return function if isinstance(function, dict) else item


def json_value(value: Any, what: str, kind: str, dump: bool = False) -> Any:
    """`value` with the null members of its objects left out, or the JSON it holds when text
    (as written: its nulls mean something, `"default": null` in a schema), or, with `dump`,
    that as JSON text. Parquet and HF datasets store objects as structs with the union of
    every row's keys, nulls where a row had none: without this, one call would train as
    `{"city": "Paris", "query": null, "limit": null}` (an explicit null in a JSON Lines object
    goes the same way: the reader cannot tell them apart). Text that is not JSON, or JSON
    nested too deep to read, rejects the row as `kind`."""

    def strip(item: Any) -> Any:
        if isinstance(item, dict):
            return {k: strip(v) for k, v in item.items() if v is not None}
        if isinstance(item, list):
            return [strip(v) for v in item]
        return item

    try:
        if isinstance(value, str) and not dump:
            value = json.loads(value, strict=False)  # raw newlines in strings, as dumps write
        else:
            value = strip(value)
        return json.dumps(value, ensure_ascii=False) if dump else value
    except RecursionError:
        raise RowRejected(f"{what} is nested too deeply", kind) from None
    except ValueError:
        raise RowRejected(f"{what} is not valid JSON", kind) from None


def normalize_tools(row: Any) -> list[dict[str, Any]] | None:
    """The row's tool definitions (`tools`, or OpenAI's older `functions`: a list, or its JSON
    text as LLaMA-Factory writes it) in the shape chat templates read (`{"type": "function",
    "function": {"name", ...}}`); None when it has none. Raise `RowRejected` when malformed."""
    if not isinstance(row, dict):
        return None
    key = "tools" if row.get("tools") not in (None, "", []) else "functions"
    value = row.get(key)
    if value in (None, "", []):
        return None
    value = json_value(value, f"field {key!r}", "malformed_tools")
    items = value if isinstance(value, list) else [value]
    tools = []
    for number, item in enumerate(items, start=1):
        function = _function_of(item)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowRejected(
                f"field {key!r} item {number} is not a function definition with a name",
                "malformed_tools",
            )
        tools.append({"type": "function", "function": function})
    return tools or None


def show(value: str, limit: int = 40) -> str:
    """`repr` of a user-supplied string, shortened so reasons stay one readable line."""
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")
