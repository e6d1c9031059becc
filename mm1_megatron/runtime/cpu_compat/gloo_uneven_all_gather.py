"""``torch.distributed.all_gather`` with uneven sizes on gloo -> pad, gather, slice.

Breaks (Megatron-Core 0.16.1): ``tensor_parallel.mappings._gather_along_first_dim`` with
``output_split_sizes`` (``gather_from_sequence_parallel_region`` in the MoE all-to-all
dispatcher with TP>1 and sequence parallelism) splits its output by those sizes and calls
``torch.distributed.all_gather(output_tensor_list, input_)`` on tensors of different
first-dim sizes; NCCL allows that, gloo does not.
Error: ``RuntimeError: ProcessGroupGloo::allgather: invalid tensor size``.
Applies when: no CUDA (``Backends.cuda_available`` is False; the process groups are gloo).
Redirect: pad every piece to the largest first dim, gather, copy each rank's true rows
back into the caller's output views: the same result NCCL produces. Only uneven gathers
on gloo groups are touched; everything else goes to the original function.
Drop when: ``_gather_along_first_dim(output_split_sizes=...)`` stops all-gathering
unequal tensors (e.g. pads itself or uses an all-to-all), or torch's gloo backend
supports uneven ``allgather``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ._registry import _once


class _CompletedWork:
    """What ``all_gather(async_op=True)`` returns when we did the work synchronously."""

    def wait(self, timeout: Any = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


@_once
def patch_gloo_uneven_all_gather() -> None:
    """``torch.distributed.all_gather`` with uneven sizes on gloo -> pad, gather, slice
    (see the module docstring)."""
    import torch.distributed as dist

    original = dist.all_gather

    @functools.wraps(original)
    def all_gather(tensor_list: list, tensor: torch.Tensor, group: Any = None,
                   async_op: bool = False) -> Any:
        rows = [t.shape[0] if t.dim() else -1 for t in tensor_list]
        uneven = tensor.dim() > 0 and len(set(rows)) > 1 and min(rows) >= 0 and all(
            t.shape[1:] == tensor.shape[1:] for t in tensor_list)
        if not uneven or dist.get_backend(group) != "gloo":
            return original(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(rows)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in tensor_list]
        original(pieces, padded, group=group)
        for out, piece, n in zip(tensor_list, pieces, rows, strict=True):
            out.copy_(piece[:n])
        return _CompletedWork() if async_op else None

    dist.all_gather = all_gather
