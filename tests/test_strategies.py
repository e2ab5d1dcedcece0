"""Strategy checkpoints on one process (no process group): what DDP saves and restores."""

from __future__ import annotations

from pathlib import Path

import torch

from sftmix_ray.config import TrainConfig
from sftmix_ray.losses import NTPLoss
from sftmix_ray.train.forward import CausalLMWithLoss
from sftmix_ray.train.strategies import TorchStrategy


def _tied_strategy(seed: int) -> TorchStrategy:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    train = TrainConfig(learning_rate=1e-2, warmup_ratio=0.0)
    return TorchStrategy(CausalLMWithLoss(model, NTPLoss(chunk_size=4)), train, 10)


def _step(strategy: TorchStrategy) -> None:
    ids = torch.arange(12).reshape(2, 6) % 64
    labels = ids.clone()
    labels[:, :2] = -100
    loss, _ = strategy.module(ids, torch.ones_like(ids), labels, normalizers=torch.tensor([8.0]))
    strategy.backward(loss)
    strategy.step()


def _snapshot(strategy: TorchStrategy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in strategy.wrapper.state_dict().items()}


def test_ddp_saves_and_restores_a_model_with_tied_embeddings(tmp_path: Path) -> None:
    """Tied input/output embeddings are one tensor under two names; safetensors refused to
    save them ("Some tensors share memory"), so every DDP run of such a model (Llama-3.2-1B/3B,
    Qwen2.5 up to 3B, Gemma) failed at its last checkpoint. Saved once, restored under both
    names, with the tie kept; synchronously and in the background."""
    for how in ("sync", "background"):
        strategy = _tied_strategy(seed=0)
        _step(strategy)
        saved = _snapshot(strategy)
        (tmp_path / how).mkdir()
        if how == "sync":
            strategy.save(tmp_path / how)
        else:
            strategy.save_async(tmp_path / how).result(timeout=60)
        _step(strategy)
        fresh = _tied_strategy(seed=1)
        assert not torch.equal(
            _snapshot(fresh)["model.lm_head.weight"], saved["model.lm_head.weight"]
        )
        fresh.load(tmp_path / how)
        restored = _snapshot(fresh)
        assert restored.keys() == saved.keys()
        for name, value in saved.items():
            assert torch.equal(restored[name], value), (how, name)
        head, embed = (
            fresh.wrapper.model.lm_head.weight,
            fresh.wrapper.model.model.embed_tokens.weight,
        )
        assert head is embed  # still one parameter
        _step(fresh)  # and it trains on as the saving run did
        for name, value in strategy.wrapper.state_dict().items():
            assert torch.equal(fresh.wrapper.state_dict()[name], value), (how, name)
