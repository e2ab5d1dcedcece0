"""Normalize one raw corpus row (alpaca, sharegpt, messages, prompt_completion, xlam, glaive or
text) to a list of chat messages.

The result is always `[{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]`
with an optional leading system message, then user and assistant turns alternating, starting
with a user turn and ending with an assistant turn (system turns may stand between them); an
assistant turn may call tools (`"tool_calls": [{"type": "function", "function": {"name": str,
"arguments": dict}}]`, its content then possibly ""), and its calls are answered by one or
more `tool` turns (the results) before the next assistant turn. The tool definitions of a
row (`tools`, or OpenAI's older `functions`) are read by `normalize_tools`. A row that cannot
be normalized raises `RowRejected` with a precise reason; turns are numbered from 1 as they
appear in the row.

Real dumps break these rules in a few recurring ways. With `repair="standard"` (the default of
`data.repair`) those are repaired and counted by kind (`conversation.REPAIRS`) instead of rejected:
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
- text (TRL's language-modeling rows: one `text` field, no chat template): read by
  text_rows.py into `text` segments, trained or not (`data.response_template`), instead of
  chat turns; the rules below are about chat turns and do not apply;
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
- a system turn is the system prompt before the first user turn, or an instruction later in
  the conversation (kept where it is and rendered there by the chat template, as TRL and
  Axolotl do; a template that refuses it, such as Gemma's or Mistral's, rejects the row as
  `template_error`); never two in a row (the repairs join them); at least one assistant
  turn; the conversation
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
from typing import Any

from sftmix_ray.data.columns import FIELDS, rename_columns
from sftmix_ray.data.conversation import check_order, is_tool_turn, name_tool_results, repair_order
from sftmix_ray.data.glaive import glaive_row
from sftmix_ray.data.reasoning import REASONING_MODES
from sftmix_ray.data.reasoning import drop as drop_reasoning
from sftmix_ray.data.text_rows import is_text_row, text_segments
from sftmix_ray.data.turns import (
    TURN_KEYS,
    Message,
    TextReader,
    json_type_name,
    normalize_tools,
    parse_calls,
    parse_turn,
    show,
    typed,
)
from sftmix_ray.errors import DataError, RowRejected

FORMATS = (
    "auto", "alpaca", "sharegpt", "messages", "prompt_completion", "xlam", "glaive", "text",
)  # fmt: skip
ROLES = ("system", "user", "assistant")
REPAIR_MODES = ("standard", "none")
_LIST_FIELD = {"sharegpt": "conversations", "messages": "messages"}
_LIST_FIELDS = frozenset(_LIST_FIELD.values())


def row_format(row: Any) -> str | None:
    """The format a single row's values point to, or None when they match none. By value, not
    by key: Parquet files, HF datasets and pandas exports of a corpus that mixes formats give
    every row every format's columns, null where the row has none."""
    if not isinstance(row, dict):
        return None

    def has(*keys: str) -> bool:  # a CSV sheet's empty cell is "", not null: no turns either
        return all(
            row.get(key) is not None and not (key in _LIST_FIELDS and row[key] == "")
            for key in keys
        )

    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("instruction"):
        return "alpaca"
    if has("prompt", "completion"):
        return "prompt_completion"
    if has("query", "answers"):
        return "xlam"
    if isinstance(row.get("chat"), str):
        return "glaive"
    if isinstance(row.get("text"), str):  # last: other formats' rows may carry a text column
        return "text"
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
        "'instruction' field, 'prompt' and 'completion', 'query' and 'answers', a 'chat' or a "
        f"'text' text{has}; pass the format explicitly (alpaca, sharegpt, messages, "
        "prompt_completion, xlam, glaive or text) and map columns of other names with "
        "data.columns (LMSYS-Chat-1M, WildChat and Capybara: {messages: conversation})"
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
    reasoning: str = "keep",
    templates: tuple[str | None, str | None] = (None, None),
) -> tuple[Any, list[Message], list[dict[str, Any]] | None, list[str]]:
    """A raw corpus row read as prepare reads it: its columns renamed (`data.columns`), in its
    own format when `per_row` (`data.format: auto`) else `fmt`, normalized, its history masked
    (`data.mask_history`), its reasoning left out when `reasoning` is `drop` (`data.reasoning`);
    a text row's response and instruction markers are `templates` (`data.response_template`,
    `data.instruction_template`). Returns the renamed row (for its `answer`), the messages,
    the tool definitions and the repairs; raises `RowRejected`. The one reader of the
    tokenization tasks, the tiny tokenizer's sample and `validate-data`."""
    if reasoning not in REASONING_MODES:
        raise ValueError(f"unknown reasoning mode {reasoning!r}; choose one of {REASONING_MODES}")
    row = rename_columns(raw, columns)
    messages, tools, repairs = normalize_example(
        row, format_of(row, fmt, per_row), repair, templates
    )
    if reasoning == "drop":
        messages, dropped = drop_reasoning(messages)
        repairs = sorted({*repairs, "reasoning_dropped"}) if dropped else repairs
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
    row: Any,
    fmt: str,
    repair: str = "standard",
    templates: tuple[str | None, str | None] = (None, None),
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
                f"or 'text' text; its columns: {_columns(row)})",
                "no_format",
            )
        fmt = detected
    repairs: set[str] = set()
    text = TextReader(repair == "standard", repairs)
    if fmt == "glaive":  # its texts read into a messages row, then the same rules
        row, fmt = glaive_row(row), "messages"
    if fmt == "text":
        segments = text_segments(_required_text(row, "text", fmt, text), *templates)
        return segments, None, sorted(repairs)
    if fmt == "alpaca":
        messages = _normalize_alpaca(row, text)
    elif fmt == "xlam":
        messages = _normalize_xlam(row, text)
    elif fmt == "prompt_completion":
        messages = _normalize_prompt_completion(row, text)
    else:
        messages = _normalize_conversation(row, fmt, text)
    return messages, normalize_tools(row), sorted(repairs)


def _normalize_alpaca(row: dict[str, Any], text: TextReader) -> list[Message]:
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


def _normalize_xlam(row: dict[str, Any], text: TextReader) -> list[Message]:
    """xLAM's single-turn function calling: `query` -> user, `answers` -> the assistant's calls
    (an empty list, "call nothing", has no answer to learn: rejected); optional system first."""
    query = _required_text(row, "query", "xlam", text)
    if "answers" not in row:
        raise RowRejected(f"missing field 'answers'{_looks_like(row, 'xlam')}", "missing_field")
    calls = parse_calls(row["answers"], 2, what="field 'answers'")
    system = text.optional(row, "system")
    messages: list[Message] = [{"role": "system", "content": system}] if system.strip() else []
    messages.append({"role": "user", "content": query})
    messages.append({"role": "assistant", "content": "", "tool_calls": calls})
    return messages


def _normalize_prompt_completion(row: dict[str, Any], text: TextReader) -> list[Message]:
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


def _alpaca_history(history: Any, text: TextReader) -> list[Message]:
    """LLaMA-Factory's `history`: earlier `[instruction, response]` pairs, oldest first (as a
    list, or its JSON text as a CSV sheet holds it; an empty cell is no history)."""
    if history is None or history == "":
        return []
    turns: list[Message] = []
    pairs = _json_list(history, "field 'history'")
    for number, pair in enumerate(typed(pairs, list, "field 'history'"), start=1):
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


def _normalize_conversation(row: dict[str, Any], fmt: str, text: TextReader) -> list[Message]:
    """Normalize a sharegpt `conversations` or a `messages` list of turns."""
    field = _LIST_FIELD[fmt]
    if field not in row:
        raise RowRejected(f"missing field {field!r}{_looks_like(row, fmt)}", "missing_field")
    turns = typed(_json_list(row[field], f"field {field!r}"), list, f"field {field!r}")
    if not turns:
        raise RowRejected(f"field {field!r} is empty", "empty_conversation")
    exchanges = [_exchange_keys(turn) for turn in turns]
    pairs = [keys for keys in exchanges if keys]
    if all(isinstance(turn, str) for turn in turns):
        # LIMA's shape: the turns' texts alone, user and assistant in turn from a user turn.
        role_key, content_key = TURN_KEYS[fmt][0]
        turns = [
            {role_key: "user" if i % 2 == 0 else "assistant", content_key: turn}
            for i, turn in enumerate(turns)
        ]
    elif len(pairs) == len(turns):
        # Capybara's shape (LDJnr's sets), or Firefly's (MOSS and UltraChat as YeungNLP
        # published them): each item one exchange, its `input` (`human`) asked and its `output`
        # (`assistant`) answered; read as a user turn and an assistant turn (with the
        # exchange's `weight`/`train`/`loss` mark, if any), numbered on as turns.
        role_key, content_key = TURN_KEYS[fmt][0]
        expanded: list[Any] = []
        for turn, (asked, answered) in zip(turns, pairs):
            marks = {k: turn[k] for k in ("weight", "train", "loss") if turn.get(k) is not None}
            expanded.append({role_key: "user", content_key: turn[asked]})
            expanded.append({role_key: "assistant", content_key: turn[answered], **marks})
        turns = expanded
    elif pairs:
        number = next(i + 1 for i, keys in enumerate(exchanges) if keys)
        asked, answered = pairs[0]
        raise RowRejected(
            f"turn {number} is an {{{asked}, {answered}}} exchange among turns with roles "
            "(a row holds one or the other)",
            "malformed_turn",
        )

    numbered: list[tuple[int, Message]] = []  # (turn number, message)
    repair, repairs = text.repair, text.repairs
    # sharegpt rows carry their system prompt in this field; for messages rows it is a
    # fallback, used (when a string) only if no system turn comes before the first user turn.
    if fmt == "sharegpt" or isinstance(row.get("system"), str):
        system = text.optional(row, "system")
    else:
        system = ""
    if system.strip():
        numbered.append((0, {"role": "system", "content": system}))
    for number, turn in enumerate(turns, start=1):
        message, mapped = parse_turn(turn, number, fmt, text)
        if mapped:
            repairs.add("role_mapped")
        if message is None:  # a repair (strict reading rejects it as wrong_type)
            repairs.add("null_content_dropped")
            continue
        role, content = message["role"], message["content"]
        if not content.strip() and not is_tool_turn(message):
            if role == "system":
                continue
            if repair:
                repairs.add("empty_turn_dropped")
                continue
            raise RowRejected(f"turn {number} content is empty", "empty_turn")
        if role == "system" and system.strip() and all(m["role"] == "system" for _, m in numbered):
            # A system prompt turn wins over the field (LLaMA-Factory's sharegpt reader does
            # the same); a system turn later in the conversation is an instruction of its own.
            numbered = [t for t in numbered if t[0] != 0]
            system = ""
        numbered.append((number, message))
    if repair:
        numbered = repair_order(numbered, repairs)
    check_order(numbered)
    if all(m.get("train") is False for _, m in numbered if m["role"] == "assistant"):
        raise RowRejected(
            "no assistant turn is trained (every one is marked weight 0, train false or loss "
            "false)",
            "no_trained_turn",
        )
    return name_tool_results([message for _, message in numbered])


_TURN_FIELDS = frozenset(key for pairs in TURN_KEYS.values() for pair in pairs for key in pair)


# An exchange's (asked, answered) keys: Capybara's, Firefly's.
_EXCHANGE_KEYS = (("input", "output"), ("human", "assistant"))


def _exchange_keys(turn: Any) -> tuple[str, str] | None:
    """The keys of an exchange (Capybara's `{input, output}`, Firefly's `{human, assistant}`),
    or None for a turn (a union's null role keys aside) or anything else."""
    if not isinstance(turn, dict) or any(turn.get(key) is not None for key in _TURN_FIELDS):
        return None
    return next((pair for pair in _EXCHANGE_KEYS if pair[0] in turn and pair[1] in turn), None)


def _json_list(value: Any, what: str) -> Any:
    """The list that a text holds as JSON (orca-agentinstruct and some exports store the turns
    as one JSON string column, a CSV sheet every list), else `value` as it is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value, strict=False)  # raw newlines in strings, as dumps write
        except ValueError:
            return value  # not JSON: rejected as text where a list belongs
        except RecursionError:
            raise RowRejected(f"{what} is nested too deeply", "malformed_turn") from None
    return value


def mask_history(messages: list[Message]) -> list[Message]:
    """`data.mask_history`: every assistant turn but the last marked `"train": False` (the
    earlier answers and calls are context, as LLaMA-Factory's mask_history trains only the
    last turn); a row whose last answer is itself not trained is rejected. A text row's last
    trained segment alone stays trained."""
    if is_text_row(messages):
        last = max(i for i, m in enumerate(messages) if m.get("train") is not False)
        return [{**m, "train": False} if i < last else m for i, m in enumerate(messages)]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if messages[last].get("train") is False:
        raise RowRejected(
            "the last assistant turn is marked not to train (weight 0, train or loss false) and "
            "data.mask_history trains no other",
            "no_trained_turn",
        )
    return [
        {**m, "train": False} if m["role"] == "assistant" and i != last else m
        for i, m in enumerate(messages)
    ]


def _required_text(row: dict[str, Any], key: str, fmt: str, text: TextReader) -> str:
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
    return ", ".join(show(str(k), 20) for k in list(row)[:limit])
