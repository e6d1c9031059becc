"""The training device and moving batches onto it.

On a GPU node that is the local CUDA device; without CUDA it is the device that stands in for
it (the host, or `meta` during a device audit, see `cpu_compat.device_audit`). Megatron-LM
moves the model onto the device before wrapping it in DDP and every batch before its forward;
so do we, with the same code on every machine.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from mm1_megatron.runtime.cpu_compat import stand_in_device


def training_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return stand_in_device()


def comm_device() -> torch.device:
    """Where the small tensors of our own collectives (flags, loss sums, counts) live: the GPU
    under NCCL, which takes no host tensors; the host under gloo (meta in a device audit)."""
    return training_device()


def pin_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Page-locked copies of a batch's tensors (in the prefetch thread), so the copy to the GPU
    runs asynchronously; a no-op without CUDA."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.pin_memory() if torch.is_tensor(v) and v.device.type == "cpu" else v
            for k, v in batch.items()}


def to_device(batch: dict[str, Any], device: Optional[torch.device] = None) -> dict[str, Any]:
    """The batch's tensors on `device` (default: the training device); other values (sample
    ids, counts) as they are. Copies from pinned memory do not block the host."""
    device = training_device() if device is None else device
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}
