"""The figures the H100 model (`h100`) assumes: the device and its fabric (an H100 SXM 80GB
in DGX/HGX nodes of 8 with one 400 Gb/s NIC per GPU: peaks, bandwidths, the memory the
allocator can get and what lives outside it) and the achievable fractions and per-call
overheads fitted to published Megatron-LM / NeMo / Megatron-Bridge H100 runs
(tests/plan/published_h100.py, checked by tests/plan/test_calibration.py).
"""

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
