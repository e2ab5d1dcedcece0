"""Tool-calling conversations: read from OpenAI, older OpenAI and LLaMA-Factory rows into one
shape, checked for order, rendered by the chat template with the tool definitions, and trained
on where the assistant speaks (its calls included), not on tool results or definitions.

`sftmix-ray prepare` on tool rows (their `tools_json` column, the calls supervised) is in
test_repairs.py's prepare test; `validate-data` counts them there too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sftmix_ray.data.chunk_worker import PREPARED, SCHEMAS, ChunkJob, process_chunk
from sftmix_ray.data.chunks import plan_chunks
from sftmix_ray.data.formats import normalize_example, normalize_with_repairs
from sftmix_ray.data.tokenize import IGNORE_INDEX, tokenize_conversation
from sftmix_ray.errors import RowRejected
from sftmix_ray.modeling import train_tiny_tokenizer

WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
CANONICAL = [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp_c": 21}'},
    {"role": "assistant", "content": "It is 21 C in Paris."},
]
OPENAI = {
    "messages": [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 C in Paris."},
    ],
    "tools": [{"type": "function", "function": WEATHER}],
}
OPENAI_LEGACY = {  # `function_call` on the assistant turn, `function` role, `functions`
    "messages": [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"role": "function", "name": "get_weather", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 C in Paris."},
    ],
    "functions": [WEATHER],
}
LLAMA_FACTORY = {  # sharegpt with function_call / observation turns, tools as JSON text
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {
            "from": "function_call",
            "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        },
        {"from": "observation", "value": '{"temp_c": 21}'},
        {"from": "gpt", "value": "It is 21 C in Paris."},
    ],
    "system": "You help.",
    "tools": json.dumps([WEATHER]),
}


XLAM = {  # Salesforce's xLAM function-calling rows: JSON text in every field
    "id": 7,
    "query": "Weather in Paris?",
    "answers": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}}]),
    "tools": json.dumps([WEATHER]),
}


def _without(messages: list[dict], *keys: str) -> list[dict]:
    """Messages with the ids and names some formats carry taken out (the rest must agree)."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if k not in keys}
        if "tool_calls" in m:
            m["tool_calls"] = [{k: v for k, v in c.items() if k != "id"} for c in m["tool_calls"]]
        out.append(m)
    return out


@pytest.mark.parametrize(
    ("row", "fmt"), [(OPENAI, "messages"), (OPENAI_LEGACY, "messages"), (LLAMA_FACTORY, "sharegpt")]
)
def test_every_tool_format_reads_to_one_shape(row, fmt):
    messages, tools, repairs = normalize_example(row, fmt, "none")
    assert repairs == []
    assert _without(messages, "tool_call_id", "name") == CANONICAL
    assert tools == [{"type": "function", "function": WEATHER}]
    assert normalize_example(row, "auto")[:2] == (messages, tools)


def test_xlam_rows_are_a_question_and_its_calls():
    messages, tools, repairs = normalize_example(XLAM, "auto")
    assert repairs == [] and tools == [{"type": "function", "function": WEATHER}]
    assert messages == [CANONICAL[1], CANONICAL[2]]
    for answers, reason in (
        ("[]", "field 'answers' list is empty"),
        ('[{"arguments": {}}]', "field 'answers' has no function name"),
    ):
        with pytest.raises(RowRejected) as info:
            normalize_example({**XLAM, "answers": answers}, "xlam")
        assert (info.value.kind, info.value.reason) == ("malformed_tool_call", reason)
    with pytest.raises(RowRejected, match=r"missing field 'query' \(row looks like messages\)"):
        normalize_example(OPENAI, "xlam")


def test_ids_and_names_the_row_gives_are_kept():
    """Mistral's template needs the call id on both sides; older OpenAI names the tool."""
    messages, _, _ = normalize_example(OPENAI, "messages")
    assert messages[2]["tool_calls"][0]["id"] == "call_1"
    assert messages[3]["tool_call_id"] == "call_1"
    legacy, _, _ = normalize_example(OPENAI_LEGACY, "messages")
    assert legacy[3]["name"] == "get_weather"


def _sg(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"from": r, "value": v} for r, v in turns]}


CALL = ("function_call", '{"name": "f", "arguments": {}}')
REJECTED = [
    (_sg(("human", "q"), CALL, ("human", "q2"), ("gpt", "a")), "unanswered_tool_call"),
    (_sg(("human", "q"), CALL, ("observation", "r"), ("human", "q2"), ("gpt", "a")),
     "unanswered_tool_result"),
    (_sg(("human", "q"), ("observation", "r"), ("gpt", "b")), "orphan_tool_result"),
    (_sg(("human", "q"), ("function_call", '{"arguments": {}}')), "malformed_tool_call"),
    (_sg(("human", "q"), ("function_call", '{"name": "f", "arguments": "[1"}')),
     "malformed_tool_call"),
    (_sg(("human", "q"), ("function_call", '{"name": "f", "arguments": [1]}')),
     "malformed_tool_call"),
    ({**_sg(("human", "q"), ("gpt", "a")), "tools": "[{"}, "malformed_tools"),
    ({**_sg(("human", "q"), ("gpt", "a")), "tools": [{"description": "no name"}]},
     "malformed_tools"),
    ({"messages": [{"role": "user", "content": "q", "tool_calls": [{"name": "f"}]},
                   {"role": "assistant", "content": "a"}]}, "malformed_tool_call"),
    # JSON nested past Python's recursion limit: a counted rejection, not a crashed actor
    (_sg(("human", "q"), ("function_call", "[" * 5000 + "]" * 5000)), "malformed_tool_call"),
    ({**_sg(("human", "q"), ("gpt", "a")), "tools": "[" * 5000 + "]" * 5000}, "malformed_tools"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "kind"), REJECTED)
def test_broken_tool_conversations_are_rejected_by_kind(row, kind):
    with pytest.raises(RowRejected) as info:
        normalize_example(row, "auto")
    assert info.value.kind == kind, info.value.reason


def test_parallel_calls_their_results_and_a_final_call():
    """Two calls in one turn answered by two results; a conversation may end with a call
    (single-turn function-calling data: the model learns to make the call)."""
    calls = '[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]'
    row = _sg(("human", "q"), ("function_call", calls), ("observation", "1"),
              ("observation", "2"), ("gpt", "a"), ("human", "again"), CALL)  # fmt: skip
    messages, applied = normalize_with_repairs(row, "sharegpt", "none")
    assert applied == []
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant",
                                             "user", "assistant"]  # fmt: skip
    assert [c["function"]["name"] for c in messages[1]["tool_calls"]] == ["f", "g"]
    assert messages[-1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {}}
    strict = _sg(("human", "q"), CALL, ("observation", "r"))
    with pytest.raises(RowRejected) as info:
        normalize_with_repairs(strict, "sharegpt", "none")
    assert info.value.kind == "ends_with_tool_result"


def test_results_are_named_after_the_calls_they_answer():
    """Hermes' template needs each result's tool name, which OpenAI rows and LLaMA-Factory's
    observations leave out: taken from the call it answers, by id, else by place."""
    f = {"id": "call_f", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    g = {"id": "call_g", "type": "function", "function": {"name": "g", "arguments": "{}"}}
    row = {"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [f, g]},
        {"role": "tool", "tool_call_id": "call_g", "content": "G"},
        {"role": "tool", "tool_call_id": "call_f", "content": "F"},
        {"role": "assistant", "content": "a"},
    ]}  # fmt: skip
    messages, _ = normalize_with_repairs(row, "messages", "none")
    assert [m.get("name") for m in messages if m["role"] == "tool"] == ["g", "f"]
    calls = '[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]'
    row = _sg(("human", "q"), ("function_call", calls), ("observation", "F"),
              ("observation", "G"), ("gpt", "a"))  # fmt: skip
    messages, _ = normalize_with_repairs(row, "sharegpt", "none")
    assert [m.get("name") for m in messages if m["role"] == "tool"] == ["f", "g"]
    # The same with the hyphenated roles of some glaive conversions.
    hyphens = _sg(("human", "q"), ("function-call", calls), ("function-response", "F"),
                  ("function-response", "G"), ("gpt", "a"))  # fmt: skip
    assert normalize_with_repairs(hyphens, "sharegpt", "none")[0] == messages


def test_structured_results_are_kept_as_json_text():
    """A tool result given as an object, a list or a number (not text) is its JSON."""
    records = [{"title": "Paris", "text": "capital"}]  # not text parts: "title" is kept
    for value, text in (({"temp_c": 21}, '{"temp_c": 21}'), ([1, 2], "[1, 2]"), (21.5, "21.5"),
                        ([], "[]"), (records, json.dumps(records))):  # fmt: skip
        row = {"messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
            {"role": "tool", "content": value},
            {"role": "assistant", "content": "a"},
        ]}  # fmt: skip
        messages, _ = normalize_with_repairs(row, "messages", "none")
        assert messages[2] == {"role": "tool", "content": text, "name": "f"}


def test_parquet_null_padding_is_not_trained_on(tmp_path):
    """Parquet (and HF datasets) store objects as structs of every row's keys: one row's call
    arguments and tool definition come back with the other row's keys as nulls, and a call
    that used `parameters` with `arguments` null. Read through the real Parquet reader."""
    import pyarrow as pa

    from sftmix_ray.data.readers import iter_records

    def row(name, key, args, props):
        call = {"id": "c1", "type": "function", "function": {"name": name, key: args}}
        return {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
                {"role": "assistant", "content": "done"},
            ],
            "tools": [{"type": "function", "function": {"name": name, "parameters": {
                "type": "object", "properties": {p: {"type": "string"} for p in props}}}}],
        }  # fmt: skip

    rows = [
        row("weather", "arguments", {"city": "Paris"}, ["city"]),
        row("search", "arguments", {"query": "x", "limit": "3"}, ["query", "limit"]),
        row("lookup", "parameters", {"city": "Oslo"}, ["city"]),
    ]
    path = tmp_path / "tools.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    read = list(iter_records(path))
    padded = read[0]["messages"][1]["tool_calls"][0]["function"]
    assert padded["arguments"]["query"] is None and padded["parameters"] is None
    assert read[2]["messages"][1]["tool_calls"][0]["function"]["arguments"] is None
    for got, want in zip(read, rows):
        messages, tools, _ = normalize_example(got, "messages", "none")
        expected, expected_tools, _ = normalize_example(want, "messages", "none")
        assert messages == expected and tools == expected_tools


def test_a_call_written_in_the_answers_text_may_be_answered_by_a_tool():
    """Hermes' function-calling dumps write the call as `<tool_call>` text in the gpt turn and
    the result as a `tool` turn: kept as they are (the call trains as answer text)."""
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    row = _sg(("system", "tools: f"), ("human", "q"), ("gpt", call), ("tool", "r"), ("gpt", "a"))
    messages, _ = normalize_with_repairs(row, "sharegpt", "none")
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "tools: f"), ("user", "q"), ("assistant", call), ("tool", "r"),
        ("assistant", "a"),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------- tokenizing


@pytest.fixture(scope="module")
def tokenizer():
    texts = [json.dumps(OPENAI), json.dumps(LLAMA_FACTORY)] * 30 + ["system user assistant tool"]
    return train_tiny_tokenizer(texts, 400)


def _pieces(tok, ids, labels, supervised: bool) -> str:
    return tok.decode([i for i, y in zip(ids, labels) if (y != IGNORE_INDEX) == supervised])


def _openai(tok, max_length: int = 4096, truncation: str = "drop"):
    """The OpenAI example row tokenized: (ids, labels, truncated)."""
    messages, tools, _ = normalize_example(OPENAI, "messages")
    return tokenize_conversation(tok, messages, max_length, truncation, tools)


def _openai_rejected(tok) -> RowRejected:
    """The rejection of the OpenAI example row under `tok`'s template."""
    with pytest.raises(RowRejected) as info:
        _openai(tok)
    return info.value


def test_calls_and_answers_are_supervised_results_and_definitions_are_not(tokenizer):
    ids, labels, truncated = _openai(tokenizer)
    assert not truncated
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert _pieces(tokenizer, ids, labels, True) == (
        f"{call}<|im_end|>\nIt is 21 C in Paris.<|im_end|>\n"
    )
    prompt = _pieces(tokenizer, ids, labels, False)
    assert "<tools>\n" + json.dumps({"type": "function", "function": WEATHER}) in prompt
    assert "You help." in prompt and '<|im_start|>tool\n{"temp_c": 21}<|im_end|>' in prompt
    # The same conversation from LLaMA-Factory's shape tokenizes to the same ids.
    same, same_tools, _ = normalize_example(LLAMA_FACTORY, "sharegpt")
    again = tokenize_conversation(tokenizer, same, 4096, "drop", same_tools)
    assert again == (ids, labels, False)


def test_turns_truncation_may_end_on_a_call(tokenizer):
    """`turns` keeps the longest prefix of whole assistant turns: here the call."""
    full, _, _ = _openai(tokenizer)
    ids, labels, truncated = _openai(tokenizer, len(full) - 1, "turns")
    assert truncated and ids == full[: len(ids)]
    assert _pieces(tokenizer, ids, labels, True).endswith("</tool_call><|im_end|>\n")


# A template without tool support (it writes content only), and one in Llama 3.1's manner: a
# tool result as `ipython` through `tojson`, the call as JSON with `parameters`.
NO_TOOLS = (
    "{% for m in messages %}{{ '<s>' + m['role'] + ': ' + m['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}"
)
LLAMA_LIKE = (
    "{% if tools %}{{ '<s>system: tools ' + (tools | tojson) + '</s>\\n' }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}"
    "{{ '<s>ipython: ' + (m['content'] | tojson) + '</s>\\n' }}"
    "{% elif m['tool_calls'] %}{{ '<s>assistant: ' }}{% for c in m['tool_calls'] %}"
    "{{ {'name': c['function']['name'], 'parameters': c['function']['arguments']} | tojson }}"
    "{% endfor %}{{ '</s>\\n' }}"
    "{% else %}{{ '<s>' + m['role'] + ': ' + m['content'] + '</s>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}"
)


def _with_template(tokenizer, template):
    tok = train_tiny_tokenizer([json.dumps(OPENAI)] * 30 + ["system user assistant"], 400)
    tok.chat_template = template
    return tok


def test_a_template_without_tool_support_rejects_the_row(tokenizer):
    """Its calls would render as empty answers: the model would learn to say nothing."""
    tok = _with_template(tokenizer, NO_TOOLS)
    rejected = _openai_rejected(tok)
    assert rejected.kind == "template_no_tools" and "turn 3's tool call" in rejected.reason
    plain = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert tokenize_conversation(tok, plain, 4096, "drop")[0]  # rows without tools still fine
    # The answer's own text naming the function is not the call.
    messages, tools, _ = normalize_example(OPENAI, "messages")
    messages[2]["content"] = "I will call get_weather."
    with pytest.raises(RowRejected) as info:
        tokenize_conversation(tok, messages, 4096, "drop", tools)
    assert info.value.kind == "template_no_tools"


def test_a_template_that_is_not_prefix_stable_must_still_render_results(tokenizer):
    """Phi-3's manner (the EOS only at the very end; system, user and assistant only): answers
    are searched for in the text, and a tool result or definition it leaves out rejects the
    row (calls cannot be aligned there at all: `template_not_prefix_stable`)."""
    phi3 = (
        "{% for m in messages %}{% if m['role'] in ('system', 'user', 'assistant') %}"
        "{{ '<s>' + m['role'] + ': ' + m['content'] + '</s>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% else %}{{ eos_token }}{% endif %}"
    )
    tok = _with_template(tokenizer, phi3)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    hermes = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": call},
        {"role": "tool", "content": "sunny, 21C"},
        {"role": "assistant", "content": "Sunny."},
    ]
    with pytest.raises(RowRejected) as info:
        tokenize_conversation(tok, hermes, 4096, "drop")
    assert info.value.kind == "template_no_tools" and "turn 3's tool result" in info.value.reason
    assert _openai_rejected(tok).kind == "template_not_prefix_stable"


def test_a_template_that_writes_results_through_tojson_is_accepted(tokenizer):
    tok = _with_template(tokenizer, LLAMA_LIKE)
    ids, labels, _ = _openai(tok)
    supervised = _pieces(tok, ids, labels, True).lstrip()  # " {" straddles the span start
    assert supervised.startswith('{"name": "get_weather", "parameters": {"city": "Paris"}}</s>')
    assert '"temp_c"' not in supervised


# Templates with tool support that are not prefix-stable, in the manner of three real ones:
# Qwen3 (an empty thinking block on the last answer after the last user turn), Hermes-3's
# tool_use (a newline after a result only when more follows), Mistral (the tool list before the
# last user turn).
QWEN3_LIKE = (
    "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- if tools %}{{ '<|im_start|>system\\n<tools>' }}{%- for t in tools %}"
    "{{ '\\n' + (t | tojson) }}{%- endfor %}{{ '\\n</tools><|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{ m.content }}{%- for c in m.tool_calls or [] %}{{ '\\n<tool_call>\\n' + ({'name': "
    "c.function.name, 'arguments': c.function.arguments} | tojson) + '\\n</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\\n' }}{%- elif m.role == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
HERMES_LIKE = (
    "{%- if tools %}{{ '<|im_start|>system\\n<tools> ' }}{%- for t in tools %}"
    "{{ t.function.name + ' ' }}{%- endfor %}{{ '</tools><|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' and m.tool_calls is defined %}"
    "{{ '<|im_start|>assistant' }}{%- for c in m.tool_calls %}{{ '\\n<tool_call>\\n' + "
    "({'name': c.function.name, 'arguments': c.function.arguments} | tojson) + '\\n</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\\n' }}{%- elif m.role == 'tool' %}"
    "{%- if loop.previtem and loop.previtem.role != 'tool' %}"
    "{{ '<|im_start|>tool\\n' }}{%- endif %}"
    "{{ '<tool_response>\\n' + m.content }}{%- if not loop.last %}{{ '\\n</tool_response>\\n' }}"
    "{%- else %}{{ '\\n</tool_response>' }}{%- endif %}{%- if loop.last or loop.nextitem.role "
    "!= 'tool' %}{{ '<|im_end|>' }}{%- endif %}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL_LIKE = (  # it also checks that its text turns alternate, as Mistral's does
    "{%- for m in messages | rejectattr('role', 'equalto', 'tool') | rejectattr('role', "
    "'equalto', 'system') | selectattr('tool_calls', 'undefined') %}"
    "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{%- endif %}{%- endfor %}"
    "{%- set users = messages | selectattr('role', 'equalto', 'user') | list %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- if tools and m == users[-1] %}"
    "{{ '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{{ '[INST] ' + m.content + '[/INST]' }}{%- elif m.tool_calls is defined %}"
    "{{ '[TOOL_CALLS] ' + (m.tool_calls | map(attribute='function') | list | tojson) + '</s>' }}"
    "{%- elif m.role == 'tool' %}{{ '[TOOL_RESULTS] ' + m.content + '[/TOOL_RESULTS]' }}"
    "{%- elif m.role == 'assistant' %}{{ ' ' + m.content + '</s>' }}{%- endif %}{%- endfor %}"
)


@pytest.mark.parametrize(
    ("template", "end"),
    [(QWEN3_LIKE, "<|im_end|>\n"), (HERMES_LIKE, "<|im_end|>\n"), (MISTRAL_LIKE, None)],
)
def test_templates_that_are_not_prefix_stable_align_calls_by_difference(tokenizer, template, end):
    """Each answer is where the whole text changes when that answer alone is replaced: the
    call and the final answer are trained on with their end-of-turn marker, nothing of the
    results, the definitions or Qwen3's thinking block. Mistral's refuses a text answer there
    (its alternation check) and, with the answer left out, `[TOOL_CALLS]` before
    `[TOOL_RESULTS]` leaves its place ambiguous: rejected, not mislabelled."""
    tok = _with_template(tokenizer, template)
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>", "</s>"]})
    messages, tools, _ = normalize_example(OPENAI, "messages")
    messages[-2:] = [messages[-2], *messages[-2:]]  # two results: Hermes' newline differs
    messages[-2] = {**messages[-3], "content": "21"}
    messages[2]["tool_calls"] = messages[2]["tool_calls"] * 2
    # A first exchange before: Mistral's tool list now moves with the last user turn.
    messages[1:1] = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    if end is None:
        with pytest.raises(RowRejected) as info:
            tokenize_conversation(tok, messages, 4096, "drop", tools)
        assert info.value.kind == "template_not_prefix_stable"
        return
    ids, labels, _ = tokenize_conversation(tok, messages, 4096, "drop", tools)
    supervised = _pieces(tok, ids, labels, True)
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert supervised.count(call) == 2 and supervised.endswith(f"It is 21 C in Paris.{end}")
    assert supervised.count(end) == 3 and supervised.count("Hello.") == 1, supervised
    for prompt_only in ("temp_c", "<think>", "<tools>", "tool\n", "user", "<tool_response>"):
        assert prompt_only not in supervised


@pytest.mark.parametrize(
    ("old", "new"),
    [  # the tool list only when a call exists; the result's header naming the call
        ("{%- if tools %}", "{%- if tools and messages | selectattr('tool_calls') | list %}"),
        ("'<|im_start|>user\\n<tool_response>\\n'",
         "'<|im_start|>tool (' + (loop.previtem.tool_calls[0].function.name "
         "if loop.previtem.tool_calls else '') + ')\\n'"),
    ],
)  # fmt: skip
def test_a_call_that_changes_text_elsewhere_rejects_the_row(tokenizer, old, new):
    """The difference of the two renders must be the answer alone: else rejected, not a span
    that takes in the tool list, the prompt or the next turn's header."""
    assert old in QWEN3_LIKE
    tok = _with_template(tokenizer, QWEN3_LIKE.replace(old, new))
    assert _openai_rejected(tok).kind == "template_not_prefix_stable"


def test_named_templates_use_tool_use_for_rows_with_tools(tokenizer):
    tok = _with_template(tokenizer, None)
    tok.chat_template = {"default": NO_TOOLS, "tool_use": LLAMA_LIKE}
    ids, labels, _ = _openai(tok)
    assert '"parameters"' in _pieces(tok, ids, labels, True)


# ------------------------------------------------------------------- chunks: write, re-tokenize


def test_a_chunk_keeps_the_tools_and_re_tokenizing_reads_them_back(tokenizer, tmp_path):
    """The tokenization tasks' own function: tool rows are written with their `tools_json`,
    and the `reference` stage's re-tokenizing of OUT/data reads them back (same ids)."""
    corpus = tmp_path / "tools.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in (OPENAI, OPENAI_LEGACY)) + "\n")

    def tokenize(messages, tools):
        return tokenize_conversation(tokenizer, messages, 4096, "drop", tools)

    def run(path: str, fmt: str, name: str) -> Path:
        target = tmp_path / name
        job = ChunkJob(path, fmt, "standard", "train", 0, {"train": str(target)},
                       {"train": str(tmp_path / f"{name}-rejections")})  # fmt: skip
        (chunk,), _ = plan_chunks(path, hf_split="train", work_dir=tmp_path, parts=1)
        stats = process_chunk(job, 0, chunk, tokenize)
        assert stats["error"] is None and stats["train"]["written"] == 2, stats
        return target

    data = pq.read_table(run(str(corpus), "messages", "data"))
    assert data.schema.equals(SCHEMAS["train"])
    tools = [json.loads(t) for t in data.column("tools_json").to_pylist()]
    assert tools == [[{"type": "function", "function": WEATHER}]] * 2
    again = pq.read_table(run(str(tmp_path / "data"), PREPARED, "again"))
    assert again.column("input_ids").to_pylist() == data.column("input_ids").to_pylist()
    assert again.column("labels").to_pylist() == data.column("labels").to_pylist()


@pytest.mark.parametrize("eos", [False, True])
def test_the_built_in_template_renders_plain_conversations_as_plain_chatml(tokenizer, eos):
    """Tool support changed nothing for rows without tools: the same text as ChatML."""
    from sftmix_ray.modeling import BUILTIN_CHAT_TEMPLATE, BUILTIN_CHAT_TEMPLATE_WITH_EOS

    conversation = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q\n"},
        {"role": "assistant", "content": " a "},
    ]
    template = BUILTIN_CHAT_TEMPLATE_WITH_EOS if eos else BUILTIN_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        conversation, chat_template=template, tokenize=False, add_generation_prompt=False
    )
    tail = tokenizer.eos_token if eos else ""
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq\n<|im_end|>\n"
        f"<|im_start|>assistant\n a <|im_end|>{tail}\n"
    )


def test_validate_data_reads_an_xlam_dump(tmp_path, capsys):
    """`sftmix-ray validate-data` detects xLAM rows and counts a bad one by kind."""
    from sftmix_ray.cli import main

    path = tmp_path / "xlam.jsonl"
    rows = [XLAM, {**XLAM, "answers": "[]"}, {**XLAM, "tools": "not json"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["validate-data", "--data", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["format"], report["total"], report["valid"]) == ("xlam", 3, 1)
    assert {k: v["examples"] for k, v in report["by_kind"].items()} == {
        "malformed_tool_call": [1], "malformed_tools": [2]
    }  # fmt: skip
