"""The decoder: Megatron-Core GPTModel, Llama-style, dense or with every-Nth-layer MoE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from mm1_megatron.config import Config, Recompute
from mm1_megatron.model.specs import decoder_block_spec
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


def build_decoder(cfg: Config, use_te: bool, pre_process: bool = True,
                  post_process: bool = True, pp_rank: int | None = None,
                  vp_stage: int | None = None) -> GPTModel:
    """The decoder layers of pipeline rank `pp_rank`, model chunk `vp_stage` (interleaving)."""
    config = decoder_transformer_config(cfg)
    return GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, use_te, pp_rank=pp_rank,
                                                  vp_stage=vp_stage),
        vp_stage=vp_stage,
        vocab_size=cfg.llm.vocab_size,
        max_sequence_length=cfg.data.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.llm.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.llm.rope_theta),
        # MM1Model splices image tokens into the full sequence first, then scatters for SP.
        scatter_embedding_sequence_parallel=False,
    )
