"""An answer's reasoning (its thinking trace) from a corpus row to the chat template.

Reasoning corpora carry the trace beside the answer: `reasoning_content` (DeepSeek's and
Qwen's API, Qwen3's template), `reasoning` (vLLM's and OpenRouter's output) or `thinking`
(gpt-oss' template, HF's Multilingual-Thinking), or as Anthropic's `{"type": "thinking"}`
content part. The turn reader keeps it as the message's `reasoning`; at rendering it goes
to the template under the key the template reads (`reasoning_content` or `thinking`), and a
template that reads neither gets it inline, `<think>\\n...\\n</think>\\n\\n` before the answer
(the convention of DeepSeek-R1's distilled data, OpenThoughts and s1K). Either way it is part
of the answer's span, so it is trained. A template that renders it for the last answers only
(Qwen3 and gpt-oss leave it out of turns before the last user turn, as at inference) is
followed; one that renders the row's last reasoning nowhere (DeepSeek-R1's strips everything
before `</think>`) rejects the row (`template_drops_reasoning`) rather than training answers
without their reasoning; `data.reasoning: drop` leaves every trace out instead (counted).
"""

from __future__ import annotations

import re
from typing import Any

from sftmix_ray.errors import RowRejected

ROW_KEYS = ("reasoning_content", "reasoning", "thinking")  # as rows carry it, first set wins
REASONING_MODES = ("keep", "drop")
_TEMPLATE_KEYS = (  # the key a template reads, by how its source names it (first found wins)
    ("reasoning_content", re.compile(r"reasoning_content")),
    ("thinking", re.compile(r"""\.thinking\b|\[\s*['"]thinking['"]\s*\]""")),
)


TEMPLATE_KEYS = tuple(key for key, _ in _TEMPLATE_KEYS)


def template_key(template: str) -> str | None:
    """The message key under which `template` renders reasoning, or None (inline it)."""
    return next((key for key, pattern in _TEMPLATE_KEYS if pattern.search(template)), None)


def for_template(messages: list[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """`messages` with each answer's `reasoning` under the template's key, or inline."""
    if not any(m.get("reasoning") for m in messages):
        return messages
    key = template_key(template)
    out = []
    for message in messages:
        reasoning = message.get("reasoning")
        message = {k: v for k, v in message.items() if k != "reasoning"}
        if reasoning and key:
            message[key] = reasoning
        elif reasoning:
            message["content"] = f"<think>\n{reasoning.strip()}\n</think>\n\n{message['content']}"
        out.append(message)
    return out


def check_rendered(messages: list[dict[str, Any]], full: str) -> None:
    """Reject a row with an answer after its last user turn (the answer being trained for,
    with its calls) whose reasoning the template did not render. Earlier answers' reasoning is
    the template's to keep or leave out (Qwen3, gpt-oss and DeepSeek-R1 leave it out, as at
    inference)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    missing = [
        m
        for m in messages[last_user + 1 :]
        if m["role"] == "assistant" and m.get("reasoning") and m["reasoning"].strip() not in full
    ]
    if missing:
        raise RowRejected(
            "chat template does not render the answer's reasoning (it drops the thinking "
            "trace); use a template that renders it, or set data.reasoning: drop to train "
            "the answers without it",
            "template_drops_reasoning",
        )


def drop(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """`data.reasoning: drop`: the messages without their reasoning, and whether any had one."""
    if not any("reasoning" in m for m in messages):
        return messages, False
    return [{k: v for k, v in m.items() if k != "reasoning"} for m in messages], True
