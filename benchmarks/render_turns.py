"""Tokenizing long conversations: what stopping the spans at `data.max_length` buys.

    python benchmarks/render_turns.py --json out.json          # or through benchmarks/run.py

Labels come from rendering the conversation up to each answer (two renders per answer, each
as long as its prefix), which grows with the square of the turns. Answers past
`data.max_length` are cut away (`turns`, `truncate`) or the row is rejected (`drop`), so their
spans are not computed. The ratio `render_300_turns_limited_over_full` is the time per row
of a 300-turn conversation (~100 tokens per exchange, the tiny preset's tokenizer, the
built-in ChatML template) tokenized at `data.max_length` 2048 with `turns` truncation, over
the same row's spans all computed (as every mode did before). `details` has ms per row
at 4, 100 and 300 turns on both paths.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import measured_ratio, single_benchmark_main

TEXT = "the quick brown fox jumps over the lazy dog and then some more words"
WORDS = TEXT.split()
MAX_LENGTH = 2048


def _conversation(turns: int) -> list[dict[str, str]]:
    chat = []
    for i in range(turns):
        ask = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(40))
        answer = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(60))
        chat += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
    return chat


def _ms_per_row(fn: Any, repeats: int) -> float:
    fn()  # warm the template cache
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1000


def measure(mode: str, repeats: int | None) -> dict[str, Any]:
    from sftmix_ray.data.tokenize import _render_spans_encoding, tokenize_conversation
    from sftmix_ray.modeling import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer([" ".join(WORDS)] * 50, 400)
    rounds = repeats or (3 if mode == "quick" else 7)
    per_row = 3 if mode == "quick" else 10
    details: dict[str, Any] = {"limited_ms": {}, "full_ms": {}}
    runs = []
    for _ in range(rounds):
        for turns in (4, 100, 300):
            chat = _conversation(turns)
            limited = _ms_per_row(
                lambda c=chat: tokenize_conversation(tokenizer, c, MAX_LENGTH, "turns"), per_row
            )
            full = _ms_per_row(lambda c=chat: _render_spans_encoding(tokenizer, c), per_row)
            details["limited_ms"].setdefault(turns, []).append(round(limited, 2))
            details["full_ms"].setdefault(turns, []).append(round(full, 2))
        runs.append(details["limited_ms"][300][-1] / details["full_ms"][300][-1])
    settings = {"max_length": MAX_LENGTH, "truncation": "turns", "rows_per_timing": per_row}
    return measured_ratio("render_300_turns_limited_over_full", runs, settings, details)


if __name__ == "__main__":
    sys.exit(
        single_benchmark_main(
            "render_turns", "render_300_turns_limited_over_full", measure, __doc__, None
        )
    )
