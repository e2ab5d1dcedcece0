"""Chunked soft-target cross-entropy: the one kernel behind NTP, Mixup and the scorer."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

# fp32 logits per loss chunk when no fixed chunk size is given: 261 positions at Llama-3's
# 128256-row vocabulary, 1024 at Mistral's 32768 (each chunk's logits, and in backward their
# gradient, exist once at a time).
DEFAULT_CHUNK_MB = 128.0
# Vocabulary rows per block of a linear head's backward (see `_LinearSoftCE`): its fp32
# weight-gradient buffer is `VOCAB_BLOCK x d`.
VOCAB_BLOCK = 16384


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


@dataclass(frozen=True)
class LogitTransform:
    """What some models apply to the head's output before their loss: a scale (Cohere,
    Granite) and a soft-cap (Gemma 2/3)."""

    scale: float = 1.0
    softcap: float | None = None


@dataclass(frozen=True)
class LinearHead:
    """An LM head that is a plain linear map plus a logit transform: the loss reads its weight
    and runs the matmuls itself (`_LinearSoftCE`) instead of calling the module per chunk."""

    weight: Tensor
    bias: Tensor | None = None
    transform: LogitTransform = LogitTransform()


def has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks of its own besides `forward` (an accelerate
    device hook, a DeepSpeed gather): then the loss must call the module, not read its weight."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_hf_hook", None) is not None
    )


def linear_head(lm_head: nn.Module) -> LinearHead | None:
    """The head's weight, bias and transform when it is a plain `nn.Linear` (an object with a
    `linear_head()` method answers for itself); None for anything else (a LoRA-wrapped or
    quantized head, a subclass, a head with hooks), which the loss then calls as a module."""
    own = getattr(type(lm_head), "linear_head", None)  # a method, never a child module
    if callable(own):
        found: LinearHead | None = own(lm_head)
        return found
    if type(lm_head) is nn.Linear and not has_hooks(lm_head):
        return LinearHead(lm_head.weight, lm_head.bias)
    return None


def _soft_ce(logits: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """`(loss, lse)`: `sum_k w[:, k] * (lse(z) - z[t[:, k]])` per row of fp32 logits."""
    lse = torch.logsumexp(logits, dim=-1)
    return (weights * (lse.unsqueeze(1) - logits.gather(1, targets))).sum(dim=1), lse


def _soft_ce_grad(
    logits: Tensor, lse: Tensor, targets: Tensor, weights: Tensor, grad: Tensor, v0: int = 0
) -> Tensor:
    """d loss / d logits, built in place of `logits` (fp32, `[c, V']`, the vocabulary's
    columns `v0:v0+V'`): `softmax(z) * sum_k w_k - sum_k w_k * onehot(t_k)`, times the upstream
    `grad`; targets outside those columns add nothing.

    Autograd's own graph for the formula would hold about four `[c, V']` temporaries (softmax,
    its product with the gradient, the gather's scatter, their sum)."""
    width = logits.shape[1]
    grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax
    grad_logits.mul_((grad * weights.sum(dim=1)).unsqueeze(1))
    one_hot = -(grad.unsqueeze(1) * weights)
    inside = (targets >= v0) & (targets < v0 + width)
    # scatter_add_ also sums the two terms when both targets are the same token.
    grad_logits.scatter_add_(1, (targets - v0).clamp(0, width - 1), one_hot * inside)
    return grad_logits


class _SoftCrossEntropy(torch.autograd.Function):
    """`_soft_ce` on given logits, with the in-place backward of `_soft_ce_grad`."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
        loss, lse = _soft_ce(logits, targets, weights)
        ctx.save_for_backward(logits, lse, targets, weights)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, lse, targets, weights = ctx.saved_tensors
        # A copy: the head's last op may have kept these logits for its own backward.
        return _soft_ce_grad(logits.clone(), lse, targets, weights, grad), None, None


def _chunk_soft_ce(hidden: Tensor, targets: Tensor, weights: Tensor, lm_head: nn.Module) -> Tensor:
    """Per-row `sum_k w[:, k] * (lse(z) - z[targets[:, k]])` for one chunk of rows."""
    # Upcast before the log-sum-exp: bf16 logits lose the small differences that matter here.
    logits = lm_head(hidden).float()
    return _SoftCrossEntropy.apply(logits, targets, weights)


def _transformed(raw: Tensor, head: LogitTransform) -> tuple[Tensor, Tensor | None]:
    """fp32 logits from the head's raw output, and `tanh` of the soft-cap when there is one."""
    logits = raw.float()
    if head.scale != 1.0:
        logits = logits * head.scale
    if head.softcap is None:
        return logits, None
    capped = (logits / head.softcap).tanh_()
    return capped * head.softcap, capped


@dataclass(frozen=True)
class _Tiles:
    """How `_LinearSoftCE` cuts `[N, V]` logits: position tiles of `rows`, vocabulary blocks
    of `block`; forward and backward compute exactly the same tiles, so backward's logits are
    bit for bit those forward's log-sum-exp saw. One tile holds what one `chunk`-position
    slice of the whole vocabulary would (the caller's memory budget)."""

    n: int
    vocab: int
    rows: int
    block: int

    @classmethod
    def of(cls, n: int, vocab: int, chunk: int) -> _Tiles:
        blocks = -(-vocab // max(1, min(vocab, VOCAB_BLOCK)))
        block = -(-vocab // blocks)  # equal blocks, the last one shorter
        return cls(n, vocab, max(1, chunk * vocab // block), block)

    def positions(self) -> range:
        return range(0, self.n, self.rows)

    def blocks(self) -> range:
        return range(0, self.vocab, self.block)


def _compute_dtype(device_type: str, weight: Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's when it is on for this device (DDP's
    bf16 over fp32 parameters), else the weight's own (bf16 under FSDP2's param policy and
    DeepSpeed bf16)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast off (the inputs are cast explicitly), where the device has autocast."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _tile_logits(
    h: Tensor, weight: Tensor, bias: Tensor | None, v0: int, tiles: _Tiles, head: LogitTransform
) -> tuple[Tensor, Tensor | None]:
    """fp32 logits of one tile (inputs already in the compute dtype) and the soft-cap's
    `tanh`. Forward and backward both come here, with the same shapes."""
    v1 = v0 + tiles.block
    raw = F.linear(h, weight[v0:v1], None if bias is None else bias[v0:v1])
    return _transformed(raw, head)


def _linear_soft_ce(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    weights: Tensor,
    tiles: _Tiles,
    head: LogitTransform,
) -> tuple[Tensor, Tensor, torch.dtype]:
    """Per-row soft cross-entropy of a linear head, tile by tile: `(loss, lse, compute dtype)`.
    The log-sum-exp over the vocabulary runs across its blocks; each target's logit is read
    from the block that holds it."""
    device_type = hidden.device.type
    dtype = _compute_dtype(device_type, weight)
    w, h_all = weight.to(dtype), hidden.to(dtype)
    b = None if bias is None else bias.to(dtype)
    loss = hidden.new_empty(tiles.n, dtype=torch.float32)
    lse_all = hidden.new_empty(tiles.n, dtype=torch.float32)
    with _no_autocast(device_type):
        for p0 in tiles.positions():
            p1 = p0 + tiles.rows
            h, t = h_all[p0:p1], targets[p0:p1]
            lse = torch.full((h.shape[0],), float("-inf"), device=h.device)
            picked = torch.zeros(t.shape, dtype=torch.float32, device=h.device)
            for v0 in tiles.blocks():
                logits, _ = _tile_logits(h, w, b, v0, tiles, head)
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
                inside = (t >= v0) & (t < v0 + logits.shape[1])
                local = (t - v0).clamp(0, logits.shape[1] - 1)
                picked = torch.where(inside, logits.gather(1, local), picked)
            loss[p0:p1] = (weights[p0:p1] * (lse.unsqueeze(1) - picked)).sum(dim=1)
            lse_all[p0:p1] = lse
    return loss, lse_all, dtype


class _LinearSoftCE(torch.autograd.Function):
    """The soft cross-entropy of `hidden @ weight.T (+ bias)`, in tiles of positions x
    vocabulary, whose backward sums the weight's gradient in fp32, one vocabulary block at a
    time.

    Calling the head module once per position chunk (the fallback for other heads) lets
    autograd add the chunks' weight gradients in the weight's dtype: in bf16, 64 chunks lost
    ~4x the precision of one matmul. Here backward walks the vocabulary block by block; each
    block's weight gradient is summed over all position tiles in an fp32 `[block, d]` buffer
    (16384 x 4096 x 4 = 268 MB at most) and written once, and the hidden states' gradient
    is summed over the blocks in fp32 `[N, d]`. Nothing of the size of the whole head is
    allocated beyond the weight's gradient itself. The logits are recomputed in the dtype
    forward used (bf16 under FSDP2's param policy, DeepSpeed bf16 or autocast), never kept.
    """

    @staticmethod
    def forward(ctx: Any, *parts: Any) -> Tensor:  # the arguments of `_linear_soft_ce`
        loss, lse, compute_dtype = _linear_soft_ce(*parts)
        hidden, weight, bias, targets, weights, tiles, head = parts
        ctx.save_for_backward(hidden, weight, bias, targets, weights, lse)
        ctx.tiles, ctx.head, ctx.compute_dtype = tiles, head, compute_dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, weights, lse = ctx.saved_tensors
        tiles, head, dtype = ctx.tiles, ctx.head, ctx.compute_dtype
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        w, h_all = weight.to(dtype), hidden.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.empty_like(bias) if need_bias else None
        device = w.device
        with _no_autocast(hidden.device.type):
            for v0 in tiles.blocks():
                v1 = min(v0 + tiles.block, tiles.vocab)
                block_weight = block_bias = None
                if grad_weight is not None:
                    block_weight = torch.zeros((v1 - v0, w.shape[1]), device=device)
                if grad_bias is not None:
                    block_bias = torch.zeros(v1 - v0, device=device)
                for p0 in tiles.positions():
                    p1 = p0 + tiles.rows
                    h, t = h_all[p0:p1], targets[p0:p1]
                    logits, capped = _tile_logits(h, w, b, v0, tiles, head)
                    g = _soft_ce_grad(logits, lse[p0:p1], t, weights[p0:p1], grad[p0:p1], v0)
                    if capped is not None:  # d(c * tanh(x / c)) / dx = 1 - tanh^2
                        g.mul_(1.0 - capped.square_())
                    if head.scale != 1.0:
                        g.mul_(head.scale)
                    if block_bias is not None:
                        block_bias.add_(g.sum(dim=0))
                    g16 = g.to(dtype)
                    del g, logits, capped
                    # Each product is rounded to the compute dtype once, then summed in fp32
                    # in place (no fp32 copy of it).
                    grad_hidden[p0:p1].add_(g16 @ w[v0:v1])
                    if block_weight is not None:
                        block_weight.add_(g16.t() @ h)
                if grad_weight is not None and block_weight is not None:
                    grad_weight[v0:v1] = block_weight
                if grad_bias is not None and block_bias is not None:
                    grad_bias[v0:v1] = block_bias
        return (
            grad_hidden.to(hidden.dtype) if need_hidden else None,
            grad_weight, grad_bias, None, None, None, None,
        )  # fmt: skip


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

    linear = linear_head(lm_head)
    if linear is not None:  # the matmuls here, the weight's gradient summed in fp32
        tiles = _Tiles.of(n_positions, linear.weight.shape[0], chunk_size)
        parts = (hidden, linear.weight, linear.bias, targets, weights, tiles, linear.transform)
        if torch.is_grad_enabled():
            return _LinearSoftCE.apply(*parts)
        return _linear_soft_ce(*parts)[0]
    # Any other head is called as a module; each chunk's logits are recomputed in backward
    # rather than kept: memory O(chunk x V).
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
