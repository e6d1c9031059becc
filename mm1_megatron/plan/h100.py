"""H100 memory and step-time model of a layout.

Everything here is *modelled*, not measured: analytic formulas with stated constants.

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
- Fits when the worst stage is below the usable memory: PyTorch's allocator gets 79.11 GiB of
  an H100 80GB (81559 MiB reported; the CUDA context takes the rest), less what lives outside
  it (NCCL 1.5 GiB, TE userbuffers 1.0 GiB with TP overlap, DALI's pool 0.5 GiB on image runs)
  and 5% fragmentation.

Step time on H100 SXM (989 TFLOP/s bf16 dense, 1979 FP8 dense, 3.35 TB/s HBM, NVLink 450 GB/s
per direction per GPU, InfiniBand 400 Gb/s = 50 GB/s per GPU). The efficiency constants are
fitted to 25 published Megatron-LM / NeMo / Megatron-Bridge H100 runs
(tests/plan/published_h100.py, tests/plan/test_calibration.py: all within ±15%, mean error
4.8%):
- Per micro-batch and stage, this GPU's share of the tokens (s x b / cp): every GEMM from its
  shape (decoder_layer_gemms: QKV, projection, fc1, fc2; router and each local expert's fc1 /
  fc2 over its routed tokens, the busiest EP rank at MOE_IMBALANCE x the mean), forward +
  dgrad + wgrad at GEMM_EFF_MAX (FP8: GEMM_EFF_MAX_FP8 of the FP8 peak) x F / (F +
  GEMM_HALF_FLOPS) for a call of F FLOPs: small GEMMs (fine-grained experts, narrow TP
  shards) run well below large ones; the output layer and the ViT in bf16. Causal attention
  (half the s x s work, split by TP and CP) at EFF_ATTN of the bf16 peak, slower by
  ATTN_CP_PENALTY per extra CP rank (ring attention's steps). Memory-bound element-wise kernels
  (norms, SwiGLU, RoPE, residuals) ~3 x (28h + 6f) bytes per token and layer, and the
  cross-entropy, at EFF_HBM of HBM bandwidth. Backward = 2 x forward; full recompute adds one
  forward, selective one forward of core attention (hardware FLOPs; model FLOPs don't change).
  Host overhead per layer and micro-batch (HOST_PER_LAYER; an MoE layer adds the dispatcher's
  host sync and a share per local expert; FP8 adds HOST_PER_FP8_EXPERT per local expert: each
  expert's input, weight and gradient is quantized on its own). Not modelled: data loading
  (issue 16 measured 5% of a step on CPU), stragglers.
- Exposed communication: TP with SP, 4 all-gather/reduce-scatter of s*b*h bf16 per layer
  forward and 4 backward (+4 under full recompute) over NVLink at 80%, TP_OVERLAP_EXPOSED of it
  left with parallel.tp_comm_overlap (TE userbuffers); the ViT's TP all-reduces are not
  overlapped; CP's ring passes K, V chunks cp - 1 times (hidden behind attention where it
  fits); EP all-to-all (dispatch + combine, forward and backward) of the routed tokens over
  InfiniBand at 60% for the share of the EP group outside the node, EP_EXPOSED of it on the
  critical path (the published MoE runs overlap most of it); PP send/recv of each
  micro-batch's activations, hidden by the interleaved schedule (overlap_p2p_comm), exposed
  in plain 1F1B. DP gradient reduce-scatter (fp32) and parameter all-gather (bf16) at 80% of
  the bandwidth a ring gets (k GPUs of the group per node share k NICs), hidden behind the
  last micro-batch's backward (overlap_grad_reduce) and the first forward
  (overlap_param_gather) where they fit.
- Step = (micro-batches + (pp - 1) / virtual_stages) x slowest stage (the 1F1B bubble,
  imbalance included; interleaving divides it, holds (pp-j-1)*2 + (vs-1)*pp + 1 chunk
  micro-batches of 1/vs of the stage's activations) + exposed DP communication + the
  optimizer step (Adam over this GPU's shard, OPTIMIZER_BYTES of HBM traffic per parameter).
  MFU = flops.py's model FLOPs / (step x GPUs x peak), peak of the run's precision (1979 with
  FP8, as the trainer reports it); `mfu_bf16_peak` uses 989 for comparison.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from mm1_megatron.config import Config
from mm1_megatron.model.flops import connector_forward_flops, training_flops_per_sequence
from mm1_megatron.model.params import (attention_params, connector_params, decoder_layer_params,
                                       expert_params, vision_layer_params, vision_params)

GIB = 2**30
# Device and fabric (H100 SXM, DGX/HGX nodes of 8 with one 400 Gb/s NIC per GPU).
HBM_GIB = 81559 / 1024  # what an "80 GB" H100 reports (79.65 GiB)
ALLOCATOR_GIB = 79.11  # what PyTorch's caching allocator can get: the CUDA context takes the rest
# Device memory outside the allocator, GiB: NCCL's buffers over all communicators, TE's
# userbuffers (TP communication overlap), DALI's decode pool (image runs).
RESERVE_GIB = {"nccl": 1.5, "te_userbuffers": 1.0, "dali": 0.5}
FRAGMENTATION = 0.05  # of the allocator's memory lost to fragmentation at the peak
USABLE_GIB = (ALLOCATOR_GIB - sum(RESERVE_GIB.values())) * (1 - FRAGMENTATION)  # all reserves
PEAK_BF16 = 989e12
PEAK_FP8 = 1979e12
HBM_BW = 3.35e12
NVLINK_BW = 450e9  # per direction (900 GB/s bidirectional)
IB_BW = 50e9  # 400 Gb/s per GPU
# Achievable fractions, calibrated against published Megatron-LM / NeMo / Megatron-Bridge H100
# runs (tests/plan/published_h100.py; the calibration test prints the table).
GEMM_EFF_MAX = 0.68  # bf16, large GEMMs
GEMM_EFF_MAX_FP8 = 0.50  # of the FP8 peak (amax, casts and transposes are extra kernels)
GEMM_HALF_FLOPS = 20e9  # a GEMM call of this many FLOPs reaches half of the top efficiency
EFF_ATTN = 0.35
HOST_PER_LAYER = 0.25e-3  # s per layer and micro-batch (launches, syncs) not hidden
HOST_PER_EXPERT = 0.1e-3  # s per local expert of an MoE layer and micro-batch
# FP8 expert GEMMs quantize each local expert's input, weight and output gradient separately
# (amax, scale, cast per expert and pass: many small kernels), so FP8's gain shrinks and then
# reverses as local experts multiply (torchao's MoE FP8 benchmark: +10% at 2 experts per GPU,
# +1% at 16, pytorch/ao#2864; NeMo-RL#3804 batches per-expert quantization for the same
# reason). Fitted to the one fine-grained FP8 run (Qwen3-30B-A3B, 16 local experts: 1.78x ->
# 1.06x); the coarse FP8 MoE runs bound it (Qwen3-235B, 4 local: 1.01 -> 0.90; Grok-1, 1: 1.03
# -> 1.01).
HOST_PER_FP8_EXPERT = 0.4e-3
OPTIMIZER_BYTES = 30  # Adam step per parameter of the shard
CE_BYTES_PER_LOGIT = 10  # fp32 softmax, its gradient and the bf16 logits, read and written
ATTN_CP_PENALTY = 0.1  # attention slowdown per extra context-parallel rank
HOST_PER_MOE_LAYER = 1e-3  # s per MoE layer and micro-batch: the dispatcher's host sync
EP_EXPOSED = 0.3  # share of the EP all-to-all not hidden behind expert / attention compute
MOE_IMBALANCE = 1.2  # busiest expert rank's routed tokens over the mean (dropless routing)
EFF_HBM = 0.70
EFF_COLLECTIVE = 0.80
EFF_ALLTOALL = 0.60
TP_OVERLAP_EXPOSED = 0.25  # share of decoder TP communication left exposed with TE overlap
CONNECTOR_SAVED_TENSORS = 10  # per grid cell and C-Abstractor block, of `hidden_size` channels



# --------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------


def stage_layers(cfg: Config) -> list[range]:
    """Decoder layers per pipeline stage (first_stage_layers on stage 0, the rest even)."""
    p, n = cfg.parallel, cfg.llm.num_layers
    first = p.first_stage_layers if p.first_stage_layers is not None else n // p.pp
    if p.pp == 1:
        return [range(n)]
    rest = (n - first) // (p.pp - 1)
    return [range(first)] + [range(first + i * rest, first + (i + 1) * rest)
                             for i in range(p.pp - 1)]


@dataclass(frozen=True)
class Layout:
    """The sizes the model needs, resolved for one world size."""

    gpus_per_node: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    dp: int
    mb: int
    microbatches: int
    vs: int = 1  # model chunks per pipeline rank (interleaved 1F1B)
    images: int = 0  # encoder inputs per sequence (tiling: sub-images); 0: text-only decoder

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: the shard group of expert optimizer state."""
        return self.tp * self.cp * self.dp // (self.ep * self.etp)

    @property
    def sp(self) -> bool:
        return self.tp > 1


def resolve_layout(cfg: Config, world: int, gpus_per_node: int = 8,
                   text_only: bool = False) -> Layout:
    """`text_only`: plan the decoder alone (no ViT, no connector, no images), e.g. to hold
    the model against published text-only runs."""
    p, t = cfg.parallel, cfg.train
    dp = world // p.model_parallel_size
    return Layout(gpus_per_node=p.gpus_per_node or gpus_per_node, tp=p.tp, pp=p.pp, cp=p.cp,
                  ep=p.ep, etp=p.expert_tp or p.tp, dp=dp, mb=t.micro_batch_size,
                  microbatches=t.global_batch_size // (t.micro_batch_size * dp),
                  vs=p.virtual_stages or 1,
                  images=0 if text_only else
                  cfg.data.max_images_per_sequence * cfg.vision.sub_images)


def _ring_bw(group: int, stride: int, gpus_per_node: int) -> float:
    """Bus bandwidth of a ring over `group` ranks spaced `stride` apart: NVLink inside a node;
    across nodes the k group members of a node share k NICs."""
    if group * stride <= gpus_per_node:
        return NVLINK_BW * EFF_COLLECTIVE
    per_node = max(1, gpus_per_node // stride)
    return min(NVLINK_BW, per_node * IB_BW) * EFF_COLLECTIVE


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Step time
# --------------------------------------------------------------------------------------------


def gemm_efficiency(flops: float, fp8: bool) -> float:
    """Fraction of the peak one GEMM call reaches: `GEMM_EFF_MAX` on large GEMMs, falling as
    flops / (flops + GEMM_HALF_FLOPS) on small ones (wave quantisation, launch and epilogue
    costs; an expert GEMM over a few hundred tokens runs far below a 4096-wide one)."""
    top = GEMM_EFF_MAX_FP8 if fp8 else GEMM_EFF_MAX
    return top * flops / (flops + GEMM_HALF_FLOPS)


def gemm_seconds(m: float, n: float, k: float, fp8: bool, passes: int = 3) -> float:
    """Forward + backward (dgrad, wgrad: `passes` = 3) of an [m, k] x [k, n] GEMM."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    flops = 2.0 * m * n * k
    peak = PEAK_FP8 if fp8 else PEAK_BF16
    return passes * flops / (peak * gemm_efficiency(flops, fp8))


@dataclass(frozen=True)
class StageTime:
    stage: int
    compute: float  # seconds per micro-batch: GEMMs, attention, element-wise kernels
    host: float  # per micro-batch launch / scheduling overhead not hidden behind the GPU
    tp_comm: float
    ep_comm: float
    p2p: float
    dp_exposed: float  # seconds per step
    optimizer: float  # seconds per step

    @property
    def per_microbatch(self) -> float:
        return self.compute + self.host + self.tp_comm + self.ep_comm + self.p2p


def decoder_layer_gemms(cfg: Config, lay: Layout, layer: int,
                        tokens: float) -> list[tuple[float, float, float, float, str]]:
    """The forward GEMMs of one decoder layer on this GPU for `tokens` tokens, as (m, n, k,
    calls, kind), kind "dense" | "router" | "expert": QKV, output projection, fc1 (gate and
    up), fc2; an MoE layer has the router and each local expert's fc1 / fc2 over the tokens
    routed to it."""
    llm, t = cfg.llm, lay.tp
    h, q, kv = llm.hidden_size, llm.num_attention_heads * llm.head_dim, \
        llm.query_groups * llm.head_dim
    gemms = [(tokens, (q + 2 * kv) / t, h, 1, "dense"), (tokens, h, q / t, 1, "dense")]
    if not llm.is_moe_layer(layer):
        f = llm.ffn_hidden_size
        return gemms + [(tokens, 2 * f / t, h, 1, "dense"), (tokens, h, f / t, 1, "dense")]
    moe, fe = llm.moe, llm.expert_ffn_hidden_size / lay.etp
    # Routed copies one expert sees: the EP group's tokens (gathered over expert-TP) times
    # top_k, shared by all experts; this GPU holds num_experts / ep of them.
    per_expert = lay.ep * lay.etp * tokens * moe.top_k / (t * moe.num_experts)
    local = moe.num_experts / lay.ep
    return gemms + [(tokens, moe.num_experts, h, 1, "router"),
                    (per_expert, 2 * fe, h, local, "expert"), (per_expert, h, fe, local, "expert")]


def _decoder_layer_seconds(cfg: Config, lay: Layout, layer: int, tokens: float,
                           fp8: bool) -> float:
    """GEMM seconds of one decoder layer, forward + backward, one micro-batch (the router in
    bf16; experts wait for the busiest EP rank)."""
    total = 0.0
    for m, n, k, calls, kind in decoder_layer_gemms(cfg, lay, layer, tokens):
        m = m * MOE_IMBALANCE if kind == "expert" else m
        total += calls * gemm_seconds(m, n, k, fp8 and kind != "router")
    return total


def stage_times(cfg: Config, lay: Layout, memory: list[StageMemory]) -> list[StageTime]:
    llm, v = cfg.llm, cfg.vision
    s, b, t, g, cp = cfg.data.seq_length, lay.mb, lay.tp, lay.gpus_per_node, lay.cp
    fp8 = cfg.train.fp8 is not None
    tokens = s * b / cp  # this GPU's share of a micro-batch's tokens (CP splits the sequence)
    tp_bw = NVLINK_BW * EFF_COLLECTIVE
    act_unit = 2 * tokens * llm.hidden_size  # one bf16 hidden-state tensor of the micro-batch
    out = []
    for j, layers in enumerate(stage_layers(cfg)):
        gemm = attn = elementwise = 0.0  # seconds / FLOPs / bytes for fwd+bwd, this GPU
        tp_ops = ep_bytes = host = 0.0
        rec_full, rec_sel = llm.recompute == "full", llm.recompute == "selective"
        q_width = llm.num_attention_heads * llm.head_dim
        for i in layers:
            gemm += _decoder_layer_seconds(cfg, lay, i, tokens, fp8) * (1 + rec_full / 3)
            # causal attention: QK^T and PV over half the s x s pairs, split by CP and TP
            a_f = 4 * b * s * s * q_width * 0.5 / cp
            attn += a_f * (3 + (rec_full or rec_sel)) / t
            f_act = (llm.moe.top_k * llm.expert_ffn_hidden_size if llm.is_moe_layer(i)
                     else llm.ffn_hidden_size)
            elementwise += 3 * tokens * (28 * llm.hidden_size + 6 * f_act) / t
            tp_ops += (8 + 4 * rec_full) if t > 1 else 0
            host += HOST_PER_LAYER
            if llm.is_moe_layer(i):
                per_expert = HOST_PER_EXPERT + (HOST_PER_FP8_EXPERT if fp8 else 0.0)
                host += HOST_PER_MOE_LAYER + per_expert * llm.moe.num_experts / lay.ep
                if lay.ep > 1:
                    a2a = 2 * (tokens / t) * llm.moe.top_k * llm.hidden_size * (lay.ep - 1) / lay.ep
                    ep_bytes += (4 + 2 * rec_full) * a2a * MOE_IMBALANCE
        vit_tp = 0.0
        if j == 0 and lay.images:
            n, hv = v.num_patches + int(v.class_token), v.hidden_size
            images = lay.images * b
            rec = 1 if v.recompute == "full" else 0
            m = images * n  # ViT tokens; the ViT runs in bf16 (FP8 skips it)
            per_layer = (gemm_seconds(m, 3 * hv / t, hv, False) + gemm_seconds(m, hv, hv / t, False)
                         + gemm_seconds(m, v.ffn_hidden_size / t, hv, False)
                         + gemm_seconds(m, hv, v.ffn_hidden_size / t, False))
            gemm += v.layers_built * per_layer * (1 + rec / 3)
            rec_attn = rec or v.recompute == "selective"
            attn += images * 4 * n * n * hv * v.layers_built * (3 + rec_attn) / t
            elementwise += 3 * images * n * (28 * hv + 6 * v.ffn_hidden_size) / t
            connector = 3 * images * connector_forward_flops(cfg.connector, v, llm.hidden_size)
            gemm += connector / (PEAK_BF16 * GEMM_EFF_MAX)
            host += HOST_PER_LAYER * v.layers_built
            if t > 1:  # 2 all-reduces forward, 2 backward (+2 recomputed) = AG+RS pairs
                vit_tp = v.layers_built * (8 + 4 * rec) * (t - 1) / t * 2 * images * n * hv / tp_bw
        if j == lay.pp - 1:  # output layer and cross-entropy, bf16
            gemm += gemm_seconds(tokens, llm.vocab_size / t, llm.hidden_size, False)
            elementwise += CE_BYTES_PER_LOGIT * tokens * llm.vocab_size / t
        # Ring attention cuts each layer's attention into cp steps per direction (smaller
        # kernels, a wait per step): the attention runs slower the more ranks share it.
        attn_s = attn / (PEAK_BF16 * EFF_ATTN) * (1 + ATTN_CP_PENALTY * (cp - 1))
        compute = gemm + attn_s + elementwise / (HBM_BW * EFF_HBM)
        tp_comm = tp_ops * (t - 1) / t * act_unit / tp_bw + vit_tp if t > 1 else 0.0
        if t > 1 and cfg.parallel.tp_comm_overlap:
            # TE userbuffers hide most of the decoder's TP traffic behind its GEMMs; assume
            # a quarter stays exposed (the ViT's all-reduces are not overlapped).
            tp_comm = TP_OVERLAP_EXPOSED * (tp_comm - vit_tp) + vit_tp
        if cp > 1:  # ring attention: K, V chunks pass cp - 1 times forward, twice backward
            kv_bytes = 2 * 2 * tokens * llm.query_groups * llm.head_dim / t
            ring = 3 * (cp - 1) * kv_bytes * len(layers) / (NVLINK_BW * EFF_COLLECTIVE)
            tp_comm += max(0.0, ring - attn_s)  # overlapped with attention
        ep_comm = 0.0
        if ep_bytes:
            in_node = max(1, g // (lay.etp * t if lay.etp == 1 else lay.etp))
            remote = max(0.0, (lay.ep - in_node) / (lay.ep - 1))
            ep_comm = EP_EXPOSED * ep_bytes * (remote / (IB_BW * EFF_ALLTOALL)
                                               + (1 - remote) / (NVLINK_BW * EFF_COLLECTIVE))
        p2p = 0.0
        if lay.pp > 1 and lay.vs == 1:  # the interleaved schedule overlaps its sends
            # Interleaving sends every chunk's output on: vs times the hops.
            hops = lay.vs * 2 if lay.vs > 1 else (1 if j in (0, lay.pp - 1) else 2)
            p2p_bw = IB_BW if lay.world // lay.pp >= g else NVLINK_BW
            p2p = 2 * hops * act_unit / (t if lay.sp else 1) / (p2p_bw * EFF_COLLECTIVE)
        out.append(StageTime(stage=j, compute=compute, host=host, tp_comm=tp_comm,
                             ep_comm=ep_comm, p2p=p2p,
                             dp_exposed=_dp_exposed(cfg, lay, memory[j], compute),
                             optimizer=_optimizer_seconds(cfg, lay, memory[j])))
    return out


def _optimizer_seconds(cfg: Config, lay: Layout, mem: StageMemory) -> float:
    """Adam on this GPU's shard, memory-bound: fp32 grad read, master weight, m and v read and
    written, bf16 weight written (OPTIMIZER_BYTES per parameter), plus the grad-norm read."""
    expert = _expert_params(mem, cfg, lay)
    dense = mem.params - expert
    if cfg.parallel.distributed_optimizer:
        shard = dense / (lay.dp * lay.cp) + expert / lay.edp
    else:
        shard = mem.params
    return (OPTIMIZER_BYTES * shard + grad_bytes(cfg) * mem.params) / (HBM_BW * EFF_HBM)


def grad_bytes(cfg: Config) -> int:
    """Bytes per parameter of Megatron DDP's gradient buffer: fp32, or bf16 when
    train.grad_reduce_in_fp32 is off."""
    return 4 if cfg.train.grad_reduce_in_fp32 else 2


def _dp_exposed(cfg: Config, lay: Layout, mem: StageMemory, compute: float) -> float:
    """Gradient reduce-scatter + parameter all-gather left after overlap, one stage."""
    p, g = cfg.parallel, lay.gpus_per_node
    expert = _expert_params(mem, cfg, lay)
    dense = mem.params - expert
    grad = grad_bytes(cfg)
    groups = [(dense, lay.dp * lay.cp, lay.tp), (expert, lay.edp, lay.ep * lay.etp)]
    rs = ag = 0.0
    for n, size, stride in groups:
        if size <= 1 or n <= 0:
            continue
        bw, frac = _ring_bw(size, stride, g), (size - 1) / size
        if p.distributed_optimizer:
            rs += frac * grad * n / bw
            ag += frac * 2 * n / bw
        else:
            rs += 2 * frac * grad * n / bw  # all-reduce of the gradients
    if p.overlap_grad_reduce:
        rs = max(0.0, rs - compute * 2 / 3)  # behind the last micro-batch's backward
    if p.overlap_param_gather:
        ag = max(0.0, ag - compute / 3)  # behind the first micro-batch's forward
    return rs + ag


def _expert_params(mem: StageMemory, cfg: Config, lay: Layout) -> float:
    llm = cfg.llm
    stage_range = stage_layers(cfg)[mem.stage]
    moe_layers = sum(llm.is_moe_layer(i) for i in stage_range)
    return moe_layers * llm.moe.num_experts * expert_params(llm) / (lay.ep * lay.etp)


# --------------------------------------------------------------------------------------------
# The estimate of one layout
# --------------------------------------------------------------------------------------------


def estimate(cfg: Config, world: int, gpus_per_node: int = 8,
             text_only: bool = False) -> dict[str, Any]:
    """Memory per stage, fit, step time and MFU of `cfg` on `world` H100s (`text_only`: the
    decoder alone)."""
    lay = resolve_layout(cfg, world, gpus_per_node, text_only)
    memory = stage_memory(cfg, lay)
    times = stage_times(cfg, lay, memory)
    worst = max(memory, key=lambda m: m.total)
    reserved = ["nccl"] + (["te_userbuffers"] if lay.tp > 1 and cfg.parallel.tp_comm_overlap
                           else []) + (["dali"] if lay.images else [])
    reserve = sum(RESERVE_GIB[k] for k in reserved)
    usable = (ALLOCATOR_GIB - reserve) * (1 - FRAGMENTATION)
    slowest = max(times, key=lambda x: x.per_microbatch)
    bubble = (lay.pp - 1) / lay.vs  # interleaving divides the 1F1B bubble by the chunks
    pipeline = (lay.microbatches + bubble) * slowest.per_microbatch
    step = pipeline + max(x.dp_exposed for x in times) + max(x.optimizer for x in times)
    seqs = cfg.train.global_batch_size
    model_flops = training_flops_per_sequence(cfg, images=lay.images).total * seqs
    peak = PEAK_FP8 if cfg.train.fp8 else PEAK_BF16
    per_gpu = model_flops / (step * world)
    return {
        "nodes": world / lay.gpus_per_node,
        "gpus": world,
        "layout": dict(tp=lay.tp, pp=lay.pp, cp=lay.cp, ep=lay.ep, expert_tp=lay.etp, dp=lay.dp,
                       micro_batch_size=lay.mb, microbatches=lay.microbatches,
                       first_stage_layers=cfg.parallel.first_stage_layers,
                       virtual_stages=cfg.parallel.virtual_stages,
                       recompute=cfg.llm.recompute, vision_recompute=cfg.vision.recompute,
                       fp8=cfg.train.fp8),
        "memory": {
            "stages": [m.to_dict() for m in memory],
            "worst_stage": worst.stage,
            "worst_gib": round(worst.total / GIB, 3),
            "usable_gib": round(usable, 3),
            "headroom": f"{ALLOCATOR_GIB} GiB allocator less {reserve:.1f} GiB outside it "
                        f"({', '.join(reserved)}) and {FRAGMENTATION:.0%} fragmentation",
            "fits": worst.total / GIB <= usable,
        },
        "time": {
            "step_s": step,
            "pipeline_s": pipeline,
            "bubble_fraction": bubble / (lay.microbatches + bubble),
            "slowest_stage": slowest.stage,
            "per_microbatch_s": {k: getattr(slowest, k) for k in
                                 ("compute", "host", "tp_comm", "ep_comm", "p2p")},
            "optimizer_s": max(x.optimizer for x in times),
            "dp_exposed_s": max(x.dp_exposed for x in times),
            "tokens_per_s": seqs * cfg.data.seq_length / step,
            "model_tflops_per_gpu": per_gpu / 1e12,
            "mfu": per_gpu / peak,
            "mfu_bf16_peak": per_gpu / PEAK_BF16,
            "peak_tflops": peak / 1e12,
        },
        "modelled": "H100 model (mm1_megatron/plan/h100.py), not a measurement",
    }
