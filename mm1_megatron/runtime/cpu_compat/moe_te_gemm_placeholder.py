"""``moe_utils.te_general_gemm`` undefined without TE -> ``None`` (torch GEMM fallback).

Breaks (Megatron-Core 0.16.1): ``TopKRouter.forward`` -> ``Router.gating`` ->
``moe_utils.router_gating_linear`` -> ``RouterGatingLinearFunction.forward`` tests
``if te_general_gemm is not None``, but ``moe_utils`` binds that name only inside its
``try: from megatron.core.extensions.transformer_engine import ...`` block; the
``except ImportError`` branch sets only ``HAVE_TE = False``.
Error: ``NameError: name 'te_general_gemm' is not defined``.
Applies when: no Transformer Engine (``Backends.transformer_engine`` is False), CUDA or not,
on Megatron-Core before 0.17 (``mcore_version.MOE_UTILS_BINDS_TE_GEMM``).
Redirect: ``None`` is the value ``megatron.core.extensions.transformer_engine`` itself
gives the name when TE's GEMM is missing; it selects the ``torch.mm`` path.
Drop when: 0.16 support ends (0.17's ``moe_utils`` binds ``te_general_gemm = None`` without
TE, so the registry skips this patch there).
"""

from __future__ import annotations

from ._registry import _once


@_once
def patch_moe_te_gemm_placeholder() -> None:
    """``moe_utils.te_general_gemm`` undefined without TE -> ``None`` (see the module
    docstring)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
