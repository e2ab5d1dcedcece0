"""The bundled demo corpus: seeded, short instruction examples with exact answers.

This is a demo and benchmark corpus, made so that the whole pipeline runs end to end on a CPU
(quickstart, tests, benchmarks) and its numbers mean something: a tiny model learns the easy
examples (1-digit sums, 3-letter words) and not the hard ones (4-digit sums, 3x2-digit
products), so confidence spreads out and the confident/unconfident split is not noise. It is
NOT a substitute for real SFT data and says nothing about instruction following in general.

Nothing is shipped: `generate_demo` builds it in pure Python from a seed, identically on every
machine. Each example is `{"messages": [...], "answer": str, "task": str, "difficulty": int}`
(the "messages" format); the last assistant turn is exactly `answer`. Difficulty runs 1-4 for
every task. Train and eval never share a question (same task and operands), so eval measures
generalisation, not recall.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sftmix_ray.io_utils import atomic_write_text

DIFFICULTIES = (1, 2, 3, 4)
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
_VOCAB = (
    "the", "a", "red", "big", "small", "cat", "dog", "fox", "bird", "sun", "moon", "tree",
    "sat", "ran", "saw", "ate", "old", "new", "blue", "green", "fast", "slow", "cold", "warm",
    "box", "cup", "hat", "pen", "map",
)  # fmt: skip
_MAX_DRAWS = 30  # draws per slot before a (task, difficulty) is deemed exhausted

# key (no two examples share one), user turns, assistant turns (the last one is the answer)
Drawn = tuple[tuple[Any, ...], list[str], list[str]]


def _digits(rng: random.Random, digits: int) -> int:
    """A random integer with exactly `digits` digits (0-9 for one digit)."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _word(rng: random.Random, difficulty: int) -> str:
    """A pronounceable pseudo-word; longer with difficulty (3-4 up to 9-11 letters)."""
    low, high = {1: (3, 4), 2: (5, 6), 3: (7, 8), 4: (9, 11)}[difficulty]
    start = rng.randrange(2)
    letters = [
        rng.choice(_VOWELS if (i + start) % 2 else _CONSONANTS)
        for i in range(rng.randint(low, high))
    ]
    return "".join(letters)


def _numbers(rng: random.Random, difficulty: int) -> list[int]:
    """A short list of numbers; longer and larger with difficulty."""
    length, high = {1: (3, 9), 2: (4, 99), 3: (5, 99), 4: (6, 999)}[difficulty]
    return [rng.randint(0, high) for _ in range(length)]


def _join(numbers: list[int]) -> str:
    """Numbers as `4, 17, 9`."""
    return ", ".join(str(n) for n in numbers)


def _add(rng: random.Random, d: int) -> Drawn:
    a, b = _digits(rng, d), _digits(rng, d)
    prompt = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."])
    return (a, b), [prompt.format(a=a, b=b)], [str(a + b)]


def _subtract(rng: random.Random, d: int) -> Drawn:
    a, b = sorted((_digits(rng, d), _digits(rng, d)), reverse=True)
    prompt = rng.choice(["What is {a} - {b}?", "Subtract {b} from {a}."])
    return (a, b), [prompt.format(a=a, b=b)], [str(a - b)]


def _multiply(rng: random.Random, d: int) -> Drawn:
    sizes = {1: (1, 1), 2: (2, 1), 3: (2, 2), 4: (3, 2)}[d]
    a, b = _digits(rng, sizes[0]), _digits(rng, sizes[1])
    prompt = rng.choice(["What is {a} * {b}?", "Multiply {a} by {b}.", "What is {a} times {b}?"])
    return (a, b), [prompt.format(a=a, b=b)], [str(a * b)]


def _reverse_word(rng: random.Random, d: int) -> Drawn:
    w = _word(rng, d)
    prompt = rng.choice(["Reverse the word '{w}'.", "Write '{w}' backwards."])
    return (w,), [prompt.format(w=w)], [w[::-1]]


def _uppercase(rng: random.Random, d: int) -> Drawn:
    w = _word(rng, d)
    prompt = rng.choice(["Write '{w}' in uppercase.", "Convert '{w}' to capital letters."])
    return (w,), [prompt.format(w=w)], [w.upper()]


def _count_letter(rng: random.Random, d: int) -> Drawn:
    w = _word(rng, d)
    c = rng.choice(w) if rng.random() < 0.75 else rng.choice(_CONSONANTS + _VOWELS)
    prompt = f"How many times does the letter '{c}' appear in '{w}'?"
    return (w, c), [prompt], [str(w.count(c))]


def _sort_letters(rng: random.Random, d: int) -> Drawn:
    w = _word(rng, d)
    prompt = f"Sort the letters of '{w}' alphabetically."
    return (w,), [prompt], ["".join(sorted(w))]


def _sort_numbers(rng: random.Random, d: int) -> Drawn:
    ns = _numbers(rng, d)
    prompt = f"Sort these numbers in ascending order: {_join(ns)}."
    return tuple(ns), [prompt], [_join(sorted(ns))]


def _max_number(rng: random.Random, d: int) -> Drawn:
    ns = _numbers(rng, d)
    return tuple(ns), [f"What is the largest number in {_join(ns)}?"], [str(max(ns))]


def _min_number(rng: random.Random, d: int) -> Drawn:
    ns = _numbers(rng, d)
    return tuple(ns), [f"What is the smallest number in {_join(ns)}?"], [str(min(ns))]


def _sum_list(rng: random.Random, d: int) -> Drawn:
    ns = _numbers(rng, d)
    return tuple(ns), [f"What is the sum of {_join(ns)}?"], [str(sum(ns))]


def _list_length(rng: random.Random, d: int) -> Drawn:
    low, high = {1: (2, 4), 2: (5, 7), 3: (8, 10), 4: (11, 14)}[d]
    ns = [rng.randint(0, 9) for _ in range(rng.randint(low, high))]
    return tuple(ns), [f"How many numbers are in this list: {_join(ns)}?"], [str(len(ns))]


def _count_words(rng: random.Random, d: int) -> Drawn:
    low, high = {1: (2, 3), 2: (4, 6), 3: (7, 9), 4: (10, 13)}[d]
    words = [rng.choice(_VOCAB) for _ in range(rng.randint(low, high))]
    sentence = " ".join(words)
    return (sentence,), [f"How many words are in this sentence: '{sentence}'?"], [str(len(words))]


def _count_up(rng: random.Random, d: int) -> Drawn:
    start = rng.randint(1, 99)
    length = {1: 3, 2: rng.randint(4, 5), 3: rng.randint(6, 7), 4: rng.randint(8, 10)}[d]
    end = start + length - 1
    return (
        (start, end),
        [f"Count from {start} to {end}."],
        [" ".join(map(str, range(start, end + 1)))],
    )


def _quantity(rng: random.Random, d: int, step: int) -> tuple[int, str]:
    """A quantity in hundredths and as text: integers at difficulty 1-2, decimals at 3-4."""
    if d <= 2:
        whole = rng.randint(1, 99) if d == 1 else rng.randint(100, 999)
        return whole * 100, str(whole)
    if d == 3:  # one decimal, not zero: 4.7
        tenths = rng.choice([t for t in range(1, 1000) if t % 10])
        return tenths * 10, f"{tenths // 10}.{tenths % 10}"
    # two decimals, the last not zero and a multiple of `step` hundredths: 12.35
    hundredths = rng.choice([h for h in range(step, 10000, step) if h % 10])
    return hundredths, f"{hundredths // 100}.{hundredths % 100:02d}"


def _converter(unit: str, target: str, factor: int, step: int) -> Callable[..., Drawn]:
    """A unit-conversion task; `step` keeps the answer an integer (hours * 60 needs 0.05)."""

    def draw(rng: random.Random, d: int) -> Drawn:
        hundredths, text = _quantity(rng, d, step)
        assert hundredths * factor % 100 == 0, "the demo only asks for integer answers"
        prompt = rng.choice(
            [f"Convert {text} {unit} to {target}.", f"How many {target} are in {text} {unit}?"]
        )
        return (hundredths,), [prompt], [str(hundredths * factor // 100)]

    return draw


def _followup(rng: random.Random, d: int) -> Drawn:
    a, b = _digits(rng, min(d, 3)), _digits(rng, min(d, 3))
    first = a + b
    op = rng.choice({1: ["add", "subtract"], 2: ["add", "subtract", "double"]}.get(d, ["multiply"]))
    if op == "subtract" and first < 1:
        op = "add"
    c = {
        1: rng.randint(1, 9),
        2: rng.randint(10, 99),
        3: rng.randint(2, 9),
        4: rng.randint(11, 19),
    }[d]
    if op == "add":
        follow, final = f"Add {c} to that.", first + c
    elif op == "subtract":
        c = min(c, first)
        follow, final = f"Subtract {c} from that.", first - c
    elif op == "double":
        c, follow, final = 2, "Double that.", first * 2
    else:
        follow, final = f"Multiply that by {c}.", first * c
    return (a, b, op, c), [f"What is {a} + {b}?", follow], [str(first), str(final)]


TASKS: dict[str, Callable[[random.Random, int], Drawn]] = {
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "reverse_word": _reverse_word,
    "uppercase": _uppercase,
    "count_letter": _count_letter,
    "sort_letters": _sort_letters,
    "sort_numbers": _sort_numbers,
    "max_number": _max_number,
    "min_number": _min_number,
    "sum_list": _sum_list,
    "list_length": _list_length,
    "count_words": _count_words,
    "count_up": _count_up,
    "km_to_m": _converter("km", "meters", 1000, 1),
    "hours_to_minutes": _converter("hours", "minutes", 60, 5),
    "kg_to_g": _converter("kg", "grams", 1000, 1),
    "followup": _followup,
}


def _generate(n: int, rng: random.Random, seen: set[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """`n` new examples, round-robin over (task, difficulty), skipping keys already `seen`."""
    slots = [(task, d) for d in DIFFICULTIES for task in TASKS]
    rows: list[dict[str, Any]] = []
    position = 0
    while len(rows) < n:
        if not slots:
            raise ValueError(f"the demo generator cannot produce {n} distinct examples")
        position %= len(slots)
        task, d = slots[position]
        for _ in range(_MAX_DRAWS):
            key, users, assistants = TASKS[task](rng, d)
            if (task, *key) not in seen:
                seen.add((task, *key))
                rows.append(_example(task, d, users, assistants))
                position += 1
                break
        else:  # this (task, difficulty) has (nearly) no unseen questions left
            del slots[position]
    rng.shuffle(rows)
    return rows


def _example(task: str, d: int, users: list[str], assistants: list[str]) -> dict[str, Any]:
    """Interleave user and assistant turns into one demo row."""
    messages = []
    for user, assistant in zip(users, assistants, strict=True):
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    return {"messages": messages, "answer": assistants[-1], "task": task, "difficulty": d}


def generate_demo(
    n_train: int = 4000, n_eval: int = 400, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic (train, eval) demo examples; no question appears in both."""
    if n_train < 0 or n_eval < 0:
        raise ValueError("n_train and n_eval must be >= 0")
    rng = random.Random(seed)
    seen: set[tuple[Any, ...]] = set()
    eval_rows = _generate(n_eval, rng, seen)  # eval first: it covers every (task, difficulty)
    train_rows = _generate(n_train, rng, seen)
    return train_rows, eval_rows


def write_demo(
    directory: str | os.PathLike[str], n_train: int = 4000, n_eval: int = 400, seed: int = 0
) -> tuple[Path, Path]:
    """Write the demo corpus as `train.jsonl` and `eval.jsonl` under `directory`."""
    train_rows, eval_rows = generate_demo(n_train, n_eval, seed)
    paths = Path(directory) / "train.jsonl", Path(directory) / "eval.jsonl"
    for path, rows in zip(paths, (train_rows, eval_rows), strict=True):
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return paths
