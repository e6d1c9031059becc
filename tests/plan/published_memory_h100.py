"""Published, measured peak GPU memory of Megatron-LM / Megatron-Core / Megatron-Bridge training runs on
H100 80GB, for calibrating the memory side of ``mm1_megatron.plan.memory``.

Plain data only. Every number was copied from the stored text of the cited file (repository + path +
commit, or index id where the commit could not be resolved); nothing is from memory. Conversions and
anything not printed by the source are marked in ``derived`` / ``notes``.

What was found
--------------
Usable points (``MEMORY_POINTS``, complete enough to plan):

1. Llama3-70B SFT, 32x H100 80GB, FP8 current scaling, seq 4096, MBS 1, GBS 32: seven measured peaks from
   the Megatron-Bridge OOM investigation (PR #3107), recorded in the Bridge skill docs
   ``skills/mbridge-perf-activation-recompute/{SKILL.md,card.yaml}``,
   ``skills/mbridge-perf-memory-tuning/SKILL.md`` and ``skills/nemo-mbridge-perf-memory-tuning/card.yaml``:
   TP4 PP4 VP5 DP2 with selective recompute [core_attn] (58.8 GB, the run OOMed on rank 0 from
   fragmentation), [mlp] (55.6), [mlp, core_attn] (55.6), [core_attn, layernorm] (59.6), the same
   layout at VP10 (60.2), TP4 PP8 VP5 DP1 (53.2) and TP8 PP4 VP5 DP1 (50.2).
   Caveat: the docs say only "Peak Mem (GB)" / ``peak_mem_gb``; which statistic (max allocated vs max
   reserved) and which rank are not stated. Megatron-Bridge's own memory log prints
   ``mem-max-allocated-gigabytes`` as bytes / 1e9 (decimal GB; ``training/utils/train_utils.py``), so
   ``memory_gib`` assumes decimal GB of max allocated (x 1e9 / 2**30); ``memory_gib_if_binary`` keeps
   the literal value in case "GB" meant GiB. A run that OOMs at a "peak" of 58.8 on an 80 GB GPU (the
   doc blames fragmentation) fits max-allocated, not max-reserved, which supports the assumption.
2. Qwen3-30B-A3B pretraining, 16x H100, BF16, TP1 PP1 CP1 EP16, seq 4096, MBS 1, GBS 1024, no recompute:
   ``rank0_peak_allocated_gib: 62.166`` (Bridge skill card ``nemo-mbridge-perf-moe-hardware-configs``).
   This is explicitly max allocated on rank 0 in GiB. The layout is from the Bridge recipe
   ``qwen3_30b_a3b_pretrain_16gpu_h100_bf16_config``; note that this recipe reduces gradients in
   bf16 (``grad_reduce_in_fp32=False``), i.e. the DDP grad buffer is 2 B/param, not the planner's 4.

So: 8 points, but only two independent model/layout families (one dense FP8 SFT, one fine-grained
BF16 MoE), both from NVIDIA's Megatron-Bridge perf investigations of 2026. That is all that could be
tied to a complete layout.

What was not found / rejected (``MEMORY_BOUNDS``)
--------------------------------------------------
* Bounds, not measurements: the Megatron-Bridge model-verification card for Qwen3-30B-A3B
  ("peak allocated memory remains below 65 GiB/GPU").
* Measured but layout incomplete: the Megatron-Core fine-grained-activation-offloading README's
  DeepSeek-V3 proxy (14 MoE layers, TP1 PP4 EP16, per-PP-stage max allocated / max reserved in MB) --
  sequence length, recompute and distributed-optimizer setting not stated, and MLA; the same README's
  Qwen3-30B-A3B table (65308 MB etc.) -- GPU count and the statistic not stated; the Bridge
  CPU-offloading card's Qwen3-30B-A3B baseline (47.2 GB) -- batch, sequence and recompute not stated.
* Measured with complete layout but an architecture the planner does not model: Qwen3.5-35B-A3B
  (30 Gated-DeltaNet + 10 attention layers, MoE, MTP) on 16x H100 (61.46 GiB max allocated etc.).
* Not full training: LoRA / PEFT peaks (Qwen3-8B, Qwen3-30B-A3B, GPT-OSS-120B on H100).
* A GPT2-XL Megatron tutorial's single-H100 ``nvidia-smi`` snapshot (33321 MiB) -- a snapshot, not a
  peak, sequence length not shown, repository not resolved.
* Searched without a usable hit: Megatron-LM GitHub issues with ``[Rank 0] (after N iterations)
  memory (MB)`` lines (the stored hits were A100/Leonardo, AMD, NPU, toy models, or had no GPU stated);
  NeMo performance summaries and the dgxc-benchmarking READMEs (throughput only); Megatron-LM
  ``report_theoretical_memory`` discussions (no H100 measured pair with layout).

Units: Megatron-LM's ``report_memory`` prints ``memory (MB)`` as bytes / 2**20 (i.e. MiB) -> GiB = MB /
1024. Megatron-Bridge's ``mem-*-gigabytes`` are bytes / 1e9 (decimal GB) -> GiB = GB * 1e9 / 2**30.
"""

_BRIDGE = "NVIDIA-NeMo/Megatron-Bridge"
_PR3107 = "https://github.com/NVIDIA-NeMo/Megatron-Bridge/pull/3107"
_RECOMPUTE_SKILL = _BRIDGE + " skills/mbridge-perf-activation-recompute/SKILL.md @6608201d77f7 ('Measured Results')"
_RECOMPUTE_CARD = _BRIDGE + " skills/mbridge-perf-activation-recompute/card.yaml @6608201d77f7 (measured_results)"
_MEMTUNE_SKILL = _BRIDGE + " skills/mbridge-perf-memory-tuning/SKILL.md @6608201d77f7 ('Measured Results', 'A Note on VPP')"
_MEMTUNE_CARD = _BRIDGE + " skills/nemo-mbridge-perf-memory-tuning/card.yaml @9e12bbd5c6a2 (measured_results)"
_LLAMA_PRESET = (_BRIDGE + " scripts/performance workload presets (stored file, index id 52014364621; path not "
                 "resolved through the index): _LLAMA3_70B_SFT_CONFIG_H100 = TP4 PP4 VP5 MBS1 GBS32 num_gpus 32; "
                 "LLAMA3_70B_SFT_CONFIG_H100_FP8_CS_V1 adds cuda_graph_impl='transformer_engine', "
                 "cuda_graph_scope='mlp'")
_BRIDGE_GB = (_BRIDGE + " src/megatron/bridge/training/utils/train_utils.py (stored versions, index ids "
              "58740803098 / 51961052743): 'gigabytes = memory_stats[torch_name] / 1.0e9' for the "
              "mem-*-gigabytes log keys (allocated_bytes.all.peak -> mem-max-allocated-gigabytes)")

# Model shapes (same sources as tests/plan/published_h100.py).
_LLAMA3_70B = dict(layers=80, hidden=8192, ffn_hidden=28672, gated_mlp=True, heads=64, kv_heads=8,
                   kv_channels=128, vocab=128256, num_experts=0, top_k=None, moe_ffn_hidden=None,
                   moe_layer_freq=None,
                   shape_source="NeMo llama.py Llama3Config70B (as in tests/plan/published_h100.py); "
                                "vocab 128256")
_QWEN3_30B_A3B = dict(layers=48, hidden=2048, ffn_hidden=6144, gated_mlp=True, heads=32, kv_heads=4,
                      kv_channels=128, vocab=151936, num_experts=128, top_k=8, moe_ffn_hidden=768,
                      moe_layer_freq=1,
                      shape_source="NeMo qwen3.py Qwen3Config30B_A3B (as in tests/plan/published_h100.py); "
                                   "every layer MoE, ffn_hidden unused; qk-layernorm; untied embeddings; "
                                   "vocab 151936 confirmed by the Bridge verification card "
                                   "('vocabulary size 151936 ... [151936, 2048]')")

_LLAMA_NOTES = (
    "Task is SFT (packed sequences, seq 4096), full-parameter, so weights/grads/optimizer are as in "
    "pretraining. FP8 current scaling (Bridge 'FP8 CS'), TE CUDA graphs on the MLP scope (preset). "
    "Metric: the docs say only 'Peak Mem (GB)'; ASSUMED Bridge mem-max-allocated-gigabytes (decimal GB, "
    "bytes/1e9) -> memory_gib = GB*1e9/2**30; memory_gib_if_binary if 'GB' meant GiB. Rank: the baseline "
    "row says 'OOM rank0'; presumably the first pipeline stage (largest in-flight activations), not "
    "stated for the other rows. distributed_optimizer ASSUMED True (Bridge recipe default, not stated); "
    "sequence_parallel ASSUMED True (TP>1 Bridge Llama recipes). grad_reduce_in_fp32 not stated. "
    "Container / Bridge commit not stated in the docs (experiment dated 2026-04-02)."
)

MEMORY_POINTS = [
    # ------------------------------------------------------------------ Llama3-70B SFT FP8, 32x H100 (PR #3107)
    dict(name="bridge-pr3107-llama3-70b-sft-fp8cs-32gpu-tp4pp4vp5-core_attn",
         source=[_RECOMPUTE_SKILL, _RECOMPUTE_CARD, _MEMTUNE_SKILL, _MEMTUNE_CARD, _PR3107, _LLAMA_PRESET],
         quote="Llama3 70B SFT on 32x H100 80GB, FP8 (Current Scaling): - Baseline: TP=4, PP=4, VPP=5, DP=2, "
               "MBS=1, GBS=32, seq_len=4096 / | Baseline | [core_attn] | ~704 | -0.8% | 58.8 (OOM rank0) | OOM | "
               "/ (card.yaml) name: baseline recompute_modules: [\"core_attn\"] tflops: 704 peak_mem_gb: 58.8 "
               "status: OOM_on_rank0",
         **_LLAMA3_70B, seq_length=4096, task="sft",
         gpus=32, tp=4, pp=4, vp=5, cp=1, ep=1, dp=2, micro_batch=1, global_batch=32, precision="fp8",
         recompute="selective", recompute_detail="recompute_modules=[core_attn]",
         distributed_optimizer=True, sequence_parallel=True, grad_reduce_in_fp32=None,
         memory_value_raw=58.8, memory_unit_raw="GB", memory_gib=54.762, memory_gib_if_binary=58.8,
         memory_kind="peak (statistic unstated; assumed max_allocated, decimal GB)", rank="0 (OOM rank)",
         gpu="H100 SXM 80GB",
         derived=("memory_gib", "distributed_optimizer", "sequence_parallel", "memory_kind"),
         notes="Without PYTORCH_CUDA_ALLOC_CONF=expandable_segments this run OOMed in ~30-60% of CI runs "
               "(PR #3107: 'flaky OOMing ... pre-existing borderline memory issue'); the memory-tuning doc "
               "attributes the OOM to fragmentation, not capacity. With expandable_segments the same layout "
               "passed at '~59' GB (card: peak_mem_gb: ~59, status: passed). " + _LLAMA_NOTES,
         confidence="medium: layout complete from the doc + preset; statistic, rank and GB-vs-GiB inferred"),
    dict(name="bridge-pr3107-llama3-70b-sft-fp8cs-32gpu-tp4pp4vp5-mlp",
         source=[_RECOMPUTE_SKILL, _RECOMPUTE_CARD, _PR3107, _LLAMA_PRESET],
         quote="| Exp 1 | [mlp] | 593.6 | -16.4% | 55.6 | Perf regression | / name: mlp_only "
               "recompute_modules: [\"mlp\"] tflops: 593.6 peak_mem_gb: 55.6 status: perf_regression",
         **_LLAMA3_70B, seq_length=4096, task="sft",
         gpus=32, tp=4, pp=4, vp=5, cp=1, ep=1, dp=2, micro_batch=1, global_batch=32, precision="fp8",
         recompute="selective", recompute_detail="recompute_modules=[mlp] (core_attn NOT recomputed)",
         distributed_optimizer=True, sequence_parallel=True, grad_reduce_in_fp32=None,
         memory_value_raw=55.6, memory_unit_raw="GB", memory_gib=51.782, memory_gib_if_binary=55.6,
         memory_kind="peak (statistic unstated; assumed max_allocated, decimal GB)", rank="unstated",
         gpu="H100 SXM 80GB",
         derived=("memory_gib", "distributed_optimizer", "sequence_parallel", "memory_kind"),
         notes="MLP (fc1/SwiGLU/fc2 inputs) recompute instead of core attention: -3.2 GB vs the baseline. "
               "The planner's 'selective' means core-attention recompute; this row needs an MLP-recompute "
               "variant. " + _LLAMA_NOTES,
         confidence="medium (same caveats as the baseline row)"),
    dict(name="bridge-pr3107-llama3-70b-sft-fp8cs-32gpu-tp4pp4vp5-mlp-core_attn",
         source=[_RECOMPUTE_SKILL, _RECOMPUTE_CARD, _PR3107, _LLAMA_PRESET],
         quote="| Exp 2 | [mlp, core_attn] | 586.8 | -17.3% | 55.6 | Perf regression | / name: "
               "mlp_plus_core_attn recompute_modules: [\"mlp\", \"core_attn\"] tflops: 586.8 peak_mem_gb: 55.6",
         **_LLAMA3_70B, seq_length=4096, task="sft",
         gpus=32, tp=4, pp=4, vp=5, cp=1, ep=1, dp=2, micro_batch=1, global_batch=32, precision="fp8",
         recompute="selective", recompute_detail="recompute_modules=[mlp, core_attn]",
         distributed_optimizer=True, sequence_parallel=True, grad_reduce_in_fp32=None,
         memory_value_raw=55.6, memory_unit_raw="GB", memory_gib=51.782, memory_gib_if_binary=55.6,
         memory_kind="peak (statistic unstated; assumed max_allocated, decimal GB)", rank="unstated",
         gpu="H100 SXM 80GB",
         derived=("memory_gib", "distributed_optimizer", "sequence_parallel", "memory_kind"),
         notes="Same peak as [mlp] alone: with fused (TE/cuDNN) attention, core-attention recompute frees "
               "~nothing -- consistent with the planner's note that selective recompute saves little. "
               + _LLAMA_NOTES,
         confidence="medium"),
    dict(name="bridge-pr3107-llama3-70b-sft-fp8cs-32gpu-tp4pp4vp5-core_attn-layernorm",
         source=[_RECOMPUTE_SKILL, _RECOMPUTE_CARD, _PR3107, _LLAMA_PRESET],
         quote="| Exp 3 | [core_attn, layernorm] | ~702 | -1.1% | 59.6 (OOM rank0) | OOM | / name: "
               "core_attn_plus_layernorm ... peak_mem_gb: 59.6 status: OOM_on_rank0",
         **_LLAMA3_70B, seq_length=4096, task="sft",
         gpus=32, tp=4, pp=4, vp=5, cp=1, ep=1, dp=2, micro_batch=1, global_batch=32, precision="fp8",
         recompute="selective", recompute_detail="recompute_modules=[core_attn, layernorm]",
         distributed_optimizer=True, sequence_parallel=True, grad_reduce_in_fp32=None,
         memory_value_raw=59.6, memory_unit_raw="GB", memory_gib=55.507, memory_gib_if_binary=59.6,
         memory_kind="peak (statistic unstated; assumed max_allocated, decimal GB)", rank="0 (OOM rank)",
         gpu="H100 SXM 80GB",
         derived=("memory_gib", "distributed_optimizer", "sequence_parallel", "memory_kind"),
         notes="Adding layernorm recompute did not lower the peak (+0.8 GB vs baseline: run-to-run / "
               "fragmentation noise). Treat 58.8-59.6 as the spread of one layout. " + _LLAMA_NOTES,
         confidence="medium"),
    dict(name="bridge-pr3107-llama3-70b-sft-fp8cs-32gpu-tp4pp4vp10-core_attn",
         source=[_MEMTUNE_SKILL, _PR3107, _LLAMA_PRESET],
         quote="In earlier experiments we incorrectly attributed an OOM fix to VPP tuning (VPP 5→10). ... The "
               "VPP=10 run actually used slightly **more** peak memory (60.2 GB vs 58.8 GB) but did not OOM "
               "because expandable segments prevented fragmentation. / (PR #3107) **TP=4 PP=4 VPP=10 (DP=2)** "
               "| **Passed**",
         **_LLAMA3_70B, seq_length=4096, task="sft",
         gpus=32, tp=4, pp=4, vp=10, cp=1, ep=1, dp=2, micro_batch=1, global_batch=32, precision="fp8",
         recompute="selective", recompute_detail="recompute_modules=[core_attn] (baseline; assumed unchanged)",
         distributed_optimizer=True, sequence_parallel=True, grad_reduce_in_fp32=None,
         memory_value_raw=60.2, memory_unit_raw="GB", memory_gib=56.066, memory_gib_if_binary=60.2,
         memory_kind="peak (statistic unstated; assumed max_allocated, decimal GB)", rank="unstated",
         gpu="H100 SXM 80GB",
         derived=("memory_gib", "distributed_optimizer", "sequence_parallel", "memory_kind",
                  "recompute_detail"),
         notes="80 layers / (PP4*VP10) = 2 layers per chunk. Run with expandable_segments (per the doc). "
               "Megatron-Core's interleaved warm-up holds (pp-j-1)*2+(vp-1)*pp+1 chunk micro-batches: "
               "stage 0 at VP5 = 23 chunks x 4 layers = 92 layer-activations, at VP10 = 43 x 2 = 86; the "
               "measured peak went UP 1.4 GB, so the difference is not activations alone. " + _LLAMA_NOTES,
         confidence="medium-low: value given in prose; run conditions (expandable_segments) differ from "
                    "the VP5 baseline"),
    dict(name="bridge-pr3107-llama3-70b-sft-fp8cs-32gpu-tp4pp8vp5",
         source=[_MEMTUNE_SKILL, _MEMTUNE_CARD, _PR3107],
         quote="| More PP | 4 | 8 | 5 | 1 | 668.0 | -5.9% | 53.2 | Borderline perf | / name: more_pp tp: 4 pp: 8 "
               "vpp: 5 dp: 1 tflops: 668.0 peak_mem_gb: 53.2 status: passed_mem_borderline_perf",
         **_LLAMA3_70B, seq_length=4096, task="sft",
         gpus=32, tp=4, pp=8, vp=5, cp=1, ep=1, dp=1, micro_batch=1, global_batch=32, precision="fp8",
         recompute="selective", recompute_detail="recompute_modules=[core_attn] (baseline; assumed unchanged)",
         distributed_optimizer=True, sequence_parallel=True, grad_reduce_in_fp32=None,
         memory_value_raw=53.2, memory_unit_raw="GB", memory_gib=49.546, memory_gib_if_binary=53.2,
         memory_kind="peak (statistic unstated; assumed max_allocated, decimal GB)", rank="unstated",
         gpu="H100 SXM 80GB",
         derived=("memory_gib", "distributed_optimizer", "sequence_parallel", "memory_kind",
                  "recompute_detail"),
         notes="80 layers / (PP8*VP5) = 2 layers per chunk; DP=1 so the distributed optimizer shards nothing "
               "(full 12 B/param optimizer state on each GPU); 32 micro-batches per step. " + _LLAMA_NOTES,
         confidence="medium"),
    dict(name="bridge-pr3107-llama3-70b-sft-fp8cs-32gpu-tp8pp4vp5",
         source=[_MEMTUNE_SKILL, _MEMTUNE_CARD, _PR3107],
         quote="| More TP | 8 | 4 | 5 | 1 | 508.7 | -28.4% | 50.2 | Severe regression | / name: more_tp tp: 8 "
               "pp: 4 vpp: 5 dp: 1 tflops: 508.7 peak_mem_gb: 50.2 status: severe_perf_regression",
         **_LLAMA3_70B, seq_length=4096, task="sft",
         gpus=32, tp=8, pp=4, vp=5, cp=1, ep=1, dp=1, micro_batch=1, global_batch=32, precision="fp8",
         recompute="selective", recompute_detail="recompute_modules=[core_attn] (baseline; assumed unchanged)",
         distributed_optimizer=True, sequence_parallel=True, grad_reduce_in_fp32=None,
         memory_value_raw=50.2, memory_unit_raw="GB", memory_gib=46.752, memory_gib_if_binary=50.2,
         memory_kind="peak (statistic unstated; assumed max_allocated, decimal GB)", rank="unstated",
         gpu="H100 SXM 80GB",
         derived=("memory_gib", "distributed_optimizer", "sequence_parallel", "memory_kind",
                  "recompute_detail"),
         notes="DP=1 (no optimizer sharding); TP8 halves weights/activations per GPU vs TP4. " + _LLAMA_NOTES,
         confidence="medium"),
    # ------------------------------------------------------------------ Qwen3-30B-A3B, 16x H100 BF16
    dict(name="bridge-qwen3-30b-a3b-bf16-16gpu-ep16-hybridep",
         source=[_BRIDGE + " skills/nemo-mbridge-perf-moe-hardware-configs/card.yaml @228e9a3e7206 "
                           "(best_configs.qwen3_30b_h100_16)",
                 _BRIDGE + " skills/nemo-mbridge-perf-moe-optimization-workflow/card.yaml @218c72fa258e "
                           "(qwen3_30b_h100_case_study: same run, no memory field)",
                 _BRIDGE + " src/megatron/bridge/recipes/qwen/h100/qwen3_moe.py @04eb4f8d6045 "
                           "(qwen3_30b_a3b_pretrain_16gpu_h100_bf16_config and the 8gpu config it extends)",
                 _BRIDGE + " src/megatron/bridge/perf_recipes/qwen/h100/qwen3_moe.py @04eb4f8d6045 and "
                           "src/megatron/bridge/perf_recipes/_common.py @007282eaeaeb (_benchmark_common)"],
         quote="qwen3_30b_h100_16: model: \"Qwen3 30B-A3B\" hardware: \"16×H100\" precision: BF16 dispatcher: "
               "HybridEP tflops: 287.305 step_time_ms: 20992.030 parallelism: \"TP1 EP16 PP1 CP1\" "
               "sequence_length: 4096 batch: \"MBS1 GBS1024\" routing: force_balance ep_overlap: true "
               "delay_wgrad_compute: false cuda_graph: \"moe_router, moe_preprocess\" "
               "rank0_peak_allocated_gib: 62.166 baseline_tflops: 244.039",
         **_QWEN3_30B_A3B, seq_length=4096, task="pretrain",
         gpus=16, tp=1, pp=1, vp=1, cp=1, ep=16, dp=16, micro_batch=1, global_batch=1024, precision="bf16",
         recompute="none", recompute_detail="recipe: 'The 16-GPU topology fits without activation "
                                            "recomputation.' recompute_granularity = None",
         distributed_optimizer=True, sequence_parallel=False, grad_reduce_in_fp32=False,
         memory_value_raw=62.166, memory_unit_raw="GiB", memory_gib=62.166, memory_gib_if_binary=62.166,
         memory_kind="max_allocated", rank="0",
         gpu="H100 SXM 80GB",
         derived=("dp", "expert_tp=1 and every non-memory setting from the recipe, not the card"),
         notes="Layout from the recipe (matches the card and the verification card: 'TP1/PP1/CP1/EP16/ETP1, "
               "DP16, SP off, GBS/MBS 1024/1, and 64-way gradient accumulation'). Recipe settings that matter "
               "for memory: use_distributed_optimizer=True (inherited from the 8-GPU config); "
               "use_precision_aware_optimizer=False with fp32 main params and Adam moments; "
               "grad_reduce_in_fp32=False (set in the recipe and again in _benchmark_common) => bf16 DDP "
               "grad buffer (2 B/param, the planner assumes 4); cross_entropy_loss_fusion (TE); "
               "moe_permute_fusion, grouped GEMM; TE CUDA graphs on moe_router + moe_preprocess (graph "
               "pools add memory); HybridEP flex dispatcher with 32 SMs; moe_router_force_load_balancing "
               "True (perf recipe) => balanced routed tokens. EP comm overlap was ON for this number "
               "(overlap_moe_expert_parallel_comm, delay_wgrad_compute False), which the base recipe at "
               "04eb4f8 does not set: the card lists rank0_peak_allocated_gib beside the overlap result "
               "(287.3 TFLOP/s) and the no-overlap baseline (244.0) without a separate memory value, so the "
               "peak is attributed to the overlap run. The card does not state the Bridge commit/container; "
               "the recipe file read is a nearby stored version, not necessarily the one run. Dense DP = 16 "
               "shards the (small) dense optimizer state 16 ways; experts: EP16, expert-DP 1 => expert "
               "optimizer state NOT sharded (128/16 = 8 experts per GPU, full fp32 state). The Bridge "
               "verification card's bound for the same recipe ('below 65 GiB/GPU') is consistent.",
         confidence="medium-high: explicit max-allocated GiB on rank 0 with a complete layout; exact "
                    "software commit and the EP-overlap attribution are the uncertain parts"),
]

MEMORY_BOUNDS = [
    # ------------------------------------------------------------------ bounds (not measurements)
    dict(name="bridge-verification-qwen3-30b-a3b-bf16-16gpu-bound",
         kind="bound",
         source=_BRIDGE + " docs/model-verification/models/qwen3-30b-a3b.md @d5d8c1925dc6 "
                          "('pretrain_performance · H100', effective Bridge commit 3a9559f01283)",
         quote="Over steps 41-50, the run averages at most 20.50 seconds per step and at least 295 model "
               "TFLOP/s/GPU, while peak allocated memory remains below 65 GiB/GPU.",
         layout="qwen3_30b_a3b_pretrain_16gpu_h100_bf16_config: TP1 PP1 CP1 EP16, seq 4096, MBS1 GBS1024, BF16",
         bound_gib=65.0, memory_kind="max_allocated (upper bound)",
         why="An acceptance threshold, not a measured value. Consistent with the 62.166 GiB measurement "
             "(MEMORY_POINTS, bridge-qwen3-30b-a3b-bf16-16gpu-ep16-hybridep)."),
    dict(name="bridge-pr3107-llama3-70b-sft-fp8cs-tp4pp4vp5-expandable-segments",
         kind="approximate",
         source=_MEMTUNE_SKILL + "; " + _MEMTUNE_CARD,
         quote="| Baseline + expandable_segments | 4 | 4 | 5 | 2 | ~704 | -0.8% | ~59 | **Passed** |",
         layout="as bridge-pr3107-llama3-70b-sft-fp8cs-32gpu-tp4pp4vp5-core_attn, with "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
         value_gb=59.0, value_gib_if_decimal=54.948,
         why="Only '~59' is given; the 58.8 row in MEMORY_POINTS is the same layout."),
    # ------------------------------------------------------------------ measured, layout incomplete
    dict(name="mcore-offload-readme-dsv3-proxy-14l-tp1pp4ep16",
         kind="measured_incomplete_layout",
         source="NVIDIA/Megatron-LM megatron/core/transformer/README.md ('Fine-grained Activation Offloading', "
                "NVIDIA + rednote), stored version with a 'Performance > H100' section (index id 25324620254; "
                "commit not resolved: the stored version at 0f99ca606fa4 only has 'Performance (WIP)'); the "
                "feature is PR #1913 / #1912 (https://github.com/NVIDIA/Megatron-LM/pull/1913)",
         quote="Layer parameters are same as DeepSeek-V3 model / Layer number is cut off to 14 layers / Replace "
               "the fisrt 3 dense layers with 3 moe layers / TP1PP4EP16VPP1CP1-MBS1GBS512 / bf16 training / "
               "DeepEP dispatcher / Baseline (no offloading) [Rank 0] (after 10 iterations) memory (MB) | "
               "allocated: 24761.02978515625 | max allocated: 65203.93359375 | reserved: 64438.0 | max reserved: "
               "74306.0 / [Rank 16] ... max allocated: 52228.1533203125 | ... | max reserved: 58770.0 / "
               "[Rank 32] ... max allocated: 45200.8349609375 | ... | max reserved: 51772.0 / [Rank 48] ... max "
               "allocated: 48166.263671875 | ... | max reserved: 56328.0",
         layout=dict(layers=14, all_moe=True, shape="DeepSeek-V3 layer (hidden 7168, MLA, 256 experts top-8, "
                     "shared expert) -- shape values not printed in the README", tp=1, pp=4, vp=1, cp=1, ep=16,
                     micro_batch=1, global_batch=512, precision="bf16",
                     gpus_derived=64, dp_derived=16),
         values_gib=dict(max_allocated=[63.676, 51.004, 44.141, 47.037],
                         max_reserved=[72.564, 57.393, 50.559, 55.008],
                         ranks=[0, 16, 32, 48]),
         also="with offloading expert_fc1, moe_act, act_norm and mlp_norm: max allocated 48544.7 / 38760.4 / "
              "34950.3 / 41310.8 MB on ranks 0/16/32/48",
         why="Per-PP-stage max allocated / max reserved (MB = MiB, Megatron report_memory) on H100, but the "
             "sequence length, recompute setting, distributed optimizer, MTP and the exact layer shape "
             "(MLA dims, vocab) are not stated, and the planner has no MLA model. gpus=64 is derived "
             "(ranks 0/16/32/48 = PP stage heads with 16 ranks per stage, EP16 needs DP>=16)."),
    dict(name="mcore-offload-readme-qwen3-30b-a3b-ep8",
         kind="measured_incomplete_layout",
         source="same README version as mcore-offload-readme-dsv3-proxy-14l-tp1pp4ep16 (section 'H100 > "
                "Qwen3-30B-A3B')",
         quote="| Qwen3-30B-A3B | TP1PP1EP8VPP1_MBS1GBS256 | 4096 | / | / | 194 | 65308 | / "
               "| TP1PP1EP8VPP1_MBS1GBS256 | 8192 | full | / | 230 | 59566 | / | TP1PP2EP8VPP4_MBS1GBS256 | 8192 | "
               "layernorm | expert_fc1 | 255 | 64962 |",
         layout=dict(tp=1, pp="1 or 2", ep=8, micro_batch=1, global_batch=256, seq_length="4096 / 8192",
                     recompute="none / full / layernorm", precision="unstated (bf16 presumed)"),
         values_mib=[65308, 59566, 64962], values_gib=[63.777, 58.17, 63.439],
         why="GPU count (hence DP and the optimizer-sharding factor) and the statistic behind 'Memory (MB)' "
             "(max allocated vs max reserved) are not stated; distributed optimizer not stated. If a later "
             "source gives the GPU count (8 is plausible for one node), the first row (no recompute, seq "
             "4096) would become a good point."),
    dict(name="bridge-cpu-offload-card-qwen3-30b-a3b-baseline-tp2pp2ep4",
         kind="measured_incomplete_layout",
         source=_BRIDGE + " skills/nemo-mbridge-perf-cpu-offloading/card.yaml @a767ee3899b0",
         quote="Verified on Qwen3-30B-A3B MoE pretrain (TP2 PP2 EP4, 2 nodes H100) ... - model: Qwen3-30B-A3B "
               "config: baseline iter_ms: 996 mem_allocated_gb: 47.2 ... config: activation_offload_24_layers "
               "mem_allocated_gb: 70.3 status: oom",
         layout=dict(tp=2, pp=2, ep=4, gpus=16, precision="bf16 (recipe default)"),
         value_gb=47.2, value_gib_if_decimal=43.958,
         why="Global/micro batch, sequence length and recompute are not stated (the SKILL.md example command "
             "uses train.global_batch_size=8 micro_batch_size=1 on the 8-GPU recipe, which has full "
             "recompute, but the card does not say the measurement used it); 'mem_allocated_gb' may be "
             "current rather than max allocated. The 70.3 GB value is an OOM at PP=1."),
    # ------------------------------------------------------------------ architecture the planner does not model
    dict(name="bridge-qwen35-35b-a3b-bf16-16gpu-ep16",
         kind="measured_unmodelled_architecture",
         source=[_BRIDGE + " skills/nemo-mbridge-perf-moe-optimization-workflow/card.yaml @218c72fa258e "
                           "(qwen35_35b_h100_bringup_case_study)",
                 _BRIDGE + " skills/nemo-mbridge-perf-moe-hardware-configs/card.yaml @228e9a3e7206",
                 _BRIDGE + " skills/nemo-mbridge-perf-parallelism-strategies/card.yaml @190603a831ef"],
         quote="model_type: \"30 Gated DeltaNet layers + 10 full-attention layers, MoE + MTP\" precision: BF16 "
               "sequence_length: 4096 ... acceptance_batch: \"MBS1/GBS1024\" best_development_layout: "
               "\"TP1/PP1/CP1/EP16, HybridEP, BF16, static dispatch, experimental SM90 grouped-MM\" ... "
               "best_development_peak_allocated_gib: 61.460 best_development_peak_reserved_gib: 65.500 ... "
               "mixed_fp8_blockwise_rank0_max_allocated_gib: 63.369 mixed_fp8_blockwise_rank0_max_reserved_gib: "
               "67.228 ... candidate: \"TP2 EP16 ETP1 MBS2 SP-on\" candidate_rank0_iteration2_max_allocated_gib: "
               "66.504 candidate_rank0_iteration2_max_reserved_gib: 68.373 ... exact_gbs1024_rank0_peak_"
               "allocated_gib: 69.942",
         values_gib=dict(tp1_ep16_bf16_max_allocated=61.460, tp1_ep16_bf16_max_reserved=65.500,
                         tp1_ep16_fp8_blockwise_bf16_experts_max_allocated=63.369,
                         tp1_ep16_fp8_blockwise_bf16_experts_max_reserved=67.228,
                         tp2_ep16_mbs2_sp_iter2_max_allocated=66.504, tp2_ep16_mbs2_sp_iter2_max_reserved=68.373,
                         exact_gbs1024_rank0_peak_allocated=69.942),
         why="Layouts are complete (16x H100, TP1 PP1 CP1 EP16, seq 4096, MBS1, GBS1024) and the values are "
             "explicit max allocated / max reserved in GiB, but the model is a hybrid Gated-DeltaNet + "
             "attention MoE with MTP, which the planner does not model. Useful only as a sanity check on "
             "allocated-vs-reserved gaps (~4 GiB here). The card also notes 'step 2 can be the first "
             "full-state memory point' (Adam state materialised after the first optimizer step)."),
    # ------------------------------------------------------------------ not full-parameter training
    dict(name="bridge-lora-sp-input-regather-h100",
         kind="not_full_training",
         source=_MEMTUNE_CARD + " (measured_results: lora_sequence_parallel_input_regather, PR #4581)",
         quote="task: peft_sft gpu: H100 dataset: SQuAD ... model: Qwen3-8B parallelism: TP2 seq_length: 8192 "
               "baseline_peak_mem_gb: 47.545 ... model: Qwen3-30B-A3B parallelism: TP4_EP4 "
               "baseline_peak_mem_gb: 29.890 ... model: GPT-OSS-120B parallelism: TP2_EP8 "
               "baseline_peak_mem_gb: 52.185",
         why="LoRA (frozen base: no full gradients or optimizer state); batch sizes / GPU counts not given."),
    # ------------------------------------------------------------------ snapshot, source unresolved
    dict(name="tutorial-gpt2-xl-1gpu-nvidia-smi",
         kind="snapshot_incomplete",
         source="stored Markdown tutorial on Megatron-LM DP/ZeRO-2 (index id 9996097503; repository and path "
                "not resolved through the index)",
         quote="R1 is a baseline training of gpt2-xl (1.5B params) with global batch size (GBS) of 1 on a single "
               "GPU. ... [0] NVIDIA H100 80GB HBM3 | 38°C,  53 % | 33321 / 81559 MB | root(33314M) ... "
               "Theoretical memory footprints: weight and optimizer=26699.47 MB",
         value_mib=33321, value_gib=32.54,
         why="An nvidia-smi snapshot during training (includes CUDA context and allocator cache, not a peak); "
             "sequence length and precision flags not shown in the stored text; other runs of the same "
             "tutorial (79 GB / 65 GB per GPU for DP4 GBS60 with/without --use-distributed-optimizer) are "
             "only in a table image."),
]

_names = [p["name"] for p in MEMORY_POINTS + MEMORY_BOUNDS]
assert len(_names) == len(set(_names)), "duplicate names"
for _p in MEMORY_POINTS:
    assert _p["tp"] * _p["pp"] * _p["cp"] * _p["dp"] == _p["gpus"], _p["name"]
    assert _p["global_batch"] % (_p["micro_batch"] * _p["dp"]) == 0, _p["name"]
    if _p["memory_unit_raw"] == "GB":
        assert abs(_p["memory_gib"] - _p["memory_value_raw"] * 1e9 / 2**30) < 1e-3, _p["name"]
del _names, _p
