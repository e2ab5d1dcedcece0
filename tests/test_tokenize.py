"""Chat templating and response-only labels: prompt -100, assistant content + end-of-turn."""

from __future__ import annotations

import pytest

from sftmix_ray.data.tokenize import IGNORE_INDEX, render_with_spans, tokenize_conversation
from sftmix_ray.errors import RowRejected
from sftmix_ray.modeling import train_tiny_tokenizer

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Add 3 to that."},
    {"role": "assistant", "content": "8"},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for m in CONVO] * 20 + ["system user assistant"]
    return train_tiny_tokenizer(texts, 320)


def _supervised_text(tok, ids, labels):
    return tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_only_assistant_turns_and_end_of_turn_are_supervised(tokenizer):
    ids, labels, truncated = tokenize_conversation(tokenizer, CONVO, 512, "drop")
    assert not truncated and len(ids) == len(labels)
    assert _supervised_text(tokenizer, ids, labels) == "5<|im_end|>\n8<|im_end|>\n"
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    supervised_eot = [i for i, label in zip(ids, labels) if label == eot]
    all_eot = [i for i in ids if i == eot]
    assert len(supervised_eot) == 2 and len(all_eot) == 5  # system, 2 user turns: not learned
    prompt = tokenizer.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert "What is 2+3?" in prompt and "Be brief." in prompt and "Add 3" in prompt


def test_spans_cover_assistant_content(tokenizer):
    text, spans = render_with_spans(tokenizer, CONVO)
    assert [text[a:b] for a, b in spans] == ["5<|im_end|>\n", "8<|im_end|>\n"]


def test_truncation_policies(tokenizer):
    ids, _, _ = tokenize_conversation(tokenizer, CONVO, 512, "drop")
    with pytest.raises(RowRejected, match=r"too long: \d+ tokens > data.max_length=10"):
        tokenize_conversation(tokenizer, CONVO, 10, "drop")
    cut = len(ids) - 3  # keeps the first answer, cuts the second
    ids2, labels2, truncated = tokenize_conversation(tokenizer, CONVO, cut, "truncate")
    assert truncated and len(ids2) == cut and ids2 == ids[:cut]
    assert _supervised_text(tokenizer, ids2, labels2).startswith("5<|im_end|>")
    with pytest.raises(RowRejected, match="no supervised tokens after truncation"):
        tokenize_conversation(tokenizer, CONVO, 8, "truncate")


def test_foreign_template_is_used_when_present(tokenizer):
    tok = train_tiny_tokenizer(["hello there", "general"] * 10, 300)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
    )
    convo = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "there"}]
    ids, labels, _ = tokenize_conversation(tok, convo, 64, "drop")
    assert _supervised_text(tok, ids, labels) == "there<|endoftext|>"


# Real templates that are not prefix-stable, in their published form (reduced to the parts
# that matter here): rendering the conversation up to a turn is not a prefix of the whole.
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)  # the EOS only at the very end
QWEN3 = (
    "{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}"
    "{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' and loop.index0 > ns.last_user %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)  # an empty thinking block only on answers after the last user turn
MISTRAL_V03 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}"
    "{%- endif %}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}{%- endfor %}"
)  # the system prompt only in the last user turn
GEMMA = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' "
    "else m['role'] %}{{ '<start_of_turn>' + role + '\\n' + m['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
TWO_TURNS = [
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hello there"},  # repeats the question
    {"role": "user", "content": "and then"},
    {"role": "assistant", "content": "general"},
]


def _templated(template: str) -> object:
    tok = train_tiny_tokenizer(["hello there", "general", "and then", "Be brief."] * 10, 300)
    extra = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "[INST]", "[/INST]"]
    tok.add_special_tokens({"additional_special_tokens": extra, "eos_token": "<|endoftext|>"})
    tok.chat_template = template
    return tok


@pytest.mark.parametrize(
    ("template", "convo", "expected"),
    [
        (PHI3, TWO_TURNS, "hello there<|end|>\ngeneral<|end|>\n<|endoftext|>"),
        # The last answer's empty thinking block is the answer's, as a one-turn row's is.
        (QWEN3, TWO_TURNS, "hello there<|im_end|>\n<think>\n\n</think>\n\ngeneral<|im_end|>\n"),
        (MISTRAL_V03, [{"role": "system", "content": "Be brief."}, *TWO_TURNS],
         "hello there<|endoftext|>general<|endoftext|>"),
    ],
    ids=["phi3", "qwen3", "mistral-v0.3"],
)  # fmt: skip
def test_templates_that_are_not_prefix_stable_label_every_answer(template, convo, expected):
    _check_answers_found(template, convo, expected)


SHORT = [  # one-letter answers: each letter is also in the templates' markup
    {"role": "user", "content": "pick one"},
    {"role": "assistant", "content": "a"},
    {"role": "user", "content": "and now"},
    {"role": "assistant", "content": "d"},
]


@pytest.mark.parametrize(
    ("template", "convo", "expected"),
    [
        (PHI3, SHORT, "a<|end|>\nd<|end|>\n<|endoftext|>"),
        (QWEN3, SHORT, "a<|im_end|>\n<think>\n\n</think>\n\nd<|im_end|>\n"),
        (MISTRAL_V03, [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "true?"}, {"role": "assistant", "content": "T"}],
         "T<|endoftext|>"),
    ],
    ids=["phi3", "qwen3", "mistral-v0.3"],
)  # fmt: skip
def test_short_answers_are_not_found_in_the_template_markup(template, convo, expected):
    """An answer "a" is also in `<|assistant|>` and "T" in `[/INST]`: the search starts after
    the answer's header and skips the template's special tokens (it labelled the markup)."""
    _check_answers_found(template, convo, expected)


def _check_answers_found(template: str, convo: list[dict], expected: str) -> None:
    """Such rows were all rejected (`template_not_prefix_stable`): multi-turn UltraChat under
    Phi-3 or Qwen3, any row with a system prompt under Mistral v0.3. Each answer is found in
    the whole text and labelled with its end-of-turn tokens; the prompts, the repeated question
    included, and the next turn's marker are not."""
    tok = _templated(template)
    ids, labels, _ = tokenize_conversation(tok, convo, 512, "drop")
    assert _supervised_text(tok, ids, labels) == expected
    # The whole text is tokenized once (the search for the answers uses the same encoding):
    # at a million rows a second pass is a second prepare.
    full = tok.apply_chat_template(convo, tokenize=False)
    texts = _texts_tokenized(tok, lambda: tokenize_conversation(tok, convo, 512, "drop"))
    assert texts.count(full) == 1, texts
    prompt = tok.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert all(m["content"] in prompt for m in convo if m["role"] == "user")
    for marker in ("<|user|>", "[INST]"):
        marker_id = tok.convert_tokens_to_ids(marker)
        assert not any(i == marker_id and label != IGNORE_INDEX for i, label in zip(ids, labels))


def test_a_template_error_rejects_the_row_with_its_reason():
    """A template's own error rejects that row, counted (it stopped the whole prepare); the
    others are kept. Gemma-2's refusal of a system turn is met instead: the system prompt goes
    before the first user turn's text (as Gemma-3's template and LLaMA-Factory do; every row
    of a corpus with system prompts, SlimOrca's, was rejected, and a Gemma reference model's
    re-tokenizing failed its stage)."""
    tok = _templated(GEMMA)
    system = [{"role": "system", "content": "Be brief."}, *TWO_TURNS]
    ids, labels, _ = tokenize_conversation(tok, system, 512, "drop")
    assert _supervised_text(tok, ids, labels) == "hello there<end_of_turn>\ngeneral<end_of_turn>\n"
    assert tok.decode(ids).startswith("<start_of_turn>user\nBe brief.\n\nhello<end_of_turn>")
    ids, labels, _ = tokenize_conversation(tok, TWO_TURNS, 512, "drop")
    assert _supervised_text(tok, ids, labels) == "hello there<end_of_turn>\ngeneral<end_of_turn>\n"
    strict = _templated(GEMMA.replace("System role not supported", "Roles must alternate"))
    with pytest.raises(RowRejected, match="Roles must alternate") as info:
        tokenize_conversation(strict, system, 512, "drop")
    assert info.value.kind == "template_error"


def test_a_tokenizer_without_template_or_chatml_tokens_learns_to_stop_at_eos(tmp_path):
    """A base model's tokenizer (no chat template, no `<|im_end|>` token) gets the built-in
    ChatML template with its EOS after each answer: `<|im_end|>` is plain text there, and a
    model trained without the EOS never stopped generating. The export carries the template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        ["hello there general", "<|im_start|> user"] * 10,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    assert tok.chat_template is None and tok.convert_tokens_to_ids("<|im_end|>") is None
    ids, labels, _ = tokenize_conversation(tok, TWO_TURNS, 512, "drop")
    supervised = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert supervised.count(tok.eos_token_id) == 2  # each answer ends with the EOS
    assert tok.decode(supervised).endswith("general<|im_end|></s>\n")
    from sftmix_ray.modeling import save_hf

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    save_hf(LlamaForCausalLM(config), tok, tmp_path / "export")
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path / "export")
    assert reloaded.chat_template is not None and "eos_token" in reloaded.chat_template
    # The tiny preset's tokenizer knows `<|im_end|>` (its EOS): its template stays as it was.
    tiny = train_tiny_tokenizer(["hello there"] * 10, 300)
    tiny.chat_template = None
    ids, labels, _ = tokenize_conversation(tiny, TWO_TURNS, 512, "drop")
    assert _supervised_text(tiny, ids, labels) == "hello there<|im_end|>\ngeneral<|im_end|>\n"


def test_a_tokenizer_with_named_templates_uses_its_default():
    """Command-R and Hermes-2-Pro keep several named templates in a dict: the `default` one
    renders (the dict's printed form was rendered as a template, garbling every row)."""
    tok = _templated(PHI3)
    tok.chat_template = {"default": PHI3, "tool_use": "{{ 'tools' }}"}
    ids, labels, _ = tokenize_conversation(tok, TWO_TURNS, 512, "drop")
    assert _supervised_text(tok, ids, labels) == "hello there<|end|>\ngeneral<|end|>\n<|endoftext|>"


def test_named_templates_without_a_default_stop_prepare_once_not_per_row():
    """No template is usable for any row: an error for the run (prepare stops), not a
    `template_error` rejection of every row."""
    from sftmix_ray.errors import SftmixError

    tok = _templated(PHI3)
    tok.chat_template = {"tool_use": "{{ 'tools' }}", "rag": "{{ 'rag' }}"}
    with pytest.raises(SftmixError, match="chat templates rag, tool_use but no 'default'") as info:
        tokenize_conversation(tok, TWO_TURNS, 512, "drop")
    assert not isinstance(info.value, RowRejected)


def _texts_tokenized(tok, run) -> list[str]:
    """The texts `tok` was called on while `run` ran."""
    seen: list[str] = []
    real = type(tok).__call__

    class Counting(type(tok)):
        def __call__(self, text, *args, **kwargs):
            seen.append(text)
            return real(self, text, *args, **kwargs)

    kind = type(tok)
    tok.__class__ = Counting
    try:
        run()
    finally:
        tok.__class__ = kind
    return seen


def _long_chat(turns: int) -> list[dict]:
    chat = []
    for i in range(turns):
        chat += [{"role": "user", "content": f"What is {i}+3?"},
                 {"role": "assistant", "content": str(i + 3)}]  # fmt: skip
    return chat


@pytest.mark.parametrize("template", [None, "MISTRAL_V03", "PHI3"])
@pytest.mark.parametrize("truncation", ["turns", "truncate"])
@pytest.mark.parametrize("limit", [9, 24, 25, 40, 77, 400])
def test_a_token_limit_stops_the_spans_without_changing_the_result(
    tokenizer, truncation, limit, template
):
    """Spans past `data.max_length` are not computed (see below): ids and labels are those of
    the whole conversation's spans, truncated, at every limit (one inside the first answer,
    at and around answer boundaries, past the end), also under templates that are not
    prefix-stable (Mistral v0.3 moves a long system prompt into the last user turn, so a
    prefix's rendering is longer than its place in the whole text)."""
    from sftmix_ray.data import tokenize as tk

    chat = _long_chat(12)
    if template is not None:
        tokenizer = _templated(globals()[template])
        chat = [{"role": "system", "content": "Be brief. " * 30}, *chat]
    _, spans, enc = tk._render_spans_encoding(tokenizer, chat)  # every span
    ids, labels, _ = tokenize_conversation(tokenizer, chat, 10_000, "drop")
    cut = min(len(ids), limit)
    try:
        if truncation == "turns" and len(ids) > limit:
            cut = tk._turns_cut(enc["offset_mapping"], spans, labels, limit)
        assert any(label != IGNORE_INDEX for label in labels[:cut]), "no_supervised_tokens"
    except (RowRejected, AssertionError) as exc:  # the whole-spans path rejects the row too
        with pytest.raises(RowRejected) as info:
            tokenize_conversation(tokenizer, chat, limit, truncation)
        assert info.value.kind == getattr(exc, "kind", "no_supervised_tokens")
        return
    got = tokenize_conversation(tokenizer, chat, limit, truncation)
    assert got == (ids[:cut], labels[:cut], len(ids) > limit)


def test_turns_past_the_limit_are_not_rendered(tokenizer, monkeypatch):
    """A 300-turn conversation cut to a few turns renders the prefixes of those turns only (two
    renders per answer, each as long as the prefix), not of all 300: that cost grows with the
    square of the turns (130 ms per such row before; agent trajectories have hundreds)."""
    calls = []
    real = type(tokenizer).apply_chat_template

    def counting(self, conversation, *args, **kwargs):
        calls.append(len(conversation))
        return real(self, conversation, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "apply_chat_template", counting)
    chat = _long_chat(300)
    ids, labels, truncated = tokenize_conversation(tokenizer, chat, 64, "turns")
    assert truncated and len(ids) <= 64
    answers = sum(1 for label in labels if label == tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert answers >= 2
    # The whole text once, then two renders per kept answer and for the first cut one.
    assert calls[0] == len(chat) and len(calls) <= 1 + 2 * (answers + 1)
    assert max(calls[1:]) <= 2 * answers + 2


def test_common_prefix_and_suffix_by_halving_match_their_definition():
    """The difference alignment's slice-halving prefix and suffix lengths agree with the
    character-by-character definition on every pair of short strings over two letters."""
    from itertools import product

    from sftmix_ray.data.tokenize import _common_prefix, _common_suffix

    def prefix(a: str, b: str) -> int:
        return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    words = ["".join(w) for n in range(6) for w in product("ab", repeat=n)]
    for a, b in product(words, words):
        assert _common_prefix(a, b) == prefix(a, b)
        assert _common_suffix(a, b) == prefix(a[::-1], b[::-1])
