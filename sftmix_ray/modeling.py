"""Load and save Hugging Face causal LMs; the built-in offline `tiny` preset."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sftmix_ray.config import ModelConfig
from sftmix_ray.errors import SftmixError
from sftmix_ray.layout import RunDir

TINY = "tiny"


def _chatml(eos_after_answer: bool) -> str:
    """ChatML, with tool calling in the Hermes/Qwen style: the tool definitions in the system
    turn (`<tools>`, one JSON per line, after the row's own system prompt), each call as
    `<tool_call>{"name": ..., "arguments": ...}</tool_call>` in the assistant turn, each
    result as a `tool` turn. A conversation without tools renders exactly as plain ChatML."""
    end = (
        "'<|im_end|>' + (eos_token if message['role'] == 'assistant' else '')"
        if (eos_after_answer)
        else "'<|im_end|>'"
    )
    return (
        "{% if tools %}{{ '<|im_start|>system\n' }}"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
        "{{ '<tools>' }}{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
        "{{ '\n</tools><|im_end|>\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if not (tools and loop.first and message['role'] == 'system') %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
        "{% for call in message['tool_calls'] or [] %}"
        "{% if message['content'] or not loop.first %}{{ '\n' }}{% endif %}"
        "{{ '<tool_call>\n' + ({'name': call['function']['name'], "
        "'arguments': call['function']['arguments']} | tojson) + '\n</tool_call>' }}"
        "{% endfor %}"
        f"{{{{ {end} + '\n' }}}}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


# ChatML, used when a tokenizer has no chat template of its own. The assistant turn's
# end-of-turn token is part of the assistant span, so the model learns to stop.
BUILTIN_CHAT_TEMPLATE = _chatml(eos_after_answer=False)
# The same, for a tokenizer without `<|im_end|>` in its vocabulary (a base model's): the
# marker is then plain text, so each answer also ends with the model's EOS token, which the
# model learns to emit and generation stops at (TRL's `setup_chat_format` adds the ChatML
# tokens instead, which resizes the embeddings).
BUILTIN_CHAT_TEMPLATE_WITH_EOS = _chatml(eos_after_answer=True)
TINY_SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def chat_template_of(tokenizer: Any, tools: bool = False) -> str:
    """The tokenizer's own chat template, else the built-in ChatML one (with the EOS token
    after each answer when `<|im_end|>` is not a token of the vocabulary). Of several named
    ones, `tool_use` for a conversation with tool definitions (`tools`) where there is one."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates (Command-R, Hermes-2-Pro)
        if tools and "tool_use" in template:
            return str(template["tool_use"])
        if "default" not in template:
            names = ", ".join(sorted(template))
            raise SftmixError(f"the tokenizer has chat templates {names} but no 'default'")
        return str(template["default"])
    if template:
        return str(template)
    marker = tokenizer.convert_tokens_to_ids("<|im_end|>")  # None or unk when unknown
    if tokenizer.eos_token is None or marker not in (None, tokenizer.unk_token_id):
        return BUILTIN_CHAT_TEMPLATE
    return BUILTIN_CHAT_TEMPLATE_WITH_EOS


def resolve_model_path(name_or_path: str, out_dir: Path | RunDir) -> str:
    """The id or directory a stage loads: the materialized preset for `tiny`, else as given."""
    if name_or_path == TINY:
        path = RunDir.of(out_dir).base_model
        if not (path / "config.json").exists():
            raise SftmixError(
                f"the tiny preset has not been built in {path}; run `sftmix-ray prepare` first"
            )
        return str(path)
    return name_or_path


TOKENIZER_TRAIN_CHARS = 4096  # per text, when training the tiny preset's tokenizer


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # BPE training time grows with the square of a word's length: one hostile 2 MB row would
    # stall it for hours. The first characters of each text teach the merges just as well.
    tok.train_from_iterator((t[:TOKENIZER_TRAIN_CHARS] for t in texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = BUILTIN_CHAT_TEMPLATE
    return fast


def build_tiny_model(cfg: ModelConfig, vocab_size: int, pad_token_id: int, eos_token_id: int):
    """A small Llama-style causal LM with seeded random init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = cfg.tiny_hidden_size
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 32 * 32 + 32,
        num_hidden_layers=cfg.tiny_num_layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(cfg.tiny_seed)
    model = LlamaForCausalLM(config)
    return model


def materialize_tiny(cfg: ModelConfig, texts: Iterable[str], target: Path) -> Path:
    """Build the tiny preset (tokenizer trained on `texts`, seeded model) into `target`."""
    from sftmix_ray.io_utils import fresh_tmp_dir, replace_dir

    tokenizer = train_tiny_tokenizer(texts, cfg.tiny_vocab_size)
    model = build_tiny_model(
        cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = fresh_tmp_dir(target)
    tokenizer.save_pretrained(tmp)
    save_pretrained(model, tmp)
    replace_dir(tmp, target)
    return target


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer with a pad token (falls back to EOS) and a chat template."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise SftmixError(f"cannot load tokenizer '{name_or_path}': {exc}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_vocabulary(model_path: str, tokenizer: Any, *, trust_remote_code: bool = False) -> None:
    """Raise unless every id `tokenizer` can produce has a row in the model's embedding.

    A tokenizer with tokens added after the model was built (chat special tokens, say) and an
    embedding that was never resized make ids past the last row: the CPU fails with an index
    error deep in the forward, a GPU with a device-side assert that takes the whole NCCL job
    down. A config without `vocab_size` is not checked."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SftmixError(f"cannot load the config of model '{model_path}': {exc}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text, "vocab_size", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise SftmixError(
            f"the tokenizer of '{model_path}' has {len(tokenizer)} tokens but the model's "
            f"embedding has {rows} rows (config vocab_size): ids from {rows} on would crash "
            "training. Resize the embedding (model.resize_token_embeddings(len(tokenizer))) "
            "and save the model, or use the tokenizer the model was trained with"
        )


def model_kwargs(
    trust_remote_code: bool, dtype: torch.dtype, attn_implementation: str | None
) -> dict[str, Any]:
    """The keyword arguments every model construction here passes to transformers."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


def load_model(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "sdpa",
    **extra: Any,
) -> Any:
    """AutoModelForCausalLM from an id or directory (safetensors preferred); `extra` goes to
    `from_pretrained` as it is (a quantization config, a device map)."""
    from transformers import AutoModelForCausalLM

    kwargs = {**model_kwargs(trust_remote_code, dtype, attn_implementation), **extra}
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:
        raise SftmixError(f"cannot load model '{name_or_path}': {exc}") from None


def set_activation_checkpointing(model: Any, on: bool) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpoints), or
    stop. transformers 5 calls it activation checkpointing and keeps the `gradient_checkpointing_*`
    methods as deprecated aliases, to be removed in v6; older releases (>= 4.56 is allowed) have
    only those."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


@contextmanager
def _deepspeed_probe_only_once_imported() -> Iterator[None]:
    """`save_pretrained` unwraps the model with accelerate's `extract_model_from_parallel`,
    which imports DeepSpeed whenever it is installed, only to test `isinstance(model,
    DeepSpeedEngine)`; DeepSpeed imports MLflow in turn. That cost the exporting rank of a DDP
    or FSDP run 1.4 CPU-s and 135 MiB (`import deepspeed` after torch and transformers, on the
    2-core dev machine). A model can be wrapped in a DeepSpeedEngine only once DeepSpeed is
    imported, so until then the probe answers False. The stand-in asks again on every call: it
    stays correct if another thread imports DeepSpeed meanwhile, or if two saves restore out of
    order (the one left in place answers as accelerate's own once DeepSpeed is loaded)."""
    try:
        from accelerate.utils import other
    except ImportError:  # transformers without accelerate unwraps by `.module` alone
        yield
        return
    original = other.is_deepspeed_available
    real = getattr(original, "__wrapped__", original)

    def probe() -> bool:
        return "deepspeed" in sys.modules and real()

    probe.__wrapped__ = real  # type: ignore[attr-defined]
    other.is_deepspeed_available = probe
    try:
        yield
    finally:
        other.is_deepspeed_available = original


def save_pretrained(model: Any, target: Path) -> None:
    """`model.save_pretrained` as safetensors, without importing DeepSpeed for it."""
    with _deepspeed_probe_only_once_imported():
        model.save_pretrained(target, safe_serialization=True)


def save_hf(model: Any, tokenizer: Any, target: Path) -> Path:
    """Save a plain HF model + tokenizer as a loadable directory, atomically (safetensors)."""
    from sftmix_ray.io_utils import fresh_tmp_dir, replace_dir

    tmp = fresh_tmp_dir(Path(target))
    save_pretrained(model, tmp)
    if tokenizer is not None:
        if not tokenizer.chat_template:  # the template it was trained with goes along
            tokenizer.chat_template = chat_template_of(tokenizer)
        tokenizer.save_pretrained(tmp)
    replace_dir(tmp, Path(target))
    return Path(target)
