"""The order of a conversation's turns: the rules every normalized conversation satisfies
(`check_order`), the standard repairs of the ways real dumps break them (`repair_order`), and
tool results named after the calls they answer. The rules are stated in `formats.py`."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from sftmix_ray.data.turns import Message
from sftmix_ray.errors import RowRejected

REPAIRS = (
    "role_mapped",  # bing/bard read as assistant
    "empty_turn_dropped",  # user/assistant turns with empty content dropped
    "leading_assistant_dropped",  # assistant turns before the first user turn dropped
    "same_role_merged",  # consecutive turns of one role merged with a blank line
    "trailing_user_dropped",  # a last user turn without a reply dropped
    "invalid_unicode_replaced",  # lone surrogates (cut emoji) replaced by U+FFFD
    "null_content_dropped",  # a turn whose content is null dropped (like an empty one)
    "trailing_tool_result_dropped",  # tool results at the end, no answer to learn from, dropped
    "system_merged",  # several leading system turns joined with a blank line
    "trailing_system_dropped",  # a system turn after the last answer (nothing follows) dropped
    "reasoning_dropped",  # data.reasoning: drop left an answer's reasoning out
)


def name_tool_results(messages: list[Message]) -> list[Message]:
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


def is_tool_turn(message: Message) -> bool:
    """A tool result, or an assistant turn that calls tools (either may have empty content)."""
    return message["role"] == "tool" or bool(message.get("tool_calls"))


def repair_order(
    numbered: list[tuple[int, Message]], repairs: set[str]
) -> list[tuple[int, Message]]:
    """Merge leading system turns, drop leading assistant turns, merge runs of one role, drop a
    trailing user turn and trailing tool results."""
    lead = next((i for i, t in enumerate(numbered) if t[1]["role"] != "system"), len(numbered))
    head = numbered[:lead]
    if len(head) > 1:  # several system prompts before the first turn: one, in their order
        repairs.add("system_merged")
        parts = [message["content"] for _, message in head]
        head = [(head[0][0], {"role": "system", "content": "\n\n".join(parts)})]
    body = numbered[lead:]
    first_user = next((i for i, t in enumerate(body) if t[1]["role"] == "user"), None)
    if first_user is None:
        return numbered  # nothing to repair into a conversation: check_order says why
    if first_user > 0 and all(t[1]["role"] in ("assistant", "tool") for t in body[:first_user]):
        repairs.add("leading_assistant_dropped")
        body = body[first_user:]
    merged: list[tuple[int, Message]] = []
    for number, message in body:
        role = message["role"]
        previous = merged[-1][1] if merged else None
        # Text turns of one role merge (system turns in the conversation too); an assistant
        # text turn also merges into the tool-calling turn right after it ("Let me look that
        # up." + the call).
        if (
            previous is not None
            and previous["role"] == role
            and role in ("user", "assistant", "system")
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
            joined = {**message}
            for key in ("content", "reasoning"):  # an answer's reasoning goes with its text
                parts = [m[key] for m in (previous, message) if m.get(key)]
                if parts or key == "content":
                    joined[key] = "\n\n".join(parts)
            merged[-1] = (merged[-1][0], joined)
        else:
            merged.append((number, message))
    dropped = {
        "user": "trailing_user_dropped",
        "tool": "trailing_tool_result_dropped",
        "system": "trailing_system_dropped",
    }
    while len(merged) > 1 and merged[-1][1]["role"] in dropped:
        repairs.add(dropped[merged.pop()[1]["role"]])
    return head + merged


def check_order(numbered: list[tuple[int, Message]]) -> None:
    """User/assistant alternating, from user to assistant, with tool results between an
    assistant turn that calls tools and the next assistant turn. System turns stand apart from
    that order: the system prompt before the first user turn, and instructions given later in
    the conversation (rendered where they are, as TRL and Axolotl render them; a template that
    refuses them rejects the row), never two in a row."""
    for (_, previous), (number, message) in pairwise(numbered):
        if message["role"] == previous["role"] == "system":
            raise RowRejected(
                f"turn {number} repeats role 'system' (one system turn at a time; "
                "data.repair: standard joins them)",
                "repeated_role",
            )
        if message["role"] == "system" and previous.get("tool_calls"):
            raise RowRejected(
                f"turn {number} (system) follows a tool call that has no result",
                "unanswered_tool_call",
            )
        if message["role"] == "tool" and previous["role"] == "system":
            raise RowRejected(
                f"turn {number} is a tool result after a system turn (results follow the "
                "call they answer)",
                "orphan_tool_result",
            )
    if len(numbered) > 1 and numbered[-1][1]["role"] == "system":
        raise RowRejected(
            f"conversation ends with a system turn (turn {numbered[-1][0]}) without a reply",
            "ends_with_system",
        )
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
