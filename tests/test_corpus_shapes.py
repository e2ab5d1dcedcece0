"""Corpora as TRL, Axolotl and LLaMA-Factory users hold them: TRL's prompt-completion rows,
turns marked not to be trained (`weight: 0`, `train: false`), columns of other names
(`data.columns`), and glaive's original function-calling rows."""

from __future__ import annotations

import copy
import json
import re
import subprocess

import pyarrow.parquet as pq
import pytest

from sftmix_ray.cli import main
from sftmix_ray.config import load_config
from sftmix_ray.data.columns import rename_columns
from sftmix_ray.data.formats import detect_format, normalize_example, row_format
from sftmix_ray.data.tokenize import IGNORE_INDEX, tokenize_conversation
from sftmix_ray.errors import ConfigError, DataError, RowRejected
from sftmix_ray.modeling import train_tiny_tokenizer
from tests.conftest import TINY_OVERRIDES, cli_env, result_json, sftmix_command, trained_runs


def user(text: str, **extra) -> dict:
    return {"role": "user", "content": text, **extra}


def bot(text: str, **extra) -> dict:
    return {"role": "assistant", "content": text, **extra}


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Name a colour.", "Red.", "Another one?", "Blue.", "Why?", "Because."] * 20
    return train_tiny_tokenizer([*texts, "system user assistant"], 320)


def supervised(tok, messages: list[dict], max_length: int = 512, truncation: str = "turns"):
    ids, labels, _ = tokenize_conversation(tok, messages, max_length, truncation)
    return tok.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX])


# --------------------------------------------------------------------------- prompt-completion


def test_prompt_completion_rows_read_as_trl_writes_them():
    """Standard (strings) and conversational (lists of turns) rows; the prompt's answers are
    context (TRL trains the completion only); the completion may hold several turns."""
    assert row_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert row_format({"prompt": "a", "completion": "b", "messages": []}) == "messages"
    messages, tools, _ = normalize_example(
        {"prompt": "Name a colour.", "completion": "Red."}, "auto"
    )
    assert messages == [user("Name a colour."), bot("Red.")] and tools is None
    row = {
        "prompt": [
            {"role": "system", "content": "Be brief."}, user("Name a colour."), bot("Red."),
            user("Another one?"),
        ],
        "completion": [bot("Blue."), user("Why?"), bot("Because.")],
    }  # fmt: skip
    messages, _, _ = normalize_example(row, "prompt_completion")
    assert messages == [
        {"role": "system", "content": "Be brief."}, user("Name a colour."),
        bot("Red.", train=False), user("Another one?"), bot("Blue."), user("Why?"),
        bot("Because."),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("row", "kind", "reason"),
    [
        ({"prompt": "q"}, "missing_field", "missing field 'completion'"),
        ({"prompt": 3, "completion": "a"}, "wrong_type", "'prompt' must be a string or a list"),
        ({"prompt": [], "completion": []}, "empty_conversation", "both empty"),
        ({"prompt": "q", "completion": [user("again")]}, "no_assistant_turn", "no assistant"),
        # Reasons name the side a turn is on.
        (
            {"prompt": [user("q")], "completion": [bot("a"), bot("b")]},
            "repeated_role",
            "completion turn 2 repeats",
        ),
        (
            {"prompt": [user("q"), user("q")], "completion": "a"},
            "repeated_role",
            "prompt turn 2 repeats",
        ),
        # A prompt ending in an answer that the completion continues (TRL's prefill) would
        # train the prompt's part once merged.
        (
            {"prompt": [user("q"), bot("Red")], "completion": " Blue."},
            "mixed_training_turns",
            "prompt turn 2 .assistant, context. runs on into completion turn 1",
        ),
        # A prompt that already holds the only answer: nothing of the completion to learn.
        (
            {"prompt": [user("q"), bot("a")], "completion": []},
            "no_trained_turn",
            "the completion has no assistant turn",
        ),
    ],
)
def test_unusable_prompt_completion_rows_are_rejected_by_kind(row, kind, reason):
    repair = "standard" if kind == "mixed_training_turns" else "none"
    with pytest.raises(RowRejected, match=reason) as info:
        normalize_example(row, "prompt_completion", repair)
    assert info.value.kind == kind


# ------------------------------------------------------------------------- untrained turns


def test_weight_and_train_marks_leave_turns_out_of_training():
    """SlimOrca/OpenHermes sharegpt turns carry `weight` (0, 1 or null), Axolotl's
    chat_template rows `train`; only assistant turns read them."""
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief.", "weight": None},
            {"from": "human", "value": "Name a colour.", "weight": 0},
            {"from": "gpt", "value": "Red.", "weight": 0},
            {"from": "human", "value": "Another one?", "weight": 0},
            {"from": "gpt", "value": "Blue.", "weight": 1},
        ]
    }
    messages, _, _ = normalize_example(row, "auto")
    assert [m.get("train", True) for m in messages] == [True, True, False, True, True]
    marked = {"messages": [user("q"), bot("a", train=False), user("q2"), bot("b", train=True)]}
    assert [m.get("train", True) for m in normalize_example(marked, "auto")[0]] == [
        True, False, True, True
    ]  # fmt: skip
    for turns, kind in [
        ([user("q"), bot("a", weight=0)], "no_trained_turn"),
        ([user("q"), bot("a", weight=0.5)], "malformed_turn"),
        ([user("q"), bot("a", train="no")], "malformed_turn"),
        ([user("q"), bot("a", weight=True)], "malformed_turn"),
    ]:
        with pytest.raises(RowRejected) as info:
            normalize_example({"messages": turns}, "messages")
        assert info.value.kind == kind, turns


AGENT_ROW = {  # AgentInstruct's / AgentTuning's sharegpt: `loss` on every turn
    "conversations": [
        {"from": "human", "loss": None, "value": "You are an agent. Reply OK."},
        {"from": "gpt", "loss": False, "value": "OK."},
        {"from": "human", "loss": None, "value": "Observation: a door."},
        {"from": "gpt", "loss": True, "value": "Act: open it."},
    ],
    "id": "os_0",
}


def test_loss_false_answers_are_context_through_the_tokenization_task(tokenizer, tmp_path):
    """An answer marked `loss: false` (AgentInstruct's few-shot replies) is context, as
    `weight: 0` is: through the tokenization tasks' own function (`process_chunk`, as `prepare`
    runs it) only the `loss: true` answer is in the labels; a mark that is not a boolean is a
    counted `malformed_turn`."""
    from sftmix_ray.data.chunk_worker import ChunkJob, process_chunk
    from sftmix_ray.data.chunks import plan_chunks

    bad = copy.deepcopy(AGENT_ROW)
    bad["conversations"][3]["loss"] = "yes"
    corpus = tmp_path / "agent.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in (AGENT_ROW, bad)))
    target = tmp_path / "data"
    job = ChunkJob(str(corpus), "auto", "standard", "train", 0, {"train": str(target)},
                   {"train": str(tmp_path / "rejections")})  # fmt: skip
    (chunk,), _ = plan_chunks(str(corpus), hf_split="train", work_dir=tmp_path, parts=1)
    stats = process_chunk(
        job, 0, chunk, lambda m, t: tokenize_conversation(tokenizer, m, 512, "turns", t)
    )
    assert (stats["train"]["written"], stats["train"]["rejected"]) == (1, 1)
    data = pq.read_table(target)
    ids, labels = (data.column(c)[0].as_py() for c in ("input_ids", "labels"))
    assert trained_runs(tokenizer, ids, labels) == ["Act: open it.<|im_end|>\n"]
    assert "OK." in tokenizer.decode(ids)  # rendered in place, as context
    (line,) = (tmp_path / "rejections" / "part-00000.jsonl").read_text().splitlines()
    rejection = json.loads(line)
    assert rejection["kind"] == "malformed_turn" and rejection["line"] == 2
    assert "turn 4 loss must be true or false (got string)" in rejection["reason"]
    # An {input, output} exchange (Capybara's shape) keeps its mark on its answer.
    exchanges = {"messages": [{"input": "q", "output": "a", "loss": False},
                              {"input": "q2", "output": "b"}]}  # fmt: skip
    messages = normalize_example(exchanges, "messages")[0]
    assert [m.get("train", True) for m in messages] == [True, False, True, True]


def test_answers_merge_only_with_answers_trained_alike():
    """The standard repairs merge consecutive answers of one kind (both trained, both
    context); a context answer running on into a trained one is rejected, as one merged turn
    would train the context or leave the trained part out."""
    row = {"messages": [user("q"), bot("a"), bot("b"), user("q2"), bot("c", weight=0),
                        bot("d", weight=0), user("q3"), bot("e")]}  # fmt: skip
    messages, _, repairs = normalize_example(row, "messages")
    assert repairs == ["same_role_merged"]
    assert [(m["content"], m.get("train", True)) for m in messages if m["role"] == "assistant"] == [
        ("a\n\nb", True), ("c\n\nd", False), ("e", True)
    ]  # fmt: skip
    for first, second in (({"weight": 0}, {}), ({}, {"train": False})):
        mixed = {"messages": [user("q"), bot("a", **first), bot("b", **second)]}
        with pytest.raises(RowRejected) as info:
            normalize_example(mixed, "messages")
        assert info.value.kind == "mixed_training_turns"
    # A prompt's answers are context whatever weight they carry (it is not checked there).
    row = {"prompt": [user("q"), bot("a", weight=0.5), user("q2")], "completion": "b"}
    assert normalize_example(row, "prompt_completion")[0][1] == bot("a", train=False)


def test_untrained_answers_are_prompt_tokens(tokenizer):
    """An untrained answer is rendered in place and left out of the labels, through the
    stored messages too (OUT/data's messages_json, read back when another tokenizer
    re-tokenizes); `turns` truncation keeps whole exchanges up to the last trained one."""
    messages = [user("Name a colour."), bot("Red.", train=False), user("Another one?"),
                bot("Blue.")]  # fmt: skip
    assert supervised(tokenizer, messages) == "Blue.<|im_end|>\n"
    plain = [{k: v for k, v in m.items() if k != "train"} for m in messages]
    ids, _, _ = tokenize_conversation(tokenizer, messages, 512, "turns")
    assert ids == tokenize_conversation(tokenizer, plain, 512, "turns")[0]  # same text
    assert supervised(tokenizer, plain) == "Red.<|im_end|>\nBlue.<|im_end|>\n"
    stored = json.loads(json.dumps(messages))
    assert supervised(tokenizer, stored) == "Blue.<|im_end|>\n"
    # The trained answer does not fit whole: the untrained exchange before it goes.
    full = len(ids)
    ids, labels, truncated = tokenize_conversation(tokenizer, messages, full - 4, "turns")
    assert truncated and ids == tokenize_conversation(tokenizer, messages[2:], 512, "turns")[0]
    # Untrained last answer: the cut is after the last trained exchange.
    tail = [*plain, user("Why?"), bot("Because.", train=False)]
    ids, labels, truncated = tokenize_conversation(tokenizer, tail, full + 2, "turns")
    assert truncated and len(ids) == full
    assert tokenizer.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX]) == (
        "Red.<|im_end|>\nBlue.<|im_end|>\n"
    )


def test_turns_truncation_drops_the_earliest_untrained_history_first(tokenizer):
    """Under `turns`, a row whose first trained answer does not end within max_length loses
    its earliest exchanges that train nothing (LLaMA-Factory keeps the last turns under
    mask_history), the fewest that make the answer fit; its system turn stays. When even the
    last exchange alone does not fit, its answer is cut (at least one token trained), and a
    prompt that alone fills the limit is rejected. Rows whose first answer is trained keep
    today's prefix rule."""
    system = {"role": "system", "content": "Name colours."}
    q1, a1 = user("Name a colour."), bot("Red.", train=False)
    q2, a2 = user("Another one?"), bot("Blue.", train=False)
    q3, a3 = user("Why?"), bot("Because. " * 6)
    chat = [system, q1, a1, q2, a2, q3, a3]

    def ids_of(messages):
        return tokenize_conversation(tokenizer, messages, 10_000, "turns")[0]

    later, last = [system, q2, a2, q3, a3], [system, q3, a3]
    full, one, two = (len(ids_of(m)) for m in (chat, later, last))
    assert full > one > two
    for limit, kept in [
        (full, chat),
        (full - 1, later),
        (one, later),
        (one - 1, last),
        (two, last),
    ]:
        ids, labels, truncated = tokenize_conversation(tokenizer, chat, limit, "turns")
        assert ids == ids_of(kept) and truncated == (limit < full), limit
        assert supervised(tokenizer, chat, limit) == "Because. " * 6 + "<|im_end|>\n"
    # The last exchange alone is too long: its answer is cut at the limit, as for one exchange.
    text = tokenizer.apply_chat_template([system, q3], tokenize=False, add_generation_prompt=True)
    prompt = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids, labels, truncated = tokenize_conversation(tokenizer, chat, prompt + 2, "turns")
    assert truncated and ids == ids_of([system, q3, a3])[: prompt + 2]
    assert sum(label != IGNORE_INDEX for label in labels) == 2
    with pytest.raises(RowRejected) as info:
        tokenize_conversation(tokenizer, chat, prompt - 1, "turns")
    assert info.value.kind == "prompt_too_long"
    # `truncate` and `drop` are unchanged: a cut at the limit (no trained token left here).
    with pytest.raises(RowRejected) as info:
        tokenize_conversation(tokenizer, chat, full - 1, "drop")
    assert info.value.kind == "too_long"
    # Every answer trained: the longest prefix of whole exchanges that fits, as before.
    plain = [{k: v for k, v in m.items() if k != "train"} for m in chat]
    ids, _, truncated = tokenize_conversation(tokenizer, plain, full - 1, "turns")
    assert truncated and ids == ids_of(plain[:5])


def test_system_turns_in_the_conversation_are_rendered_where_they_are(tokenizer, capsys, tmp_path):
    """A system turn later in a conversation (an instruction for what follows) is kept where
    it is and rendered there by the chat template, untrained, as TRL and Axolotl render it
    (it was rejected as `system_not_first`, as LLaMA-Factory does); a sharegpt row's `system`
    field stays its system prompt beside it. `turns` truncation drops the instruction with
    the exchange it comes before, never apart from it. A template that refuses it rejects the
    row, counted."""
    system = {"role": "system", "content": "Name colours."}
    french = {"role": "system", "content": "Answer in French."}
    q1, a1, q2, a2 = user("Name a colour."), bot("Red."), user("Another one?"), bot("Bleu.")
    row = {"system": "Name colours.", "conversations": [
        {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red."},
        {"from": "system", "value": "Answer in French."},
        {"from": "human", "value": "Another one?"}, {"from": "gpt", "value": "Bleu."}]}  # fmt: skip
    messages, _, repairs = normalize_example(row, "sharegpt", "none")
    assert messages == [system, q1, a1, french, q2, a2] and repairs == []
    ids, labels, _ = tokenize_conversation(tokenizer, messages, 10_000, "turns")
    text = tokenizer.decode(ids)
    assert "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nAnother" in text
    assert trained_runs(tokenizer, ids, labels) == ["Red.<|im_end|>\n", "Bleu.<|im_end|>\n"]
    # Truncation: the first answer is context, so earlier exchanges go first; the second
    # exchange keeps its instruction.
    chat = [system, q1, {**a1, "train": False}, french, q2, a2]
    kept = [system, french, q2, a2]
    full = len(tokenize_conversation(tokenizer, chat, 10_000, "turns")[0])
    ids, _, truncated = tokenize_conversation(tokenizer, chat, full - 1, "turns")
    assert truncated and ids == tokenize_conversation(tokenizer, kept, 10_000, "turns")[0]
    # A template that refuses system turns past the first (as Gemma's and Mistral's do).
    strict = tokenizer.chat_template.replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if message['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('System role not supported') }}{% endif %}",
    )
    assert strict != tokenizer.chat_template
    refusing = copy.deepcopy(tokenizer)
    refusing.chat_template = strict
    with pytest.raises(RowRejected) as info:
        tokenize_conversation(refusing, messages, 10_000, "turns")
    assert info.value.kind == "template_error" and "System role not supported" in str(info.value)
    # Nothing follows a system turn after the last answer: dropped by the repairs, rejected
    # strictly; a system turn cannot stand between a call and its result.
    trailing = {"messages": [q1, a1, french]}
    assert normalize_example(trailing, "messages")[0] == [q1, a1]
    assert normalize_example(trailing, "messages")[2] == ["trailing_system_dropped"]
    with pytest.raises(RowRejected) as info:
        normalize_example(trailing, "messages", "none")
    assert info.value.kind == "ends_with_system"
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {}}}]}  # fmt: skip
    result = {"role": "tool", "content": "r"}
    for turns, kind in [
        ([q1, call, french, result, a2], "unanswered_tool_call"),
        ([q1, call, result, french, result, a2], "orphan_tool_result"),
    ]:
        with pytest.raises(RowRejected) as info:
            normalize_example({"messages": turns}, "messages")
        assert info.value.kind == kind
    # Through validate-data: such a row is valid.
    path = tmp_path / "instructions.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert main(["validate-data", "--data", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["valid"], report["rejected"]) == (1, 0), report


# --------------------------------------------------------------------------- mask_history

HISTORY = [
    {"messages": [user("Name a colour."), bot("Red."), user("Another one?"), bot("Blue.")]},
    {"messages": [user("Name a colour."), bot("Red."), user("Another one?"),
                  bot("Blue.", weight=0)]},  # its last answer is not to be trained
    {"messages": [user("Why?"), bot("Because.")]},
]  # fmt: skip


def test_mask_history_trains_each_rows_last_answer_only(tokenizer, tmp_path):
    """`data.mask_history` (LLaMA-Factory's): earlier answers are context. Through the
    tokenization tasks' own function (`process_chunk`, as `prepare` runs it) and
    `validate-data --mask-history`: the same rows kept and rejected."""
    from sftmix_ray.data.chunk_worker import ChunkJob, process_chunk
    from sftmix_ray.data.chunks import plan_chunks

    corpus = tmp_path / "history.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in HISTORY))
    target = tmp_path / "data"
    job = ChunkJob(str(corpus), "messages", "standard", "train", 0, {"train": str(target)},
                   {"train": str(tmp_path / "rejections")}, mask_history=True)  # fmt: skip
    (chunk,), _ = plan_chunks(str(corpus), hf_split="train", work_dir=tmp_path, parts=1)
    stats = process_chunk(
        job, 0, chunk, lambda m, t: tokenize_conversation(tokenizer, m, 512, "turns", t)
    )
    assert stats["train"]["written"] == 2 and stats["train"]["rejected"] == 1
    data = pq.read_table(target)
    answers = [
        tokenizer.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX])
        for ids, labels in zip(*(data.column(c).to_pylist() for c in ("input_ids", "labels")))
    ]
    assert answers == ["Blue.<|im_end|>\n", "Because.<|im_end|>\n"]
    (line,) = (tmp_path / "rejections" / "part-00000.jsonl").read_text().splitlines()
    assert json.loads(line)["kind"] == "no_trained_turn" and json.loads(line)["line"] == 2
    # A limit that holds the last exchange only: the history goes, the row stays (it was
    # rejected as prompt_too_long before: its one trained answer started past the limit).
    last = len(tokenize_conversation(tokenizer, HISTORY[0]["messages"][2:], 512, "turns")[0])
    short = ChunkJob(str(corpus), "messages", "standard", "train", 0,
                     {"train": str(tmp_path / "short")}, {"train": str(tmp_path / "short-rej")},
                     mask_history=True)  # fmt: skip
    stats = process_chunk(
        short, 0, chunk, lambda m, t: tokenize_conversation(tokenizer, m, last, "turns", t)
    )
    assert (stats["train"]["written"], stats["train"]["truncated"]) == (2, 1)
    kept = pq.read_table(tmp_path / "short").column("input_ids").to_pylist()
    assert [len(ids) for ids in kept] == [last, len(data.column("input_ids")[1])]
    # Without it, the first row trains both answers (and the second its first).
    assert supervised(tokenizer, normalize_example(HISTORY[0], "messages")[0]) == (
        "Red.<|im_end|>\nBlue.<|im_end|>\n"
    )
    proc = subprocess.run(
        [*sftmix_command(), "validate-data", "--data", str(corpus), "--mask-history", "--json"],
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    report = result_json(proc)
    assert report["valid"] == 2 and list(report["by_kind"]) == ["no_trained_turn"]
    from sftmix_ray.stages import prepare_reads
    from tests.conftest import tiny_config

    assert "data.mask_history" not in prepare_reads(tiny_config())  # earlier runs keep theirs
    assert prepare_reads(tiny_config("data.mask_history=true"))["data.mask_history"] is True


# --------------------------------------------------------------------------------- glaive

GLAIVE_SYSTEM = (
    "SYSTEM: You are a helpful assistant with access to the following functions. Use them if "
    'required -\n{\n    "name": "get_price",\n    "description": "A stock\'s price",\n'
    '    "parameters": {\n        "type": "object",\n        "properties": {\n'
    '            "symbol": {"type": "string"}\n        }\n    }\n}\n\n'
    '{\n    "name": "calc",\n    "parameters": {}\n}\n'
)
GLAIVE_CHAT = (
    "USER: What is Apple's price?\n\n\n"
    'ASSISTANT: <functioncall> {"name": "get_price", "arguments": '
    '\'{"symbol": "AAPL", "note": "it\'s"}\'} <|endoftext|>\n\n\n'
    'FUNCTION RESPONSE: {"price": 150.75}\n\n\n'
    "ASSISTANT: Apple is at $150.75. <|endoftext|>\n\n\n"
    "USER: Thanks!\n\n\nASSISTANT: You're welcome! <|endoftext|>\n"
)


def test_glaive_rows_read_with_calls_results_and_definitions():
    """glaive-function-calling-v2's texts: the definitions (pretty-printed JSON after the
    preamble), single-quoted call arguments (not JSON as written; an apostrophe inside), the
    function response as a tool result named after the call."""
    messages, tools, repairs = normalize_example(
        {"system": GLAIVE_SYSTEM, "chat": GLAIVE_CHAT}, "auto"
    )
    call = {"name": "get_price", "arguments": {"symbol": "AAPL", "note": "it's"}}
    assert messages == [
        user("What is Apple's price?"),
        bot("", tool_calls=[{"type": "function", "function": call}]),
        {"role": "tool", "content": '{"price": 150.75}', "name": "get_price"},
        bot("Apple is at $150.75."), user("Thanks!"), bot("You're welcome!"),
    ]  # fmt: skip
    assert [t["function"]["name"] for t in tools] == ["get_price", "calc"] and repairs == []
    assert tools[0]["function"]["parameters"]["properties"] == {"symbol": {"type": "string"}}
    # No functions: the system prompt is kept (without glaive's label); text before a call too.
    row = {
        "system": "SYSTEM: You are a helpful assistant, with no access to external functions.",
        "chat": "USER: hi\n\n\nASSISTANT: Let me see. <functioncall> "
        '{"name": "calc", "arguments": {"x": 1}}\n\n\nFUNCTION RESPONSE: 2\n\n\nASSISTANT: 2',
    }
    messages, tools, _ = normalize_example(row, "glaive")
    plain = "You are a helpful assistant, with no access to external functions."
    assert tools is None and messages[0] == {"role": "system", "content": plain}
    assert messages[2]["content"] == "Let me see." and messages[2]["tool_calls"][0]["function"] == {
        "name": "calc", "arguments": {"x": 1}
    }  # fmt: skip


def test_glaive_quirks_are_read_as_the_dump_means_them():
    """What the real dump does: an answer running on after `<|endoftext|>` on the same line
    (merged into the call after it), a label on a line of its own inside a turn (text, not a
    new turn: glaive separates turns with blank lines), `\\'` and raw newlines in quoted
    arguments, definitions as a JSON list, braces in a plain system prompt, a preamble of
    one's own (kept as the system prompt)."""
    chat = (
        "USER: Answer in this form:\nASSISTANT: <text>\n\n\n"
        "ASSISTANT: Sure, one moment. <|endoftext|> ASSISTANT: <functioncall> "
        '{"name": "f", "arguments": \'{"q": "it\\\'s\nfine"}\'} <|endoftext|>\n\n\n'
        "FUNCTION RESPONSE: {}\n\n\nASSISTANT: Done. <|endoftext|>"
    )
    system = 'SYSTEM: You are Bob. Use these functions:\n[{"name": "f"}, {"name": "g"}]'
    messages, tools, repairs = normalize_example({"system": system, "chat": chat}, "glaive")
    assert messages[0] == {"role": "system", "content": "You are Bob. Use these functions:"}
    assert messages[1] == user("Answer in this form:\nASSISTANT: <text>")
    assert messages[2]["content"] == "Sure, one moment."
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"q": "it's\nfine"}
    assert [t["function"]["name"] for t in tools] == ["f", "g"]
    assert repairs == ["same_role_merged"]
    # A conversion that joined turns with single newlines: no blank line anywhere, so every
    # label that starts a line starts a turn.
    single = 'USER: q\nASSISTANT: <functioncall> {"name": "f", "arguments": \'{}\'}\n' + (
        "FUNCTION RESPONSE: 1\nASSISTANT: one"
    )
    messages, _, _ = normalize_example({"chat": single}, "glaive")
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    braces = {"system": 'SYSTEM: Reply as {"answer": ...}.', "chat": "USER: q\n\n\nASSISTANT: a"}
    messages, tools, _ = normalize_example(braces, "glaive")
    assert tools is None and messages[0]["content"] == 'Reply as {"answer": ...}.'


DEEP = "[" * 100_000


@pytest.mark.parametrize(
    ("row", "kind"),
    [
        ({"system": "", "chat": "hello there"}, "no_turns"),
        ({"chat": "preamble\n\n\nUSER: q\n\n\nASSISTANT: a"}, "malformed_turn"),
        ({"chat": "USER: q\n\n\nASSISTANT: <functioncall> {name: f}"}, "malformed_tool_call"),
        ({"chat": "USER: q\n\n\nASSISTANT: <functioncall> {\"name\": \"f\", \"arguments\": 'x'}"},
         "malformed_tool_call"),  # arguments text that is not JSON
        # A name that is not a JSON string, and calls and definitions nested too deep: each a
        # rejected row, never an exception that stops prepare.
        ({"chat": "USER: q\n\n\nASSISTANT: <functioncall> "
                  "{\"name\": \"a\\qb\", \"arguments\": '{}'}"}, "malformed_tool_call"),
        ({"chat": f"USER: q\n\n\nASSISTANT: <functioncall> {DEEP}"}, "malformed_tool_call"),
        ({"system": f"SYSTEM: functions -\n{DEEP}", "chat": "USER: q\n\n\nASSISTANT: a"},
         "malformed_tools"),
        ({"system": "SYSTEM: functions -\n{\"name\": \"f\",", "chat": "USER: q\n\n\nASSISTANT: a"},
         "malformed_tools"),
        ({"system": 3, "chat": "USER: q\n\n\nASSISTANT: a"}, "wrong_type"),
        ({"chat": "USER: q\n\n\nFUNCTION RESPONSE: 1\n\n\nASSISTANT: a"}, "orphan_tool_result"),
    ],
)  # fmt: skip
def test_unreadable_glaive_rows_are_rejected_by_kind(row, kind):
    with pytest.raises(RowRejected) as info:
        normalize_example(row, "glaive", "none")
    assert info.value.kind == kind, info.value.reason


# ------------------------------------------------------------------------ real dumps' shapes

CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
DUMP_SHAPES = {
    # the turn wins over the row's field, as in LLaMA-Factory's sharegpt reader
    "sharegpt system field and turn": (
        {"system": "S1", "conversations": [{"from": "system", "value": "S2"},
                                           {"from": "human", "value": "Q"},
                                           {"from": "gpt", "value": "A"}]},
        [("system", "S2"), ("user", "Q"), ("assistant", "A")], []),
    "leading system turns": (
        {"messages": [{"role": "system", "content": "S1"}, {"role": "developer", "content": "S2"},
                      {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        [("system", "S1\n\nS2"), ("user", "Q"), ("assistant", "A")], ["system_merged"]),
    "turns as a JSON string (orca-agentinstruct)": (
        {"messages": json.dumps([{"role": "user", "content": "Q"},
                                 {"role": "assistant", "content": "A"}])},
        [("user", "Q"), ("assistant", "A")], []),
    "texts alone (LIMA)": (
        {"conversations": ["Q1", "A1", "Q2", "A2"], "source": "stackexchange"},
        [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")], []),
    "OpenAI refusal": (
        {"messages": [{"role": "user", "content": "Q"},
                      {"role": "assistant", "content": None, "refusal": "I can't."}]},
        [("user", "Q"), ("assistant", "I can't.")], []),
    "tool result parts with a union's keys": (
        {"messages": [{"role": "user", "content": "Q"},
                      {"role": "assistant", "content": None, "tool_calls": [CALL]},
                      {"role": "tool", "tool_call_id": "c1",
                       "content": [{"type": "text", "text": "42", "image_url": None}]},
                      {"role": "assistant", "content": "A"}]},
        [("user", "Q"), ("assistant", ""), ("tool", "42"), ("assistant", "A")], []),
    "tool result parts with a null type": (
        {"messages": [{"role": "user", "content": "Q"},
                      {"role": "assistant", "content": None, "tool_calls": [CALL]},
                      {"role": "tool", "tool_call_id": "c1",
                       "content": [{"type": None, "text": "42", "cache_control": None}]},
                      {"role": "assistant", "content": "A"}]},
        [("user", "Q"), ("assistant", ""), ("tool", "42"), ("assistant", "A")], []),
    "turns as JSON text with a raw newline": (
        {"messages": '[{"role": "user", "content": "Q\nR"}, '
                     '{"role": "assistant", "content": "A"}]'},
        [("user", "Q\nR"), ("assistant", "A")], []),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DUMP_SHAPES))
def test_real_dump_shapes_read_as_peers_read_them(case):
    """Shapes of real public dumps that peers read (found by an audit of ~120 rows copied from
    their schemas): each read as its dump means it, repairs counted; the ones that need a
    repair are rejected by `data.repair: none`."""
    row, expected, repairs = DUMP_SHAPES[case]
    fmt = row_format(row)
    messages, _, applied = normalize_example(row, fmt)
    assert [(m["role"], m["content"]) for m in messages] == expected and applied == repairs
    if repairs:
        with pytest.raises(RowRejected):
            normalize_example(row, fmt, "none")


def test_turns_as_json_text_nested_too_deeply_are_a_rejection():
    with pytest.raises(RowRejected) as info:
        normalize_example({"messages": "[" * 100_000}, "messages")
    assert info.value.kind == "malformed_turn" and "nested too deeply" in info.value.reason


def test_json_text_keeps_its_nulls_and_struct_nulls_go():
    """A call's arguments and a tool schema given as JSON text keep their nulls (they mean
    something); the null members of structured values (a Parquet union's padding) go."""
    schema = {"name": "f", "parameters": {"x": {"type": "str", "default": None}}}
    row = {"query": "Q", "answers": '[{"name": "f", "arguments": {"x": null}}]',
           "tools": json.dumps([schema])}  # fmt: skip
    messages, tools, _ = normalize_example(row, "xlam")
    assert messages[-1]["tool_calls"][0]["function"]["arguments"] == {"x": None}
    assert tools[0]["function"] == schema
    struct = {**row, "answers": [{"name": "f", "arguments": {"x": 1, "y": None}}]}
    messages, _, _ = normalize_example(struct, "xlam")
    assert messages[-1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}


def test_a_mixed_format_parquet_file_loses_no_row(tmp_path, capsys):
    """One Parquet file of alpaca, sharegpt, messages and prompt-completion rows (as pandas or
    `datasets` write a mixed corpus: every row every column, null where it has none): every
    row read in its own format by `validate-data` (before, only the messages row was valid)."""
    import pyarrow as pa

    turns = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    sg = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    rows = [
        {"instruction": "Add 1 and 1.", "input": "", "output": "2"},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        {"prompt": "Say A.", "completion": "A"},
    ]
    schema = pa.schema([("instruction", pa.string()), ("input", pa.string()),
                        ("output", pa.string()), ("conversations", sg), ("messages", turns),
                        ("prompt", pa.string()), ("completion", pa.string())])  # fmt: skip
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    assert main(["validate-data", "--data", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["valid"], report["rejected"]) == (4, 0), report
    assert report["format"].startswith("mixed")


def test_capybara_exchanges_read_as_turns(tmp_path, capsys, tokenizer):
    """Capybara's rows (LDJnr's sets: `conversation`, a list of `{input, output}` exchanges),
    mapped as LMSYS' are (`data.columns: {messages: conversation}`), from JSON Lines and from
    Parquet (a list of structs): each exchange a user and an assistant turn, every output
    trained; an exchange with no answer is repaired away, a row mixing exchanges and turns
    rejected; unmapped, the detection error says how to map it."""
    import pyarrow as pa

    rows = [
        {"source": "Airoboros", "conversation": [
            {"input": "Name a colour.", "output": "Red."},
            {"input": "Another one?", "output": "Blue."}]},
        {"source": "Dove", "conversation": [  # the last question was never answered
            {"input": "Why?", "output": "Because."}, {"input": "Another one?", "output": ""}]},
        {"source": "GPT4LLM", "conversation": [  # an exchange beside a turn: no known shape
            {"input": "Why?", "output": "Because."}, {"role": "user", "content": "Why?"}]},
    ]  # fmt: skip
    jsonl = tmp_path / "capybara.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exchange = pa.struct([("input", pa.string()), ("output", pa.string())])
    schema = pa.schema([("source", pa.string()), ("conversation", pa.list_(exchange))])
    parquet = tmp_path / "capybara.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:2], schema=schema), parquet)
    for path, total in ((jsonl, 3), (parquet, 2)):
        code = main(["validate-data", "--data", str(path), "--column", "messages=conversation",
                     "--json"])  # fmt: skip
        report = json.loads(capsys.readouterr().out)
        assert code == 0 and report["format"] == "messages", report
        assert (report["total"], report["valid"]) == (total, 2), report
        assert report["repairs"] == {"empty_turn_dropped": 1, "trailing_user_dropped": 1}
        assert [r["index"] for r in report["rejections"]] == ([2] if total == 3 else [])
    (first, _), (second, _) = (
        normalize_example(rename_columns(r, {"messages": "conversation"}), "auto")[:2]
        for r in rows[:2]
    )
    assert [(m["role"], m["content"]) for m in first] == [
        ("user", "Name a colour."), ("assistant", "Red."),
        ("user", "Another one?"), ("assistant", "Blue."),
    ]  # fmt: skip
    assert [(m["role"], m["content"]) for m in second] == [
        ("user", "Why?"),
        ("assistant", "Because."),
    ]
    assert supervised(tokenizer, first) == supervised(
        tokenizer, [user("Name a colour."), bot("Red."), user("Another one?"), bot("Blue.")]
    )
    with pytest.raises(RowRejected) as info:
        normalize_example(rename_columns(rows[2], {"messages": "conversation"}), "auto")
    assert (info.value.kind, info.value.reason) == (
        "malformed_turn",
        "turn 1 is an {input, output} exchange among turns with roles (a row holds one or the "
        "other)",
    )
    # An exchange's weight-0 mark stays on its answer (context, not trained).
    marked = {
        "messages": [{"input": "Why?", "output": "Because.", "weight": 0}, *rows[0]["conversation"]]
    }
    messages = normalize_example(marked, "messages")[0]
    assert [m.get("train") for m in messages if m["role"] == "assistant"] == [False, None, None]
    with pytest.raises(DataError, match=re.escape("Capybara: {messages: conversation}")):
        detect_format(rows)


def test_firefly_exchanges_read_as_turns(tmp_path, capsys, tokenizer):
    """Firefly's rows (YeungNLP's MOSS and UltraChat sets: `conversation`, a list of
    `{human, assistant}` exchanges), mapped as Capybara's are: each exchange a user and an
    assistant turn, through `validate-data` and the tokenization task's labels."""
    from sftmix_ray.data.chunk_worker import ChunkJob, process_chunk
    from sftmix_ray.data.chunks import plan_chunks

    rows = [
        {"conversation_id": 1, "category": "Brainstorming", "num_turn": 2, "conversation": [
            {"human": "Name a colour.", "assistant": "Red."},
            {"human": "Another one?", "assistant": "Blue."}]},
        {"conversation_id": 2, "conversation": [  # an exchange beside a turn: no known shape
            {"human": "Why?", "assistant": "Because."}, {"role": "user", "content": "Why?"}]},
    ]  # fmt: skip
    path = tmp_path / "firefly.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["validate-data", "--data", str(path), "--column", "messages=conversation",
                 "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and (report["total"], report["valid"]) == (2, 1), report
    (rejection,) = report["rejections"]
    assert "turn 1 is an {human, assistant} exchange among turns" in rejection["reason"]
    dirs = {"train": str(tmp_path / "d")}, {"train": str(tmp_path / "r")}
    job = ChunkJob(str(path), "messages", "standard", "train", 0, *dirs,
                   columns={"messages": "conversation"})  # fmt: skip
    (chunk,), _ = plan_chunks(str(path), hf_split="train", work_dir=tmp_path, parts=1)
    stats = process_chunk(
        job, 0, chunk, lambda m, t: tokenize_conversation(tokenizer, m, 512, "turns", t)
    )
    assert (stats["train"]["written"], stats["train"]["rejected"]) == (1, 1)
    data = pq.read_table(tmp_path / "d")
    ids, labels = (data.column(c)[0].as_py() for c in ("input_ids", "labels"))
    assert trained_runs(tokenizer, ids, labels) == ["Red.<|im_end|>\n", "Blue.<|im_end|>\n"]


# -------------------------------------------------------------------------------- columns


def test_columns_are_renamed_and_checked():
    dolly = {"instruction": "i", "context": "c", "response": "r", "category": "qa"}
    columns = {"input": "context", "output": "response"}
    renamed = rename_columns(dolly, columns)
    assert renamed == {"instruction": "i", "input": "c", "output": "r", "category": "qa"}
    assert dolly["response"] == "r"  # the row itself is unchanged
    assert rename_columns({"instruction": "i", "output": "o"}, columns) == {
        "instruction": "i", "output": "o"
    }  # fmt: skip
    messages, _, _ = normalize_example(renamed, "auto")
    assert messages == [user("i\n\nc"), bot("r")]
    assert load_config(None, ["data.columns=input=context,output=response"]).data.columns == (
        columns
    )
    assert load_config(None, ["data.columns=null"]).data.columns == {}  # a key left empty
    # One column may fill two fields: GSM8K's answer is the output and eval's exact match.
    gsm8k = rename_columns({"question": "q", "answer": "a"}, {"instruction": "question",
                           "output": "answer", "answer": "answer"})  # fmt: skip
    assert gsm8k == {"instruction": "q", "output": "a", "answer": "a"}
    # The fingerprint of prepare names the mapping only when there is one (earlier runs keep
    # their prints).
    from sftmix_ray.stages import prepare_reads
    from tests.conftest import tiny_config

    assert "data.columns" not in prepare_reads(tiny_config())
    assert prepare_reads(tiny_config("data.columns={input: context}"))["data.columns"] == {
        "input": "context"
    }  # fmt: skip
    for bad, message in [
        ("data.columns={inptu: context}", "did you mean 'input'"),
        ("data.columns={input: ''}", "must name a column"),
        ("data.columns=input", "expected key=value pairs"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])
    with pytest.raises(RowRejected, match="unmapped columns: 'context', 'response'"):
        normalize_example(dolly, "alpaca")
    # A corpus of no format says what its rows have (LMSYS-Chat-1M's `conversation`).
    lmsys = {"conversation_id": "a", "conversation": [user("hi"), bot("hello")]}
    with pytest.raises(RowRejected, match="its columns: 'conversation_id', 'conversation'"):
        normalize_example(lmsys, "auto")
    with pytest.raises(RowRejected, match="its columns: 'chat', 'id'"):  # a chat not a text
        normalize_example({"chat": [], "id": 1}, "auto")
    with pytest.raises(DataError, match="its first row has 'conversation_id', 'conversation'"):
        detect_format([lmsys])
    assert detect_format([rename_columns(lmsys, {"messages": "conversation"})]) == "messages"


# ---------------------------------------------------------------- through prepare's CLI

ROWS = [
    {"prompt": "Name a colour.", "response": "Red."},
    {"prompt": [user("Name a colour."), bot("Red."), user("Another one?")], "response": "Blue."},
    {"prompt": "Why?", "response": [bot("Because.", weight=0)]},  # nothing left to train
    {"prompt": "Why?", "answer_text": "Because."},  # no completion column
    {  # an agent trajectory as the completion; the answer before the call is context
        "prompt": [user("Weather?")],
        "response": [
            bot("Let me check.", train=False),
            user("Go on."),
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {}}}]},
            {"role": "tool", "content": "sunny"},
            bot("Sunny."),
        ],
        "tools": [{"type": "function", "function": {"name": "w", "parameters": {}}}],
    },
    {"prompt": "2+2?", "response": [bot("4", reasoning_content="Two and two.")]},  # a trace
]  # fmt: skip


@pytest.mark.slow
def test_prepare_reads_a_mapped_prompt_completion_corpus(ray_local, tmp_path, capsys):
    """`sftmix-ray prepare` on a corpus (a .jsonl.gz file and a .csv one) whose completion
    column is `response`
    (`data.columns`): detected as prompt-completion once mapped, the prompts' answers left
    out of the labels, the rows with nothing to train rejected by kind; `validate-data
    --column` says the same of the file."""
    import gzip

    path = tmp_path / "corpus"  # with an alpaca file beside: `auto` reads each row in its own
    path.mkdir()  # a gzipped JSON Lines file and a CSV sheet, as `datasets` reads them
    (path / "pc.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode())
    )
    (path / "zz-alpaca.csv").write_text('instruction,output\nPet?,"A dog."\n')
    # The held-out file is glaive's (auto detects each file's format).
    glaive = tmp_path / "glaive.jsonl"
    glaive.write_text(json.dumps({"system": GLAIVE_SYSTEM, "chat": GLAIVE_CHAT}) + "\n")
    out = tmp_path / "out"
    sets = [f"--set={o}" for o in TINY_OVERRIDES if not o.startswith("ray.")]
    mapped = "--set=data.columns={completion: response}"
    code = main(["prepare", "--output-dir", str(out), *sets, f"--set=data.path={path}", mapped,
                 f"--set=data.eval_path={glaive}", "--set=data.max_length=512"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    train = json.loads((out / "summary.json").read_text())["stages"]["prepare"]["train"]
    assert train["input"] == 7 and train["written"] == 5 and train["rejected"] == 2
    kinds = {k: v["examples"] for k, v in train["rejections_by_kind"].items()}
    assert kinds == {"no_trained_turn": [2], "missing_field": [3]}
    data = pq.read_table(out / "data").sort_by("example_id")
    assert data.column("example_id").to_pylist() == [0, 1, 4, 5, 6]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "base_model")
    answers = []
    for ids, labels in zip(*(data.column(c).to_pylist() for c in ("input_ids", "labels"))):
        answers.append(tok.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX]))
    call = '<tool_call>\n{"name": "w", "arguments": {}}\n</tool_call><|im_end|>\n'
    think = "<think>\nTwo and two.\n</think>\n\n4<|im_end|>\n"  # trained, inline (ChatML)
    assert answers == [
        "Red.<|im_end|>\n", "Blue.<|im_end|>\n", f"{call}Sunny.<|im_end|>\n", think,
        "A dog.<|im_end|>\n",
    ]  # fmt: skip
    stored = [json.loads(m) for m in data.column("messages_json").to_pylist()]
    assert stored[1][1] == bot("Red.", train=False)  # kept for re-tokenizing
    assert stored[3][1] == bot("4", reasoning="Two and two.")
    # The glaive row: its call and both answers trained, its definitions beside it.
    heldout = pq.read_table(out / "heldout")
    ids, labels = (heldout.column(c)[0].as_py() for c in ("input_ids", "labels"))
    trained = tok.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX])
    assert trained == (
        '<tool_call>\n{"name": "get_price", "arguments": {"symbol": "AAPL", "note": "it\'s"}}\n'
        "</tool_call><|im_end|>\nApple is at $150.75.<|im_end|>\nYou're welcome!<|im_end|>\n"
    )
    assert len(json.loads(heldout.column("tools_json")[0].as_py())) == 2

    proc = subprocess.run(
        [*sftmix_command(), "validate-data", "--data", str(path), "--column",
         "completion=response", "--json"],
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    report = result_json(proc)
    assert report["format"] == "mixed (alpaca 1, prompt_completion 4)" and report["valid"] == 5
    assert {k: v["examples"] for k, v in report["by_kind"].items()} == kinds
