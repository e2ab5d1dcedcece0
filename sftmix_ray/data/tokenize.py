"""Chat-template rendering and tokenization with response-only labels."""

from __future__ import annotations

import functools
import json
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from jinja2 import TemplateError

from sftmix_ray.data import reasoning
from sftmix_ray.data.text_rows import is_text_row, labelled_text
from sftmix_ray.errors import RowRejected, SftmixError
from sftmix_ray.labels import IGNORE_INDEX
from sftmix_ray.modeling import chat_template_of


def _render(
    tokenizer: Any,
    messages: list[dict],
    template: str,
    generation_prompt: bool,
    tools: list[dict] | None = None,
) -> str:
    def render(tools: list[dict] | None) -> str:
        return tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    try:
        return render(tools)
    except TypeError:
        if tools is not None:
            raise
        # A template that loops over `tools` unchecked (Hermes' and Command-R's tool_use, set
        # as a tokenizer's only template): a row without tools has an empty list of them.
        return render([])


def render_with_spans(
    tokenizer: Any, messages: list[dict], tools: list[dict] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans of assistant turns."""
    text, spans, _ = _render_spans_encoding(tokenizer, messages, tools)
    return text, spans


def _encode(tokenizer: Any, text: str) -> Any:
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)


def _render_spans_encoding(
    tokenizer: Any,
    messages: list[dict],
    tools: list[dict] | None = None,
    limit: int | None = None,
) -> tuple[str, list[tuple[int, int]], Any]:
    """Render a conversation; return the text, the character spans of assistant turns and the
    text's encoding (token ids and character offsets), tokenized once.

    Each span runs from where the generation prompt ends to where the rendered turn ends, so
    it covers the assistant content and its end-of-turn token (the model must learn to stop).
    That needs a prefix-stable template (rendering the conversation up to a turn gives a prefix
    of the whole). Several real ones are not: Phi-3 ends the text with the EOS token, Qwen3
    keeps an empty thinking block only after the last user turn, Mistral v0.3 puts the system
    prompt into the last user turn. Their spans are found in the whole text instead
    (`_searched_spans`); a row whose turns cannot be found there either is rejected.

    Tool calls are part of their assistant turn's span (the model learns to make them); tool
    results and the tool definitions (`tools`) are prompt. A template that leaves any of them
    out of the text (one without tool support) rejects the row (`_check_tools_rendered`).

    With a token `limit` (truncation keeps at most that many tokens), the spans stop at the
    first answer that starts past it, once its prefix is checked: rendering each turn's prefix
    costs time quadratic in the turns, which a long agent trajectory or a 300-turn dump would
    pay for turns that are cut away anyway. (A template that would turn out not prefix-stable
    only at a later turn keeps its checked spans then, rather than being searched.)
    """
    template = chat_template_of(tokenizer, tools=bool(tools))
    full = _render(tokenizer, messages, template, False, tools)
    enc = _encode(tokenizer, full)
    starts = [start for start, _ in enc["offset_mapping"]]

    def past(char: int) -> bool:  # an answer starting at `char` is cut away by the limit
        return limit is not None and bisect_left(starts, char) > limit

    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], template, True, tools)
        upto = _render(tokenizer, messages[: i + 1], template, False, tools)
        if not (full.startswith(upto) and upto.startswith(prompt)):
            if any(m.get("tool_calls") for m in messages):
                spans = _diffed_spans(tokenizer, messages, template, full, tools, past)
                _check_tools_rendered(messages, tools, full, spans)
                return full, spans, enc
            _check_tools_rendered(messages, tools, full, None)
            return full, _searched_spans(tokenizer, messages, template, full, enc), enc
        # Only a prefix of `full` tells where the answer starts in it (checked just above).
        if past(len(prompt)):
            break  # this answer (even a token straddling its start) is past the limit
        spans.append((len(prompt), len(upto)))
    _check_tools_rendered(messages, tools, full, spans)
    return full, spans, enc


_PROBE_TURN = "\ue000"  # a private-use character: in no real answer
_PROBE_THOUGHT = "\ue001"  # the probe's reasoning, likewise


def _diffed_spans(
    tokenizer: Any,
    messages: list[dict],
    template: str,
    full: str,
    tools: list[dict] | None,
    past: Callable[[int], bool],
) -> list[tuple[int, int]]:
    """Assistant spans of a template that is not prefix-stable, for rows with tool calls (whose
    rendering cannot be searched for as text): each answer is where the whole text changes
    when that answer alone is replaced by a one-character text answer, extended by the whole
    tokens of the template's end-of-turn marker (`_answer_tail`) that follow it (or, where the
    template refuses that replacement, when the answer is left out). The start is
    where the renderings part (after the header the template writes either way: Qwen3's
    thinking block, Hermes' `<|im_start|>assistant\\n`), the end where they meet again. The
    spans stop at the first answer that starts `past` the token limit, as on the prefix path."""
    tails = _answer_tails(tokenizer, template)
    header = _answer_header(tokenizer, template)
    thought_key = reasoning.template_key(template)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        thinks = bool(thought_key and message.get(thought_key))
        # An answer with reasoning gets a probe with reasoning: a template that writes an
        # empty block for an answer without one (Qwen3's last) would change more text.
        replacement = {"role": "assistant", "content": _PROBE_TURN}
        if thinks:
            replacement[str(thought_key)] = _PROBE_THOUGHT
        probe = [*messages[:i], replacement, *messages[i + 1 :]]
        removed = False
        try:
            other = _render(tokenizer, probe, template, False, tools)
        except TemplateError:
            # A template that checks roles among text turns only (Mistral's: a text answer
            # before tool results breaks its alternation): the answer left out instead.
            try:
                other = _render(
                    tokenizer, [*messages[:i], *messages[i + 1 :]], template, False, tools
                )
            except TemplateError:  # gpt-oss: a result must follow a call
                other = full  # nothing differs: not located, below
            removed = True
        start = _common_prefix(full, other)
        same = _common_suffix(full[start:], other[start:])
        end = len(full) - same
        # The renders must differ by this answer alone: where it was, the other render holds
        # the probe and nothing else (a template that also writes the tool list only when a
        # call exists, or names the call in the result's header, changes text elsewhere); with
        # the answer left out, its place must not slide (the text after it starting like it,
        # `[TOOL_CALLS]` before `[TOOL_RESULTS]`, would move the span into the result).
        middle = other[start : len(other) - same]
        located = middle == ("" if removed else _PROBE_TURN)
        if thinks and not removed and not located:
            # The probe's reasoning, the template's markup between it and the answer (as the
            # real answer has it), then the probe's answer.
            between = middle[len(_PROBE_THOUGHT) : len(middle) - len(_PROBE_TURN)]
            located = (
                middle.startswith(_PROBE_THOUGHT)
                and middle.endswith(_PROBE_TURN)
                and len(between) <= _MAX_BLOCK_OPENING
                and between in full[start:end]
            )
        if removed:
            located = located and len(other) - _common_suffix(full, other) == start
        if not located or end <= start or (spans and start < spans[-1][1]):
            raise RowRejected(
                f"chat template is not prefix-stable and turn {i + 1} (assistant) cannot be "
                "located in the rendered text; cannot align its tool calls",
                "template_not_prefix_stable",
            )
        if past(start):
            break
        if thinks:
            # The renders part after the block's opening (Qwen3's `<think>\n`, which the
            # model must learn to write): the answer starts back at its header.
            start = _after_header(full, start, header)
        spans.append((start, _through_end_marker(full, end, tails)))
    return spans


_MAX_BLOCK_OPENING = 32  # characters of markup a template writes between header and reasoning


def _after_header(full: str, start: int, header: str) -> int:
    """Where the answer header that ends shortly before `start` ends (`start` if none)."""
    at = full.rfind(header, 0, start) if header else -1
    end = at + len(header)
    return end if at >= 0 and 0 <= start - end <= _MAX_BLOCK_OPENING else start


def _through_end_marker(full: str, end: int, tails: tuple[_Tail, ...]) -> int:
    """`end` moved past the longest run of whole tokens of one of the template's end-of-turn
    markers (`_answer_tails`) that `full` has there."""
    runs = (cut for tail, cuts in tails for cut in cuts if full.startswith(tail[:cut], end))
    return end + max(runs, default=0)


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of `a` and `b`, by halving with slice comparisons (C-speed
    memcmp; a character loop in Python took seconds for a long agent trajectory's turns)."""
    low, high = 0, min(len(a), len(b))
    while low < high:  # a[:low] == b[:low] holds; find the largest such length
        mid = (low + high + 1) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _common_suffix(a: str, b: str) -> int:
    return _common_prefix(a[::-1], b[::-1])


def _check_tools_rendered(
    messages: list[dict],
    tools: list[dict] | None,
    full: str,
    spans: list[tuple[int, int]] | None,
) -> None:
    """Each call in its assistant turn's span (its function name there once more per call than
    in the turn's own text), each tool result's text and each tool definition's name in the
    text: a template without tool support renders an empty answer for a call (it would train
    the model to say nothing) and drops the rest. Turns past the last span (cut away by
    truncation) are not checked; without spans (the search path of a template that is not
    prefix-stable, taken only by rows without calls) only results and definitions are."""
    answers = iter(spans or ())
    for number, message in enumerate(messages, start=1):
        missing = None
        if message["role"] == "assistant" and spans is not None:
            span = next(answers, None)
            if span is None:
                break
            answer = full[span[0] : span[1]]
            names = [call["function"]["name"] for call in message.get("tool_calls") or ()]
            missing = next(
                (
                    f"tool call {n!r}"
                    for n in names
                    if answer.count(n) < _written(message, n) + names.count(n)
                ),
                None,
            )
        elif message["role"] == "tool" and not _rendered(message["content"].strip(), full):
            missing = "tool result"
        if missing:
            raise RowRejected(
                f"chat template does not render turn {number}'s {missing}: it has no tool "
                "support (use a model whose template has, or leave tool rows out)",
                "template_no_tools",
            )
    for tool in tools or ():
        if tool["function"]["name"] not in full:
            raise RowRejected(
                f"chat template does not render the tool definition {tool['function']['name']!r}:"
                " it has no tool support (use a model whose template has, or leave tool rows out)",
                "template_no_tools",
            )


def _written(message: dict, name: str) -> int:
    """How often `name` is in a message's own text: its content and a reasoning the template
    renders ("I should call get_weather" is not the call)."""
    keys = ("content", *reasoning.TEMPLATE_KEYS)
    return sum(message[k].count(name) for k in keys if isinstance(message.get(k), str))


def _rendered(text: str, full: str) -> bool:
    """`text` is in `full` as it is or as a JSON string's inside (Llama 3.1's template writes a
    tool result through `tojson`)."""
    return text in full or any(
        json.dumps(text, ensure_ascii=ascii)[1:-1] in full for ascii in (False, True)
    )


def _searched_spans(
    tokenizer: Any, messages: list[dict], template: str, full: str, enc: Any
) -> list[tuple[int, int]]:
    """Assistant spans of a template that is not prefix-stable: each turn's content is found
    in `full` in order (user turns too, so that an answer repeating the question is not found
    in the question), never inside the template's special tokens (a one-letter answer "a" is
    in `<|assistant|>`). An answer's span starts where the header the template writes before
    an answer (its generation prompt, e.g. `<|assistant|>\n`) ends, when that header is right
    before it (a little markup between: gpt-oss' `<|channel|>final<|message|>`, Qwen3's empty
    thinking block, or a rendered reasoning), as the prefix path's spans do, else where its
    content starts; it is extended by the longest run of whole tokens of an end-of-turn marker
    (`_answer_tails`) that `full` also has there. Whole tokens: `<|end|>` of
    `<|end|><|endoftext|>` matches before `<|user|>`, and the `<|` of `<|user|>` must not be
    taken for a start of `<|endoftext|>`. A template that cuts an inline reasoning away at
    `</think>` (DeepSeek-R1's) leaves the answer after it to be found."""
    markup = _special_token_spans(tokenizer, enc)
    header = _answer_header(tokenizer, template)
    tails = _answer_tails(tokenizer, template)
    thought_key = reasoning.template_key(template)
    spans: list[tuple[int, int]] = []
    position = 0
    for i, message in enumerate(messages):
        if message["role"] == "system" and i == 0:
            continue  # templates may move the system prompt (Mistral v0.3: to the last user turn)
        # A later system turn is searched like a user turn: an answer's words in it ("Reply
        # with one letter: A, B or C.") are not the answer.
        assistant = message["role"] == "assistant"
        needles = [message["content"]]
        if assistant and "</think>" in needles[0]:
            needles.append(needles[0].rsplit("</think>", 1)[1])  # what R1's template keeps
        answer_start = None  # where this answer's header ends
        straddling = None  # the answer found across the header's end
        ahead, searched = None, False  # the answer found from `position` (without a header)
        if assistant and header:
            ahead, searched = _find_any(full, needles, position, markup), True
            at = full.find(header, position)
            # Only this answer's own header, not a later one with the answer before it:
            # Nemotron's (with `<think>\n`) is the last answer's. (The answer "a" may be found
            # in the header's `assistant`: that is not before it.)
            if at >= 0 and (ahead is None or ahead[0] >= at):
                position = answer_start = at + len(header)
                if ahead is not None and ahead[0] < answer_start < ahead[1]:
                    # QwQ's generation prompt ends with `<think>\n`, which the inline
                    # reasoning also starts with: the answer is the rest.
                    straddling = ahead
        opened = False  # a rendered reasoning opens the answer
        thought = message.get(thought_key) if assistant and thought_key else None
        if thought and answer_start is not None:
            found_thought = _find_content(full, thought, position, markup)
            # Qwen3 renders it after the last user turn only: the same words in a later turn
            # are not it.
            if found_thought and found_thought[0] - answer_start <= _MAX_BLOCK_OPENING:
                position, opened = found_thought[1], True
        if straddling or (searched and answer_start is None):  # `position` has not moved
            found = straddling or ahead
        else:
            found = _find_any(full, needles, position, markup)
        if found is None:
            if not assistant:
                continue  # a template may rewrite user turns; answers are what must be found
            raise RowRejected(
                f"chat template is not prefix-stable and turn {i + 1} (assistant) is not found "
                "in the rendered text; cannot align assistant labels",
                "template_not_prefix_stable",
            )
        start, end = found
        if assistant:
            if answer_start is not None and (opened or start - answer_start <= _MAX_BLOCK_OPENING):
                start = answer_start
            end = _through_end_marker(full, end, tails)
            spans.append((start, end))
        position = end
    return spans


def _find_any(
    text: str, needles: list[str], position: int, markup: list[tuple[int, int]]
) -> tuple[int, int] | None:
    """`_find_content` of the first of `needles` that is found."""
    return next(
        (found for n in needles if (found := _find_content(text, n, position, markup))), None
    )


_PROBE = "sftmix-probe-answer"
_PROBE_QUESTION = "sftmix-probe-question"

_Tail = tuple[str, tuple[int, ...]]  # a marker's text, and where each of its tokens ends


def _probe_render(
    tokenizer: Any, messages: list[dict], template: str, generation_prompt: bool
) -> str:
    """A probe conversation rendered without tools, or with an empty list of them for a
    template that refuses to render without (a loop over `tools` unchecked is `_render`'s)."""
    try:
        return _render(tokenizer, messages, template, generation_prompt)
    except TemplateError:
        return _render(tokenizer, messages, template, generation_prompt, [])


@functools.lru_cache(maxsize=8)
def _answer_tails(tokenizer: Any, template: str) -> tuple[_Tail, ...]:
    """What the template writes after an answer (its end-of-turn marker), from probe
    conversations (the same for every row): after the last answer (`<|end|>\n` then the EOS
    for Phi-3, `<|return|>` for gpt-oss) and after an answer that a user turn follows (gpt-oss'
    `<|end|>`), neither with the next turn's header (`_turn_header_start`). A run of whole
    tokens of one of them is what an answer's span takes."""
    user, answer = {"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}
    last = _probe_render(tokenizer, [user, answer], template, False)
    tails = []
    if (at := last.rfind(_PROBE)) >= 0:
        tails.append(_tail(tokenizer, last[at + len(_PROBE) :], ""))
    try:
        question = {"role": "user", "content": _PROBE_QUESTION}
        more = _probe_render(tokenizer, [user, answer, question], template, False)
        alone = _probe_render(tokenizer, [question], template, False)
    except (TemplateError, TypeError, ValueError):
        more = alone = ""  # a template that refuses a conversation ending with a user turn
    if _PROBE in more and _PROBE_QUESTION in more and _PROBE_QUESTION in alone:
        at = more.index(_PROBE) + len(_PROBE)
        gap = more[at : more.index(_PROBE_QUESTION, at)]
        tails.append(_tail(tokenizer, gap, alone[: alone.index(_PROBE_QUESTION)]))
    return tuple(dict.fromkeys(tail for tail in tails if tail[0]))


_TURN_START_NAMES = ("start", "begin", "user")  # in the special token that opens a turn


def _tail(tokenizer: Any, gap: str, before_user: str) -> _Tail:
    """The end-of-turn marker at the head of `gap` (what a template writes after an answer),
    without the next turn's header: that starts at the first special token of the gap naming
    a start or the user role (`<|im_start|>`, `<|start_header_id|>`, `<start_of_turn>`,
    `<|start|>`, Phi-3's `<|user|>`) within what the gap ends with in common with the text
    before a first user turn (`before_user`: Mistral's `[INST]`, no such token), else where
    that common end begins. Returns the marker and where each of its tokens ends."""
    enc = tokenizer(gap, add_special_tokens=False, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    common = len(gap) - _common_suffix(gap, before_user) if before_user else len(gap)
    special = _special_ids(tokenizer)
    cut = next(
        (
            begin
            for token, (begin, _) in zip(enc["input_ids"], spans)
            if token in special
            and (not before_user or begin >= common)
            and any(
                n in str(tokenizer.convert_ids_to_tokens(token)).lower() for n in _TURN_START_NAMES
            )
        ),
        common,
    )
    cut = next((begin for begin, _ in spans if begin >= cut), len(gap))  # a token boundary
    return gap[:cut], tuple(end for _, end in spans if end <= cut)


@functools.lru_cache(maxsize=8)
def _answer_header(tokenizer: Any, template: str) -> str:
    """What the template writes to start an answer: its generation prompt, as the difference
    between rendering a probe question with and without it ("" if it has none); the same
    for every row, like `_answer_tail`."""
    question = [{"role": "user", "content": "q"}]
    prompt = _probe_render(tokenizer, question, template, generation_prompt=True)
    plain = _probe_render(tokenizer, question, template, generation_prompt=False)
    same = next((k for k, (a, b) in enumerate(zip(prompt, plain)) if a != b), len(plain))
    return prompt[same:]


@functools.lru_cache(maxsize=8)
def _special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of the tokenizer's added and special tokens (a chat template's markup)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return frozenset(tokenizer.all_special_ids) | frozenset(added)


def _special_token_spans(tokenizer: Any, enc: Any) -> list[tuple[int, int]]:
    """Character spans of the added and special tokens (the template's markup) in the text
    that `enc` encodes."""
    special = _special_ids(tokenizer)
    return [
        span for token, span in zip(enc["input_ids"], enc["offset_mapping"]) if token in special
    ]


def _find_content(
    text: str, content: str, position: int, markup: list[tuple[int, int]]
) -> tuple[int, int] | None:
    """Where `content` (or its stripped form, as templates that trim write it) first is in
    `text` from `position` on, cutting through no `markup` span (a special token wholly inside
    it is its own: an inline `<think>` that the tokenizer has as a token), as (start, end)."""
    for needle in (content, content.strip()):
        if not needle:
            continue
        at = text.find(needle, position)
        while at >= 0:
            end = at + len(needle)
            if not any(a < end and at < b and not at <= a < b <= end for a, b in markup):
                return at, end
            at = text.find(needle, at + 1)
    return None


TRUNCATIONS = ("turns", "truncate", "drop")


def tokenize_conversation(
    tokenizer: Any,
    messages: list[dict],
    max_length: int,
    truncation: str,
    tools: list[dict] | None = None,
) -> tuple[list[int], list[int], bool]:
    """Token ids and labels (-100 outside the spans of trained assistant turns); returns
    (ids, labels, truncated).

    Longer than `max_length`: `turns` keeps the longest prefix of whole exchanges that fits,
    or, when the first exchange alone does not fit, cuts its response (at least one response
    token stays supervised; a prompt that alone fills `max_length` is rejected as
    `prompt_too_long`); `truncate` cuts at `max_length` wherever that falls; `drop` rejects
    the row (`too_long`). Under `turns`, when the first trained answer does not end within the
    limit and exchanges that train nothing come before it (`data.mask_history`, where only the
    last answer is trained; a TRL prompt's answers; `weight: 0` turns), the earliest of those
    exchanges go first, as LLaMA-Factory keeps the last turns under `mask_history`: the row
    keeps its system turn, its tool definitions and as much recent history as fits.
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    truncated = False
    if is_text_row(messages):  # format `text`: no chat template, cut like a conversation
        ids, labels, spans, offsets = labelled_text(tokenizer, messages)
    else:
        ids, labels, spans, enc = _labelled(tokenizer, messages, tools, max_length)
        if len(ids) > max_length and truncation == "turns" and not _fits(spans, enc, max_length):
            shorter = _without_early_history(tokenizer, messages, tools, max_length)
            if shorter is not None:
                (ids, labels, spans, enc), truncated = shorter, True
        offsets = enc["offset_mapping"]
    if len(ids) > max_length:
        if truncation == "drop":
            raise RowRejected(
                f"too long: {len(ids)} tokens > data.max_length={max_length}", "too_long"
            )
        cut = max_length
        if truncation == "turns":
            cut = _turns_cut(offsets, spans, labels, max_length)
        ids, labels, truncated = ids[:cut], labels[:cut], True
    if all(label == IGNORE_INDEX for label in labels):
        reason = "no supervised tokens after truncation" if truncated else "no supervised tokens"
        raise RowRejected(reason, "no_supervised_tokens")
    return ids, labels, truncated


_Labelled = tuple[list[int], list[int], list[tuple[int, int]], Any]


def _labelled(
    tokenizer: Any, messages: list[dict], tools: list[dict] | None, max_length: int
) -> _Labelled:
    """The whole conversation's ids, its labels, the character spans of its trained answers
    (up to the first answer past `max_length`) and its encoding (character offsets)."""
    # Assistant turns marked `"train": False` (formats.py: weight 0, a TRL prompt's answers)
    # are rendered like the others and left out of the labels; the mark is not the template's.
    trained = [m.get("train") is not False for m in messages if m["role"] == "assistant"]
    if not all(trained):
        messages = [{k: v for k, v in m.items() if k != "train"} for m in messages]
    try:
        # An answer's reasoning under the template's key, or inline (reasoning.py).
        rendered = reasoning.for_template(messages, chat_template_of(tokenizer, tools=bool(tools)))
        # Answers past max_length are cut away (`turns`, `truncate`) or the row goes (`drop`).
        try:
            full, spans, enc = _render_spans_encoding(tokenizer, rendered, tools, max_length)
        except TemplateError as exc:
            if rendered[0]["role"] != "system" or "system" not in str(exc).lower():
                raise
            # Gemma-2's template refuses a system turn; its system prompt goes before the first
            # user turn's text, as Gemma-3's template and LLaMA-Factory's gemma template do.
            rendered = _system_in_first_user_turn(rendered)
            full, spans, enc = _render_spans_encoding(tokenizer, rendered, tools, max_length)
        except TypeError:
            if not any(m.get("tool_calls") for m in rendered):
                raise
            # A template that writes a call's arguments as text (DeepSeek-V3.1's `+`): JSON.
            rendered = _arguments_as_text(rendered)
            full, spans, enc = _render_spans_encoding(tokenizer, rendered, tools, max_length)
        reasoning.check_rendered(messages, full)
    except (RowRejected, SftmixError):
        raise  # a row's own rejection, or the tokenizer's template unusable for every row
    except (TemplateError, ValueError, TypeError, RecursionError) as exc:
        # The template's own checks (Gemma: no system role), the tokenizer's input checks,
        # arguments nested too deep for the template's JSON; a bug of ours (IndexError,
        # KeyError, ...) is not passed off as a rejected row.
        message = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise RowRejected(
            f"chat template or tokenizer failed: {type(exc).__name__}: {message}",
            "template_error",
        ) from None
    # One span per assistant turn, in order (up to the limit): keep the trained turns'.
    spans = [span for span, train in zip(spans, trained) if train]
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
    return ids, labels, spans, enc


def _system_in_first_user_turn(messages: list[dict]) -> list[dict]:
    """`messages` without their system turn, its text before the first user turn's."""
    system, rest = messages[0], list(messages[1:])
    at = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if at is None:
        return rest
    rest[at] = {**rest[at], "content": f"{system['content']}\n\n{rest[at]['content']}"}
    return rest


def _arguments_as_text(messages: list[dict]) -> list[dict]:
    """`messages` with each call's arguments as their JSON text."""

    def text(call: dict) -> dict:
        return {
            **call,
            "function": {
                **call["function"],
                "arguments": json.dumps(call["function"]["arguments"]),
            },
        }

    return [
        {**m, "tool_calls": [text(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m
        for m in messages
    ]


def _fits(spans: list[tuple[int, int]], enc: Any, limit: int) -> bool:
    """Whether the first trained answer ends (its end-of-turn included) within `limit` tokens."""
    starts = [start for start, _ in enc["offset_mapping"]]
    return bool(spans) and bisect_left(starts, spans[0][1]) <= limit


def _without_early_history(
    tokenizer: Any, messages: list[dict], tools: list[dict] | None, limit: int
) -> _Labelled | None:
    """`_labelled` of the conversation without its earliest exchanges (a user turn and the
    turns up to the next user turn) that come before the first trained answer: the fewest
    whose removal lets that answer end within `limit` tokens, else all of them (the answer is
    then cut inside, or its prompt is too long). None when there is nothing to drop."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    first = next(
        (
            i
            for i, m in enumerate(messages)
            if m["role"] == "assistant" and m.get("train") is not False
        ),
        None,
    )
    if first is None or not users:
        return None
    # Exchanges may start at these user turns (with the system turns right before one: an
    # instruction given for it); the one holding the first trained answer stays.
    starts = [_after_instructions(messages, i) for i in users if i <= first][1:]
    if not starts:
        return None
    head = messages[: users[0]]  # the system turn (a conversation starts with a user turn)

    def attempt(k: int) -> _Labelled:
        return _labelled(tokenizer, [*head, *messages[starts[k] :]], tools, limit)

    low, high = 0, len(starts) - 1  # the fewest dropped: binary search on the start
    best = attempt(high)
    if not _fits(best[2], best[3], limit):
        return best
    while low < high:
        mid = (low + high) // 2
        tried = attempt(mid)
        if _fits(tried[2], tried[3], limit):
            best, high = tried, mid
        else:
            low = mid + 1
    return best


def _after_instructions(messages: list[dict], user: int) -> int:
    """Where the exchange of the user turn at `user` starts: at the system turns right before
    it, if any."""
    while user > 0 and messages[user - 1]["role"] == "system":
        user -= 1
    return user


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
    first = next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first is None or first >= limit:  # None: its span was past the limit, not rendered
        where = f"starts at token {first}" if first is not None else "starts past it"
        raise RowRejected(
            f"prompt too long: the first trained response {where} (data.max_length={limit})",
            "prompt_too_long",
        )
    return limit
