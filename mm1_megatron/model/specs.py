"""Layer-implementation choice: Transformer Engine specs on GPUs with TE, local specs otherwise.

The choice lives here and nowhere else. The TE branch is a thin switch onto Megatron-Core's
own TE specs; the local branch is what CPU runs (and tests) use.
"""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
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
    """CLIP encoder layer: bidirectional attention (the local ViT spec defaults to causal)."""
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


def init_tp_comm_overlap(cfg) -> None:
    """Transformer Engine's userbuffers for `parallel.tp_comm_overlap`, sized for the decoder's
    [seq x micro-batch, hidden] activations (as Megatron-LM does); once per process, before
    the model is built. A thin switch onto TE: validation refuses it where TE is absent."""
    p = cfg.parallel
    if not (p.tp_comm_overlap and p.tp > 1):
        return
    from transformer_engine.pytorch.module.base import initialize_ub

    tokens = cfg.data.seq_length * cfg.train.micro_batch_size // p.cp
    initialize_ub(shape=[tokens, cfg.llm.hidden_size], tp_size=p.tp,
                  use_fp8=cfg.train.fp8 is not None)
