"""The bundled demo corpus: deterministic, disjoint, covering every task and difficulty, exact."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sftmix_ray.data.demo import DIFFICULTIES, TASKS, generate_demo, write_demo
from sftmix_ray.data.formats import normalize_row
from sftmix_ray.data.validation import validate_file


@pytest.fixture(scope="module")
def demo() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return generate_demo()


def prompt(row: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in row["messages"] if m["role"] == "user")


def test_sizes_and_determinism(demo: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    train, eval_rows = demo
    assert (len(train), len(eval_rows)) == (4000, 400)
    assert generate_demo() == demo
    assert generate_demo(50, 10, seed=3) == generate_demo(50, 10, seed=3)
    other_train, other_eval = generate_demo(seed=1)
    assert other_train != train and other_eval != eval_rows


def test_train_and_eval_are_disjoint(
    demo: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    train, eval_rows = demo
    train_prompts = {prompt(row) for row in train}
    assert not train_prompts & {prompt(row) for row in eval_rows}
    assert len(train_prompts) == len(train)  # no duplicate question inside train either


def test_every_task_and_difficulty_is_covered(
    demo: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    expected = {(task, d) for task in TASKS for d in DIFFICULTIES}
    for rows in demo:
        assert {(row["task"], row["difficulty"]) for row in rows} == expected
    per_task = Counter(row["task"] for row in demo[0])
    assert min(per_task.values()) >= 0.8 * len(demo[0]) / len(TASKS)  # roughly balanced
    assert {"add", "subtract", "multiply", "reverse_word", "km_to_m", "followup"} <= set(TASKS)


def test_rows_are_valid_messages_and_short(
    demo: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    for row in demo[0] + demo[1]:
        messages = normalize_row(row, "messages")
        assert messages == row["messages"]
        assert messages[-1] == {"role": "assistant", "content": row["answer"]}
        assert set(row) == {"messages", "answer", "task", "difficulty"}
        assert len(prompt(row).split()) <= 25
        turns = 2 if row["task"] == "followup" else 1
        assert [m["role"] for m in messages] == ["user", "assistant"] * turns


def _recompute(row: dict[str, Any]) -> str | None:
    """The exact answer recomputed from the prompt text, for the tasks a regex can parse."""
    text = prompt(row)
    task = row["task"]
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    word = re.search(r"'([a-z]+)'", text)
    if task in ("add", "subtract", "multiply"):
        a, b = numbers
        if task == "subtract" and text.startswith("Subtract"):
            b, a = a, b
        return str({"add": a + b, "subtract": a - b, "multiply": a * b}[task])
    if task in ("sum_list", "max_number", "min_number", "sort_numbers", "list_length"):
        funcs = {"sum_list": sum, "max_number": max, "min_number": min, "list_length": len}
        if task == "sort_numbers":
            return ", ".join(map(str, sorted(numbers)))
        return str(funcs[task](numbers))
    if task in ("km_to_m", "kg_to_g", "hours_to_minutes"):
        value = float(re.search(r"\d+(?:\.\d+)?", text).group())  # type: ignore[union-attr]
        factor = 60 if task == "hours_to_minutes" else 1000
        return str(round(value * factor))
    if task == "reverse_word" and word:
        return word.group(1)[::-1]
    if task == "sort_letters" and word:
        return "".join(sorted(word.group(1)))
    if task == "uppercase" and word:
        return word.group(1).upper()
    if task == "count_letter":
        letter, target = re.findall(r"'([a-z]+)'", text)
        return str(target.count(letter))
    if task == "count_words":
        return str(len(re.search(r"'(.+)'", text).group(1).split()))  # type: ignore[union-attr]
    if task == "count_up":
        return " ".join(map(str, range(numbers[0], numbers[1] + 1)))
    if task == "followup":
        first = numbers[0] + numbers[1]
        if "Double" in text:
            return str(2 * first)
        c = numbers[2]
        return str(
            {"Add": first + c, "Subtract": first - c, "Multiply": first * c}[
                text.split("\n")[1].split()[0]
            ]
        )
    return None


def test_answers_are_exact(demo: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    checked: Counter[str] = Counter()
    for row in demo[0][:1500] + demo[1]:
        expected = _recompute(row)
        if expected is not None:
            assert row["answer"] == expected, row
            checked[row["task"]] += 1
    assert set(checked) == set(TASKS)
    assert all(answer.isdigit() for answer in (r["answer"] for r in demo[1] if r["task"] == "add"))


def test_difficulty_grows(demo: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    lengths: dict[int, list[int]] = {d: [] for d in DIFFICULTIES}
    for row in demo[0]:
        if row["task"] == "add":
            lengths[row["difficulty"]].append(len(row["answer"]))
    means = [sum(v) / len(v) for v in lengths.values()]
    assert means == sorted(means) and means[0] < means[-1]


def test_write_demo_round_trips(tmp_path: Path) -> None:
    train_path, eval_path = write_demo(tmp_path / "demo", n_train=60, n_eval=20, seed=7)
    assert (train_path.name, eval_path.name) == ("train.jsonl", "eval.jsonl")
    train, eval_rows = generate_demo(60, 20, seed=7)
    assert [json.loads(line) for line in train_path.read_text().splitlines()] == train
    valid, report = validate_file(eval_path)
    assert (report.total, report.valid, report.format) == (20, 20, "messages")
    assert [messages for _, messages in valid] == [row["messages"] for row in eval_rows]


def test_negative_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        generate_demo(-1, 10)
