"""LoRA adapters through peft: wrap a model for training, and export the adapter and the merged
model from the gathered weights.

The wrapped model stays a causal LM with the same decoder and head (peft swaps the target
linear layers for LoRA layers in place), so `CausalLMWithLoss`, the Mixup term and every
strategy work on it unchanged; only the adapter's parameters require gradients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sftmix_ray.config import LoraConfig
from sftmix_ray.extras import require

ADAPTER_CONFIG = "adapter_config.json"


def peft_config(lora: LoraConfig) -> Any:
    """peft's `LoraConfig` for our settings."""
    peft = require("peft", "train.lora.r > 0 (LoRA)")
    targets: str | list[str] = lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft's own spelling: every linear layer but the output head
    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model: nn.Module, lora: LoraConfig, seed: int) -> nn.Module:
    """`model` with LoRA adapters; the base weights frozen.

    The adapters' random init (A; B starts at zero) is drawn from `seed` alone, so every rank,
    worker count and strategy starts from the same adapter whatever else used the RNG before.
    """
    peft = require("peft", "train.lora.r > 0 (LoRA)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, peft_config(lora))


def quantized_base_kwargs(lora: LoraConfig) -> dict[str, Any]:
    """`from_pretrained` keyword arguments of a QLoRA base (4-bit NF4, bf16 compute)."""
    if not lora.load_in_4bit:
        return {}
    require("bitsandbytes", "train.lora.load_in_4bit (QLoRA)")
    if not torch.cuda.is_available():
        raise RuntimeError("train.lora.load_in_4bit (QLoRA) needs a CUDA GPU on every worker")
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    }


def frozen_names(module: nn.Module) -> set[str]:
    """Names of the parameters that do not train (a LoRA run's base weights)."""
    return {name for name, p in module.named_parameters() if not p.requires_grad}


def save_adapter(peft_model: Any, tokenizer: Any, base: str, target: Path) -> Path:
    """The adapter (and the tokenizer) as a directory `PeftModel.from_pretrained` loads over
    `base` (a model id or directory), written atomically."""
    from sftmix_ray.modeling import save_hf

    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base
    return save_hf(peft_model, tokenizer, Path(target))  # peft saves only the adapter


def is_adapter_dir(path: Path) -> bool:
    """An adapter directory (as `save_adapter` writes) without a full model."""
    return (path / ADAPTER_CONFIG).exists() and not (path / "config.json").exists()


def load_with_adapter(adapter_dir: Path, base: str | None, **load_kwargs: Any) -> nn.Module:
    """The base model with the adapter merged in (for inference): `base`, else the base the
    adapter names."""
    import json

    from sftmix_ray.modeling import load_model

    peft = require("peft", f"loading the LoRA adapter {adapter_dir}")
    recorded = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    model = load_model(base or recorded["base_model_name_or_path"], **load_kwargs)
    return peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
