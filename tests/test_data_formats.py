"""Row normalization (alpaca, sharegpt, messages, auto), every rejection reason, row validation."""

from __future__ import annotations

from typing import Any

import pytest

from sftmix_ray.data.formats import FORMATS, detect_format, normalize_row, normalize_with_repairs
from sftmix_ray.data.validation import (
    Rejection,
    ValidationReport,
    format_report,
    validate_rows,
)
from sftmix_ray.errors import DataError, RowRejected


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def sg(*turns: tuple[str, Any], **extra: Any) -> dict[str, Any]:
    """A sharegpt row from (from, value) pairs."""
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def msgs(*turns: tuple[str, Any]) -> dict[str, Any]:
    """A messages row from (role, content) pairs."""
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_formats_constant() -> None:
    assert FORMATS == (
        "auto",
        "alpaca",
        "sharegpt",
        "messages",
        "prompt_completion",
        "xlam",
        "glaive",
        "text",
    )


# --- alpaca ---------------------------------------------------------------------------------


def test_alpaca_instruction_only() -> None:
    row = {"instruction": "Say hi.", "output": "hi"}
    assert normalize_row(row, "alpaca") == [user("Say hi."), assistant("hi")]


def test_alpaca_with_input_and_system() -> None:
    row = {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "Be brief."}
    assert normalize_row(row, "alpaca") == [
        system("Be brief."),
        user("Translate.\n\nchat"),
        assistant("cat"),
    ]


@pytest.mark.parametrize("empty", ["", "   \n", None])
def test_alpaca_empty_input_and_system_are_absent(empty: Any) -> None:
    row = {"instruction": "Q", "input": empty, "output": "A", "system": empty}
    assert normalize_row(row, "alpaca") == [user("Q"), assistant("A")]


def test_alpaca_keeps_content_verbatim() -> None:
    row = {"instruction": "  Q  ", "output": " A\n", "extra": 1}
    assert normalize_row(row, "alpaca") == [user("  Q  "), assistant(" A\n")]


# --- sharegpt -------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["human", "user", "prompter", "Human", " USER "])
def test_sharegpt_user_aliases(alias: str) -> None:
    assert normalize_row(sg((alias, "q"), ("gpt", "a")), "sharegpt") == [user("q"), assistant("a")]


@pytest.mark.parametrize("alias", ["gpt", "assistant", "bot", "chatgpt", "model", "GPT"])
def test_sharegpt_assistant_aliases(alias: str) -> None:
    assert normalize_row(sg(("human", "q"), (alias, "a")), "sharegpt") == [
        user("q"),
        assistant("a"),
    ]


def test_sharegpt_system_turn_and_multi_turn() -> None:
    row = sg(("system", "S"), ("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2"))
    assert normalize_row(row, "sharegpt") == [
        system("S"),
        user("q1"),
        assistant("a1"),
        user("q2"),
        assistant("a2"),
    ]


def test_sharegpt_top_level_system() -> None:
    row = sg(("human", "q"), ("gpt", "a"), system="S")
    assert normalize_row(row, "sharegpt") == [system("S"), user("q"), assistant("a")]


def test_sharegpt_empty_system_turn_is_dropped() -> None:
    row = sg(("system", " "), ("human", "q"), ("gpt", "a"), system="")
    assert normalize_row(row, "sharegpt") == [user("q"), assistant("a")]


def test_sharegpt_accepts_role_content_turns() -> None:
    row = {"conversations": [{"role": "user", "content": "q"}, {"role": "gpt", "content": "a"}]}
    assert normalize_row(row, "sharegpt") == [user("q"), assistant("a")]


# --- messages -------------------------------------------------------------------------------


def test_messages_multi_turn_with_system_and_aliases() -> None:
    row = msgs(("system", "S"), ("human", "q1"), ("assistant", "a1"), ("user", "q2"), ("bot", "a2"))
    assert normalize_row(row, "messages") == [
        system("S"),
        user("q1"),
        assistant("a1"),
        user("q2"),
        assistant("a2"),
    ]


def test_messages_extra_keys_are_ignored() -> None:
    row = {**msgs(("user", "q"), ("assistant", "a")), "answer": "a", "task": "t"}
    assert normalize_row(row, "messages") == [user("q"), assistant("a")]


# --- auto -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"instruction": "q", "output": "a"}, "alpaca"),
        (sg(("human", "q"), ("gpt", "a")), "sharegpt"),
        (msgs(("user", "q"), ("assistant", "a")), "messages"),
    ],
)
def test_auto_per_row_and_detect_format(row: dict[str, Any], fmt: str) -> None:
    assert normalize_row(row, "auto") == [user("q"), assistant("a")]
    assert detect_format([None, {"body": "x"}, row]) == fmt


def test_detect_format_uses_first_matching_row() -> None:
    rows = [sg(("human", "q"), ("gpt", "a")), {"instruction": "q", "output": "a"}]
    assert detect_format(rows) == "sharegpt"


def test_detect_format_without_any_known_row() -> None:
    with pytest.raises(DataError, match="cannot detect the corpus format"):
        detect_format([None, 5, {"body": "hello"}])


def test_unknown_format_name() -> None:
    with pytest.raises(ValueError, match="unknown format 'chatml'"):
        normalize_row({"instruction": "q", "output": "a"}, "chatml")


# --- every rejection reason -----------------------------------------------------------------

OK_QA = (("human", "q"), ("gpt", "a"))

REJECTIONS: list[tuple[Any, str, str]] = [
    (None, "alpaca", "row is not an object (got null)"),
    (5, "auto", "row is not an object (got int)"),
    ("text", "messages", "row is not an object (got string)"),
    ([1, 2], "sharegpt", "row is not an object (got list)"),
    (True, "alpaca", "row is not an object (got bool)"),
    (
        {"body": "q"},
        "auto",
        "row matches no format (no 'messages', 'conversations' or 'instruction' field, nor "
        "'prompt' and 'completion', nor 'query' and 'answers', nor a 'chat' or 'text' text; "
        "its columns: 'body')",
    ),
    # alpaca
    ({"output": "a"}, "alpaca", "missing field 'instruction'"),
    ({"instruction": "q"}, "alpaca", "missing field 'output'"),
    ({"instruction": 1, "output": "a"}, "alpaca", "field 'instruction' must be a string (got int)"),
    ({"instruction": "q", "output": None}, "alpaca", "field 'output' must be a string (got null)"),
    (
        {"instruction": " \t", "output": "a"},
        "alpaca",
        "fields 'instruction' and 'input' are both empty",
    ),
    ({"instruction": "q", "output": "\n"}, "alpaca", "field 'output' is empty"),
    (
        {"instruction": "q", "output": "a", "input": 3},
        "alpaca",
        "field 'input' must be a string (got int)",
    ),
    (
        {"instruction": "q", "output": "a", "system": ["s"]},
        "alpaca",
        "field 'system' must be a string (got list)",
    ),
    (
        msgs(("user", "q"), ("assistant", "a")),
        "alpaca",
        "missing field 'instruction' (row looks like messages)",
    ),
    # sharegpt
    (
        {"instruction": "q", "output": "a"},
        "sharegpt",
        "missing field 'conversations' (row looks like alpaca)",
    ),
    ({"conversations": "q"}, "sharegpt", "field 'conversations' must be a list (got string)"),
    ({"conversations": []}, "sharegpt", "field 'conversations' is empty"),
    (
        {"conversations": [{"from": "human", "value": "q"}, "a"]},
        "sharegpt",
        "turn 2 is not an object (got string)",
    ),
    ({"conversations": ["q"]}, "sharegpt", "no assistant turn"),  # LIMA's texts: a user turn
    ({"conversations": [{"value": "q"}]}, "sharegpt", "turn 1 has no 'from' field"),
    ({"conversations": [{"from": "human"}]}, "sharegpt", "turn 1 has no 'value' field"),
    (
        {"conversations": [{"from": 1, "value": "q"}]},
        "sharegpt",
        "turn 1 role must be a string (got int)",
    ),
    (sg(("human", "q"), ("narrator", "a")), "sharegpt", "unknown role 'narrator' in turn 2"),
    (sg(("human", "q"), ("x" * 60, "a")), "sharegpt", f"unknown role '{'x' * 37}...' in turn 2"),
    (sg(("human", "q"), ("gpt", 7)), "sharegpt", "turn 2 content must be a string (got int)"),
    (sg(("human", " "), ("gpt", "a")), "sharegpt", "turn 1 content is empty"),
    (sg(*OK_QA, ("human", "q2"), ("gpt", "")), "sharegpt", "turn 4 content is empty"),
    (sg(("human", "q")), "sharegpt", "no assistant turn"),
    (sg(("system", "s")), "sharegpt", "no user or assistant turn"),
    (
        sg(("gpt", "a"), ("human", "q"), ("gpt", "a")),
        "sharegpt",
        "conversation must start with a user turn (turn 1 is assistant)",
    ),
    (
        sg(*OK_QA, ("system", "s"), ("system", "t"), ("human", "q"), ("gpt", "a")),
        "sharegpt",
        "turn 4 repeats role 'system' (one system turn at a time; data.repair: standard joins "
        "them)",
    ),
    (
        sg(("system", "s1"), ("system", "s2"), *OK_QA),
        "sharegpt",
        "turn 2 repeats role 'system' (one system turn at a time; data.repair: standard joins "
        "them)",
    ),
    (
        sg(("human", "q"), ("human", "q"), ("gpt", "a")),
        "sharegpt",
        "turn 2 repeats role 'user' (user and assistant turns must alternate)",
    ),
    (
        sg(*OK_QA, ("gpt", "a2")),
        "sharegpt",
        "turn 3 repeats role 'assistant' (user and assistant turns must alternate)",
    ),
    (
        sg(*OK_QA, ("human", "q2")),
        "sharegpt",
        "conversation ends with a user turn (turn 3) without a reply",
    ),
    (sg(*OK_QA, system=5), "sharegpt", "field 'system' must be a string (got int)"),
    # messages
    ({"messages": {"role": "user"}}, "messages", "field 'messages' must be a list (got object)"),
    (
        msgs(("user", "q"), ("tool", "{}"), ("assistant", "a")),
        "messages",
        "turn 2 is a tool result with no assistant turn before it",
    ),
    (  # a call's arguments must be a JSON object
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
            ]
        },
        "messages",
        "turn 2 tool call has no function name",
    ),
    (
        sg(("human", "q"), ("function_call", "{not json"), ("observation", "ok"), ("gpt", "a")),
        "sharegpt",
        "turn 2 tool call is not valid JSON",
    ),
    (
        msgs(("user", ["part"]), ("assistant", "a")),
        "messages",
        "turn 1 content part 1 is not text ('string'); only text is supported",
    ),
    (
        msgs(("user", None), ("assistant", "a")),
        "messages",
        "turn 1 content must be a string (got null)",
    ),
    ({"messages": [{"role": "user"}]}, "messages", "turn 1 has no 'content' field"),
    ({"messages": [{"content": "q"}]}, "messages", "turn 1 has no 'role' field"),
    (msgs(("user", "q"), ("assistant", "   ")), "messages", "turn 2 content is empty"),
]


@pytest.mark.parametrize(("row", "fmt", "reason"), REJECTIONS)
def test_rejection_reason(row: Any, fmt: str, reason: str) -> None:
    with pytest.raises(RowRejected) as info:
        normalize_row(row, fmt)
    assert info.value.reason == reason


# --- validate_rows and the report -----------------------------------------------------------


def mixed_rows() -> list[Any]:
    ok = {"instruction": "q", "output": "a"}
    return [ok, None, {"instruction": "q"}, ok, 5, {"instruction": "q"}, sg(*OK_QA), ok]


def test_validate_rows_keeps_every_valid_row_and_counts() -> None:
    """`auto` reads each row in its own format (the sharegpt row among alpaca ones is kept), a
    row of no format by the corpus' rules; an explicit format is strict."""
    valid, report = validate_rows(mixed_rows(), "auto")
    assert [index for index, _ in valid] == [0, 3, 6, 7]
    assert all(messages == [user("q"), assistant("a")] for _, messages in valid)
    assert (report.total, report.valid, report.rejected) == (8, 4, 4)
    assert report.total == report.valid + report.rejected
    assert report.format == "mixed (alpaca 3, sharegpt 1)"
    assert [r.index for r in report.rejections] == [1, 2, 4, 5]
    assert report.rejections[-1].reason == "missing field 'output'"
    valid, report = validate_rows(mixed_rows(), "alpaca")
    assert [index for index, _ in valid] == [0, 3, 7] and report.format == "alpaca"
    assert report.rejections[-1].reason == "missing field 'instruction' (row looks like sharegpt)"


def test_report_to_json_shape() -> None:
    _, report = validate_rows(mixed_rows(), "alpaca")
    payload = report.to_json()
    assert list(payload) == [
        "total",
        "valid",
        "rejected",
        "rejections",
        "format",
        "by_kind",
        "repairs",
    ]
    assert payload["rejections"][0] == {"index": 1, "reason": "row is not an object (got null)"}
    assert payload["total"] == payload["valid"] + payload["rejected"] == 8


def test_report_invariant_is_enforced() -> None:
    with pytest.raises(AssertionError):
        ValidationReport(total=3, valid=1, rejected=1, rejections=[Rejection(0, "x")])


def test_validate_rows_explicit_format_and_bad_name() -> None:
    _, report = validate_rows([sg(*OK_QA)], "sharegpt")
    assert (report.valid, report.format) == (1, "sharegpt")
    with pytest.raises(ValueError, match="unknown format"):
        validate_rows([], "csv")


def test_format_report_groups_reasons() -> None:
    _, report = validate_rows(mixed_rows(), "auto")
    text = format_report(report, "corpus.jsonl", max_listed=3)
    lines = text.splitlines()
    assert lines[0] == (
        "corpus.jsonl: 8 rows, 4 valid, 4 rejected (format: mixed (alpaca 3, sharegpt 1))"
    )
    assert lines[1] == "rejected 4 rows by reason:"
    assert lines[2] == "  2 x \"missing field 'output'\" (rows 2, 5)"
    assert '  1 x "row is not an object (got null)" (row 1)' in lines
    assert "  row 1: row is not an object (got null)" in lines
    assert "  row 5: missing field 'output'" not in lines
    assert lines[-1] == "  ... and 1 more"


def test_format_report_without_rejections() -> None:
    _, report = validate_rows([{"instruction": "q", "output": "a"}])
    assert format_report(report, "x.json") == "x.json: 1 row, 1 valid, 0 rejected (format: alpaca)"


def test_validate_rows_names_the_source_when_detection_fails() -> None:
    with pytest.raises(DataError, match=r"^corpus\.jsonl: cannot detect the corpus format"):
        validate_rows([{"body": "a"}], "auto", source="corpus.jsonl")


# Shapes real corpora have that peers (TRL, LLaMA-Factory) read; all were rejected or lost.
KEPT_SHAPES = {
    "openai_text_parts": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                   {"type": "text", "text": "there"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]},
        "messages", [("user", "Hi\nthere"), ("assistant", "Hello")],
    ),
    "developer_role": (
        msgs(("developer", "Be brief."), ("user", "q"), ("assistant", "a")),
        "messages", [("system", "Be brief."), ("user", "q"), ("assistant", "a")],
    ),
    # messages rows read the field only without a system turn (the turn wins), as before.
    "system_turn_wins_in_messages": (
        {"system": "ignored", **msgs(("system", "Be brief."), ("user", "q"), ("assistant", "a"))},
        "messages", [("system", "Be brief."), ("user", "q"), ("assistant", "a")],
    ),
    "non_string_system_field_in_messages": (
        {"system": {"note": 1}, **msgs(("user", "q"), ("assistant", "a"))},
        "messages", [("user", "q"), ("assistant", "a")],
    ),
    "top_level_system_in_messages": (
        {"system": "You are a pirate.", **msgs(("user", "q"), ("assistant", "a"))},
        "messages", [("system", "You are a pirate."), ("user", "q"), ("assistant", "a")],
    ),
    # Parquet and HF datasets give every turn the union of the keys their rows use.
    "merged_turn_keys": (
        {"conversations": [{"from": None, "value": None, "role": "user", "content": "q"},
                           {"from": "gpt", "value": "a", "role": None, "content": None}]},
        "sharegpt", [("user", "q"), ("assistant", "a")],
    ),
    "alpaca_history": (
        {"instruction": "And 3+3?", "input": "", "output": "6", "history": [["2+2?", "4"]]},
        "alpaca", [("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "6")],
    ),
    "alpaca_input_only": (
        {"instruction": "", "input": "Translate: chat", "output": "cat"},
        "alpaca", [("user", "Translate: chat"), ("assistant", "cat")],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(KEPT_SHAPES))
def test_real_corpus_shapes_are_read(case):
    row, fmt, expected = KEPT_SHAPES[case]
    for mode in ("standard", "none"):  # formats, not repairs: read in strict mode too
        messages, repairs = normalize_with_repairs(row, fmt, mode)
        assert [(m["role"], m["content"]) for m in messages] == expected
        assert repairs == []


@pytest.mark.parametrize(
    ("row", "fmt", "kind", "reason"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                       {"role": "assistant", "content": "a"}]},
         "messages", "non_text_content", "turn 1 content part 1 is not text ('image_url')"),
        ({"instruction": "q", "output": "a", "history": [["only one"]]},
         "alpaca", "malformed_turn", "history item 1 is not an [instruction, response] pair"),
    ],
)  # fmt: skip
def test_unsupported_shapes_are_rejected_by_name(row, fmt, kind, reason):
    with pytest.raises(RowRejected) as info:
        normalize_with_repairs(row, fmt)
    assert info.value.kind == kind and info.value.reason.startswith(reason)
