"""Padded batches of token rows, shared by training, held-out loss and evaluation."""

from __future__ import annotations

import numpy as np
import torch

from sftmix_ray.labels import IGNORE_INDEX


def collate(
    inputs: list[np.ndarray], labels: list[np.ndarray], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-pad one micro-batch to its longest row (pads are masked and ignored)."""
    length = max(len(x) for x in inputs)
    ids = np.full((len(inputs), length), pad_id, dtype=np.int64)
    labs = np.full((len(inputs), length), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(inputs), length), dtype=np.int64)
    for i, (x, y) in enumerate(zip(inputs, labels)):
        ids[i, : len(x)], labs[i, : len(y)], mask[i, : len(x)] = x, y, 1
    return {
        "input_ids": torch.from_numpy(ids).to(device),
        "attention_mask": torch.from_numpy(mask).to(device),
        # The labels stay on the host (the losses index the device's hidden states with them),
        # as do the mask's counts: read from host copies they cost no device sync.
        "labels_host": torch.from_numpy(labs),
        "attention_mask_host": torch.from_numpy(mask),
    }
