"""Plain-text rows (format `text`): one `text` field per row, trained as written, without a
chat template, as TRL trains a language-modeling dataset and Axolotl its `completion` type
(openassistant-guanaco's "### Human: ... ### Assistant: ..." transcripts, Llama-2-formatted
dumps, domain text).

A row is kept as messages of the role `text`, segments that are trained or not (`"train":
False`), so that its `messages_json` re-tokenizes like any other row. By default every token
is trained. With `data.response_template` (TRL's older DataCollatorForCompletionOnlyLM) only
the text after that marker is: after its first occurrence to the end, or, with
`data.instruction_template` too, after each response marker up to the next instruction marker
(multi-turn transcripts: the human turns are context). Without the instruction template, what
follows the *last* response marker is trained, as TRL's collator does (it keeps the last
match), so a transcript trains its last answer only. The markers themselves are never
trained. A row with a response template but no marker in it is rejected (`no_response_marker`:
TRL ignores such a row with a warning).
"""

from __future__ import annotations

from typing import Any

from sftmix_ray.errors import RowRejected
from sftmix_ray.loss_kernels import IGNORE_INDEX

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


def tokenize_text(
    tokenizer: Any, messages: list[dict[str, Any]], max_length: int, truncation: str
) -> tuple[list[int], list[int], bool]:
    """(ids, labels, truncated) of a text row: the tokenizer's own special tokens (BOS) and
    EOS at the end, as TRL adds it; a token is trained when one of its characters is in a
    trained segment, EOS when the last segment is trained. Longer than `max_length`: cut there
    (`turns`, `truncate`; a row whose first trained token is past it is `prompt_too_long`) or
    rejected (`drop`)."""
    text = "".join(m["content"] for m in messages)
    spans, position = [], 0
    for message in messages:
        end = position + len(message["content"])
        if message.get("train") is not False:
            spans.append((position, end))
        position = end
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos] and text.startswith(str(tokenizer.bos_token)):
        ids, offsets = ids[1:], offsets[1:]  # a dump written with its own "<s>" (Llama-2's)
    # A token is trained when any of its characters is: a token that straddles a marker's edge
    # (BPE merges "." with a following "###") keeps the answer's characters in training.
    labels = [
        token if start < stop and any(start < b and a < stop for a, b in spans) else IGNORE_INDEX
        for token, (start, stop) in zip(ids, offsets)
    ]
    eos = tokenizer.eos_token_id
    ends_trained = bool(spans) and spans[-1][1] == len(text)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos if ends_trained else IGNORE_INDEX)
    elif eos is not None and offsets[-1][0] == offsets[-1][1]:  # the tokenizer's own EOS
        labels[-1] = eos if ends_trained else IGNORE_INDEX
    truncated = len(ids) > max_length
    if truncated:
        if truncation == "drop":
            raise RowRejected(
                f"too long: {len(ids)} tokens > data.max_length={max_length}", "too_long"
            )
        first = next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if truncation == "turns" and (first is None or first >= max_length):
            raise RowRejected(
                f"prompt too long: the first trained token is token {(first or 0) + 1} "
                f"(data.max_length={max_length})",
                "prompt_too_long",
            )
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        reason = "no supervised tokens after truncation" if truncated else "no supervised tokens"
        raise RowRejected(reason, "no_supervised_tokens")
    return ids, labels, truncated
