"""Plain-text rows (format `text`): one `text` field per row, trained as written, without a
chat template, as TRL trains a language-modeling dataset and Axolotl its `completion` type
(openassistant-guanaco's "### Human: ... ### Assistant: ..." transcripts, Llama-2-formatted
dumps, domain text).

A row is kept as messages of the role `text`, segments that are trained or not (`"train":
False`), so that its `messages_json` re-tokenizes like any other row. By default every token
is trained. With `data.response_template` (TRL's older DataCollatorForCompletionOnlyLM) only
the text after that marker is: after its last occurrence (TRL's collator keeps the last match,
so a transcript trains its last answer), or, with `data.instruction_template` too, after each
response marker up to the next instruction marker (the human turns are context). The markers
themselves are never trained. A row with a response template but no marker in it is rejected
(`no_response_marker`: TRL ignores such a row with a warning).
"""

from __future__ import annotations

from typing import Any

from sftmix_ray.errors import RowRejected
from sftmix_ray.labels import IGNORE_INDEX

TEXT_ROLE = "text"


def is_text_row(messages: list[dict[str, Any]]) -> bool:
    return bool(messages) and messages[0].get("role") == TEXT_ROLE


def text_segments(
    text: str, response: str | None = None, instruction: str | None = None
) -> list[dict[str, Any]]:
    """`text` as `text` messages: context segments are marked `"train": False`."""
    if not response:
        return [{"role": TEXT_ROLE, "content": text}]
    segments: list[tuple[str, bool]] = []
    start = 0  # where the current context segment began
    at = text.find(response) if instruction else text.rfind(response)
    if at < 0:
        raise RowRejected(
            f"no response marker {response!r} in the text (data.response_template)",
            "no_response_marker",
        )
    while at >= 0:
        answer = at + len(response)
        end = len(text)
        if instruction:
            next_human = text.find(instruction, answer)
            end = next_human if next_human >= 0 else len(text)
        segments += [(text[start:answer], False), (text[answer:end], True)]
        start = end
        at = text.find(response, end) if instruction and end < len(text) else -1
    if start < len(text):
        segments.append((text[start:], False))
    if not any(trained and part.strip() for part, trained in segments):
        raise RowRejected("nothing follows the response marker", "no_trained_turn")
    return [
        {"role": TEXT_ROLE, "content": part, **({} if trained else {"train": False})}
        for part, trained in segments
        if part
    ]


def labelled_text(
    tokenizer: Any, messages: list[dict[str, Any]]
) -> tuple[list[int], list[int], list[tuple[int, int]], list[tuple[int, int]]]:
    """A text row's ids, labels, the character spans of its trained segments and each token's
    character offsets, in order (tokenize.py truncates it as it does a conversation: under
    `turns` after the last whole trained segment that fits). The tokenizer's own
    special tokens (BOS) and EOS at the end, as TRL adds it; a token is trained when one of its
    characters is in a trained segment, EOS when the last segment is trained."""
    text = "".join(m["content"] for m in messages)
    spans, position = [], 0
    for message in messages:
        end = position + len(message["content"])
        if message.get("train") is not False:
            spans.append((position, end))
        position = end
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos] and text.startswith(str(tokenizer.bos_token)):
        ids, offsets = ids[1:], offsets[1:]  # a dump written with its own "<s>" (Llama-2's)
    # A token is trained when any of its characters is: a token that straddles a marker's edge
    # (BPE merges "." with a following "###") keeps the answer's characters in training. One
    # pass: tokens and segments both run left to right.
    labels, j = [], 0
    for token, (start, stop) in zip(ids, offsets):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        trained = start < stop and j < len(spans) and spans[j][0] < stop
        labels.append(token if trained else IGNORE_INDEX)
    eos = tokenizer.eos_token_id
    ends_trained = bool(spans) and spans[-1][1] == len(text)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos if ends_trained else IGNORE_INDEX)
        offsets.append((len(text), len(text)))
    elif eos is not None and offsets[-1][0] == offsets[-1][1]:  # the tokenizer's own EOS
        labels[-1] = eos if ends_trained else IGNORE_INDEX
        offsets[-1] = (len(text), len(text))  # at (0, 0): offsets stay ordered for the cut
    return ids, labels, spans, offsets
