"""H100 memory and step-time model of a layout.

Everything here is *modelled*, not measured: analytic formulas with stated constants.

This module puts the two halves together for one layout (`estimate`): the memory of every
pipeline stage (`memory`), against what an H100 leaves usable, and the step time of every
stage (`step_time`), into the step, its pipeline bubble and MFU; the layout comes from
`layout`, the device figures and calibrated constants from `h100_constants`.

- Fits when the worst stage is below the usable memory: PyTorch's allocator gets 79.11 GiB of
  an H100 80GB (81559 MiB reported; the CUDA context takes the rest), less what lives outside
  it (NCCL 1.5 GiB, TE userbuffers 1.0 GiB with TP overlap, DALI's pool 0.5 GiB on image runs)
  and 5% fragmentation.
- Step = (micro-batches + (pp - 1) / virtual_stages) x slowest stage (the 1F1B bubble,
  imbalance included; interleaving divides it, holds (pp-j-1)*2 + (vs-1)*pp + 1 chunk
  micro-batches of 1/vs of the stage's activations) + exposed DP communication + the
  optimizer step (Adam over this GPU's shard, OPTIMIZER_BYTES of HBM traffic per parameter).
  MFU = flops.py's model FLOPs / (step x GPUs x peak), peak of the run's precision (1979 with
  FP8, as the trainer reports it); `mfu_bf16_peak` uses 989 for comparison.
"""

from __future__ import annotations

from typing import Any

from mm1_megatron.config import Config
from mm1_megatron.model.flops import training_flops_per_sequence
from mm1_megatron.plan.h100_constants import (ALLOCATOR_GIB, FRAGMENTATION, GIB, PEAK_BF16,
                                              PEAK_FP8, RESERVE_GIB)
from mm1_megatron.plan.layout import resolve_layout
from mm1_megatron.plan.memory import stage_memory
from mm1_megatron.plan.step_time import stage_times


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
