"""The only way training code enters a collective: tensors on the process group's device.

NCCL process groups have no CPU backend (`No backend type associated with device type cpu`),
so a metric or a count built on the host must travel to the training device before it is
reduced. Every all-reduce of the loop goes through `all_reduce_sum`, which does exactly that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(
    values: torch.Tensor | Sequence[float], device: torch.device, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Sum `values` over ranks on `device` (float64 by default); the sum stays on `device`
    (read it with `.tolist()` where the host needs it: one copy, when it is needed)."""
    tensor = torch.as_tensor(values, dtype=dtype).to(device)
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
