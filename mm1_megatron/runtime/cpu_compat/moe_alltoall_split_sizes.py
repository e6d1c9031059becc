"""MoE all-to-all split sizes: CPU tensors -> numpy, as on GPU.

Breaks (Megatron-Core 0.16.1): ``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize``
(from ``dispatch_preprocess`` / ``dispatch_postprocess``) moves the per-rank token counts
that ``preprocess`` computed to the host with
``moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)``, which converts only CUDA
tensors (``if torch.is_tensor(tensor) and tensor.is_cuda``); on CPU they stay torch tensors
and reach ``torch.distributed.all_to_all_single(output_split_sizes=<Tensor>)``.
Error: ``TypeError: all_to_all_single(): incompatible function arguments``.
Applies when: no CUDA (``Backends.cuda_available`` is False).
Redirect: honour ``as_numpy`` for CPU tensors too, so the dispatcher gets exactly the
numpy arrays it gets on a GPU (also what its later arithmetic expects).
Drop when: ``moe_utils.maybe_move_tensor_to_cpu`` applies ``as_numpy`` to tensors that are
already on the CPU (the conversion moves out of its ``tensor.is_cuda`` branch), or the
dispatcher stops passing tensors as split sizes.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ._registry import _once


@_once
def patch_moe_alltoall_split_sizes() -> None:
    """MoE all-to-all split sizes: CPU tensors -> numpy, as on GPU (see the module docstring)."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False,
                                 record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu  # imported by name
