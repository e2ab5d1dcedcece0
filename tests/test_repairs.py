"""Repairs for real dumps (data.repair) and the truncation policies (data.truncation).

Through `sftmix-ray validate-data --json` (every repair kind, counted once per row and kind,
`total == valid + rejected`, strict mode for comparison) and the tokenizer's truncation
(`turns`, `truncate`, `drop`, `prompt_too_long`); `sftmix-ray prepare` with both is in
test_hostile_input.py and below.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sftmix_ray.cli import main
from sftmix_ray.data.formats import normalize_with_repairs
from sftmix_ray.data.tokenize import IGNORE_INDEX, tokenize_conversation
from sftmix_ray.errors import RowRejected
from tests.conftest import TINY_OVERRIDES


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


# name -> (conversation, repairs applied, messages after repair as (role, content))
REPAIRED = {
    "leading_assistant": (
        [turn("gpt", "hello"), turn("human", "q"), turn("gpt", "a")],
        ["leading_assistant_dropped"],
        [("user", "q"), ("assistant", "a")],
    ),
    "trailing_user": (
        [turn("human", "q"), turn("gpt", "a"), turn("human", "and?")],
        ["trailing_user_dropped"],
        [("user", "q"), ("assistant", "a")],
    ),
    "empty_then_merge": (
        [turn("human", "q1"), turn("gpt", " "), turn("human", "q2"), turn("gpt", "a")],
        ["empty_turn_dropped", "same_role_merged"],
        [("user", "q1\n\nq2"), ("assistant", "a")],
    ),
    "two_user_turns": (
        [turn("human", "q1"), turn("human", "q2"), turn("gpt", "a1"), turn("gpt", "a2")],
        ["same_role_merged"],
        [("user", "q1\n\nq2"), ("assistant", "a1\n\na2")],
    ),
    "bing_and_bard": (
        [turn("human", "q"), turn("bing", "a"), turn("human", "q2"), turn("bard", "b")],
        ["role_mapped"],
        [("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "b")],
    ),
    "trailing_tool_result": (  # the dump stops after the tool answered: the call is kept
        [turn("human", "q"), turn("function_call", '{"name": "f", "arguments": {"x": 1}}'),
         turn("observation", "r")],
        ["trailing_tool_result_dropped"],
        [("user", "q"), ("assistant", "")],
    ),
    "text_then_tool_call": (  # "Let me look." and the call as two assistant turns
        [turn("human", "q"), turn("gpt", "Let me look."),
         turn("function_call", '{"name": "f", "arguments": "{}"}'), turn("observation", "r"),
         turn("gpt", "found r")],
        ["same_role_merged"],
        [("user", "q"), ("assistant", "Let me look."), ("tool", "r"), ("assistant", "found r")],
    ),
    "two_instructions_in_a_row": (  # system turns later in the conversation are joined too
        [turn("human", "q"), turn("gpt", "a"), turn("system", "s1"), turn("system", "s2"),
         turn("human", "q2"), turn("gpt", "a2")],
        ["same_role_merged"],
        [("user", "q"), ("assistant", "a"), ("system", "s1\n\ns2"), ("user", "q2"),
         ("assistant", "a2")],
    ),
    "cut_emoji": (  # a dump cut an emoji in half: a lone surrogate, which no tokenizer takes
        [turn("human", "cut \ud83d here"), turn("gpt", "ok \udc00")],
        ["invalid_unicode_replaced"],
        [("user", "cut \ufffd here"), ("assistant", "ok \ufffd")],
    ),
    "null_content": (  # an assistant turn that only called a tool: content null
        [turn("human", "q"), {"from": "gpt", "value": None}, turn("human", "q2"), turn("gpt", "a")],
        ["null_content_dropped", "same_role_merged"],
        [("user", "q\n\nq2"), ("assistant", "a")],
    ),
    "everything_at_once": (
        [turn("gpt", "x"), turn("human", ""), turn("human", "q"), turn("chatgpt", "a"),
         turn("bard", "a2"), turn("human", "dangling")],
        ["empty_turn_dropped", "leading_assistant_dropped", "role_mapped", "same_role_merged",
         "trailing_user_dropped"],
        [("user", "q"), ("assistant", "a\n\na2")],
    ),
}  # fmt: skip
# Still invalid after the repairs: (conversation, kind)
UNREPAIRABLE = {
    "only_assistant": ([turn("gpt", "a")], "no_turns_or_assistant"),
    "only_user": ([turn("human", "q")], "no_assistant_turn"),
    "empty": ([], "empty_conversation"),
    "orphan_tool_result": (
        [turn("human", "q"), turn("tool", "x"), turn("gpt", "a")],
        "orphan_tool_result",
    ),
    "unknown_role": ([turn("human", "q"), turn("narrator", "x")], "unknown_role"),
    # An instruction between two user turns leaves them in a row (it is not merged across).
    "system_between_user_turns": (
        [turn("human", "q"), turn("system", "s"), turn("human", "q2"), turn("gpt", "a")],
        "repeated_role",
    ),
}


@pytest.mark.parametrize("case", list(REPAIRED))
def test_each_repair(case):
    conversation, repairs, expected = REPAIRED[case]
    messages, applied = normalize_with_repairs({"conversations": conversation}, "sharegpt")
    assert applied == sorted(repairs)
    assert [(m["role"], m["content"]) for m in messages] == expected
    with pytest.raises(RowRejected):  # strict mode rejects every one of them
        normalize_with_repairs({"conversations": conversation}, "sharegpt", "none")


@pytest.mark.parametrize("case", list(UNREPAIRABLE))
def test_unrepairable_rows_are_still_rejected(case):
    conversation, kind = UNREPAIRABLE[case]
    with pytest.raises(RowRejected) as info:
        normalize_with_repairs({"conversations": conversation}, "sharegpt")
    if kind == "no_turns_or_assistant":
        assert info.value.kind in ("no_turns", "no_assistant_turn", "starts_with_assistant")
    else:
        assert info.value.kind == kind


def _validate(path: Path, capsys, *extra: str) -> dict:
    assert main(["validate-data", "--data", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_validate_data_counts_repairs_once_per_row_and_kind(tmp_path, capsys):
    rows = [{"conversations": c} for c, _, _ in REPAIRED.values()]
    rows += [{"conversations": c} for c, _ in UNREPAIRABLE.values()]
    rows.append({"conversations": [turn("human", "fine"), turn("gpt", "row")]})
    path = tmp_path / "dump.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = _validate(path, capsys)
    assert report["total"] == len(rows) == report["valid"] + report["rejected"]
    assert report["valid"] == len(REPAIRED) + 1 and report["rejected"] == len(UNREPAIRABLE)
    expected: dict[str, int] = {}
    for _, repairs, _ in REPAIRED.values():
        for kind in repairs:
            expected[kind] = expected.get(kind, 0) + 1
    assert report["repairs"] == expected  # "everything_at_once" merges twice: counted once
    by_kind = report["by_kind"]
    assert sum(v["count"] for v in by_kind.values()) == report["rejected"]
    assert by_kind["orphan_tool_result"] == {"count": 1, "examples": [len(REPAIRED) + 3]}
    assert by_kind["unknown_role"] == {"count": 1, "examples": [len(REPAIRED) + 4]}
    assert [r["index"] for r in report["rejections"]] == list(
        range(len(REPAIRED), len(REPAIRED) + len(UNREPAIRABLE))
    )
    strict = _validate(path, capsys, "--repair", "none")
    assert strict["repairs"] == {} and strict["valid"] == 1
    assert strict["total"] == strict["valid"] + strict["rejected"]
    # Strict mode rejects exactly the repaired rows on top of the unrepairable ones.
    assert strict["rejected"] == report["rejected"] + len(REPAIRED)


# ------------------------------------------------------------------------------ truncation


@pytest.fixture(scope="module")
def tokenizer():
    from sftmix_ray.modeling import train_tiny_tokenizer

    texts = [f"question {i} answer {i * 7} words words" for i in range(300)]
    return train_tiny_tokenizer(texts, 400)


CHAT = [
    {"role": "user", "content": "question one words words"},
    {"role": "assistant", "content": "answer one " + "words " * 20},
    {"role": "user", "content": "question two"},
    {"role": "assistant", "content": "answer two " + "words " * 20},
]


def _first_exchange_length(tokenizer) -> int:
    ids, _, _ = tokenize_conversation(tokenizer, CHAT[:2], 10_000, "turns")
    return len(ids)


def test_turns_keeps_whole_exchanges(tokenizer):
    full, _, _ = tokenize_conversation(tokenizer, CHAT, 10_000, "turns")
    first = _first_exchange_length(tokenizer)
    ids, labels, truncated = tokenize_conversation(tokenizer, CHAT, len(full) - 1, "turns")
    assert truncated and ids == full[:first]  # exactly the first exchange, end-of-turn included
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert end_of_turn in supervised and ids[first - 2] == end_of_turn  # then the newline


def test_turns_cuts_the_first_response_when_it_alone_is_too_long(tokenizer):
    first = _first_exchange_length(tokenizer)
    ids, labels, truncated = tokenize_conversation(tokenizer, CHAT, first - 5, "turns")
    assert truncated and len(ids) == first - 5
    assert any(t != IGNORE_INDEX for t in labels)


def test_prompt_too_long_is_rejected_and_counted(tokenizer):
    with pytest.raises(RowRejected) as info:
        tokenize_conversation(tokenizer, CHAT, 4, "turns")
    assert info.value.kind == "prompt_too_long" and "data.max_length=4" in info.value.reason


def test_truncate_and_drop(tokenizer):
    full, _, _ = tokenize_conversation(tokenizer, CHAT, 10_000, "turns")
    ids, _, truncated = tokenize_conversation(tokenizer, CHAT, len(full) - 3, "truncate")
    assert truncated and ids == full[: len(full) - 3]  # mid-turn, wherever the limit falls
    with pytest.raises(RowRejected) as info:
        tokenize_conversation(tokenizer, CHAT, len(full) - 3, "drop")
    assert info.value.kind == "too_long"


@pytest.mark.slow
def test_prepare_repairs_truncates_and_reports_by_kind(ray_local, tmp_path, capsys):
    """`sftmix-ray prepare` on a dump with every repair kind, over-long conversations and a
    prompt that alone is too long: repaired rows keep their example_id, long rows are kept as
    their leading exchanges, and the summary and OUT/rejections/train.jsonl say what happened."""
    long_chat = [turn("human", "q " * 5), turn("gpt", "a " * 30), turn("human", "q2"),
                 turn("gpt", "b " * 200)]  # fmt: skip
    rows = [{"conversations": c} for c, _, _ in REPAIRED.values()]
    rows += [
        {"conversations": long_chat},
        {"conversations": [turn("human", "p " * 400), turn("gpt", "a")]},  # prompt too long
        {"conversations": [turn("human", "q")]},  # no reply
        {  # LLaMA-Factory's tool calling: tools as JSON text, a call, its result, the answer
            "conversations": [turn("human", "q"),
                              turn("function_call", '{"name": "calc", "arguments": {"x": 2}}'),
                              turn("observation", "4"), turn("gpt", "it is 4")],
            "tools": json.dumps([{"name": "calc"}]),
        },
    ]  # fmt: skip
    path = tmp_path / "dump.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    sets = [f"--set={o}" for o in TINY_OVERRIDES if not o.startswith("ray.")]
    code = main(["prepare", "--output-dir", str(out), *sets, f"--set=data.path={path}",
                 "--set=data.format=sharegpt", "--set=data.max_length=96"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    train = json.loads((out / "summary.json").read_text())["stages"]["prepare"]["train"]
    n = len(REPAIRED)
    assert train["input"] == len(rows) == train["written"] + train["rejected"]
    assert train["written"] == n + 2 and train["truncated"] >= 1
    expected: dict[str, int] = {}
    for _, repairs, _ in REPAIRED.values():
        for kind in repairs:
            expected[kind] = expected.get(kind, 0) + 1
    assert train["repairs"] == expected  # every kind, the cut emoji's included
    assert set(train["rejections_by_kind"]) == {"prompt_too_long", "no_assistant_turn"}
    assert train["rejections_by_kind"]["prompt_too_long"]["examples"] == [n + 1]
    lines = Path(train["rejections_file"]).read_text().splitlines()
    assert [json.loads(line)["example_id"] for line in lines] == [n + 1, n + 2]
    # ... and where each is in the file the user gave (rows n + 1 and n + 2: lines n + 2, n + 3)
    assert [(json.loads(x)["file"], json.loads(x)["line"]) for x in lines] == [
        (str(path), n + 2), (str(path), n + 3)
    ]  # fmt: skip
    assert not Path(train["rejections_file"]).is_relative_to(out / "data")
    data = pq.read_table(out / "data").sort_by("example_id")
    assert data.column("example_id").to_pylist() == [*range(n + 1), n + 3]
    assert max(len(x) for x in data.column("input_ids").to_pylist()) <= 96
    # The tool row: its definitions kept beside its messages, its call and answer trained on.
    tools = data.column("tools_json").to_pylist()
    assert json.loads(tools[-1]) == [{"type": "function", "function": {"name": "calc"}}]
    assert tools[:-1] == [None] * (n + 1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "base_model")
    ids, labels = (data.column(c)[-1].as_py() for c in ("input_ids", "labels"))
    supervised = tok.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX])
    call = '<tool_call>\n{"name": "calc", "arguments": {"x": 2}}\n</tool_call><|im_end|>\n'
    # At data.max_length=96 the tiny tokenizer's `turns` truncation may keep only the call.
    assert supervised in (call, f"{call}it is 4<|im_end|>\n")
