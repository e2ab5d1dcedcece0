"""An answer's reasoning (its thinking trace) kept and trained: read from the fields real
reasoning corpora use, rendered under the key the chat template reads or inline in `<think>`
tags, and a template that drops it rejects the row unless `data.reasoning: drop`."""

from __future__ import annotations

import json

import pytest

from sftmix_ray.cli import main
from sftmix_ray.data.formats import normalize_example, read_example
from sftmix_ray.data.reasoning import template_key
from sftmix_ray.data.tokenize import tokenize_conversation
from sftmix_ray.errors import RowRejected
from sftmix_ray.modeling import train_tiny_tokenizer
from tests.conftest import trained_runs

THOUGHT = "Two and two make four."


def chat(**answer) -> dict:
    return {"messages": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4", **answer}]}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["2+2?", "4", THOUGHT, "Why?", "Because.", "<think> </think>"] * 20
    return train_tiny_tokenizer([*texts, "system user assistant"], 360)


def trained(tok, messages, template: str | None = None, tools=None) -> list[str]:
    """The trained text of each answer (runs of supervised tokens), under `template`."""
    if template is not None:
        tok = _with_template(tok, template)
    ids, labels, _ = tokenize_conversation(tok, messages, 1024, "turns", tools)
    return trained_runs(tok, ids, labels)


def _with_template(tok, template: str):
    import copy

    other = copy.copy(tok)
    other.chat_template = template
    return other


@pytest.mark.parametrize(
    "answer",
    [
        {"reasoning_content": THOUGHT},  # DeepSeek's and Qwen's API, Qwen3's template
        {"reasoning": THOUGHT},  # vLLM's and OpenRouter's output
        {"thinking": THOUGHT},  # gpt-oss' template, HF's Multilingual-Thinking
        {"content": [{"type": "thinking", "thinking": THOUGHT, "signature": "x"},
                     {"type": "text", "text": "4"}]},  # Anthropic's content parts
    ],
)  # fmt: skip
def test_reasoning_is_read_from_every_field_real_corpora_use(answer):
    messages, _, repairs = normalize_example(chat(**answer), "messages")
    assert messages[-1] == {"role": "assistant", "content": "4", "reasoning": THOUGHT}
    assert repairs == []
    # A flag or an empty field is not a trace; a user turn's is not read.
    for other in ({"thinking": False}, {"reasoning_content": ""}, {"reasoning": None}):
        assert "reasoning" not in normalize_example(chat(**other), "messages")[0][-1]


def test_reasoning_is_trained_inline_where_the_template_reads_none(tokenizer):
    """The built-in ChatML template reads no reasoning key: the trace goes before the answer
    in `<think>` tags, and is trained with it."""
    messages = normalize_example(chat(reasoning_content=THOUGHT), "messages")[0]
    assert trained(tokenizer, messages) == [f"<think>\n{THOUGHT}\n</think>\n\n4<|im_end|>\n"]
    # Consecutive answers merge with their reasoning (a standard repair).
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "Hm.", "reasoning": "One."},
                        {"role": "assistant", "content": "4", "reasoning": "Two."}]}  # fmt: skip
    messages, _, repairs = normalize_example(row, "messages")
    assert messages[-1]["reasoning"] == "One.\n\nTwo." and repairs == ["same_role_merged"]


# Qwen3's template, reduced to what matters here: `reasoning_content` (or a `<think>` block in
# the content) rendered only for answers after the last user turn, as at inference.
QWEN3_REASONING = (
    "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{%- set content = m.content %}{%- set rc = '' %}"
    "{%- if m.reasoning_content is string %}{%- set rc = m.reasoning_content %}"
    "{%- elif '</think>' in content %}{%- set rc = content.split('</think>')[0]"
    ".split('<think>')[-1].strip('\\n') %}{%- set content = content.split('</think>')[-1]"
    ".lstrip('\\n') %}{%- endif %}{%- if loop.index0 > ns.last %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + rc.strip('\\n') + '\\n</think>\\n\\n' + content"
    " + '<|im_end|>\\n' }}{%- else %}{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
# DeepSeek-R1's: everything up to `</think>` stripped from every answer; reads no key.
R1_LIKE = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{%- set c = m.content %}"
    "{%- if '</think>' in c %}{%- set c = c.split('</think>')[-1] %}{%- endif %}"
    "{{ '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}{%- else %}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
GPT_OSS_LIKE = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if m.thinking %}{{ '[analysis] ' + m.thinking + '\\n' }}{%- endif %}"
    "{{ m.content + '<|im_end|>\\n' }}{%- else %}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_reasoning_goes_under_the_key_the_template_reads(tokenizer):
    """Qwen3's `reasoning_content`, gpt-oss' `thinking`: rendered by the template itself and
    trained from the answer's header on (`<think>` included); Qwen3 leaves the reasoning of
    answers before the last user turn out (its choice, as at inference), their text trained."""
    assert template_key(QWEN3_REASONING) == "reasoning_content"
    assert template_key(GPT_OSS_LIKE) == "thinking" and template_key(R1_LIKE) is None
    one = normalize_example(chat(thinking=THOUGHT), "messages")[0]
    assert trained(tokenizer, one, QWEN3_REASONING) == [
        f"<think>\n{THOUGHT}\n</think>\n\n4<|im_end|>\n"
    ]
    assert trained(tokenizer, one, GPT_OSS_LIKE) == [f"[analysis] {THOUGHT}\n4<|im_end|>\n"]
    # Two exchanges: Qwen3's template is not prefix-stable here (the first answer's block goes
    # once a user turn follows), so the answers are searched for in the whole text.
    row = {"messages": [{"role": "user", "content": "Why?"},
                        {"role": "assistant", "content": "Because.", "reasoning": "Hm."},
                        {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4", "reasoning": THOUGHT}]}  # fmt: skip
    two = normalize_example(row, "messages")[0]
    assert trained(tokenizer, two, QWEN3_REASONING) == [
        "Because.<|im_end|>\n",
        f"<think>\n{THOUGHT}\n</think>\n\n4<|im_end|>\n",
    ]


def test_a_template_that_drops_reasoning_rejects_the_row_unless_told_to_drop(tokenizer, tmp_path):
    """DeepSeek-R1's template strips every `<think>` block: training would teach answers
    without their reasoning, so the row is rejected by kind; `data.reasoning: drop` (and
    `validate-data --reasoning drop`) leaves the traces out and counts them."""
    r1 = _with_template(tokenizer, R1_LIKE)
    messages = normalize_example(chat(reasoning=THOUGHT), "messages")[0]
    with pytest.raises(RowRejected) as info:
        tokenize_conversation(r1, messages, 1024, "turns")
    assert info.value.kind == "template_drops_reasoning"
    _, dropped, _, repairs = read_example(chat(reasoning=THOUGHT), "messages", reasoning="drop")
    assert "reasoning" not in dropped[-1] and repairs == ["reasoning_dropped"]
    assert trained(r1, dropped) == ["4<|im_end|>\n"]
    corpus = tmp_path / "thinking.jsonl"
    rows = [chat(thinking=THOUGHT), chat(), chat(reasoning_content=THOUGHT)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for mode, repaired in (("keep", {}), ("drop", {"reasoning_dropped": 2})):
        args = ["validate-data", "--data", str(corpus), "--reasoning", mode, "--json"]
        report = json.loads(_stdout(main, args))
        assert (report["valid"], report["repairs"]) == (3, repaired)


def _stdout(entry, args) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert entry(args) == 0
    return buffer.getvalue()


# Qwen3's tool-calling template, reduced: the reasoning block (or an empty one on the last
# answer) only after the last user turn, so a row whose first answer is a call is not
# prefix-stable and its answers are located by rendering each one replaced by a probe.
QWEN3_TOOLS = (
    "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- if tools %}{{ '<|im_start|>system\\n<tools>' }}{%- for t in tools %}"
    "{{ '\\n' + (t | tojson) }}{%- endfor %}{{ '\\n</tools><|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last and m.reasoning_content %}"
    "{{ '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}"
    "{%- elif loop.index0 > ns.last and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{ m.content }}{%- for c in m.tool_calls or [] %}{{ '<tool_call>' + ({'name': "
    "c.function.name, 'arguments': c.function.arguments} | tojson) + '</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\\n' }}{%- elif m.role == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>' + m.content + '</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_reasoning_with_tool_calls_on_a_template_that_is_not_prefix_stable(tokenizer):
    """The probe that locates an answer has no reasoning, so the renders part after the
    block's `<think>\\n`; the span goes back to the answer's header: the model learns to open
    its block, as on the other paths."""
    call = {"type": "function", "function": {"name": "w", "arguments": {}}}
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "content": "4"},
                        {"role": "assistant", "content": "4", "reasoning": THOUGHT}],
           "tools": [{"type": "function", "function": {"name": "w"}}]}  # fmt: skip
    messages, tools, _ = normalize_example(row, "messages")
    assert trained(tokenizer, messages, QWEN3_TOOLS, tools) == [
        '<tool_call>{"name": "w", "arguments": {}}</tool_call><|im_end|>\n',
        f"<think>\n{THOUGHT}\n</think>\n\n4<|im_end|>\n",
    ]


def test_earlier_answers_reasoning_is_the_templates_to_leave_out(tokenizer):
    """Found in review: Qwen3 leaves the reasoning of an answer before the last user turn out;
    the same words in a later user turn are not taken for it (that trained the user turn),
    and a row whose last answer has none is not rejected for its earlier one's. DeepSeek-R1's
    template, which leaves every block out, is treated alike."""

    def row(last: dict) -> list[dict]:
        return normalize_example({"messages": [
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "Because.", "reasoning": "Hm."},
            {"role": "user", "content": "You said Hm. and then Because. Why?"},
            {"role": "assistant", "content": "4", **last}]}, "messages")[0]  # fmt: skip

    assert trained(tokenizer, row({"reasoning": THOUGHT}), QWEN3_REASONING) == [
        "Because.<|im_end|>\n",
        f"<think>\n{THOUGHT}\n</think>\n\n4<|im_end|>\n",
    ]
    assert trained(tokenizer, row({}), QWEN3_REASONING) == [
        "Because.<|im_end|>\n",
        "<think>\n\n</think>\n\n4<|im_end|>\n",  # its empty block, as in a one-turn row
    ]
    # R1's template cuts the inline block at `</think>`, leaving its blank line, as at inference.
    assert trained(tokenizer, row({}), R1_LIKE) == ["\n\nBecause.<|im_end|>\n", "4<|im_end|>\n"]


def test_a_reasoning_naming_the_call_does_not_pass_for_the_call(tokenizer):
    """Found in review: a template without tool support renders no call; a reasoning that
    names the function must not make the call look rendered (the row trained an empty
    answer)."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {}}}
    messages = normalize_example({"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call],
         "reasoning": "I should call get_weather for Paris."}]}, "messages")[0]  # fmt: skip
    with pytest.raises(RowRejected) as info:
        trained(tokenizer, messages, QWEN3_REASONING)
    assert info.value.kind == "template_no_tools"
