"""The memory side of the H100 model: bytes per GPU of each pipeline stage of a layout
(`stage_memory` -> `StageMemory`: weights, gradients, optimizer state, activations), from the
parameter counts of model/params.py and per-token activation accounting of each block.
Modelled, not measured; the accounting:

Memory per GPU, per pipeline stage (GiB = 2**30 bytes):
- Weights 2 B/param (bf16), main grads 4 B/param (Megatron DDP with train.grad_reduce_in_fp32;
  2 without), optimizer 12 B/param (fp32 master + Adam m, v) divided by the distributed
  optimizer's shard group: DP*CP for dense params, the expert-data-parallel group tp*cp*dp/(ep*expert_tp) for
  expert params (ZeRO-1, Rajbhandari et al. 2020). Dense params are split by TP, experts by
  EP*expert_tp; norms, router, connector and ViT embeddings are replicated.
  FP8 (train.fp8): TE keeps the bf16 weights and caches an FP8 copy and its transpose of every
  linear weight across micro-batches: +2 B per linear-layer param. Activations are assumed to
  stay bf16 (conservative: TE saves some GEMM inputs in FP8).
- Activations: Korthikanti et al. 2022's accounting applied to our layers (bf16, no dropout):
  per token a Llama layer saves norm inputs 2h+2h, QKV input 2h, Q,K,V 2(h+2kv), attention
  output 2h, fc1 input 2h, SwiGLU input 4f and fc2 input 2f bytes. With TP the GEMM-side
  tensors divide by t; with SP the rest does too. (Their GPT-3 layer, with dropout masks and a
  4h GeLU MLP, gives their 34sbh + 5as^2b; ours is ~28sbh for mm1-30b.) Attention is *fused*
  (TE flash / cuDNN): no s x s scores are kept, only the fp32 softmax statistics 4as, so
  `selective` recompute (core attention) saves little; `unfused` keeps the softmax output
  2as^2b per layer, which selective recompute removes. `full` keeps only each group's input
  2sbh(/t with SP) plus one group's activations while it is recomputed. MoE layers: tokens are
  routed top_k times, so the expert FFN holds ~top_k x the dense FFN's activations (with
  expert_tp the routed tokens are gathered over the expert-TP group).
  1F1B: stage j holds min(pp - j, micro-batches) micro-batches in flight; stage 0 also holds
  the ViT (16 images x 730 tokens per sequence, no SP) and the C-Abstractor (replicated, ~10
  saved tensors of `connector.hidden_size` channels per grid cell per block) for each.
  Last stage: the vocab-parallel cross-entropy holds ~10 B per logit element (bf16 logits,
  fp32 softmax and its gradient) of one micro-batch, s x b x vocab / (t x cp). Context
  parallelism (cp) splits every activation along the sequence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from mm1_megatron.config import Config
from mm1_megatron.model.params import (attention_params, connector_params, decoder_layer_params,
                                       expert_params, vision_layer_params, vision_params)
from mm1_megatron.plan.h100_constants import CE_BYTES_PER_LOGIT, CONNECTOR_SAVED_TENSORS, GIB
from mm1_megatron.plan.layout import Layout, stage_layers


ATTENTION = "fused"  # "unfused" keeps the s x s softmax output (Korthikanti's 5as/h regime)


def _score_bytes(heads: int, seq: int, recompute: str) -> float:
    """Per token: what core attention keeps for backward (selective recompute: nothing)."""
    if recompute == "selective":
        return 0.0
    return 2 * heads * seq if ATTENTION == "unfused" else 4 * heads  # bf16 probs | fp32 lse


def attention_block_bytes(tokens: int, h: int, kv: int, heads: int, seq: int, t: int, sp: bool,
                          recompute: str = "none") -> float:
    """Norm input + QKV input (split by SP), Q, K, V + projection input (split by TP)."""
    rep = 1 / t if sp else 1.0
    return tokens * (4 * h * rep + (2 * (h + 2 * kv) + 2 * h
                                    + _score_bytes(heads, seq, recompute)) / t)


def dense_mlp_bytes(tokens: int, h: int, f: int, t: int, sp: bool) -> float:
    """Norm input + fc1 input (split by SP), SwiGLU input 2f and output f (split by TP)."""
    return tokens * (4 * h * (1 / t if sp else 1.0) + 6 * f / t)


def moe_mlp_bytes(cfg: Config, lay: "Layout", tokens: int) -> float:
    """Routed-expert FFN: top_k copies of each token, gathered over the expert-TP group."""
    llm, k = cfg.llm, cfg.llm.moe.top_k
    h, fe = llm.hidden_size, llm.expert_ffn_hidden_size / lay.etp
    rep = 1 / lay.tp if lay.sp else 1.0
    norm_and_router = tokens * (2 * h + 4 * llm.moe.num_experts) * rep  # + fp32 router logits
    routed = tokens * k * lay.etp / lay.tp  # token copies this GPU's experts compute on
    unpermute = 2 * h * tokens * k / lay.tp  # expert outputs kept for the prob-weighted combine
    return norm_and_router + routed * (2 * h + 6 * fe) + unpermute


def decoder_layer_activation_bytes(cfg: Config, lay: "Layout", layer: int,
                                   recompute: Optional[str] = None) -> float:
    """Saved bytes of one decoder layer for one micro-batch under `recompute` (none/selective;
    default the config's, full is handled per stage)."""
    llm, s = cfg.llm, cfg.data.seq_length
    tokens = s * lay.mb / lay.cp  # context parallelism splits the sequence
    mode = recompute or llm.recompute
    mode = "none" if mode == "full" else mode
    kv = llm.query_groups * llm.head_dim
    attn = attention_block_bytes(tokens, llm.hidden_size, kv, llm.num_attention_heads, s,
                                 lay.tp, lay.sp, mode)
    if llm.is_moe_layer(layer):
        return attn + moe_mlp_bytes(cfg, lay, tokens)
    return attn + dense_mlp_bytes(tokens, llm.hidden_size, llm.ffn_hidden_size, lay.tp, lay.sp)


def vision_activation_bytes(cfg: Config, lay: Layout) -> tuple[float, float]:
    """(saved bytes, transient bytes) of the ViT for one micro-batch on stage 0. No SP."""
    v = cfg.vision
    n = v.num_patches + int(v.class_token)
    tokens = lay.images * lay.mb * n
    h, f, t = v.hidden_size, v.ffn_hidden_size, lay.tp
    # Norm, QKV, norm, fc1 inputs replicated (no SP); Q, K, V, proj input, GeLU in/out split.
    scores = _score_bytes(v.num_attention_heads, n, v.recompute)
    per_layer = tokens * (8 * h + (8 * h + 4 * f + scores) / t)
    if v.recompute == "full":
        groups = math.ceil(v.layers_built / v.recompute_layers)
        return groups * 2 * h * tokens, v.recompute_layers * per_layer
    return v.layers_built * per_layer, 0.0


def connector_activation_bytes(cfg: Config, lay: Layout) -> float:
    c, v = cfg.connector, cfg.vision
    images = lay.images * lay.mb
    if c.type != "c_abstractor":
        return images * 2 * (v.num_patches * v.hidden_size + c.num_tokens * cfg.llm.hidden_size)
    cells = c.depth * (v.num_patches + c.num_tokens)
    return images * 2 * (CONNECTOR_SAVED_TENSORS * c.hidden_size * cells
                         + v.num_patches * v.hidden_size)


@dataclass(frozen=True)
class StageMemory:
    stage: int
    layers: int
    in_flight: float  # micro-batches of this stage's activations held (fractional: chunks)
    params: float  # this GPU's parameters
    weights: float  # bytes from here on
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("weights", "grads", "optimizer", "activations"):
            d[k + "_gib"] = round(d.pop(k) / GIB, 3)
        d["params"] = int(self.params)
        d["total_gib"] = round(self.total / GIB, 3)
        return d


def _stage_params(cfg: Config, lay: Layout, stage: int, layers: range) -> tuple[float, float,
                                                                                float]:
    """(dense params, expert params, linear-layer params for the FP8 caches) on one GPU."""
    llm, v = cfg.llm, cfg.vision
    dense = expert = linear = 0.0
    for i in layers:
        full = decoder_layer_params(llm, i)
        if llm.is_moe_layer(i):
            e = llm.moe.num_experts
            experts = e * expert_params(llm) / (lay.ep * lay.etp)
            expert += experts
            dense += attention_params(llm) / lay.tp + 2 * llm.hidden_size + e * llm.hidden_size
            linear += attention_params(llm) / lay.tp + experts
        else:
            mats = full - 2 * llm.hidden_size
            dense += mats / lay.tp + 2 * llm.hidden_size
            linear += mats / lay.tp
    table = llm.vocab_size * llm.hidden_size / lay.tp
    last = stage == lay.pp - 1
    if stage == 0:
        dense += table
    if stage == 0 and lay.images:
        vit_layers = v.layers_built * vision_layer_params(v)
        dense += vit_layers / lay.tp + vision_params(v) - vit_layers
        dense += connector_params(cfg.connector, v, llm.hidden_size)
        linear += vit_layers / lay.tp
    if last:
        dense += llm.hidden_size + (table if (not llm.tie_embeddings or lay.pp > 1) else 0)
    return dense, expert, linear


def stage_memory(cfg: Config, lay: Layout) -> list[StageMemory]:
    llm, p = cfg.llm, cfg.parallel
    stages = []
    for j, layers in enumerate(stage_layers(cfg)):
        dense, expert, linear = _stage_params(cfg, lay, j, layers)
        params = dense + expert
        fp8_cache = 2 * linear if cfg.train.fp8 else 0
        if p.distributed_optimizer:
            optimizer = 12 * (dense / (lay.dp * lay.cp) + expert / lay.edp)
        else:
            optimizer = 12 * params
        in_flight = min(lay.pp - j, lay.microbatches)
        if lay.vs > 1:
            # Interleaved warm-up (Megatron-Core): (pp-j-1)*2 + (vs-1)*pp + 1 chunk
            # micro-batches, each holding 1/vs of the stage's activations.
            chunks = min((lay.pp - j - 1) * 2 + (lay.vs - 1) * lay.pp + 1,
                         lay.microbatches * lay.vs)
            in_flight = chunks / lay.vs
        if llm.recompute == "full":
            r = llm.recompute_layers
            h_in = (2 * cfg.data.seq_length * lay.mb * llm.hidden_size / lay.cp
                    / (lay.tp if lay.sp else 1))
            saved = math.ceil(len(layers) / r) * h_in
            transient = r * max((decoder_layer_activation_bytes(cfg, lay, i, "none")
                                 for i in layers), default=0.0)
        else:
            saved = sum(decoder_layer_activation_bytes(cfg, lay, i) for i in layers)
            transient = 0.0
        acts = in_flight * saved + transient
        if j == 0 and lay.images:
            vit_saved, vit_transient = vision_activation_bytes(cfg, lay)
            acts += in_flight * (vit_saved + connector_activation_bytes(cfg, lay))
            acts = max(acts, acts + vit_transient - transient)  # transients are not concurrent
        if j == lay.pp - 1:
            # bf16 logits, fp32 softmax and its gradient: the vocab-parallel cross-entropy
            acts += (CE_BYTES_PER_LOGIT * cfg.data.seq_length * lay.mb * llm.vocab_size
                     / (lay.tp * lay.cp))
        stages.append(StageMemory(stage=j, layers=len(layers), in_flight=in_flight,
                                  params=params, weights=2 * params + fp8_cache,
                                  grads=grad_bytes(cfg) * params, optimizer=optimizer,
                                  activations=acts))
    return stages


def grad_bytes(cfg: Config) -> int:
    """Bytes per parameter of Megatron DDP's gradient buffer: fp32, or bf16 when
    train.grad_reduce_in_fp32 is off."""
    return 4 if cfg.train.grad_reduce_in_fp32 else 2
