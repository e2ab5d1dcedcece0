"""Build a sharded model without a full copy on every rank: the meta device, then rank 0's
weights broadcast into the shards.

Under FSDP2 every rank builds the model on the meta device (no memory), shards it, allocates
only its own shards (`to_empty`), and receives their values from rank 0, the one rank that
reads the checkpoint: each rank gets only its own rows of each parameter (unlike
`set_model_state_dict(..., broadcast_from_rank0=True)`, which sends every rank every whole
tensor). Buffers, also those no checkpoint holds (rotary `inv_freq`), are broadcast. So a node of 8
GPUs holds one full fp32 copy in host memory (rank 0's) instead of eight, and no GPU ever
holds more than its shard: 32 GB less per GPU at 8B.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class RankZeroWeights:
    """The checkpoint's tensors on rank 0 (empty on every other rank)."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # every buffer, by name


def meta_model(
    model_path: str,
    *,
    trust_remote_code: bool,
    attn_implementation: str | None,
) -> nn.Module:
    """The model's modules and parameters on the meta device, in fp32 (the master weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftmix_ray.modeling import model_kwargs

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    kwargs = model_kwargs(trust_remote_code, torch.float32, attn_implementation)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def rank_zero_weights(model: nn.Module | None) -> RankZeroWeights:
    """What rank 0 broadcasts: a loaded model's state dict and buffers (None elsewhere)."""
    if model is None:
        return RankZeroWeights()
    return RankZeroWeights(
        state=dict(model.state_dict()), buffers=dict(model.named_buffers(remove_duplicate=False))
    )


@torch.no_grad()
def materialize_from_rank0(
    module: nn.Module, weights: RankZeroWeights, device: torch.device, prefix: str = ""
) -> None:
    """Allocate a sharded meta `module`'s own shards on `device` and fill them from rank 0.

    `prefix` is prepended to the checkpoint's names (the wrapper's `model.`). A collective:
    every rank calls it after `fully_shard`, before the optimizer is built. Rank 0 sends each
    rank only its own rows of each dim-0-sharded parameter (FSDP2's layout), so no other rank
    ever allocates a whole tensor, and rank 0 sends 1/world of the model to each rank instead
    of all of it to every rank as a broadcast would. Replicated tensors and the buffers (also
    the non-persistent ones, e.g. rotary `inv_freq`, which no checkpoint holds) are broadcast.
    """
    module.to_empty(device=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    # Each tensor once: a tied parameter (embedding and head) and a shared buffer are one.
    for name, param in module.named_parameters():
        full = _source(weights.state, name, prefix) if rank == 0 else None
        if _is_row_sharded(param):
            _scatter_rows(param, full, rank, world)
        else:
            _broadcast_into(_local(param), full, rank)
    for name, buffer in module.named_buffers():
        full = _source(weights.buffers, name, prefix) if rank == 0 else None
        _broadcast_into(buffer, full, rank)


def _source(tensors: dict[str, torch.Tensor], name: str, prefix: str) -> torch.Tensor:
    key = name.removeprefix(prefix)
    if key not in tensors:
        raise RuntimeError(f"rank 0's checkpoint has no tensor {key} for the sharded model")
    return tensors[key]


def _local(value: torch.Tensor) -> torch.Tensor:
    return value.to_local() if hasattr(value, "to_local") else value


def _is_row_sharded(value: Any) -> bool:
    """An FSDP2 parameter: a DTensor sharded along dim 0 over a 1-D mesh."""
    from torch.distributed.tensor import DTensor, Shard

    return (
        isinstance(value, DTensor)
        and value.device_mesh.ndim == 1
        and tuple(value.placements) == (Shard(0),)
    )


def _scatter_rows(param: Any, full: torch.Tensor | None, rank: int, world: int) -> None:
    """Rank r's rows of `full` (torch.chunk over dim 0, as FSDP2 shards) into its local shard.

    One `dist.scatter` of equal parts (the rows padded to `world` parts of ceil(n / world)),
    a collective on the process group's own communicator. Point-to-point sends under NCCL
    would open a communicator of its own for every (rank 0, peer) pair, kept for the whole
    run: 63 on rank 0 of a 64-GPU job, each with its own GPU buffers, where rank 0 is already
    the rank with the least to spare."""
    local = param.to_local()
    rows = param.shape[0]  # the global shape: every rank knows the part size without rank 0
    if rows == 0:
        return
    size = -(-rows // world)
    whole_part = local.shape[0] == size and local.is_contiguous()
    part = local if whole_part else local.new_empty((size, *local.shape[1:]))
    parts = None
    if rank == 0:
        assert full is not None
        if rows < size * world:  # the last parts are short or empty: pad them to `size` rows
            source = local.new_zeros((size * world, *local.shape[1:]))
            source[:rows].copy_(full.detach())
        else:
            source = full.detach().to(device=local.device, dtype=local.dtype).contiguous()
        parts = list(source.chunk(world, dim=0))
    dist.scatter(part, parts, src=0)
    if not whole_part and local.numel():
        local.copy_(part[: local.shape[0]])


def _broadcast_into(target: torch.Tensor, full: torch.Tensor | None, rank: int) -> None:
    if rank == 0:
        assert full is not None
        target.copy_(full.detach().to(target.device, target.dtype))
    dist.broadcast(target, src=0)
