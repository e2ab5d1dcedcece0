"""Answers to benchmark questions, in the layouts their judges read: AlpacaEval's model outputs
(`[{"instruction", "output", "generator"}]`) and FastChat's MT-Bench model answers (one JSON
line per question: `question_id`, `answer_id`, `model_id`, `choices: [{"index": 0, "turns"}]`,
`tstamp`). MT-Bench questions have one or more turns; each later turn is answered with the
earlier turns and their answers in the context, as FastChat's `gen_model_answer` does.

Reading the questions and writing the files happen on the driver; `answer_questions` runs where
the model is (the eval task, on its GPU when it has one).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftmix_ray.errors import DataError

# FastChat's `temperature_config` for MT-Bench categories (others: 0.0).
MT_BENCH_TEMPERATURES = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
    "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0,
}  # fmt: skip


@dataclass(frozen=True)
class Question:
    """One question: its id, its user turns (one for AlpacaEval), and what else its file held."""

    question_id: int | str
    turns: tuple[str, ...]
    category: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. AlpacaEval's `dataset`


def read_questions(path: str | Path) -> tuple[str, list[Question]]:
    """`(layout, questions)` of an AlpacaEval JSON list (`instruction`) or an MT-Bench
    JSON Lines file (`question_id`, `turns`); errors name the file, line or item and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval.questions: {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from None
        return "alpaca_eval", [_alpaca_question(path, i, item) for i, item in enumerate(items)]
    questions = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON: {exc}") from None
        questions.append(_mt_bench_question(path, number, item))
    if not questions:
        raise DataError(f"{path}: no questions")
    ids = [q.question_id for q in questions]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: question_id values repeat")
    return "mt_bench", questions


def _alpaca_question(path: Path, index: int, item: Any) -> Question:
    where = f"{path}: item {index}"
    if not isinstance(item, dict) or not isinstance(item.get("instruction"), str):
        raise DataError(f"{where}: expected an object with a string 'instruction'")
    if not item["instruction"].strip():
        raise DataError(f"{where}: empty 'instruction'")
    extra = {k: v for k, v in item.items() if k not in ("instruction", "output", "generator")}
    return Question(index, (item["instruction"],), str(item.get("category", "")), extra)


def _mt_bench_question(path: Path, number: int, item: Any) -> Question:
    where = f"{path}:{number}"
    if not isinstance(item, dict) or "question_id" not in item:
        raise DataError(f"{where}: expected an object with 'question_id' and 'turns'")
    turns = item.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise DataError(f"{where}: 'turns' must be a non-empty list of strings")
    return Question(item["question_id"], tuple(turns), str(item.get("category", "")))


def temperature_of(question: Question, temperature: float, per_category: bool) -> float:
    """The sampling temperature of a question (MT-Bench's per category when asked)."""
    if per_category:
        return MT_BENCH_TEMPERATURES.get(question.category, 0.0)
    return temperature


def answer_questions(
    model: Any,
    tokenizer: Any,
    questions: list[Question],
    *,
    temperature: float,
    per_category: bool,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> list[list[str]]:
    """Each question's answers, one per turn; turn k is generated with turns < k and their
    answers in the chat, for all questions of one temperature at once."""
    from sftmix_ray.evaluation import generate
    from sftmix_ray.modeling import chat_template_of

    template = chat_template_of(tokenizer)
    answers: list[list[str]] = [[] for _ in questions]
    depth = max(len(q.turns) for q in questions)
    for turn in range(depth):
        groups: dict[float, list[int]] = {}
        for i, q in enumerate(questions):
            if turn < len(q.turns):
                groups.setdefault(temperature_of(q, temperature, per_category), []).append(i)
        for temp, members in sorted(groups.items()):
            prompts = [
                tokenizer.apply_chat_template(
                    _chat(questions[i], answers[i], turn), chat_template=template,
                    tokenize=False, add_generation_prompt=True,
                )
                for i in members
            ]  # fmt: skip
            outputs = generate(
                model, tokenizer, prompts, max_new_tokens, batch_size,
                temperature=temp, seed=seed + turn,
            )  # fmt: skip
            for i, text in zip(members, outputs):
                answers[i].append(text)
    return answers


def _chat(question: Question, answers: list[str], turn: int) -> list[dict[str, str]]:
    messages = []
    for k in range(turn + 1):
        messages.append({"role": "user", "content": question.turns[k]})
        if k < turn:
            messages.append({"role": "assistant", "content": answers[k]})
    return messages


def alpaca_eval_outputs(
    questions: list[Question], answers: list[list[str]], generator: str
) -> list[dict[str, Any]]:
    """AlpacaEval model outputs: the first turn's instruction and answer."""
    return [
        {**q.extra, "instruction": q.turns[0], "output": a[0], "generator": generator}
        for q, a in zip(questions, answers)
    ]


def mt_bench_answers(
    questions: list[Question], answers: list[list[str]], model_id: str
) -> list[dict[str, Any]]:
    """FastChat MT-Bench model answers (one per question, every turn answered)."""
    now = time.time()
    return [
        {
            "question_id": q.question_id,
            "answer_id": _answer_id(model_id, q.question_id, a),
            "model_id": model_id,
            "choices": [{"index": 0, "turns": a}],
            "tstamp": now,
        }
        for q, a in zip(questions, answers)
    ]


def _answer_id(model_id: str, question_id: Any, turns: list[str]) -> str:
    """A stable id (FastChat uses a random shortuuid): the same answer gets the same id."""
    key = json.dumps([model_id, question_id, turns], ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:22]
