"""Per-GPU memory of a training recipe, computed from the model's config (no GPU, no weights).

    python benchmarks/memory_model.py --config configs/llama31_8b_alpaca.yaml --gpus 8 --gpu-gib 80
    python benchmarks/memory_model.py --model llama3-8b --strategy fsdp --gpus 8 --rows 4 --seq 2048

Counts, per GPU, in bytes: the sharded fp32 master weights, their fp32 gradients and AdamW's two
fp32 moments (FSDP2 and ZeRO-3 shard all three over the world; DDP keeps them whole; LoRA trains
only the adapters), the bf16 copies of the layers being gathered (FSDP2 holds the root unit,
embeddings and LM head, gathered through the whole forward and backward, and one decoder layer
plus the next one prefetched), the activations kept for backward (every layer's, or with
gradient checkpointing each layer's input plus one layer recomputed), the loss's logit chunk
(its fp32 logits and their gradient), the loss's fp32 sum of one vocabulary block of the LM
head's weight gradient, and a fixed allowance for the CUDA context, NCCL buffers and the
allocator's slack. Activations assume a fused attention kernel (FlashAttention / SDPA: no
`s x s` score matrix kept) and Llama-style blocks (RMSNorm, GQA attention, SwiGLU MLP).

It is an estimate: `tests/test_benchmarks.py` checks its parameter count against the real model
and its activation bytes against the tensors autograd actually saves, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
OVERHEAD_BYTES = 3 * GIB  # CUDA context, NCCL buffers, allocator fragmentation (a rule of thumb)
VOCAB_BLOCK = 16384  # sftmix_ray.loss_kernels.VOCAB_BLOCK

# Architectures of the recipes' models (their config.json values), usable without a download.
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "tie_word_embeddings": False},
    "mistral-7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768,
                   "tie_word_embeddings": False},
    "qwen2.5-14b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
                    "tie_word_embeddings": False, "attention_bias": True},
}  # fmt: skip
MODEL_PRESET = {  # model ids of the recipes -> preset
    "meta-llama/Llama-3.1-8B": "llama3-8b",
    "mistralai/Mistral-7B-v0.3": "mistral-7b",
    "Qwen/Qwen2.5-14B": "qwen2.5-14b",
}


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Arch:
        heads = int(config["num_attention_heads"])
        return cls(
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", False)),
        )

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def layer_params(self) -> int:
        """One decoder layer: q, k, v, o projections, gate/up/down, two RMSNorm weights."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        attention = h * h + 2 * h * kv + h * h + (h + 2 * kv if self.qkv_bias else 0)
        return attention + 3 * h * i + 2 * h

    def root_params(self) -> int:
        """Embeddings, final norm and LM head (FSDP2's root unit)."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()

    def lora_params(self, r: int) -> int:
        """LoRA on every linear layer of the blocks (`all-linear`): r x (in + out) each."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
        return self.layers * sum(r * (a + b) for a, b in shapes)

    def activation_elements_per_token(self) -> int:
        """Elements one layer keeps for backward per token (fused attention): the two norms'
        inputs and outputs, q/k/v before and after RoPE, the attention output, the MLP's gate,
        up, activation and product."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        norms = 4 * h
        attention = (h + 2 * kv) * 2 + h  # q, k, v (and rotated q, k; v kept once more)
        mlp = 4 * i
        return norms + attention + mlp


@dataclass(frozen=True)
class Recipe:
    strategy: str  # ddp, fsdp, zero3, zero2
    gpus: int
    rows: int  # rows per GPU per micro-batch
    seq: int
    bf16: bool = True
    checkpointing: bool = True
    chunk_positions: int = 0  # 0: from chunk_mb
    chunk_mb: float = 128.0
    lora_r: int = 0


def estimate(arch: Arch, recipe: Recipe) -> dict[str, float]:
    """Bytes per GPU by part, and their total."""
    world = recipe.gpus
    sharded = recipe.strategy in ("fsdp", "zero3")
    total_params = arch.params()
    trained = arch.lora_params(recipe.lora_r) if recipe.lora_r else total_params
    compute_bytes = 2 if recipe.bf16 else 4
    parts: dict[str, float] = {}
    # fp32 master weights (frozen base included: LoRA keeps the base in fp32 too).
    parts["weights_fp32"] = (
        4 * (total_params + (trained if recipe.lora_r else 0)) / (world if sharded else 1)
    )
    grads_shard = world if sharded or recipe.strategy == "zero2" else 1
    parts["gradients_fp32"] = 4 * trained / grads_shard
    parts["adam_moments_fp32"] = 8 * trained / (world if recipe.strategy != "ddp" else 1)
    if recipe.strategy == "fsdp":
        # The root unit stays gathered (bf16) through forward and backward, and its gradient
        # is unsharded fp32 until its reduce-scatter; one layer plus the prefetched next.
        parts["gathered_bf16"] = compute_bytes * (arch.root_params() + 2 * arch.layer_params())
        if not recipe.lora_r:
            parts["unsharded_root_grad_fp32"] = 4 * arch.root_params()
    elif recipe.strategy == "zero3":
        parts["gathered_bf16"] = compute_bytes * (arch.root_params() / 2 + 2 * arch.layer_params())
    tokens = recipe.rows * recipe.seq
    per_layer = arch.activation_elements_per_token() * tokens * compute_bytes
    if recipe.checkpointing:
        kept = arch.layers * arch.hidden * tokens * compute_bytes + per_layer
    else:
        kept = arch.layers * per_layer
    parts["activations"] = kept
    parts["final_hidden_fp32"] = 2 * 4 * tokens * arch.hidden  # and its gradient
    chunk = chunk_positions(recipe, arch.vocab)
    parts["loss_chunk_fp32"] = 2 * 4 * min(chunk, tokens) * arch.vocab  # logits + their grad
    if not recipe.lora_r:
        # The loss sums the head's weight gradient in fp32, one vocabulary block at a time.
        parts["head_grad_fp32"] = 4 * min(arch.vocab, VOCAB_BLOCK) * arch.hidden
    parts["overhead"] = OVERHEAD_BYTES
    parts["total"] = sum(parts.values())
    return parts


def chunk_positions(recipe: Recipe, vocab: int) -> int:
    """Positions per loss chunk: fixed, or as many fp32 logit rows as `chunk_mb` holds (what
    `train.loss_chunk_size` / `train.loss_chunk_mb` give the loss)."""
    if recipe.chunk_positions:
        return recipe.chunk_positions
    return max(1, int(recipe.chunk_mb * 1024**2 // (4 * vocab)))


def arch_for(model: str, config_path: str | None = None) -> Arch:
    """A preset name, a recipe's model id, or a `config.json` path."""
    if config_path:
        return Arch.from_config(json.loads(Path(config_path).read_text()))
    name = MODEL_PRESET.get(model, model)
    if name in PRESETS:
        return Arch.from_config(PRESETS[name])
    path = Path(model) / "config.json"
    if path.exists():
        return Arch.from_config(json.loads(path.read_text()))
    raise SystemExit(f"unknown model {model!r}: a preset ({', '.join(PRESETS)}) or a directory")


def recipe_from_config(path: str, gpus: int) -> tuple[str, Recipe]:
    """The model and per-GPU recipe of one of `configs/*.yaml`."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sftmix_ray.config import load_config

    cfg = load_config(path)
    train = cfg.train
    strategy = train.strategy
    if strategy == "deepspeed":
        strategy = f"zero{train.deepspeed_stage}"
    recipe = Recipe(
        strategy=strategy, gpus=gpus, rows=train.per_device_train_batch_size,
        seq=cfg.data.max_length, bf16=train.bf16, checkpointing=train.gradient_checkpointing,
        chunk_positions=train.loss_chunk_size, chunk_mb=train.loss_chunk_mb,
        lora_r=train.lora.r,
    )  # fmt: skip
    return cfg.model.name_or_path, recipe


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown, GiB per GPU; `other`: the unsharded root gradient, the final hidden states and
    the fixed overhead."""
    keys = ["weights_fp32", "gradients_fp32", "adam_moments_fp32", "gathered_bf16",
            "activations", "loss_chunk_fp32", "head_grad_fp32"]  # fmt: skip
    head = "| recipe | " + " | ".join(keys) + " | other | total | fits |"
    lines = [head, "|" + "---|" * (len(keys) + 4)]
    for row in rows:
        parts = row["bytes"]
        other = parts["total"] - sum(parts.get(k, 0) for k in keys)
        gib = [f"{parts.get(k, 0) / GIB:.1f}" for k in keys] + [f"{other / GIB:.1f}"]
        total = f"**{parts['total'] / GIB:.1f}**"
        lines.append(f"| {row['name']} | " + " | ".join(gib) + f" | {total} | {row['fits']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], help="a recipe YAML (repeat)")
    parser.add_argument("--model", help="preset, model id or directory (without --config)")
    parser.add_argument("--model-config", help="a config.json (overrides --model)")
    parser.add_argument("--strategy", default="fsdp", choices=["ddp", "fsdp", "zero2", "zero3"])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gib", type=float, action="append", default=[])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--lora-r", type=int, default=0)
    parser.add_argument("--chunk-mb", type=float, default=128.0)
    parser.add_argument("--json", help="write the estimates here")
    args = parser.parse_args(argv)
    budgets = args.gpu_gib or [80.0, 24.0]
    jobs: list[tuple[str, Arch, Recipe]] = []
    for path in args.config:
        model, recipe = recipe_from_config(path, args.gpus)
        jobs.append((Path(path).stem, arch_for(model), recipe))
        if recipe.lora_r == 0:  # what LoRA would need instead
            lora = Recipe(**{**asdict(recipe), "lora_r": 16})
            jobs.append((f"{Path(path).stem} + LoRA r16", arch_for(model), lora))
    if not args.config:
        recipe = Recipe(
            strategy=args.strategy, gpus=args.gpus, rows=args.rows, seq=args.seq,
            checkpointing=not args.no_checkpointing, chunk_mb=args.chunk_mb, lora_r=args.lora_r,
        )  # fmt: skip
        jobs.append((args.model or "model", arch_for(args.model, args.model_config), recipe))
    rows = []
    for name, arch, recipe in jobs:
        parts = estimate(arch, recipe)
        fits = ", ".join(
            f"{b:g} GiB: {'yes' if parts['total'] <= b * GIB else 'no'}" for b in budgets
        )
        rows.append({"name": name, "params": arch.params(), "recipe": asdict(recipe),
                     "bytes": parts, "fits": fits})  # fmt: skip
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
