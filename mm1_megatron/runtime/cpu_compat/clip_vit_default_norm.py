"""``CLIPViTModel`` default ``ln_pre_impl`` without TE -> ``WrappedTorchNorm``.

Breaks (Megatron-Core 0.16.1): ``CLIPViTModel.__init__`` (also reached through
``LLaVAModel``, which cannot pass ``ln_pre_impl``) defaults ``ln_pre_impl`` /
``ln_post_impl`` to ``clip_vit_model.NORM_IMPL``, which is ``torch.nn.LayerNorm`` when TE
is absent, and builds it with ``build_module(..., config=...)``.
Error: ``TypeError: LayerNorm.__init__() got an unexpected keyword argument 'config'``.
Applies when: no Transformer Engine (``Backends.transformer_engine`` is False), CUDA or not.
Redirect: ``WrappedTorchNorm`` is Megatron's own config-aware torch norm (what the local
layer spec uses); it builds the same ``torch.nn.LayerNorm`` from the config.
Drop when: ``clip_vit_model.NORM_IMPL`` falls back to a config-aware norm such as
``WrappedTorchNorm`` instead of ``torch.nn.LayerNorm`` (or ``LLaVAModel`` forwards
``ln_pre_impl`` / ``ln_post_impl`` so callers can choose).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from ._registry import _once


@_once
def patch_clip_vit_default_norm() -> None:
    """``CLIPViTModel`` default ``ln_pre_impl`` without TE -> ``WrappedTorchNorm``
    (see the module docstring)."""
    from megatron.core.models.vision import clip_vit_model
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cls = clip_vit_model.CLIPViTModel
    original_init = cls.__init__
    signature = inspect.signature(original_init)

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for name in ("ln_pre_impl", "ln_post_impl"):
            if bound.arguments[name] is torch.nn.LayerNorm:
                bound.arguments[name] = WrappedTorchNorm
        original_init(*bound.args, **bound.kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
