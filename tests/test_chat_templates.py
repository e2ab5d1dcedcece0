"""Labels under chat templates written in the manner of real ones, reduced to what decides
the labels: what an audit of 30 published templates (Llama 3.x, Qwen2.5/3, QwQ, gpt-oss,
Mistral, Gemma, Phi, DeepSeek, Hermes, Nemotron, ...) over a tiny tokenizer found mislabelled
or refused. Each test fails on the code before that audit."""

from __future__ import annotations

import copy

import pytest

from sftmix_ray.data.formats import normalize_example
from sftmix_ray.data.tokenize import tokenize_conversation
from sftmix_ray.modeling import train_tiny_tokenizer
from tests.conftest import trained_runs
from tests.test_tokenize import PHI3
from tests.test_tool_calls import HERMES_LIKE

MARKUP = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<SPECIAL_11>",
          "<SPECIAL_12>", "<think>", "</think>", "<tool_call>", "</tool_call>"]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Hello! How can I help?", "Tell me a joke.", "Why not?", "weather in Paris", "sunny"]
    tok = train_tiny_tokenizer([*texts * 20, "system user assistant"], 360)
    tok.add_special_tokens({"additional_special_tokens": MARKUP})
    return tok


def trained(tok, template: str, row: dict, max_length: int = 1024) -> list[str]:
    """The trained runs of a row under `template` (each run decoded on its own)."""
    tok = copy.copy(tok)
    tok.chat_template = template
    messages, tools, _ = normalize_example(copy.deepcopy(row), "messages")
    ids, labels, _ = tokenize_conversation(tok, messages, max_length, "turns", tools)
    return trained_runs(tok, ids, labels)


TWO = {"messages": [{"role": "user", "content": "Hi."},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Tell me a joke."},
                    {"role": "assistant", "content": "Why not?"}]}  # fmt: skip

# gpt-oss (harmony): an answer is `<|channel|>final<|message|>...` after the header
# `<|start|>assistant`, ending `<|end|>` when more follows and `<|return|>` at the end.
GPT_OSS_LIKE = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + m.content }}"
    "{{ '<|return|>' if loop.last else '<|end|>' }}{%- else %}"
    "{{ '<|start|>' + m.role + '<|message|>' + m.content + '<|end|>' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start|>assistant' }}{%- endif %}"
)


def test_gpt_oss_answers_keep_their_channel_and_end_markers(tokenizer):
    """The model writes `<|channel|>final<|message|>` itself and ends an earlier answer with
    `<|end|>`: both trained (the channel was left out of every answer of a multi-turn row and
    `<|end|>` out of the earlier ones)."""
    assert trained(tokenizer, GPT_OSS_LIKE, TWO) == [
        "<|channel|>final<|message|>Hello! How can I help?<|end|>",
        "<|channel|>final<|message|>Why not?<|return|>",
    ]


# Nemotron-Nano-v2: its generation prompt (`<SPECIAL_11>Assistant\n<think>\n`) is how only
# the answer being generated starts; earlier answers have no `<think>`.
NEMOTRON_LIKE = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{{ '<SPECIAL_11>Assistant\\n' }}{%- if loop.last %}{{ '<think>\\n' }}{%- endif %}"
    "{{ m.content + '\\n<SPECIAL_12>\\n' }}{%- else %}"
    "{{ '<SPECIAL_11>' + m.role + '\\n' + m.content + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<SPECIAL_11>Assistant\\n<think>\\n' }}{%- endif %}"
)


def test_an_answer_header_only_the_last_answer_has_is_not_searched_for_earlier(tokenizer):
    """The earlier answer was searched for after the last answer's header (rejected as not
    found); the end marker stops before the next turn's header."""
    assert trained(tokenizer, NEMOTRON_LIKE, TWO) == [
        "Hello! How can I help?\n<SPECIAL_12>\n",
        "Why not?\n<SPECIAL_12>\n",
    ]


# QwQ: the generation prompt ends with `<think>\n`; answers before the last user turn are cut
# at `</think>` (their reasoning goes, as at inference).
QWQ_LIKE = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{%- set c = m.content %}"
    "{%- if not loop.last %}{%- set c = c.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{ '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}{%- else %}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}"
    "{%- endif %}"
)


def test_inline_reasoning_under_a_template_that_cuts_history_at_think(tokenizer):
    """An earlier answer whose inline reasoning the template cut away is found by what is
    left of it (the row was rejected as not found); the last answer's reasoning is trained
    after the generation prompt's own `<think>\\n`."""
    row = copy.deepcopy(TWO)
    row["messages"][1]["reasoning"] = "They greet me."
    row["messages"][3]["reasoning"] = "A joke about jokes."
    assert trained(tokenizer, QWQ_LIKE, row) == [
        "Hello! How can I help?<|im_end|>\n",
        "A joke about jokes.\n</think>\n\nWhy not?<|im_end|>\n",
    ]


CALL_ROW = {
    "messages": [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
}  # fmt: skip


def test_a_tool_template_that_iterates_tools_unchecked(tokenizer):
    """Hermes' and Command-R's tool_use templates loop over `tools` without checking it: the
    probes that find the answer header and end marker rendered without tools and failed, so
    every tool row was rejected as `template_error`."""
    unchecked = HERMES_LIKE.replace("{%- if tools %}", "{%- if true %}", 1)
    assert unchecked != HERMES_LIKE
    runs = trained(tokenizer, unchecked, CALL_ROW)
    assert runs[-1] == "It is sunny.<|im_end|>\n" and "get_weather" in runs[0]
    # Set as a tokenizer's only template, it also renders the rows without tools.
    assert trained(tokenizer, unchecked, TWO) == [
        "Hello! How can I help?<|im_end|>\n",
        "Why not?<|im_end|>\n",
    ]


# DeepSeek-V3.1 writes a call's arguments with `+`, as text.
DEEPSEEK_V31_LIKE = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{%- for c in m.tool_calls or [] %}{{ '<tool_call>' + c.function.name + ':' "
    "+ c.function.arguments + '</tool_call>' }}{%- endfor %}{{ m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_template_that_writes_arguments_as_text_gets_json_text(tokenizer):
    """Arguments are read as objects (what most templates `tojson`); one that concatenates
    them failed every call row (`template_error`): it gets their JSON text."""
    runs = trained(tokenizer, DEEPSEEK_V31_LIKE, CALL_ROW)
    assert runs == [
        '<tool_call>get_weather:{"city": "Paris"}</tool_call><|im_end|>\n',
        "It is sunny.<|im_end|>\n",
    ]


def test_an_answers_words_in_a_later_system_turn_are_not_the_answer(tokenizer):
    """Under a template that is not prefix-stable (Phi-3's: EOS only at the very end) the
    answers are searched for in the whole text; a system turn later in the conversation
    ("Reply with one letter: A, B or C.") is searched past like a user turn, so the answer
    "B" is not found inside it (it was, and the system text was trained)."""
    row = {"messages": [
        {"role": "user", "content": "Which is a colour? A) dog B) red C) sky"},
        {"role": "system", "content": "Reply with one letter: A, B or C."},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why not?"}]}  # fmt: skip
    assert trained(tokenizer, PHI3, row) == ["B<|end|>\n", "Why not?<|end|>\n<|im_end|>"]
