"""A ShareGPT-like synthetic corpus: multi-turn, heavy-tailed lengths, and the defects of real
dumps (a lost first user turn, an unanswered last user turn, empty turns, `bing` roles).

    python benchmarks/corpus.py --rows 20000 --out corpus.jsonl

Lengths follow a log-normal per turn (median ~60 words, long tail clipped at 3,000) and the
number of exchanges a geometric law, like public ShareGPT dumps, so that padding, truncation
and memory behave as they do on real data. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

DEFECTS = {  # fraction of rows with each defect
    "leading_assistant": 0.08,
    "trailing_user": 0.02,
    "empty_turn": 0.01,
    "bing_role": 0.005,
}


def _words(rng: random.Random, vocab: list[str]) -> str:
    n = max(1, min(3000, int(rng.lognormvariate(4.1, 1.1))))
    return " ".join(rng.choice(vocab) for _ in range(n))


def sharegpt_like(rows: int, seed: int = 0) -> Iterator[dict]:
    """`rows` ShareGPT records ({"id", "conversations": [{"from", "value"}, ...]})."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    for i in range(rows):
        exchanges = min(12, 1 + int(rng.expovariate(0.8)))
        turns = []
        for _ in range(exchanges):
            turns.append({"from": "human", "value": _words(rng, vocab)})
            turns.append({"from": "gpt", "value": _words(rng, vocab)})
        roll, defect = rng.random(), None
        for name, share in DEFECTS.items():
            if roll < share:
                defect = name
                break
            roll -= share
        if defect == "leading_assistant":  # the dump lost the first user turn
            turns.insert(0, {"from": "gpt", "value": _words(rng, vocab)})
        elif defect == "trailing_user":
            turns.append({"from": "human", "value": _words(rng, vocab)})
        elif defect == "empty_turn":
            turns.insert(1, {"from": "gpt", "value": ""})
        elif defect == "bing_role":
            turns[-1]["from"] = "bing"
        yield {"id": f"sg-{i}", "conversations": turns}


def write_jsonl(path: Path, rows: int, seed: int = 0, copies: int = 1) -> int:
    """Write the corpus (`copies` times over) as JSON Lines; returns its size in bytes."""
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(copies):
            for record in sharegpt_like(rows, seed):
                out.write(json.dumps(record) + "\n")
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(write_jsonl(args.out, args.rows, args.seed))


if __name__ == "__main__":
    main()
