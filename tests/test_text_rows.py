"""Format `text` (TRL's language-modeling rows, openassistant-guanaco's transcripts): read,
segmented by `data.response_template` / `data.instruction_template`, tokenized without a chat
template, through `prepare` and `validate-data`."""

from __future__ import annotations

import json
import subprocess
from bisect import bisect_left

import pyarrow.parquet as pq
import pytest

from sftmix_ray.cli import main
from sftmix_ray.data.formats import read_example, row_format
from sftmix_ray.data.text_rows import text_segments
from sftmix_ray.data.tokenize import IGNORE_INDEX, tokenize_conversation
from sftmix_ray.errors import ConfigError, RowRejected
from sftmix_ray.modeling import train_tiny_tokenizer
from tests.conftest import (
    TINY_OVERRIDES,
    cli_env,
    result_json,
    sftmix_command,
    tiny_config,
    trained_runs,
)

HUMAN, BOT = "### Human:", "### Assistant:"
GUANACO = f"{HUMAN} What is 2+3?{BOT} It is 5.{HUMAN} And 2+4?{BOT} It is 6."


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer([GUANACO, "plain text about cats"] * 20, 320)


def test_segments_follow_trls_completion_only_rules():
    # No template: the whole text is trained (TRL's language modeling).
    assert text_segments(GUANACO) == [{"role": "text", "content": GUANACO}]
    # A response template alone: what follows its last occurrence (TRL's collator keeps the
    # last match), so a transcript trains its last answer.
    last = text_segments(GUANACO, BOT)
    assert [(m["content"], m.get("train", True)) for m in last] == [
        (f"{HUMAN} What is 2+3?{BOT} It is 5.{HUMAN} And 2+4?{BOT}", False),
        (" It is 6.", True),
    ]
    # With the instruction template: each answer, up to the next human turn.
    turns = text_segments(GUANACO, BOT, HUMAN)
    assert [(m["content"], m.get("train", True)) for m in turns] == [
        (f"{HUMAN} What is 2+3?{BOT}", False),
        (" It is 5.", True),
        (f"{HUMAN} And 2+4?{BOT}", False),
        (" It is 6.", True),
    ]
    assert "".join(m["content"] for m in turns) == GUANACO
    with pytest.raises(RowRejected) as missing:
        text_segments("no markers here", BOT)
    assert missing.value.kind == "no_response_marker"
    with pytest.raises(RowRejected) as empty:
        text_segments(f"{HUMAN} hi{BOT}  ", BOT, HUMAN)
    assert empty.value.kind == "no_trained_turn"


def test_a_text_row_is_detected_last_and_read_with_its_templates():
    assert row_format({"text": GUANACO}) == "text"
    # A chat row that also has a text column stays a chat row.
    chat = {"messages": [{"role": "user", "content": "q"}], "text": "q"}
    assert row_format(chat) == "messages"
    _, messages, tools, _ = read_example({"text": GUANACO}, "auto", per_row=True,
                                         templates=(BOT, HUMAN))  # fmt: skip
    assert tools is None and [m.get("train", True) for m in messages] == [False, True] * 2
    # data.mask_history: the last answer alone; a column of another name is mapped to `text`.
    _, masked, _, _ = read_example({"body": GUANACO}, "auto", per_row=True,
                                   templates=(BOT, HUMAN), history_masked=True,
                                   columns={"text": "body"})  # fmt: skip
    assert [m.get("train", True) for m in masked] == [False, False, False, True]
    assert "".join(m["content"] for m in masked) == GUANACO
    # `--set data.instruction_template=### Human:` is that text (YAML alone reads a comment),
    # and an instruction template needs a response template.
    for marker in (BOT, "[/INST]", "Assistant:"):  # not a comment, a list, a mapping
        assert tiny_config(f"data.response_template={marker}").data.response_template == marker
    assert tiny_config('data.response_template=" A: "').data.response_template == " A: "
    with pytest.raises(ConfigError, match=r"data\.instruction_template.*needs|unless"):
        tiny_config(f"data.instruction_template={HUMAN}")


def test_labels_are_the_answers_and_eos_only(tok):
    messages = text_segments(GUANACO, BOT, HUMAN)
    ids, labels, truncated = tokenize_conversation(tok, messages, 512, "turns")
    assert not truncated and len(ids) == len(labels)
    assert tok.decode(ids[:-1]) == GUANACO and ids[-1] == tok.eos_token_id
    # The answers and the EOS after the last one; a token that straddles an answer's edge
    # (BPE merges across it) is trained with the answer, so at most pieces of the markers.
    first, second = trained_runs(tok, ids, labels)
    assert " It is 5." in first and first in f"{BOT} It is 5.{HUMAN}"
    assert (
        second.endswith(f" It is 6.{tok.eos_token}") and second in f"{BOT} It is 6.{tok.eos_token}"
    )
    # No template: every token and the EOS.
    ids, labels, _ = tokenize_conversation(tok, text_segments(GUANACO), 512, "turns")
    assert labels == ids
    # The reference re-tokenizes the stored messages_json: the same ids and labels.
    again = tokenize_conversation(tok, json.loads(json.dumps(messages)), 512, "turns")
    assert again[:2] == tokenize_conversation(tok, messages, 512, "turns")[:2]


def test_a_tokenizers_own_bos_and_eos(tok, tmp_path):
    """A tokenizer that adds BOS and EOS itself (Llama-2's, with add_eos_token): the EOS is
    trained with the last answer, and a dump that writes its own "<s>" gets one BOS."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok.save_pretrained(tmp_path / "base")
    own = PreTrainedTokenizerFast.from_pretrained(tmp_path / "base")
    own.add_special_tokens({"bos_token": "<s>"})
    bos, eos = own.bos_token_id, own.eos_token_id
    own.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"<s> $A {own.eos_token}", special_tokens=[("<s>", bos), (own.eos_token, eos)]
    )
    ids, labels, _ = tokenize_conversation(own, text_segments(GUANACO), 512, "turns")
    assert ids[0] == bos and ids[-1] == eos and ids.count(eos) == 1
    assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]  # every token, its EOS too
    ids, labels, _ = tokenize_conversation(own, text_segments(f"<s>{GUANACO}", BOT), 512, "turns")
    assert ids[:2] != [bos, bos] and ids[0] == bos and labels[-1] == eos


def test_truncation_of_a_text_row(tok):
    messages = text_segments(GUANACO, BOT, HUMAN)
    ids, labels, _ = tokenize_conversation(tok, messages, 512, "turns")
    first = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
    with pytest.raises(RowRejected) as dropped:
        tokenize_conversation(tok, messages, len(ids) - 1, "drop")
    assert dropped.value.kind == "too_long"
    for mode in ("turns", "truncate"):
        cut_ids, cut_labels, truncated = tokenize_conversation(tok, messages, first + 1, mode)
        assert truncated and cut_ids == ids[: first + 1] and cut_labels[-1] != IGNORE_INDEX
    # `turns` keeps whole answers where one fits: a limit inside the second human turn cuts
    # after the first answer (its last token), `truncate` at the limit.
    starts = [start for start, _ in tok(GUANACO, return_offsets_mapping=True)["offset_mapping"]]
    end_of_first = bisect_left(starts, GUANACO.index(HUMAN, 1))
    whole, _, _ = tokenize_conversation(tok, messages, end_of_first + 2, "turns")
    assert whole == ids[:end_of_first] and " is 5." in tok.decode(whole[-3:])
    assert (
        tokenize_conversation(tok, messages, end_of_first + 2, "truncate")[0]
        == ids[: end_of_first + 2]
    )
    with pytest.raises(RowRejected) as prompt:
        tokenize_conversation(tok, messages, first, "turns")
    assert prompt.value.kind == "prompt_too_long"
    with pytest.raises(RowRejected) as nothing:
        tokenize_conversation(tok, messages, first, "truncate")
    assert nothing.value.kind == "no_supervised_tokens"


@pytest.mark.slow
def test_prepare_and_validate_data_read_a_guanaco_corpus(ray_local, tmp_path, capsys):
    """`sftmix-ray prepare` with data.format auto on openassistant-guanaco-shaped rows: every
    answer trained, the human turns not; a row without a response marker is a counted
    rejection; `validate-data` with the same templates counts the same."""
    rows = [{"text": f"{HUMAN} q{i}?{BOT} a{i}.{HUMAN} again?{BOT} b{i}."} for i in range(30)]
    rows.insert(7, {"text": "a row with no markers"})
    path = tmp_path / "guanaco.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    sets = [f"--set={o}" for o in TINY_OVERRIDES if not o.startswith("ray.")]
    sets += [f"--set=data.path={path}", f"--set=data.response_template={BOT}",
             f"--set=data.instruction_template={HUMAN}",
             "--set=data.eval_fraction=0.1"]  # fmt: skip
    assert main(["prepare", "--output-dir", str(out), *sets]) == 0, capsys.readouterr().err
    stages = json.loads((out / "summary.json").read_text())["stages"]["prepare"]
    train, heldout = stages["train"], stages.get("heldout", {})
    assert train["input"] + heldout.get("input", 0) == 31
    assert train["rejected"] + heldout.get("rejected", 0) == 1
    assert {**train["rejections_by_kind"], **heldout.get("rejections_by_kind", {})}.keys() == {
        "no_response_marker"
    }
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "base_model")
    for directory in ("data", "heldout"):
        table = pq.read_table(out / directory)
        for example, ids, labels in zip(
            table["example_id"].to_pylist(), table["input_ids"].to_pylist(),
            table["labels"].to_pylist(),
        ):  # fmt: skip
            i = example if example < 7 else example - 1  # the rejected row was 7th
            first, second = trained_runs(tok, ids, labels)
            assert f" a{i}." in first and first in f"{BOT} a{i}.{HUMAN}"
            assert second.endswith(f" b{i}.{tok.eos_token}")
            assert second in f"{BOT} b{i}.{tok.eos_token}"

    proc = subprocess.run(
        [*sftmix_command(), "validate-data", "--data", str(path), "--json",
         "--response-template", BOT, "--instruction-template", HUMAN],
        capture_output=True, text=True, timeout=120, env=cli_env(),
    )  # fmt: skip
    report = result_json(proc)
    assert (report["format"], report["valid"], report["rejected"]) == ("text", 30, 1)
    assert report["by_kind"] == {"no_response_marker": {"count": 1, "examples": [7]}}


def test_eval_measures_a_text_rows_nll_and_leaves_it_out_of_exact_match(tok, tmp_path):
    """A held-out text row with an `answer` column has no turns to prompt with: its NLL counts,
    exact match takes only the chat rows."""
    import pyarrow as pa
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftmix_ray.evaluation import heldout_metrics

    chat = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    text = text_segments(GUANACO, BOT, HUMAN)
    rows = []
    for messages in (chat, text):
        ids, labels, _ = tokenize_conversation(tok, messages, 512, "turns")
        rows.append({"messages_json": json.dumps(messages), "answer": "5", "input_ids": ids,
                     "labels": labels})  # fmt: skip
    (tmp_path / "heldout").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "heldout" / "part-00000.parquet")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    cfg = {"max_examples": 10, "exact_match": True, "max_new_tokens": 2}
    result = heldout_metrics(model, tok, str(tmp_path / "heldout"), cfg)
    assert result["exact_match_rows"] == 1
    tokens = sum(label != IGNORE_INDEX for r in rows for label in r["labels"][1:])
    assert result["response_tokens"] == tokens and result["response_nll"] > 0
