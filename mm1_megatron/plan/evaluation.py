"""The H100 model of few-shot evaluation (`mm1-eval` on one node): memory per GPU and time per
1,000 queries of an evaluation layout (`eval_estimate`), and the fastest layout that fits
(`eval_layouts`). Modelled, not measured; the accounting:

- A query is a k-shot prompt: k + 1 images of `connector.num_tokens` tokens (sub-images
  counted) and `text_tokens` of text per example, then `new_tokens` greedy tokens (mm1-eval's
  defaults: 20 captioning, 10 VQA). `batch` prompts run together (mm1-eval --batch-size).
- Layout: one model spans tp x ep GPUs (dense weights split by TP, experts by EP x TP, the
  connector replicated); the node's other GPUs hold further copies that split the queries
  (mm1-eval's expert-data-parallel shares). The model is evaluated in bf16.
- Memory per GPU: its weights (2 B/param), the static KV cache of the batch (2 x layers x
  kv width / tp x (prompt + new tokens) x 2 B per row), the prefill's transient activations
  (one decoder layer's ~20 B per token and hidden unit / tp; the ViT's over the batch's
  images, ~20 B per patch token and unit), against the usable memory of the training plan.
- Prefill: the ViT, connector and decoder forward FLOPs of the batch (the output layer at the
  last position only) at the GEMM efficiency of the training model for GEMMs of that size,
  plus the decoder's TP all-reduces (2 per layer, over NVLink) and the EP all-to-alls.
- Decode, per token: memory-bound: this GPU's weights and the batch's KV cache read once from
  HBM (all local experts read: an upper bound for a small batch), plus per layer the host's
  kernel launches (HOST_PER_LAYER, no CUDA graphs) and a small-message latency per TP
  all-reduce (2 per layer) and EP all-to-all (2 per MoE layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mm1_megatron.config import Config
from mm1_megatron.model.flops import (connector_forward_flops, llm_forward_flops,
                                      vision_forward_flops)
from mm1_megatron.model.params import count_params, expert_params
from mm1_megatron.plan.h100_constants import (EFF_COLLECTIVE, EFF_HBM, GEMM_EFF_MAX,
                                              GEMM_HALF_FLOPS, GIB, HBM_BW, HOST_PER_LAYER,
                                              NVLINK_BW, PEAK_BF16, USABLE_GIB)

# NCCL's latency for a collective of a few KiB inside an NVLink node (nccl-tests'
# small-message all-reduce / all-to-all on 8 H100s: ~10-20 us); one decode step's messages are
# that small.
SMALL_COLLECTIVE_S = 15e-6
ACT_BYTES_PER_UNIT = 20  # transient prefill activations per token and hidden unit, bytes


@dataclass(frozen=True)
class EvalWorkload:
    shots: int = 8
    batch: int = 8  # prompts generated together (mm1-eval --batch-size)
    new_tokens: int = 10  # greedy tokens per query (mm1-eval: 10 VQA, 20 captioning)
    text_tokens: int = 24  # text tokens per example (question or caption, the prompt's words)

    def prompt_tokens(self, cfg: Config) -> int:
        per_image = cfg.connector.num_tokens * cfg.vision.sub_images
        return (self.shots + 1) * (per_image + self.text_tokens)

    def images(self, cfg: Config) -> int:
        """Encoder inputs per query (sub-images counted)."""
        return (self.shots + 1) * cfg.vision.sub_images


def _gemm_eff(flops_per_call: float) -> float:
    return GEMM_EFF_MAX * flops_per_call / (flops_per_call + GEMM_HALF_FLOPS)


def eval_estimate(cfg: Config, tp: int, ep: int, gpus: int = 8,
                  work: EvalWorkload = EvalWorkload()) -> dict[str, Any]:
    """Memory per GPU and time per 1,000 queries of `cfg` evaluated at TP=`tp` x EP=`ep` on a
    node of `gpus` H100s (the rest data parallel)."""
    llm, v = cfg.llm, cfg.vision
    counts = count_params(cfg)
    experts = llm.num_moe_layers * llm.moe.num_experts * expert_params(llm)
    dense_llm = counts.llm - experts
    weights = 2 * ((dense_llm + counts.vision) / tp + counts.connector + experts / (tp * ep))
    prompt = work.prompt_tokens(cfg)
    context = prompt + work.new_tokens
    kv_width = llm.query_groups * llm.head_dim / tp
    kv_cache = work.batch * llm.num_layers * 2 * kv_width * context * 2
    images = work.batch * work.images(cfg)
    patches = v.num_patches + int(v.class_token)
    activations = max(work.batch * prompt * llm.hidden_size / tp,
                      images * patches * v.hidden_size / tp) * ACT_BYTES_PER_UNIT
    memory = weights + kv_cache + activations

    # Prefill: FLOPs of the batch, split over the model's GPUs.
    logits_skipped = 2 * (prompt - 1) * llm.vocab_size * llm.hidden_size  # last position only
    llm_flops = work.batch * (llm_forward_flops(llm, prompt) - logits_skipped)
    vision_flops = images * (vision_forward_flops(v) +
                             connector_forward_flops(cfg.connector, v, llm.hidden_size))
    per_layer_gemm = llm_flops / max(llm.num_layers, 1) / 4 / tp  # QKV, proj, fc1, fc2
    prefill_compute = (llm_flops / tp / _gemm_eff(per_layer_gemm) +
                       vision_flops / tp / _gemm_eff(vision_flops / max(v.layers_built, 1) / 4 /
                                                     tp)) / PEAK_BF16
    tp_bytes = 2 * llm.num_layers * work.batch * prompt * llm.hidden_size * 2
    prefill_comm = (tp_bytes * 2 * (tp - 1) / tp / (NVLINK_BW * EFF_COLLECTIVE)) if tp > 1 else 0.0
    if ep > 1:  # dispatch + combine of the routed tokens, the share leaving this GPU
        routed = work.batch * prompt * llm.moe.top_k * llm.hidden_size * 2
        prefill_comm += llm.num_moe_layers * 2 * routed * (ep - 1) / ep / tp / \
            (NVLINK_BW * EFF_COLLECTIVE)
    prefill = prefill_compute + prefill_comm

    # Decode: per generated token, memory-bound.
    collectives = (2 * llm.num_layers if tp > 1 else 0) + \
        (2 * llm.num_moe_layers if ep > 1 else 0)
    llm_weights = weights - 2 * (counts.vision / tp + counts.connector)
    decode_step = (llm_weights + kv_cache) / (HBM_BW * EFF_HBM) + \
        llm.num_layers * HOST_PER_LAYER + collectives * SMALL_COLLECTIVE_S
    per_batch = prefill + work.new_tokens * decode_step
    copies = gpus // (tp * ep)
    seconds = 1000 / (copies * work.batch) * per_batch
    return {
        "layout": {"tp": tp, "ep": ep, "copies": copies, "gpus": gpus},
        "workload": {"shots": work.shots, "batch": work.batch, "new_tokens": work.new_tokens,
                     "prompt_tokens": prompt},
        "memory_gib": {"weights": weights / GIB, "kv_cache": kv_cache / GIB,
                       "activations": activations / GIB, "total": memory / GIB,
                       "usable": USABLE_GIB},
        "fits": memory / GIB <= USABLE_GIB,
        "time_s": {"prefill_per_batch": prefill, "decode_per_token": decode_step,
                   "per_batch": per_batch, "per_1000_queries": seconds},
        "gpu_hours_per_1000_queries": seconds * gpus / 3600,
        "modelled": "H100 model (mm1_megatron/plan/evaluation.py), not a measurement",
    }


def eval_layouts(cfg: Config, gpus: int = 8, work: EvalWorkload = EvalWorkload()
                 ) -> list[dict[str, Any]]:
    """Every TP x EP layout on one node that mm1-eval accepts for `cfg` (its own check,
    `config.evaluation_config`), fastest first among those that fit (then those that do
    not)."""
    from mm1_megatron.config import ConfigError, evaluation_config

    out = []
    for tp in (t for t in (1, 2, 4, 8) if t <= gpus):
        for ep in (e for e in (1, 2, 4, 8, 16, 32, 64) if tp * e <= gpus):
            try:
                evaluation_config(cfg, gpus, tp=tp, ep=ep)
            except ConfigError:
                continue
            out.append(eval_estimate(cfg, tp, ep, gpus, work))
    return sorted(out, key=lambda e: (not e["fits"], e["time_s"]["per_1000_queries"]))


def copies_label(copies: int) -> str:
    """"1 copy", "4 copies": of the model on the node."""
    return f"{copies} cop{'y' if copies == 1 else 'ies'}"


EVAL_PRESETS = ("mm1-3b", "mm1-7b", "mm1-30b", "mm1-3b-moe64", "mm1-7b-moe32")


def eval_table(presets=EVAL_PRESETS, gpus: int = 8, work: EvalWorkload = EvalWorkload()) -> str:
    """Markdown: per preset, the fastest evaluation layout on one node that fits and the one
    with the fewest copies (the whole node on one model), with memory and cost per 1,000
    queries (docs/evaluation.md holds this table; `tools/plan.py --eval` prints one preset's
    layouts)."""
    from mm1_megatron.config import get_preset

    rows = ["| preset | layout (8 H100) | GiB/GPU | s / 1,000 queries | GPU-h / 1,000 |",
            "|---|---|---|---|---|"]
    for name in presets:
        layouts = [e for e in eval_layouts(get_preset(name), gpus, work) if e["fits"]]
        whole_node = min(layouts, key=lambda e: (e["layout"]["copies"],
                                                 e["time_s"]["per_1000_queries"]))
        picks = [layouts[0]] + ([whole_node] if whole_node is not layouts[0] else [])
        for e in picks:
            lay = e["layout"]
            rows.append(f"| {name} | TP={lay['tp']} EP={lay['ep']} x "
                        f"{copies_label(lay['copies'])} | {e['memory_gib']['total']:.1f} | "
                        f"{e['time_s']['per_1000_queries']:.0f} | "
                        f"{e['gpu_hours_per_1000_queries']:.3f} |")
    return "\n".join(rows) + "\n"
