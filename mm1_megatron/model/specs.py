"""Layer-implementation choice: Transformer Engine specs on GPUs with TE, local specs otherwise.

The choice lives here and nowhere else. The TE branch is a thin switch onto Megatron-Core's
own TE specs; the local branch is what CPU runs (and tests) use.
"""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from mm1_megatron.runtime.backends import Backends, detect_backends


def use_transformer_engine(backends: Backends | None = None) -> bool:
    """TE layers whenever Transformer Engine imports (it needs CUDA); local layers otherwise."""
    return (backends or detect_backends()).layer_spec == "transformer_engine"


def decoder_block_spec(config: TransformerConfig, use_te: bool, pp_rank: int | None = None,
                       vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """Dense/MoE layer pattern from `config.moe_layer_freq`, sliced to this pipeline stage
    (and model chunk, with interleaving)."""
    return get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                      normalization=config.normalization, pp_rank=pp_rank,
                                      vp_stage=vp_stage)


def vision_layer_spec(use_te: bool) -> ModuleSpec:
    """CLIP encoder layer: bidirectional attention (the local ViT spec is causal before 0.17)."""
    if use_te:
        from megatron.core.models.vision.vit_layer_specs import (
            get_vit_layer_with_transformer_engine_spec,
        )

        spec = get_vit_layer_with_transformer_engine_spec()
    else:
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec

        spec = get_vit_layer_with_local_spec()
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    return spec


def vision_norm(use_te: bool) -> type | None:
    """The ViT's ln_pre / ln_post: CLIPViTModel's default (TENorm) under TE, torch's otherwise."""
    return None if use_te else WrappedTorchNorm


def userbuffer_kwargs(cfg, te_version: str) -> dict:
    """Arguments of TE's `initialize_ub` for `parallel.tp_comm_overlap`, as Megatron-LM passes
    them: buffers sized for the decoder's [seq x micro-batch / cp, hidden] activations, the
    bootstrap over NCCL (TE's default picks MPI wherever torch has it, which dies under plain
    srun), and FP8 as quantization modes from TE 2.7 on (`use_fp8` before)."""
    from packaging.version import Version

    p = cfg.parallel
    if Version(te_version) < Version("1.9"):
        raise RuntimeError(f"parallel.tp_comm_overlap needs Transformer Engine >= 1.9 "
                           f"(NCCL bootstrap); found {te_version}")
    tokens = cfg.data.seq_length * cfg.train.micro_batch_size // p.cp
    kwargs = dict(shape=[tokens, cfg.llm.hidden_size], tp_size=p.tp, bootstrap_backend="nccl")
    fp8 = cfg.train.fp8 is not None
    if Version(te_version) >= Version("2.7"):
        kwargs["quantization_modes"] = ["FP8" if fp8 else "NONE"]  # UserBufferQuantizationMode
    else:
        kwargs["use_fp8"] = fp8
    return kwargs


def init_tp_comm_overlap(cfg) -> None:
    """Transformer Engine's userbuffers for `parallel.tp_comm_overlap`; once per process,
    before the model is built. A thin switch onto TE: validation refuses it where TE is
    absent. `UB_SKIPMC=1` in the environment turns off CUDA multicast in TE's userbuffers
    (for nodes or containers without multicast support)."""
    p = cfg.parallel
    if not (p.tp_comm_overlap and p.tp > 1):
        return
    import transformer_engine
    from transformer_engine.pytorch.module import base

    kwargs = userbuffer_kwargs(cfg, transformer_engine.__version__)
    if "quantization_modes" in kwargs:
        kwargs["quantization_modes"] = [base.UserBufferQuantizationMode[m]
                                        for m in kwargs["quantization_modes"]]
    base.initialize_ub(**kwargs)
