"""Chunked soft-target cross-entropy: the one kernel behind NTP, Mixup and the scorer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# fp32 logits per loss chunk when no fixed chunk size is given: 261 positions at Llama-3's
# 128256-row vocabulary, 1024 at Mistral's 32768 (each chunk's logits, and in backward their
# gradient, exist once at a time).
DEFAULT_CHUNK_MB = 128.0


def head_vocab(lm_head: nn.Module) -> int:
    """The number of logits an LM head produces (its full size also when sharded)."""
    head = getattr(lm_head, "lm_head", lm_head)  # a head with a logit transform wraps it
    out_features = getattr(head, "out_features", None)
    if isinstance(out_features, int):
        return out_features
    weight: Any = head.weight
    shape = getattr(weight, "ds_shape", None) or weight.shape  # ZeRO-3 keeps the full shape
    return int(shape[0])


def chunk_positions(chunk_size: int, chunk_mb: float, vocab: int) -> int:
    """Positions per chunk: `chunk_size` when > 0, else as many as `chunk_mb` of fp32 logits
    of `vocab` entries hold (at least 1)."""
    if chunk_size > 0:
        return chunk_size
    return max(1, int(chunk_mb * 1024 * 1024 // (4 * vocab)))


class _SoftCrossEntropy(torch.autograd.Function):
    """`sum_k w[:, k] * (lse(z) - z[t[:, k]])` per row, with a backward that allocates one `[c, V]`.

    Autograd's own graph for this formula would hold about four `[chunk, V]` temporaries in
    backward (softmax, its product with the gradient, the gather's scatter, their sum); this
    builds the logit gradient `softmax(z) * sum_k w_k - sum_k w_k * onehot(t_k)` in place.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        loss = (weights * (lse.unsqueeze(1) - logits.gather(1, targets))).sum(dim=1)
        ctx.save_for_backward(logits, lse, targets, weights)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, lse, targets, weights = ctx.saved_tensors
        grad_logits = (logits - lse.unsqueeze(1)).exp_()  # softmax, one [c, V] allocation
        grad_logits.mul_((grad * weights.sum(dim=1)).unsqueeze(1))
        # scatter_add_ also sums the two terms when both targets are the same token.
        grad_logits.scatter_add_(1, targets, -(grad.unsqueeze(1) * weights))
        return grad_logits, None, None


def _chunk_soft_ce(hidden: Tensor, targets: Tensor, weights: Tensor, lm_head: nn.Module) -> Tensor:
    """Per-row `sum_k w[:, k] * (lse(z) - z[targets[:, k]])` for one chunk of rows."""
    # Upcast before the log-sum-exp: bf16 logits lose the small differences that matter here.
    logits = lm_head(hidden).float()
    return _SoftCrossEntropy.apply(logits, targets, weights)


def chunked_soft_ce(
    hidden: Tensor,
    lm_head: nn.Module,
    targets: Tensor,
    weights: Tensor,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted multi-target cross-entropy per position, `[N]` fp32, never holding `N x V` logits.

    `hidden` is `[N, d]`, `targets` `[N, K]` token ids, `weights` `[N, K]`; position `n` costs
    `sum_k weights[n, k] * (logsumexp(z_n) - z_n[targets[n, k]])` with `z_n = lm_head(hidden[n])`.
    A zero-weight target is never read for its value and may be anything, `-100` included.
    Nothing here waits for the device: the chunking follows `N`, a shape (callers pass only
    the positions they score, selected with indices built on the host).
    """
    if hidden.dim() != 2 or targets.dim() != 2 or targets.shape != weights.shape:
        raise ValueError(
            f"chunked_soft_ce wants hidden [N, d], targets and weights [N, K]; got "
            f"{tuple(hidden.shape)}, {tuple(targets.shape)}, {tuple(weights.shape)}"
        )
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {targets.shape[0]} target rows")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_positions = hidden.shape[0]
    weights = weights.to(device=hidden.device, dtype=torch.float32)
    targets = targets.to(hidden.device)
    if n_positions == 0:
        # Keep a (zero) gradient path through the LM head and the hidden states, so every
        # parameter still gets a gradient and DDP/FSDP reductions stay in step across ranks.
        zero = lm_head(hidden[:0]).float().sum() * 0.0
        return hidden.new_zeros(0, dtype=torch.float32) + zero
    # A zero-weight target is never read for its value; clamp it so -100 cannot index.
    targets = torch.where(weights != 0, targets, torch.zeros_like(targets))

    # Recompute each chunk's logits in backward rather than keep them: memory O(chunk x V).
    recompute = torch.is_grad_enabled()
    pieces = []
    for start in range(0, n_positions, chunk_size):
        args = (
            hidden[start : start + chunk_size],
            targets[start : start + chunk_size],
            weights[start : start + chunk_size],
            lm_head,
        )
        if recompute:
            piece = checkpoint(_chunk_soft_ce, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            piece = _chunk_soft_ce(*args)
        pieces.append(piece)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
