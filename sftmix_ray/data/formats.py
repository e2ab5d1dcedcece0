"""Normalize one raw corpus row (alpaca, sharegpt, messages, prompt_completion, xlam or glaive) to a
list of chat messages.

The result is always `[{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]`
with an optional leading system message, then user and assistant turns alternating, starting
with a user turn and ending with an assistant turn; an assistant turn may call tools
(`"tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}]`, its
content then possibly ""), and its calls are answered by one or more `tool` turns (the
results) before the next assistant turn. The tool definitions of a row (`tools`, or OpenAI's
older `functions`) are read by `normalize_tools`. A row that cannot be normalized raises
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
- prompt_completion (TRL's): `prompt` is a string (one user turn) or a list of turns, and
  `completion` a string (one assistant turn) or a list of turns; the turns are numbered on
  from the prompt's into the completion's; the prompt's assistant turns are context, not
  trained (TRL trains the completion only). Unlike TRL, a string pair is rendered with the
  chat template like every other row (TRL concatenates the two texts);
- an assistant turn marked `weight: 0` (Axolotl's and SlimOrca's, OpenHermes' sharegpt
  dumps) or `train: false` (Axolotl's chat_template datasets) is context, not trained; a row
  with no assistant turn left to train is rejected (`no_trained_turn`);
- glaive (glaive-function-calling-v2's `system` and `chat` texts, read by glaive.py into turns
  with calls, results and the definitions);
- xlam (Salesforce's xLAM function-calling rows): `query` is the user turn, `answers` (a JSON
  list of `{"name", "arguments"}`, as text or a list) the assistant's calls, `tools` their
  definitions: single-turn data that teaches the calls themselves;
- roles are known (aliases from real dumps are mapped, case-insensitively); tool calls come as
  OpenAI's `tool_calls` (or older `function_call`) on an assistant turn, or as LLaMA-Factory's
  `function_call` turn (a JSON call or list of calls); tool results as `tool`, `function`
  (OpenAI's older name), `ipython` (Llama 3.1's), `observation` (LLaMA-Factory's),
  `tool_response` or `function_response` turns (hyphens read as underscores); a call's
  arguments are a JSON object (or its text);
- a system message may only come first; at least one assistant turn; the conversation
  starts with a user turn, alternates, and ends with an assistant turn (a trailing user turn
  would have no response to learn from, and chat templates reject non-alternating roles);
  tool results follow an assistant turn (one that calls tools, or one whose text holds the
  call as Hermes' dumps write it) or another result, and are followed by an assistant turn;
  an assistant turn that calls tools is followed by their results or
  ends the conversation (the model learns to make the call). The repairs drop trailing tool
  results like a trailing user turn, and merge an assistant text turn into the tool-calling
  turn right after it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

from sftmix_ray.data.columns import FIELDS, rename_columns
from sftmix_ray.data.glaive import glaive_row
from sftmix_ray.errors import DataError, RowRejected

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "xlam", "glaive")
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
# Tool results: OpenAI's `tool` (and older `function`), Llama 3.1's `ipython`, LLaMA-Factory's
# `observation`; read as role `tool`. Tool calls as turns of their own (LLaMA-Factory's
# `function_call`): an assistant turn whose content is the JSON call(s).
TOOL_RESULT_ROLES = frozenset(
    {"tool", "function", "ipython", "observation", "tool_response", "function_response"}
)
TOOL_CALL_ROLES = frozenset({"function_call", "tool_call"})
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
    "trailing_tool_result_dropped",  # tool results at the end, no answer to learn from, dropped
)
# Key pairs a turn may use, the format's own first: (role key, content key).
_TURN_KEYS = {
    "sharegpt": (("from", "value"), ("role", "content")),
    "messages": (("role", "content"), ("from", "value")),
}
_LIST_FIELD = {"sharegpt": "conversations", "messages": "messages"}

Message = dict[str, Any]
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
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "query" in row and "answers" in row:
        return "xlam"
    if isinstance(row.get("chat"), str):
        return "glaive"
    return None


def format_of(row: Any, corpus_format: str, per_row: bool) -> str:
    """The format to read `row` in: its own (`data.format: auto` reads each row in its own, so
    a directory of alpaca and sharegpt files loses neither), else the corpus' (whose rules
    then say precisely what the row lacks)."""
    return (per_row and row_format(row)) or corpus_format


def detect_format(rows: Iterable[Any]) -> str:
    """The format of a corpus, from the keys of its first row that matches a known format."""
    columns: str | None = None  # the first row's, to say what the corpus has
    for row in rows:
        fmt = row_format(row)
        if fmt is not None:
            return fmt
        if columns is None and isinstance(row, dict):
            columns = _columns(row)
    has = f" (its first row has {columns})" if columns else ""
    raise DataError(
        "cannot detect the corpus format: no row has a 'messages', 'conversations' or "
        "'instruction' field, 'prompt' and 'completion', 'query' and 'answers', or a 'chat' "
        f"text{has}; pass the format explicitly (alpaca, sharegpt, messages, "
        "prompt_completion, xlam or glaive) and map columns of other names with data.columns "
        "(LMSYS-Chat-1M and WildChat: {messages: conversation})"
    )


def normalize_row(row: Any, fmt: str) -> list[Message]:
    """Normalize one raw row to chat messages, strictly (no repairs); raise `RowRejected`."""
    return normalize_with_repairs(row, fmt, "none")[0]


def read_example(
    raw: Any,
    fmt: str,
    repair: str = "standard",
    *,
    columns: dict[str, str] | None = None,
    per_row: bool = False,
    history_masked: bool = False,
) -> tuple[Any, list[Message], list[dict[str, Any]] | None, list[str]]:
    """A raw corpus row read as prepare reads it: its columns renamed (`data.columns`), in its
    own format when `per_row` (`data.format: auto`) else `fmt`, normalized, its history masked
    (`data.mask_history`). Returns the renamed row (for its `answer`), the messages, the tool
    definitions and the repairs; raises `RowRejected`. The one reader of the tokenization
    actors, the tiny tokenizer's sample and `validate-data`."""
    row = rename_columns(raw, columns)
    messages, tools, repairs = normalize_example(row, format_of(row, fmt, per_row), repair)
    return row, mask_history(messages) if history_masked else messages, tools, repairs


def normalize_with_repairs(
    row: Any, fmt: str, repair: str = "standard"
) -> tuple[list[Message], list[str]]:
    """Normalize one raw row; return the messages and the repairs applied (kinds, each once).

    Raise `RowRejected` (with its `kind`) when the row is invalid even after the repairs
    (its tool definitions included: `normalize_example` returns them).
    """
    messages, _, repairs = normalize_example(row, fmt, repair)
    return messages, repairs


def normalize_example(
    row: Any, fmt: str, repair: str = "standard"
) -> tuple[list[Message], list[dict[str, Any]] | None, list[str]]:
    """Normalize one raw row; return its messages, its tool definitions (None without) and
    the repairs applied (kinds, each once). Raise `RowRejected` when the row is invalid."""
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
                "row matches no format (no 'messages', 'conversations' or 'instruction' "
                "field, nor 'prompt' and 'completion', nor 'query' and 'answers', nor a 'chat' "
                f"text; its columns: {_columns(row)})",
                "no_format",
            )
        fmt = detected
    repairs: set[str] = set()
    text = _TextReader(repair == "standard", repairs)
    if fmt == "glaive":  # its texts read into a messages row, then the same rules
        row, fmt = glaive_row(row), "messages"
    if fmt == "alpaca":
        messages = _normalize_alpaca(row, text)
    elif fmt == "xlam":
        messages = _normalize_xlam(row, text)
    elif fmt == "prompt_completion":
        messages = _normalize_prompt_completion(row, text)
    else:
        messages = _normalize_conversation(row, fmt, text)
    return messages, normalize_tools(row), sorted(repairs)


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


def _normalize_xlam(row: dict[str, Any], text: _TextReader) -> list[Message]:
    """xLAM's single-turn function calling: `query` -> user, `answers` -> the assistant's calls
    (an empty list, "call nothing", has no answer to learn: rejected); optional system first."""
    query = _required_text(row, "query", "xlam", text)
    if "answers" not in row:
        raise RowRejected(f"missing field 'answers'{_looks_like(row, 'xlam')}", "missing_field")
    calls = _parse_calls(row["answers"], 2, what="field 'answers'")
    system = text.optional(row, "system")
    messages: list[Message] = [{"role": "system", "content": system}] if system.strip() else []
    messages.append({"role": "user", "content": query})
    messages.append({"role": "assistant", "content": "", "tool_calls": calls})
    return messages


def _normalize_prompt_completion(row: dict[str, Any], text: _TextReader) -> list[Message]:
    """TRL's prompt-completion row as one conversation: the prompt's turns (its assistant turns
    not trained), then the completion's; a string is one user (prompt) or assistant
    (completion) turn."""
    turns: list[Any] = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        if key not in row:
            raise RowRejected(
                f"missing field {key!r}{_looks_like(row, 'prompt_completion')}", "missing_field"
            )
        value = row[key]
        if isinstance(value, str):
            turns.append({"role": role, "content": value})
        elif isinstance(value, list):
            context = key == "prompt"  # TRL never trains on the prompt
            turns.extend(
                {**t, "train": False} if context and isinstance(t, dict) else t for t in value
            )
        else:
            raise RowRejected(
                f"field {key!r} must be a string or a list of turns (got {json_type_name(value)})",
                "wrong_type",
            )
    if not turns:
        raise RowRejected("fields 'prompt' and 'completion' are both empty", "empty_conversation")
    in_prompt = 1 if isinstance(row["prompt"], str) else len(row["prompt"])
    try:
        return _normalize_conversation(
            {"messages": turns, "system": row.get("system")}, "messages", text
        )
    except RowRejected as exc:
        if exc.kind == "no_trained_turn":
            raise RowRejected(
                "the completion has no assistant turn to train (none, or each marked weight 0 "
                "or train false)",
                exc.kind,
            ) from None

        def side(match: re.Match[str]) -> str:  # the turns are numbered on across both sides
            n = int(match.group(1))
            return f"prompt turn {n}" if n <= in_prompt else f"completion turn {n - in_prompt}"

        raise RowRejected(re.sub(r"\bturn (\d+)", side, exc.reason), exc.kind) from None


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

    numbered: list[tuple[int, Message]] = []  # (turn number, message)
    repair, repairs = text.repair, text.repairs
    # sharegpt rows carry their system prompt in this field; for messages rows it is a
    # fallback, used (when a string) only if no turn is a system one, as before it was read.
    if fmt == "sharegpt" or isinstance(row.get("system"), str):
        system = text.optional(row, "system")
    else:
        system = ""
    if system.strip():
        numbered.append((0, {"role": "system", "content": system}))
    for number, turn in enumerate(turns, start=1):
        message, mapped = _parse_turn(turn, number, fmt, text)
        if mapped:
            repairs.add("role_mapped")
        if message is None:  # a repair (strict reading rejects it as wrong_type)
            repairs.add("null_content_dropped")
            continue
        role, content = message["role"], message["content"]
        if not content.strip() and not _is_tool_turn(message):
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
        numbered.append((number, message))
    if repair:
        numbered = _repair_order(numbered, repairs)
    _check_order(numbered)
    if all(m.get("train") is False for _, m in numbered if m["role"] == "assistant"):
        raise RowRejected(
            "no assistant turn is trained (every one is marked weight 0 or train false)",
            "no_trained_turn",
        )
    return _name_tool_results([message for _, message in numbered])


def mask_history(messages: list[Message]) -> list[Message]:
    """`data.mask_history`: every assistant turn but the last marked `"train": False` (the
    earlier answers and calls are context, as LLaMA-Factory's mask_history trains only the
    last turn); a row whose last answer is itself not trained is rejected."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if messages[last].get("train") is False:
        raise RowRejected(
            "the last assistant turn is marked not to train (weight 0 or train false) and "
            "data.mask_history trains no other",
            "no_trained_turn",
        )
    return [
        {**m, "train": False} if m["role"] == "assistant" and i != last else m
        for i, m in enumerate(messages)
    ]


def _name_tool_results(messages: list[Message]) -> list[Message]:
    """Give each tool result without a `name` the name of the call it answers (by
    `tool_call_id`, else by its place among the results after the call), as templates such as
    Hermes' require and OpenAI rows and LLaMA-Factory's observations leave out."""
    calls: list[dict[str, Any]] = []
    answered = 0
    for message in messages:
        if message["role"] == "assistant":
            calls, answered = message.get("tool_calls") or [], 0
        elif message["role"] == "tool":
            if "name" not in message and calls:
                by_id = [c for c in calls if c.get("id") and c["id"] == message.get("tool_call_id")]
                call = by_id[0] if by_id else calls[min(answered, len(calls) - 1)]
                message["name"] = call["function"]["name"]
            answered += 1
    return messages


def _is_tool_turn(message: Message) -> bool:
    """A tool result, or an assistant turn that calls tools (either may have empty content)."""
    return message["role"] == "tool" or bool(message.get("tool_calls"))


def _repair_order(
    numbered: list[tuple[int, Message]], repairs: set[str]
) -> list[tuple[int, Message]]:
    """Drop leading assistant turns, merge runs of one role, drop a trailing user turn and
    trailing tool results."""
    head = [t for t in numbered[:1] if t[1]["role"] == "system"]
    body = numbered[len(head) :]
    first_user = next((i for i, t in enumerate(body) if t[1]["role"] == "user"), None)
    if first_user is None:
        return numbered  # nothing to repair into a conversation: _check_order says why
    if first_user > 0 and all(t[1]["role"] in ("assistant", "tool") for t in body[:first_user]):
        repairs.add("leading_assistant_dropped")
        body = body[first_user:]
    merged: list[tuple[int, Message]] = []
    for number, message in body:
        role = message["role"]
        previous = merged[-1][1] if merged else None
        # Text turns of one role merge; an assistant text turn also merges into the
        # tool-calling turn right after it ("Let me look that up." + the call).
        if (
            previous is not None
            and previous["role"] == role
            and role in ("user", "assistant")
            and not previous.get("tool_calls")
        ):
            if previous.get("train", True) != message.get("train", True):
                # One merged turn would train the context part or leave the trained one out.
                raise RowRejected(
                    f"turn {merged[-1][0]} (assistant, "
                    f"{'context' if previous.get('train') is False else 'trained'}) runs on "
                    f"into turn {number} ("
                    f"{'context' if message.get('train') is False else 'trained'}): a "
                    "prefilled answer or a weight 0 and a weight 1 answer in a row, which "
                    "cannot be merged without training the context",
                    "mixed_training_turns",
                )
            repairs.add("same_role_merged")
            parts = [c for c in (previous["content"], message["content"]) if c]
            merged[-1] = (merged[-1][0], {**message, "content": "\n\n".join(parts)})
        else:
            merged.append((number, message))
    while len(merged) > 1 and merged[-1][1]["role"] in ("user", "tool"):
        role = merged.pop()[1]["role"]
        repairs.add("trailing_user_dropped" if role == "user" else "trailing_tool_result_dropped")
    return head + merged


def _parse_turn(turn: Any, number: int, fmt: str, text: _TextReader) -> tuple[Message | None, bool]:
    """Read one turn as (message with its canonical role, mapped by a repair); reject
    malformed turns. The message is None for a null content that the repairs drop; an
    assistant turn marked not to be trained carries `"train": False`."""
    message, mapped = _read_turn(turn, number, fmt, text)
    if message is not None and message["role"] == "assistant" and not _trains(turn, number):
        message["train"] = False
    return message, mapped


def _trains(turn: dict[str, Any], number: int) -> bool:
    """False for a turn marked context only: `weight` 0 (Axolotl's sharegpt, SlimOrca's and
    OpenHermes' dumps; null or 1 train) or `train` false (Axolotl's chat_template)."""
    weight, train = turn.get("weight"), turn.get("train")
    if train is False:  # context (a TRL prompt's answers are marked so): its weight is moot
        return False
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise RowRejected(f"turn {number} weight must be 0 or 1 (got {weight!r})", "malformed_turn")
    if train is not None and not isinstance(train, bool):
        raise RowRejected(
            f"turn {number} train must be true or false (got {json_type_name(train)})",
            "malformed_turn",
        )
    return weight != 0 and train is not False


def _read_turn(turn: Any, number: int, fmt: str, text: _TextReader) -> tuple[Message | None, bool]:
    """`_parse_turn` without the training mark."""
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
    tool_name = name.replace("-", "_")  # `function-call` / `function-response` in some dumps
    if tool_name in TOOL_CALL_ROLES:  # the turn's content is the call(s)
        calls = _parse_calls(turn.get(content_key), number)
        return {"role": "assistant", "content": "", "tool_calls": calls}, False
    if tool_name in TOOL_RESULT_ROLES:
        return _tool_result(turn, content_key, number, text), False
    if role is None:
        raise RowRejected(f"unknown role {_show(raw_role)} in turn {number}", "unknown_role")
    raw_calls = turn.get("tool_calls") or turn.get("function_call")
    if raw_calls and role != "assistant":
        raise RowRejected(f"turn {number} ({role}) has tool calls", "malformed_tool_call")
    if content_key not in turn and not raw_calls:
        raise RowRejected(f"turn {number} has no {content_key!r} field", "malformed_turn")
    content = turn.get(content_key)
    if raw_calls:
        text_ = "" if content is None else text(content, f"turn {number} content", parts=True)
        return {
            "role": role,
            "content": text_,
            "tool_calls": _parse_calls(raw_calls, number),
        }, mapped
    if content is None and text.repair:
        return None, mapped
    return {"role": role, "content": text(content, f"turn {number} content", parts=True)}, mapped


def _tool_result(turn: dict[str, Any], content_key: str, number: int, text: _TextReader) -> Message:
    """A tool result turn: its text ("" when null: a tool may return nothing), and the tool's
    `name` and the `tool_call_id` it answers when the row gives them (some templates need
    the id, e.g. Mistral's)."""
    content = turn.get(content_key)
    text_parts = (  # OpenAI's content parts: text only, nothing beside it
        isinstance(content, list)
        and bool(content)
        and all(
            isinstance(p, dict) and p.get("type", "text") == "text" and set(p) <= {"type", "text"}
            for p in content
        )
    )
    if isinstance(content, dict | list | int | float | bool) and not text_parts:
        # A structured result (records, a number, an empty list) as its JSON text.
        content = _json_value(content, f"turn {number} content", "malformed_turn", dump=True)
    result = "" if content is None else text(content, f"turn {number} content", parts=True)
    message: Message = {"role": "tool", "content": result}
    for key in ("name", "tool_call_id"):
        if isinstance(turn.get(key), str) and turn[key]:
            message[key] = turn[key]
    return message


def _parse_calls(value: Any, number: int, what: str = "") -> list[dict[str, Any]]:
    """Tool calls in the shape chat templates read (`{"type": "function", "function": {"name",
    "arguments": dict}}`, with the row's `id` when given) from OpenAI's `tool_calls` list, its
    older single `function_call`, or LLaMA-Factory's `function_call` turn (JSON text of a call
    or a list of calls); arguments given as JSON text are parsed."""
    what = what or f"turn {number} tool call"
    value = _json_value(value, what, "malformed_tool_call")
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
        arguments = _json_value(
            arguments, f"{what} {_show(name)}: arguments", "malformed_tool_call"
        )
        if not isinstance(arguments, dict):
            raise RowRejected(
                f"{what} {_show(name)}: arguments must be an object "
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


def _json_value(value: Any, what: str, kind: str, dump: bool = False) -> Any:
    """`value` (or the JSON it holds, when text) with the null members of its objects left out,
    or, with `dump`, that as JSON text. Parquet and HF datasets store objects as structs with
    the union of every row's keys, nulls where a row had none: without this, one call would
    train as `{"city": "Paris", "query": null, "limit": null}`. Text that is not JSON, or JSON
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
    value = _json_value(value, f"field {key!r}", "malformed_tools")
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


def _check_order(numbered: list[tuple[int, Message]]) -> None:
    """System first; then user/assistant alternating, from user to assistant, with tool
    results between an assistant turn that calls tools and the next assistant turn."""
    for position, (number, message) in enumerate(numbered):
        if message["role"] == "system" and position > 0:
            raise RowRejected(f"system message must come first (turn {number})", "system_not_first")
    body = [(number, message) for number, message in numbered if message["role"] != "system"]
    if not body:
        raise RowRejected("no user or assistant turn", "no_turns")
    if all(message["role"] != "assistant" for _, message in body):
        raise RowRejected("no assistant turn", "no_assistant_turn")
    first_number, first = body[0]
    if first["role"] != "user":
        raise RowRejected(
            f"conversation must start with a user turn (turn {first_number} is {first['role']})",
            "starts_with_assistant",
        )
    for (_, previous), (number, message) in pairwise(body):
        role, before = message["role"], previous["role"]
        calls = before == "assistant" and bool(previous.get("tool_calls"))
        # A result may also follow an assistant turn whose call is in its text (Hermes'
        # `<tool_call>` markup in the gpt turns of its sharegpt dumps).
        if role == "tool" and before not in ("assistant", "tool"):
            raise RowRejected(
                f"turn {number} is a tool result with no assistant turn before it",
                "orphan_tool_result",
            )
        if calls and role != "tool":
            raise RowRejected(
                f"turn {number} ({role}) follows a tool call that has no result",
                "unanswered_tool_call",
            )
        if before == "tool" and role not in ("tool", "assistant"):
            raise RowRejected(
                f"turn {number} ({role}) follows a tool result that no assistant turn answers",
                "unanswered_tool_result",
            )
        if role == before and role != "tool":
            raise RowRejected(
                f"turn {number} repeats role {role!r} (user and assistant turns must alternate)",
                "repeated_role",
            )
    last_number, last = body[-1]
    if last["role"] == "tool":
        raise RowRejected(
            f"conversation ends with a tool result (turn {last_number}) without a reply",
            "ends_with_tool_result",
        )
    if last["role"] != "assistant":
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
    """A hint when a row rejected as `fmt` has the keys of another format, or columns that no
    format reads (Dolly's `response`: data.columns can map it)."""
    other = row_format(row)
    if other is not None and other != fmt:
        return f" (row looks like {other})"
    unread = _columns({k: None for k in row if k not in FIELDS}, 4)
    return f" (unmapped columns: {unread}; see data.columns)" if unread else ""


def _columns(row: dict[str, Any], limit: int = 8) -> str:
    """The first `limit` column names of a row, shown for a reason ("" for none)."""
    return ", ".join(_show(str(k), 20) for k in list(row)[:limit])


def _show(value: str, limit: int = 40) -> str:
    """`repr` of a user-supplied string, shortened so reasons stay one readable line."""
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")
