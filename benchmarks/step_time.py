"""`sftmix_over_ntp_step_time`: one SFTMix training step against one NTP step on the same batch.

Both arms run the project's own step: `CausalLMWithLoss` (decoder body, then the chunked loss
calling the LM head as a module) under the `ddp` strategy's single-process path (`loss.backward`,
gradient clipping, AdamW, scheduler), on the same `2b` rows, with the same chunk size. Only the
loss differs: NTP over the `2b` rows, or SFTMix (NTP + `mu * L_mix` over the `b` pairs'
mixed last hidden states). One model and one optimizer serve both arms, so caches and weights
are shared; the NTP arm passes `loss=NTPLoss` to the wrapper as held-out evaluation does.

The model is Llama-style with GQA, its vocabulary sized so the LM head's share of forward FLOPs
at this sequence length equals Llama-3-8B's at 2048 tokens (about 7%): the extra cost of SFTMix
is LM-head work, so its relative size is what makes the ratio mean something.
Steps run A B A B ... A (A = NTP); each B is compared with the mean of its two neighbouring As,
which cancels a linear drift of the machine's speed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import seeded_llama

from sftmix_ray.config import TrainConfig
from sftmix_ray.losses import NTPLoss, SFTMixLoss
from sftmix_ray.train.forward import CausalLMWithLoss
from sftmix_ray.train.strategies import build_strategy

# Llama-3-8B: hidden, layers, MLP width, query heads, key/value heads, vocabulary.
LLAMA3_8B = {"hidden": 4096, "layers": 32, "ffn": 14336, "heads": 32, "kv_heads": 8}
LLAMA3_8B_VOCAB, LLAMA3_8B_SEQ = 128256, 2048
BODY = {"hidden": 512, "layers": 8, "ffn": 1376, "heads": 8, "kv_heads": 2}
SETTINGS = {
    "quick": {"pairs": 2, "seq_len": 256, "warmup": 1, "repeats": 6},
    "full": {"pairs": 4, "seq_len": 256, "warmup": 2, "repeats": 12},
}
CHUNK, MU, ALPHA = 1024, 0.2, 0.5


def body_flops_per_token(body: dict[str, int], seq_len: int) -> float:
    """Forward FLOPs per token of the decoder layers (projections, MLP, causal attention)."""
    d, head_dim = body["hidden"], body["hidden"] // body["heads"]
    projections = 2 * (2 * d * d + 2 * d * body["kv_heads"] * head_dim)  # q, o; k, v
    mlp = 2 * 3 * d * body["ffn"]  # gate, up, down
    # QK^T and AV over the causal context, (seq_len + 1) / 2 keys per query on average.
    attention = 2 * 2 * d * (seq_len + 1) / 2
    return body["layers"] * (projections + mlp + attention)


def head_share(body: dict[str, int], vocab: int, seq_len: int) -> float:
    """The LM head's share of forward FLOPs per token (embeddings and norms ignored)."""
    head = 2 * body["hidden"] * vocab
    return head / (head + body_flops_per_token(body, seq_len))


def vocab_for_share(body: dict[str, int], share: float, seq_len: int) -> int:
    """A vocabulary (multiple of 64) that gives the LM head `share` of forward FLOPs."""
    head = share / (1 - share) * body_flops_per_token(body, seq_len)
    return round(head / (2 * body["hidden"]) / 64) * 64


def theoretical_ratio(body: dict[str, int], vocab: int, seq_len: int) -> float:
    """SFTMix step FLOPs over NTP step FLOPs, every position a response token.

    The body costs 3 forwards (forward, backward to inputs and to weights). The chunked loss
    costs the head 4: forward, the recomputed forward in backward, and the two backward
    matmuls. SFTMix adds the head over `b` mixed rows to NTP's head over `2b` rows.
    """
    body_cost = 3 * body_flops_per_token(body, seq_len) * seq_len
    head_cost = 4 * 2 * body["hidden"] * vocab * (seq_len - 1)
    return (body_cost + 1.5 * head_cost) / (body_cost + head_cost)


def build(vocab: int, seq_len: int) -> tuple[Any, dict[str, Any]]:
    """The training strategy around a seeded Llama-style model, and the model's config."""
    model = seeded_llama(vocab, seq_len=seq_len, **BODY)
    wrapper = CausalLMWithLoss(model, SFTMixLoss(ALPHA, MU, chunk_size=CHUNK))
    train = TrainConfig(learning_rate=1e-5, warmup_ratio=0.0, lr_scheduler_type="constant")
    return build_strategy("ddp", wrapper, train, total_steps=1_000_000), model.config.to_dict()


def measure(mode: str, repeats: int | None = None) -> dict[str, dict[str, Any]]:
    """The step-time ratio's runs, settings and details."""
    settings = {**SETTINGS[mode], **({"repeats": repeats} if repeats else {})}
    pairs, seq_len = settings["pairs"], settings["seq_len"]
    reference = head_share(LLAMA3_8B, LLAMA3_8B_VOCAB, LLAMA3_8B_SEQ)
    vocab = vocab_for_share(BODY, reference, seq_len)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    strategy, model_config = build(vocab, seq_len)
    sftmix, ntp = strategy.wrapper.loss, NTPLoss(chunk_size=CHUNK)

    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (2 * pairs, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()  # every position a response token: the head's largest share

    def step(mixup: bool, index: int) -> float:
        start = time.perf_counter()
        lam = sftmix.sample_lambda(pairs, seed=0, step=index, rank=0) if mixup else None
        loss_fn = sftmix if mixup else ntp
        loss, _ = strategy.module(
            input_ids,
            attention_mask,
            labels,
            lam=lam,
            normalizers=loss_fn.normalizer_counts(labels, lam),
            loss=loss_fn,
        )
        strategy.backward(loss)
        strategy.step()
        return time.perf_counter() - start

    for i in range(settings["warmup"]):
        step(False, i)
        step(True, i)
    ntp_s = [step(False, 0)]
    sftmix_s = []
    for i in range(settings["repeats"]):
        sftmix_s.append(step(True, i))
        ntp_s.append(step(False, i))
        print(f"  step {i}: ntp {ntp_s[-2]:.3f}s sftmix {sftmix_s[-1]:.3f}s", flush=True)
    runs = [b / ((a0 + a1) / 2) for b, a0, a1 in zip(sftmix_s, ntp_s, ntp_s[1:])]
    return {
        "sftmix_over_ntp_step_time": {
            "runs": runs,
            "settings": {
                **settings,
                "rows": 2 * pairs,
                "tokens_per_step": 2 * pairs * seq_len,
                "vocab": vocab,
                **{f"model_{k}": v for k, v in BODY.items()},
                "chunk_size": CHUNK,
                "mixup_mu": MU,
                "mixup_alpha": ALPHA,
                "torch_threads": threads,
                "dtype": "float32",
                "labels": "every position (no prompt masking)",
                "step": "CausalLMWithLoss forward + loss, backward, clip, AdamW, scheduler",
            },
            "details": {
                "lm_head_share_of_forward_flops": head_share(BODY, vocab, seq_len),
                "llama3_8b_lm_head_share_at_2048": reference,
                "theoretical_flop_ratio": theoretical_ratio(BODY, vocab, seq_len),
                "ntp_step_s": ntp_s,
                "sftmix_step_s": sftmix_s,
                "model_config": model_config,
            },
        }
    }
