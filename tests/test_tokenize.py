"""Chat templating and response-only labels: prompt -100, assistant content + end-of-turn."""

from __future__ import annotations

import pytest

from sftmix_ray.data.tokenize import IGNORE_INDEX, render_with_spans, tokenize_conversation
from sftmix_ray.errors import RowRejected
from sftmix_ray.modeling import train_tiny_tokenizer

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Add 3 to that."},
    {"role": "assistant", "content": "8"},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for m in CONVO] * 20 + ["system user assistant"]
    return train_tiny_tokenizer(texts, 320)


def _supervised_text(tok, ids, labels):
    return tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_only_assistant_turns_and_end_of_turn_are_supervised(tokenizer):
    ids, labels, truncated = tokenize_conversation(tokenizer, CONVO, 512, "drop")
    assert not truncated and len(ids) == len(labels)
    assert _supervised_text(tokenizer, ids, labels) == "5<|im_end|>\n8<|im_end|>\n"
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    supervised_eot = [i for i, label in zip(ids, labels) if label == eot]
    all_eot = [i for i in ids if i == eot]
    assert len(supervised_eot) == 2 and len(all_eot) == 5  # system, 2 user turns: not learned
    prompt = tokenizer.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert "What is 2+3?" in prompt and "Be brief." in prompt and "Add 3" in prompt


def test_spans_cover_assistant_content(tokenizer):
    text, spans = render_with_spans(tokenizer, CONVO)
    assert [text[a:b] for a, b in spans] == ["5<|im_end|>\n", "8<|im_end|>\n"]


def test_truncation_policies(tokenizer):
    ids, _, _ = tokenize_conversation(tokenizer, CONVO, 512, "drop")
    with pytest.raises(RowRejected, match=r"too long: \d+ tokens > data.max_length=10"):
        tokenize_conversation(tokenizer, CONVO, 10, "drop")
    cut = len(ids) - 3  # keeps the first answer, cuts the second
    ids2, labels2, truncated = tokenize_conversation(tokenizer, CONVO, cut, "truncate")
    assert truncated and len(ids2) == cut and ids2 == ids[:cut]
    assert _supervised_text(tokenizer, ids2, labels2).startswith("5<|im_end|>")
    with pytest.raises(RowRejected, match="no supervised tokens after truncation"):
        tokenize_conversation(tokenizer, CONVO, 8, "truncate")


def test_foreign_template_is_used_when_present(tokenizer):
    tok = train_tiny_tokenizer(["hello there", "general"] * 10, 300)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
    )
    convo = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "there"}]
    ids, labels, _ = tokenize_conversation(tok, convo, 64, "drop")
    assert _supervised_text(tok, ids, labels) == "there<|endoftext|>"
