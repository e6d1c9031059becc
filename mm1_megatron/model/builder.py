"""A run Config -> the parts MM1Model is built from, and the model: the one place the model's
construction reads the Config.

MM1Model takes its parts injected, as Megatron-Core's LLaVAModel does: the decoder's and the
encoder's TransformerConfigs and layer specs (the TE or local choice is model/specs.py's), the
connector's spec, and the image-slot settings (`MM1Parts`). `mm1_parts` makes them from a
Config; `build_mm1_model` builds one pipeline stage's model from them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from mm1_megatron.config import Config, Recompute
from mm1_megatron.model.connector import (AttnPoolConnector, AvgPoolConnector, CAbstractor,
                                          ConnectorParts)
from mm1_megatron.model.language import LanguageParts
from mm1_megatron.model.mm1 import MM1Model, MM1Parts
from mm1_megatron.model.specs import decoder_block_spec, vision_layer_spec, vision_norm
from mm1_megatron.model.vision import VISION_ACTIVATIONS, VisionParts
from mm1_megatron.runtime.mcore_version import ROUTER_SCALES_AUX_LOSS_BY_TP_CP

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def precision_kwargs(cfg: Config, fp8: bool = True) -> dict:
    """Dtype flags of a TransformerConfig; `fp8=False` keeps the module out of FP8 whatever
    `train.fp8` says (the image encoder)."""
    t = cfg.train
    dtype = _DTYPES[t.precision]
    kwargs = dict(params_dtype=dtype, pipeline_dtype=dtype, bf16=t.precision == "bf16",
                  fp16=t.precision == "fp16")
    if fp8 and t.fp8 is not None:
        kwargs.update(fp8=t.fp8, fp8_recipe=t.fp8_recipe)
    return kwargs


def recompute_kwargs(mode: Recompute, layers: int) -> dict:
    """Megatron-Core activation recomputation: `selective` re-runs core attention only,
    `full` checkpoints groups of `layers` transformer layers."""
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=layers)
    if mode == "selective":
        return dict(recompute_granularity="selective")
    return {}


def parallel_kwargs(cfg: Config, decoder: bool) -> dict:
    p = cfg.parallel
    return dict(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp if decoder else 1,
        virtual_pipeline_model_parallel_size=p.virtual_stages if decoder else None,
        context_parallel_size=p.cp if decoder else 1,
        # SP splits the decoder's sequence; the ViT sees whole images and never uses it.
        sequence_parallel=decoder and p.sequence_parallel and p.tp > 1,
        # Weights are created on the host and split, so every TP size starts from the same
        # full tensors (parity tests rely on this); fused grad accumulation needs CUDA + apex.
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
    )


def decoder_transformer_config(cfg: Config) -> TransformerConfig:
    llm, moe, p = cfg.llm, cfg.llm.moe, cfg.parallel
    kwargs = dict(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.query_groups,
        kv_channels=llm.head_dim,
        ffn_hidden_size=llm.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=llm.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        num_layers_in_first_pipeline_stage=p.first_stage_layers,
        calculate_per_token_loss=True,  # one objective whatever the DP size / micro-batching
        tp_comm_overlap=p.tp_comm_overlap and p.tp > 1,  # TE userbuffers (init_tp_comm_overlap)
        **parallel_kwargs(cfg, decoder=True),
        **precision_kwargs(cfg),
        **recompute_kwargs(llm.recompute, llm.recompute_layers),
    )
    if moe.num_experts > 0:
        # calculate_per_token_loss: before 0.19 the router scales its aux and z-loss by the
        # *local* token count, which SP divides by tp and CP by cp, so their gradients shrink
        # by tp*cp; scale the coefficients back. 0.19's router does it itself (mcore_version).
        # tests/model/test_parity.py compares the router gradients with one process.
        shards = 1 if ROUTER_SCALES_AUX_LOSS_BY_TP_CP else \
            (p.tp if kwargs["sequence_parallel"] else 1) * p.cp
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_layer_freq=moe.layer_freq,
            moe_router_topk=moe.top_k,
            moe_router_load_balancing_type="aux_loss",
            moe_router_dtype="fp32" if moe.router_dtype == "fp32" else None,
            moe_aux_loss_coeff=moe.aux_loss_coeff * shards,
            moe_z_loss_coeff=moe.z_loss_coeff * shards,
            moe_token_dispatcher_type=moe.dispatcher,
            moe_ffn_hidden_size=llm.expert_ffn_hidden_size,
            moe_grouped_gemm=moe.grouped_gemm,
            expert_model_parallel_size=p.ep,
            expert_tensor_parallel_size=p.expert_tp or p.tp,
        )
    return TransformerConfig(**kwargs)


def vision_transformer_config(cfg: Config) -> TransformerConfig:
    v = cfg.vision
    return TransformerConfig(
        num_layers=v.layers_built,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        ffn_hidden_size=v.ffn_hidden_size,
        normalization="LayerNorm",
        layernorm_epsilon=v.layernorm_eps,
        add_bias_linear=True,
        activation_func=VISION_ACTIVATIONS[v.activation],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # The encoder lives whole on the first pipeline stage.
        **parallel_kwargs(cfg, decoder=False),
        # Never FP8 (train.fp8 is the decoder's): its GEMMs see 730 x images rows, which TE's
        # FP8 refuses unless the image count is a multiple of 4, and the encoder is ~10% of
        # the FLOPs. Megatron-Bridge keeps vision backbones out of FP8 by default too.
        **precision_kwargs(cfg, fp8=False),
        **recompute_kwargs(v.recompute, v.recompute_layers),
    )


def language_parts(cfg: Config, use_te: bool, pp_rank: Optional[int] = None,
                   vp_stage: Optional[int] = None) -> LanguageParts:
    """The decoder's parts, its block spec sliced to pipeline rank `pp_rank` and model chunk
    `vp_stage` (interleaving)."""
    config = decoder_transformer_config(cfg)
    return LanguageParts(
        config=config,
        layer_spec=decoder_block_spec(config, use_te, pp_rank=pp_rank, vp_stage=vp_stage),
        vocab_size=cfg.llm.vocab_size,
        max_sequence_length=cfg.data.seq_length,
        tie_embeddings=cfg.llm.tie_embeddings,
        rotary_base=int(cfg.llm.rope_theta),
    )


def vision_parts(cfg: Config, use_te: bool) -> VisionParts:
    v = cfg.vision
    return VisionParts(config=vision_transformer_config(cfg),
                       layer_spec=vision_layer_spec(use_te), image_size=v.image_size,
                       patch_size=v.patch_size, class_token=v.class_token,
                       norm=vision_norm(use_te))


def connector_parts(cfg: Config) -> ConnectorParts:
    c, v, llm_hidden = cfg.connector, cfg.vision, cfg.llm.hidden_size
    if c.type == "c_abstractor":
        spec = ModuleSpec(module=CAbstractor, params=dict(
            vision_hidden=v.hidden_size, num_patches=v.num_patches, llm_hidden=llm_hidden,
            channels=c.hidden_size, depth=c.depth, mlp_depth=c.mlp_depth, grid=c.grid_size,
            pos_emb=c.pos_emb, norm_eps=c.norm_eps))
    elif c.type == "avg_pool":
        spec = ModuleSpec(module=AvgPoolConnector, params=dict(
            vision_hidden=v.hidden_size, llm_hidden=llm_hidden, grid=c.grid_size))
    elif c.type == "attn_pool":
        spec = ModuleSpec(module=AttnPoolConnector, params=dict(
            vision_hidden=v.hidden_size, llm_hidden=llm_hidden, num_queries=c.num_tokens,
            num_heads=v.num_attention_heads))
    else:
        raise ValueError(f"connector.type: unknown connector {c.type!r}")
    return ConnectorParts(spec=spec, num_tokens=c.num_tokens)


def mm1_parts(cfg: Config, use_te: bool, pp_rank: Optional[int] = None,
              vp_stage: Optional[int] = None) -> MM1Parts:
    """Everything MM1Model of `cfg` is built from, for pipeline rank `pp_rank` and model chunk
    `vp_stage`: Transformer Engine layers (and THD packed rows) with `use_te`, local ones
    otherwise."""
    return MM1Parts(
        language=language_parts(cfg, use_te, pp_rank=pp_rank, vp_stage=vp_stage),
        vision=vision_parts(cfg, use_te),
        connector=connector_parts(cfg),
        image_token_id=cfg.llm.image_token_id,
        # The model sees sub-images (tiling: an image's overview and tiles) as images.
        max_images_per_row=cfg.data.max_images_per_sequence * cfg.vision.sub_images,
        packed_sequences=use_te,
    )


def build_mm1_model(cfg: Config, use_te: bool, pre_process: bool = True,
                    post_process: bool = True, pp_rank: Optional[int] = None,
                    vp_stage: Optional[int] = None) -> MM1Model:
    """MM1Model of `cfg`: the whole model by default, or one pipeline stage (`pre_process`:
    it holds the embedding, encoder and connector; `post_process`: the output layer)."""
    return MM1Model(mm1_parts(cfg, use_te, pp_rank=pp_rank, vp_stage=vp_stage),
                    pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
