"""Chat-template rendering and tokenization with response-only labels."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from sftmix_ray.errors import RowRejected
from sftmix_ray.loss_kernels import IGNORE_INDEX
from sftmix_ray.modeling import chat_template_of


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
    That needs a prefix-stable template (rendering the conversation up to a turn gives a prefix
    of the whole). Several real ones are not: Phi-3 ends the text with the EOS token, Qwen3
    keeps an empty thinking block only after the last user turn, Mistral v0.3 puts the system
    prompt into the last user turn. Their spans are found in the whole text instead
    (`_searched_spans`); a row whose turns cannot be found there either is rejected.
    """
    template = chat_template_of(tokenizer)
    full = _render(tokenizer, messages, template, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], template, generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], template, generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(prompt)):
            return full, _searched_spans(tokenizer, messages, template, full)
        spans.append((len(prompt), len(upto)))
    return full, spans


def _searched_spans(
    tokenizer: Any, messages: list[dict], template: str, full: str
) -> list[tuple[int, int]]:
    """Assistant spans of a template that is not prefix-stable: each turn's content is found
    in `full` in order (user turns too, so that an answer repeating the question is not found
    in the question), each answer after the header the template writes before an answer (its
    generation prompt, e.g. `<|assistant|>\\n`) and never inside the template's special tokens
    (a one-letter answer "a" is in `<|assistant|>`), then extended by the longest run of whole
    tokens of what the template writes after that content when the turn is the last one (its
    end-of-turn marker) that `full` also has there. Whole tokens: `<|end|>` of
    `<|end|><|endoftext|>` matches before `<|user|>`, and the `<|` of `<|user|>` must not be
    taken for a start of `<|endoftext|>`."""
    markup = _special_token_spans(tokenizer, full)
    spans: list[tuple[int, int]] = []
    position = 0
    for i, message in enumerate(messages):
        if message["role"] == "system":
            continue  # some templates move it (Mistral v0.3: into the last user turn)
        content = message["content"]
        if message["role"] == "assistant":
            header = _answer_header(tokenizer, messages[:i], template)
            at = full.find(header, position) if header else -1
            if at >= 0:
                position = at + len(header)
        found = _find_content(full, content, position, markup)
        if found is None:
            if message["role"] == "user":
                continue  # a template may rewrite user turns; answers are what must be found
            raise RowRejected(
                f"chat template is not prefix-stable and turn {i} (assistant) is not found in "
                "the rendered text; cannot align assistant labels",
                "template_not_prefix_stable",
            )
        start, end = found
        if message["role"] == "assistant":
            upto = _render(tokenizer, messages[: i + 1], template, generation_prompt=False)
            own = _find_content(upto, content, 0, _special_token_spans(tokenizer, upto), True)
            tail = upto[own[1] :] if own is not None else ""
            end += _common_token_prefix(tokenizer, tail, full[end:])
            spans.append((start, end))
        position = end
    return spans


def _answer_header(tokenizer: Any, before: list[dict], template: str) -> str:
    """What the template writes after `before` to start an answer: its generation prompt, as
    the difference between rendering `before` with and without it ("" if it has none)."""
    prompt = _render(tokenizer, before, template, generation_prompt=True)
    plain = _render(tokenizer, before, template, generation_prompt=False)
    same = next((k for k, (a, b) in enumerate(zip(prompt, plain)) if a != b), len(plain))
    return prompt[same:]


def _special_token_spans(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character spans of the added and special tokens (the template's markup) in `text`."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [
        span for token, span in zip(enc["input_ids"], enc["offset_mapping"]) if token in special
    ]


def _find_content(
    text: str, content: str, position: int, markup: list[tuple[int, int]], last: bool = False
) -> tuple[int, int] | None:
    """Where `content` (or its stripped form, as templates that trim write it) is in `text`
    from `position` on, overlapping no `markup` span: the first (or the `last`) occurrence,
    as (start, end)."""
    for needle in (content, content.strip()):
        if not needle:
            continue
        at = text.rfind(needle, position) if last else text.find(needle, position)
        while at >= 0:
            end = at + len(needle)
            if not any(a < end and at < b for a, b in markup):
                return at, end
            at = text.rfind(needle, position, end - 1) if last else text.find(needle, at + 1)
    return None


def _common_token_prefix(tokenizer: Any, tail: str, rest: str) -> int:
    """Characters of the longest run of `tail`'s whole tokens that `rest` starts with."""
    if not tail:
        return 0
    offsets = tokenizer(tail, add_special_tokens=False, return_offsets_mapping=True)
    best = 0
    for _, token_end in offsets["offset_mapping"]:
        if rest.startswith(tail[:token_end]):
            best = max(best, token_end)
        else:
            break
    return best


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
    try:
        text, spans = render_with_spans(tokenizer, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except RowRejected:
        raise
    except Exception as exc:  # the template's own checks (Gemma: no system role), tokenizer
        message = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise RowRejected(
            f"chat template or tokenizer failed: {type(exc).__name__}: {message}",
            "template_error",
        ) from None
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
