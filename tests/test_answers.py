"""Answers for AlpacaEval and MT-Bench, without Ray: question files in both layouts, clear errors
for bad ones, multi-turn answering with the earlier answers in context, greedy and seeded
sampling, the judges' file layouts. (`sftmix-ray eval` writing them: tests/test_lora.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftmix_ray.answers import (
    Question,
    alpaca_eval_outputs,
    answer_questions,
    mt_bench_answers,
    read_questions,
)
from sftmix_ray.errors import DataError

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO / "configs" / "questions" / "alpaca_eval_demo.json"
MT_BENCH = REPO / "configs" / "questions" / "mt_bench_demo.jsonl"


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset's architecture with a locally trained tokenizer (seeded, untrained)."""
    from sftmix_ray.config import ModelConfig
    from sftmix_ray.modeling import build_tiny_model, train_tiny_tokenizer

    texts = [q.turns[0] for q in read_questions(MT_BENCH)[1]] * 20
    tokenizer = train_tiny_tokenizer(texts, 300)
    model = build_tiny_model(
        ModelConfig(), len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id
    )
    return model.eval(), tokenizer


def test_both_question_layouts_are_read():
    layout, alpaca = read_questions(ALPACA)
    assert layout == "alpaca_eval" and len(alpaca) == 5
    assert alpaca[0].turns == ("What is 17 + 25?",) and alpaca[0].extra == {
        "dataset": "sftmix-demo"
    }
    layout, mt = read_questions(MT_BENCH)
    assert layout == "mt_bench" and [q.question_id for q in mt] == [81, 111, 121, 131]
    assert [len(q.turns) for q in mt] == [2, 2, 1, 2] and mt[0].category == "writing"


@pytest.mark.parametrize(
    ("text", "name", "message"),
    [
        ('[{"instruction": "a"}, {"input": "b"}]', "q.json", r"q\.json: item 1: .*'instruction'"),
        ('{"question_id": 1, "turns": ["a"]}\n{"question_id": 2}\n', "q.jsonl", r"q\.jsonl:2: "),
        ('{"question_id": 1, "turns": ["a"]}\n{"question_id": 1, "turns": ["b"]}\n', "q.jsonl",
         "question_id values repeat"),
        ('{"question_id": 1, "turns": [""]}\n{"question_id": 2, "turns": "x"}\n', "q.jsonl",
         r"q\.jsonl:2: 'turns' must be"),
        ('[{"instruction": "a"},', "q.json", r"q\.json: not valid JSON"),
    ],
)  # fmt: skip
def test_bad_question_files_name_the_place(tmp_path, text, name, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_questions(path)


def test_turns_are_answered_with_the_earlier_answers_in_context(tiny):
    from sftmix_ray.evaluation import generate

    model, tokenizer = tiny
    _, questions = read_questions(MT_BENCH)
    answers = answer_questions(
        model, tokenizer, questions, temperature=0.0, per_category=False,
        max_new_tokens=6, batch_size=3, seed=0,
    )  # fmt: skip
    assert [len(a) for a in answers] == [2, 2, 1, 2]
    # Turn 2 of question 111, greedy, one at a time: with turn 1 and its answer in the chat.
    q, a = questions[1], answers[1]
    chat = [{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": a[0]},
            {"role": "user", "content": q.turns[1]}]  # fmt: skip
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert a[0] in prompt
    assert generate(model, tokenizer, [prompt], 6, batch_size=1) == [a[1]]
    # The judges' layouts.
    rows = mt_bench_answers(questions, answers, "demo-model")
    assert [r["question_id"] for r in rows] == [81, 111, 121, 131]
    assert rows[1]["choices"] == [{"index": 0, "turns": a}] and rows[1]["model_id"] == "demo-model"
    assert len({r["answer_id"] for r in rows}) == 4
    outputs = alpaca_eval_outputs(questions, answers, "demo-model")
    assert outputs[1] == {"instruction": q.turns[0], "output": a[0], "generator": "demo-model"}


def test_sampling_is_seeded_and_mt_bench_temperatures_apply(tiny):
    model, tokenizer = tiny
    topics = [("rays", "writing"), ("sums", "math")] * 3
    questions = [Question(i, (f"Say something about {w}.",), c) for i, (w, c) in enumerate(topics)]

    def run(seed: int, per_category: bool = True) -> list[list[str]]:
        return answer_questions(
            model, tokenizer, questions, temperature=0.0, per_category=per_category,
            max_new_tokens=8, batch_size=6, seed=seed,
        )  # fmt: skip

    first, again, other = run(0), run(0), run(1)
    assert first == again, "the same seed gives the same samples"
    writing = [i for i, q in enumerate(questions) if q.category == "writing"]
    math = [i for i, q in enumerate(questions) if q.category == "math"]
    # writing samples at 0.7 (the untrained model's answers differ by seed); math is greedy:
    # the same answer for the same question whatever the seed.
    assert [first[i] for i in writing] != [other[i] for i in writing]
    assert [first[i] for i in math] == [other[i] for i in math] == [run(5, False)[i] for i in math]


def test_demo_question_files_are_valid_json():
    assert isinstance(json.loads(ALPACA.read_text()), list)
    assert all(json.loads(line) for line in MT_BENCH.read_text().splitlines())
