"""The time side of the H100 model: seconds per micro-batch of each pipeline stage of a
layout (`stage_times` -> `StageTime`: GEMMs from their shapes, attention, memory-bound
kernels, host overhead, exposed TP / EP / PP communication) plus the stage's exposed DP
communication and optimizer step. Modelled, not measured; the accounting:

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
"""

from __future__ import annotations

from dataclasses import dataclass

from mm1_megatron.config import Config
from mm1_megatron.model.flops import connector_forward_flops
from mm1_megatron.model.params import expert_params
from mm1_megatron.plan.h100_constants import (ATTN_CP_PENALTY, CE_BYTES_PER_LOGIT, EFF_ALLTOALL,
                                              EFF_ATTN, EFF_COLLECTIVE, EFF_HBM, EP_EXPOSED,
                                              GEMM_EFF_MAX, GEMM_EFF_MAX_FP8, GEMM_HALF_FLOPS,
                                              HBM_BW, HOST_PER_EXPERT, HOST_PER_FP8_EXPERT,
                                              HOST_PER_LAYER, HOST_PER_MOE_LAYER, IB_BW,
                                              MOE_IMBALANCE, NVLINK_BW, OPTIMIZER_BYTES,
                                              PEAK_BF16, PEAK_FP8, TP_OVERLAP_EXPOSED)
from mm1_megatron.plan.layout import Layout, stage_layers
from mm1_megatron.plan.memory import StageMemory, grad_bytes


def _ring_bw(group: int, stride: int, gpus_per_node: int) -> float:
    """Bus bandwidth of a ring over `group` ranks spaced `stride` apart: NVLink inside a node;
    across nodes the k group members of a node share k NICs."""
    if group * stride <= gpus_per_node:
        return NVLINK_BW * EFF_COLLECTIVE
    per_node = max(1, gpus_per_node // stride)
    return min(NVLINK_BW, per_node * IB_BW) * EFF_COLLECTIVE


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
