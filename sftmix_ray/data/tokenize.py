"""Chat-template rendering and tokenization with response-only labels."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from sftmix_ray.errors import RowRejected
from sftmix_ray.loss_kernels import IGNORE_INDEX
from sftmix_ray.modeling import BUILTIN_CHAT_TEMPLATE


def _render(tokenizer: Any, messages: list[dict], template: str, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def render_with_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans of assistant turns.

    Each span runs from where the generation prompt ends to where the rendered turn ends, so
    it covers the assistant content and its end-of-turn token (the model must learn to stop).
    Templates that are not prefix-stable (rendering a conversation changes an earlier turn's
    text) are rejected, since their labels could not be aligned.
    """
    template = tokenizer.chat_template or BUILTIN_CHAT_TEMPLATE
    full = _render(tokenizer, messages, template, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], template, generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], template, generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(prompt)):
            raise RowRejected(
                f"chat template is not prefix-stable at turn {i}; cannot align assistant labels",
                "template_not_prefix_stable",
            )
        spans.append((len(prompt), len(upto)))
    return full, spans


TRUNCATIONS = ("turns", "truncate", "drop")


def tokenize_conversation(
    tokenizer: Any, messages: list[dict], max_length: int, truncation: str
) -> tuple[list[int], list[int], bool]:
    """Token ids and labels (-100 outside assistant spans); returns (ids, labels, truncated).

    Longer than `max_length`: `turns` keeps the longest prefix of whole exchanges that fits,
    or, when the first exchange alone does not fit, cuts its response (at least one response
    token stays supervised; a prompt that alone fills `max_length` is rejected as
    `prompt_too_long`); `truncate` cuts at `max_length` wherever that falls; `drop` rejects
    the row (`too_long`).
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    text, spans = render_with_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    span_idx = 0
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        # A token is supervised when it starts inside an assistant span.
        while span_idx < len(spans) and start >= spans[span_idx][1]:
            span_idx += 1
        if span_idx < len(spans) and spans[span_idx][0] <= start < spans[span_idx][1]:
            labels[t] = ids[t]
        elif span_idx < len(spans) and start < spans[span_idx][0] < end:
            labels[t] = ids[t]  # a token that straddles the span start belongs to the answer
    truncated = False
    if len(ids) > max_length:
        if truncation == "drop":
            raise RowRejected(
                f"too long: {len(ids)} tokens > data.max_length={max_length}", "too_long"
            )
        cut = max_length
        if truncation == "turns":
            cut = _turns_cut(enc["offset_mapping"], spans, labels, max_length)
        ids, labels, truncated = ids[:cut], labels[:cut], True
    if all(label == IGNORE_INDEX for label in labels):
        reason = "no supervised tokens after truncation" if truncated else "no supervised tokens"
        raise RowRejected(reason, "no_supervised_tokens")
    return ids, labels, truncated


def _turns_cut(
    offsets: list[tuple[int, int]], spans: list[tuple[int, int]], labels: list[int], limit: int
) -> int:
    """Where `turns` truncation cuts: after the last whole exchange that fits in `limit`
    tokens, else inside the first response (keeping at least its first token)."""
    starts = [start for start, _ in offsets]  # non-decreasing
    # Tokens of the conversation up to the end of each assistant turn (its end-of-turn included).
    ends = [bisect_left(starts, span_end) for _, span_end in spans]
    fitting = [end for end in ends if end <= limit]
    if fitting:
        return max(fitting)
    first = next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    if first >= limit:
        raise RowRejected(
            f"prompt too long: the first response starts at token {first} >= "
            f"data.max_length={limit}",
            "prompt_too_long",
        )
    return limit
