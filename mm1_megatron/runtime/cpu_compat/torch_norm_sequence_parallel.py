"""``WrappedTorchNorm`` with ``sequence_parallel=True`` -> build it, mark its params.

Breaks (Megatron-Core 0.16.1): the local layer spec's norm
(``transformer.torch_norm.WrappedTorchNorm``, used when TE is absent) asserts
``not config.sequence_parallel`` in ``__new__``; but SP is required for MoE with TP>1 and
EP>1.
Error: ``AssertionError: sequence parallel not supported by torch LayerNorm``.
Applies when: no Transformer Engine (``Backends.transformer_engine`` is False), CUDA or not.
Redirect: the norm itself is the same with or without SP; what SP needs is that its
weight gradients, computed on a sequence shard per TP rank, are summed across the TP
group. ``finalize_model_grads`` does that for params tagged ``sequence_parallel=True``,
the tag TE's and apex's norms set, so we build the torch norm and tag its params.
Drop when: ``WrappedTorchNorm.__new__`` accepts ``config.sequence_parallel`` (no longer
asserts against it) and tags its params ``sequence_parallel`` itself.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ._registry import _once


@_once
def patch_torch_norm_sequence_parallel() -> None:
    """``WrappedTorchNorm`` with ``sequence_parallel=True`` -> build it, mark its params
    (see the module docstring)."""
    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    original_new = cls.__new__

    def __new__(klass: type, config: Any, hidden_size: int, eps: float = 1e-5,
                **kwargs: Any) -> torch.nn.Module:
        if not config.sequence_parallel:
            return original_new(klass, config, hidden_size, eps, **kwargs)
        shallow = copy.copy(config)  # a copy: no __post_init__ re-validation, caller untouched
        shallow.sequence_parallel = False
        norm = original_new(klass, shallow, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    cls.__new__ = staticmethod(__new__)  # type: ignore[assignment]
