"""Published H100 training-throughput data points for Megatron-LM / NeMo / Megatron-Core runs.

Purpose: calibration targets for the analytic step-time / memory planner
(``mm1_megatron.plan``).  Every number below was copied from the stored text of
the cited file (repository + path + commit, or page), never from memory.  No
source in this set publishes measured peak memory, so ``memory_gib`` is always
``None``.

Sources
-------
1. NVIDIA/NeMo ``docs/source/performance/performance_summary.md`` @ 070a0bb
   (NeMo 24.07 container, DGX-H100, FP8; "Pretraining" table, columns
   #-GPUs | GBS | MBS | Sequence Length | TP | PP | CP | VP | Tokens/sec/GPU |
   Model TFLOP/sec/GPU).  A second stored version of the same page (index id
   28718048417, commit not resolvable through the index; also NeMo 24.07) has a
   "Long Input Sequences" table (NeMo 24.03.01, LLAMA2-7B, FP8) whose TFLOP/s
   column agrees with ``docs/source/performance/performance_long_sequence.md``
   @ 0aa2671.
2. NVIDIA/dgxc-benchmarking (DGX Cloud performance recipes, NeMo launcher):
   ``llama3.1/README_8b.md`` and ``llama3.1/README_405b.md`` @ 143b90d
   (nvcr.io/nvidia/nemo:24.09), ``llama3.1/README_70b.md`` @ 8f5cbb3
   (nvcr.io/nvidia/nemo:24.12), ``nemo_megatron/README_175b.md`` @ 0b71cfd,
   ``grok1/README_314b.md`` @ 143b90d (nemo:dev container).  These publish step
   time, total tokens/s and MFU for BF16 *and* FP8 on the same layout; MFU is
   relative to 989 TFLOP/s (BF16) or 1979 TFLOP/s (FP8) dense peak, as the
   READMEs state.  TFLOP/s/GPU is therefore *derived* (mfu * peak) and stored
   in ``tflops_per_gpu_derived``; ``tflops_per_gpu`` stays ``None``.
3. NVIDIA-NeMo/Megatron-Bridge ``docs/performance-summary.md`` @ df0289c
   (sections "26.02 NeMo Container" and "25.11 NeMo Container", System:
   DGX-H100) and ``docs/performance-summary-archive.md`` @ 4da7335 (26.02,
   per-model tables).
4. NVIDIA/Megatron-LM ``README.md`` @ 0010ab7 and
   ``megatron/core/transformer/moe/README.md`` @ 022bcb5: their numbers could
   not be tied to a complete layout (the README's model table is an image), so
   they live in ``UNPAIRED_POINTS`` and are *not* in ``POINTS``.

FLOP conventions (checked numerically: ``implied_flops_per_token`` =
TFLOP/s / tokens/s/GPU, computed at import time, matches the named formula to
<=0.5% for every point except dgxc 405B (+1%, explained in its notes) and GPT-OSS
(see its notes); dgxc TFLOP/s are the derived mfu*peak values)
-------------------------------------------------------------------------
* ``nemo-full`` (NeMo <= 24.12 and dgxc READMEs): "model FLOPs", fwd+bwd = 3x
  forward, no recompute FLOPs, attention scores counted for the *full* s x s
  matrix (no causal halving).  Per token:
  ``L*h^2*(12 + 12*g/a + c*f/h + 12*s/h) + 6*V*h`` with c = 18 for gated
  (SwiGLU) MLPs and 12 for non-gated (nemo/utils/flops_formulas.py: llama2,
  llama3, nemotron, mixtral; dgxc README "Notes" sections).  For GPT-3 this is
  exactly Narayanan et al. 2021: ``72*B*s*L*h^2*(1 + s/(6h) + V/(12*L*h))``.
  NeMo's GPT-3 formula uses V = 51200 regardless of the real padded vocab.
* ``bridge-causal`` (Megatron-Bridge 25.11 / 26.02):
  ``num_floating_point_operations`` in
  src/megatron/bridge/training/utils/flop_utils.py: 3x forward, GQA-aware and
  kv_channels-aware QKV/out projections, core attention counted *causally*
  (s/2), MLP 2 or 3 matmuls (GLU), MoE = top_k * expert MLP, logits 2*h*V fwd.
  Exception noted on the GPT-OSS point: its published TFLOP/s matches this
  formula with a *non-GLU* expert MLP (2 matmuls) and full-length causal
  attention on every layer (the 128-token sliding window is ignored).
* ``dgxc-grok``: the Grok-1 README gives only the total (4.27e15 FLOPs per
  8192-token sequence); that reproduces the causal count (4.275e15) and not
  the full count (4.433e15) for the shape below.

Quotes are verbatim; where several table rows were needed, verbatim row prefixes (cut after the
relevant column) are joined with " / ".

Layout notes: ``dp`` is always derived as gpus / (tp*pp*cp) unless the source
lists it (marked in ``derived``).  ``ep`` is carved out of dp (and, with MoE
parallel folding, tp*cp) as in Megatron-Core.  ``sequence_parallel`` is not
stated in any table; it is *assumed* True whenever tp > 1 (the usual NeMo / Bridge
recipe choice, not verified per row; Megatron-Core requires it for MoE with EP
and TP, see megatron/core/transformer/moe/README.md) and listed in ``derived``.
Activation recompute is not stated in any table (``recompute`` = None unless
stated).  Every ``gpu`` is a DGX-H100 / DGX-Cloud H100, i.e. H100 SXM 80GB.
"""

PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}  # dense H100 SXM peaks used by the dgxc READMEs

FLOP_CONVENTIONS = {
    "nemo-full": (
        "NeMo/dgxc model FLOPs: 3x forward, no recompute, full (non-causal) s^2 attention; per token "
        "L*h^2*(12+12*g/a+c*f/h+12*s/h)+6*V*h, c=18 gated / 12 non-gated; equals Narayanan et al. 2021 "
        "72*B*s*L*h^2*(1+s/6h+V/(12*L*h)) for GPT-3 (nemo/utils/flops_formulas.py, dgxc README Notes)"
    ),
    "bridge-causal": (
        "Megatron-Bridge num_floating_point_operations (training/utils/flop_utils.py): 3x forward, GQA and "
        "kv_channels aware projections, causal core attention (s/2), GLU MLP = 3 matmuls, MoE = top_k expert "
        "MLPs, logits 2*h*V fwd; no recompute FLOPs"
    ),
    "dgxc-grok": (
        "dgxc Grok-1 README: only the total 4.27e15 FLOPs per 8192-token sequence is given; it matches the "
        "bridge-causal style count (causal attention, gated top-2 experts, V=131072) to 0.1%"
    ),
}

_KEYS = (
    "name", "source", "quote", "container",
    "layers", "hidden", "ffn_hidden", "gated_mlp", "heads", "kv_heads", "kv_channels", "vocab", "flop_vocab",
    "seq_length",
    "num_experts", "top_k", "moe_ffn_hidden", "moe_layer_freq",
    "gpus", "tp", "pp", "vp", "cp", "ep", "dp", "sequence_parallel", "fsdp", "recompute",
    "micro_batch", "global_batch",
    "precision",
    "tflops_per_gpu", "tflops_per_gpu_derived", "tokens_per_sec_per_gpu", "tokens_per_sec_total",
    "step_time_s", "mfu", "memory_gib",
    "flop_convention_id", "flop_convention", "gpu", "derived", "shape_source", "notes",
)

_DEFAULTS = dict(
    container=None, kv_channels=None, flop_vocab=None,
    num_experts=0, top_k=None, moe_ffn_hidden=None, moe_layer_freq=None,
    vp=1, cp=1, ep=1, fsdp=False, recompute=None,
    tflops_per_gpu=None, tflops_per_gpu_derived=None, tokens_per_sec_per_gpu=None,
    tokens_per_sec_total=None, step_time_s=None, mfu=None, memory_gib=None,
    gpu="H100 SXM 80GB", derived=(), notes="",
)


def _pt(**kw):
    p = dict(_DEFAULTS)
    p.update(kw)
    derived = list(p["derived"])
    if p.get("dp") is None:
        p["dp"] = p["gpus"] // (p["tp"] * p["pp"] * p["cp"])
        derived.append("dp")
    assert p["tp"] * p["pp"] * p["cp"] * p["dp"] == p["gpus"], p["name"]
    assert p["global_batch"] % (p["micro_batch"] * p["dp"]) == 0, p["name"]
    if "sequence_parallel" not in kw:
        p["sequence_parallel"] = p["tp"] > 1
        derived.append("sequence_parallel")
    p["derived"] = tuple(derived)
    if derived:
        p["notes"] = (p["notes"] + " " if p["notes"] else "") + "[derived, not published: " + ", ".join(derived) + "]"
    p["flop_convention"] = FLOP_CONVENTIONS[p["flop_convention_id"]]
    missing = set(_KEYS) - set(p)
    extra = set(p) - set(_KEYS)
    assert not missing and not extra, (p["name"], missing, extra)
    return {k: p[k] for k in _KEYS}


# ---------------------------------------------------------------- shapes
# Shape sources (all read from stored text):
#   GPT-3 5B:   NVIDIA/NeMo-Framework-Launcher launcher_scripts/conf/training/gpt3/5b_fp8_performance.yaml @1e46ac6
#               (24 layers, 4096 hidden, ffn 4*h, 32 heads, GPT2BPETokenizer, make_vocab_size_divisible_by 128)
#   GPT-3 175B: standard GPT-3 (96 layers, 12288, 96 heads, ffn 4*h), as spelled out in the dgxc
#               nemo_megatron/README_175b.md "Notes" (24*96*12288^2 ...; vocab 51200 in the FLOP formula)
#   Llama 2/3/3.1: NVIDIA/NeMo nemo/collections/llm/gpt/model/llama.py @008df61 (Llama2Config7B/70B,
#               Llama3Config8B/70B, Llama31Config405B; Llama3 num_query_groups=8); vocab 32000 (Llama 2) and
#               128256 (Llama 3) from LLM_VOCAB_SIZE_MAP in nemo/collections/common/parts/perf_metrics_utils.py
#   Nemotron-4 340B: NVIDIA/NeMo nemo/collections/llm/gpt/model/nemotron.py @0037ec8 (Nemotron4Config340B,
#               squared-ReLU, non-gated); vocab 256000 from LLM_VOCAB_SIZE_MAP
#   Grok-1:     xai-org/grok-1 run.py @11b95e7 (emb 48*128, 64 layers, 48 q heads, 8 kv heads, key_size 128,
#               8 experts, 2 selected, vocab 128*1024, widening_factor 8) + model.py ffn_size():
#               int(8*6144)*2//3 = 32768 (gated)
#   GPT-OSS 120B: NVIDIA/NeMo nemo/collections/llm/gpt/model/gpt_oss.py @15253fa (GPTOSSConfig, GPTOSSConfig120B)
#   Qwen3 MoE:  NVIDIA/NeMo nemo/collections/llm/gpt/model/qwen3.py @00558c4 (Qwen3Config30B_A3B,
#               Qwen3Config235B_A22B; kv_channels 128, vocab 151936, 128 experts top-8)

_NEMO2407 = ("NVIDIA/NeMo docs/source/performance/performance_summary.md @070a0bb168d4 "
             "(NeMo 24.07, System: DGX-H100), table 'Pretraining' (FP8)")
_NEMO2407_LONG = ("NVIDIA/NeMo docs/source/performance/performance_summary.md, stored version with a "
                  "'Long Input Sequences' table (index id 28718048417; commit not resolved), LLAMA2-7B FP8, "
                  "Container NeMo24.03.01, System DGX-H100; TFLOP/s also in "
                  "docs/source/performance/performance_long_sequence.md @0aa267117ae5 (With-CP column)")
_BRIDGE = "NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md @df0289c180dd"
_BRIDGE_ARCH = "NVIDIA-NeMo/Megatron-Bridge docs/performance-summary-archive.md @4da7335ff4b7"

_LLAMA2_7B = dict(layers=32, hidden=4096, ffn_hidden=11008, gated_mlp=True, heads=32, kv_heads=32, vocab=32000,
                  shape_source="NeMo llama.py Llama2Config7B; vocab from NeMo LLM_VOCAB_SIZE_MAP['llama2']")
_LLAMA3_8B = dict(layers=32, hidden=4096, ffn_hidden=14336, gated_mlp=True, heads=32, kv_heads=8, vocab=128256,
                  shape_source="NeMo llama.py Llama3Config8B / Llama31Config8B; vocab LLM_VOCAB_SIZE_MAP['llama3']")
_LLAMA3_70B = dict(layers=80, hidden=8192, ffn_hidden=28672, gated_mlp=True, heads=64, kv_heads=8, vocab=128256,
                   shape_source="NeMo llama.py Llama3Config70B / Llama31Config70B; vocab LLM_VOCAB_SIZE_MAP['llama3']")
_LLAMA31_405B = dict(layers=126, hidden=16384, ffn_hidden=53248, gated_mlp=True, heads=128, kv_heads=8,
                     vocab=128256, shape_source="NeMo llama.py Llama31Config405B (num_query_groups 8 via Llama3Config)")
_GPT3_175B = dict(layers=96, hidden=12288, ffn_hidden=49152, gated_mlp=False, heads=96, kv_heads=96, vocab=50304,
                  flop_vocab=51200,
                  shape_source="GPT-3 175B as in dgxc nemo_megatron/README_175b.md Notes; real vocab = GPT2 BPE "
                               "50257 padded to a multiple of 128 (50304), FLOP formulas use 51200")
_GROK1 = dict(layers=64, hidden=6144, ffn_hidden=32768, gated_mlp=True, heads=48, kv_heads=8, vocab=131072,
              num_experts=8, top_k=2, moe_ffn_hidden=32768, moe_layer_freq=1,
              shape_source="xai-org/grok-1 run.py @11b95e7 + model.py ffn_size(6144, 8) = 32768")

POINTS = [
    # ------------------------------------------------------------ NeMo 24.07 (FP8, nemo-full)
    _pt(name="nemo2407-gpt3-5b-fp8-64gpu", source=_NEMO2407, container="NeMo 24.07",
        quote="| GPT3-5B       | 64     | 2048 | 4   | 2048           | 1  | 1  | 1  | 1  | 22521              | 736",
        layers=24, hidden=4096, ffn_hidden=16384, gated_mlp=False, heads=32, kv_heads=32, vocab=50304,
        flop_vocab=51200, seq_length=2048,
        shape_source="NeMo-Framework-Launcher conf/training/gpt3/5b_fp8_performance.yaml @1e46ac6 (that file: "
                     "TP1 PP1 MBS4 GBS2048, sequence_parallel False, selective recompute with 0 layers)",
        gpus=64, tp=1, pp=1, micro_batch=4, global_batch=2048, precision="fp8",
        tflops_per_gpu=736, tokens_per_sec_per_gpu=22521, flop_convention_id="nemo-full",
        notes="GPT-3 style (LayerNorm, GeLU, learned pos-emb). Implied FLOPs/token matches the NeMo gpt3() formula "
              "with V=51200 (Narayanan). The launcher perf yaml is a likely, not confirmed, match for this row."),
    _pt(name="nemo2407-gpt3-175b-fp8-128gpu", source=_NEMO2407, container="NeMo 24.07",
        quote="| GPT3-175B     | 128    | 256  | 1   | 2048           | 4  | 8  | 1  | 6  | 726                | 782",
        seq_length=2048, **_GPT3_175B,
        gpus=128, tp=4, pp=8, vp=6, micro_batch=1, global_batch=256, precision="fp8",
        tflops_per_gpu=782, tokens_per_sec_per_gpu=726, flop_convention_id="nemo-full",
        notes="96 layers / (PP8*VP6) = 2 layers per virtual stage; 64 microbatches per step per pipeline. Same "
              "table also has a 512-GPU GBS2048 MBS2 row (782 tok/s, 842 TFLOP/s, linked to MLPerf)."),
    _pt(name="nemo2407-llama2-7b-fp8-8gpu", source=_NEMO2407, container="NeMo 24.07",
        quote="| LLAMA2-7B     | 8      | 128  | 1   | 4096           | 1  | 1  | 1  | 1  | 16847              | 776",
        seq_length=4096, **_LLAMA2_7B,
        gpus=8, tp=1, pp=1, micro_batch=1, global_batch=128, precision="fp8",
        tflops_per_gpu=776, tokens_per_sec_per_gpu=16847, flop_convention_id="nemo-full",
        notes="Single node, pure DP8; 16 microbatches per rank."),
    _pt(name="nemo2407-llama2-70b-fp8-64gpu", source=_NEMO2407, container="NeMo 24.07",
        quote="| LLAMA2-70B    | 64     | 128  | 1   | 4096           | 4  | 4  | 1  | 20 | 1707               | 759",
        layers=80, hidden=8192, ffn_hidden=28672, gated_mlp=True, heads=64, kv_heads=8, vocab=32000,
        shape_source="NeMo llama.py Llama2Config70B; vocab LLM_VOCAB_SIZE_MAP['llama2']",
        seq_length=4096,
        gpus=64, tp=4, pp=4, vp=20, micro_batch=1, global_batch=128, precision="fp8",
        tflops_per_gpu=759, tokens_per_sec_per_gpu=1707, flop_convention_id="nemo-full",
        notes="VP20 => 1 layer per virtual stage; dp=4 => 32 microbatches per pipeline."),
    _pt(name="nemo2407-nemotron4-340b-fp8-128gpu", source=_NEMO2407, container="NeMo 24.07",
        quote="| Nemotron-340B | 128    | 32   | 1   | 4096           | 8  | 8  | 1  | 12 | 322                | 678",
        layers=96, hidden=18432, ffn_hidden=73728, gated_mlp=False, heads=96, kv_heads=8, vocab=256000,
        shape_source="NeMo nemotron.py Nemotron4Config340B (squared ReLU, no GLU); vocab "
                     "LLM_VOCAB_SIZE_MAP['nemotron']",
        seq_length=4096,
        gpus=128, tp=8, pp=8, vp=12, micro_batch=1, global_batch=32, precision="fp8",
        tflops_per_gpu=678, tokens_per_sec_per_gpu=322, flop_convention_id="nemo-full",
        notes="Very large model at tiny GBS: dp=2 => only 16 microbatches for PP8*VP12 (large bubble share). "
              "Non-gated MLP: NeMo nemotron() formula uses 12*f/h."),
    _pt(name="nemo2407-llama3-8b-fp8-8gpu-cp2", source=_NEMO2407, container="NeMo 24.07",
        quote="| LLAMA3-8B     | 8      | 128  | 1   | 8192           | 1  | 1  | 2  | 1  | 12036              | 697",
        seq_length=8192, **_LLAMA3_8B,
        gpus=8, tp=1, pp=1, cp=2, micro_batch=1, global_batch=128, precision="fp8",
        tflops_per_gpu=697, tokens_per_sec_per_gpu=12036, flop_convention_id="nemo-full",
        notes="CP2 x DP4 on one node. Compare bridge2511-llama3-8b-fp8cs-8gpu-fsdp (same GBS/seq, causal "
              "convention)."),
    _pt(name="nemo2407-llama3-70b-fp8-64gpu", source=_NEMO2407, container="NeMo 24.07",
        quote="| LLAMA3-70B    | 64     | 128  | 1   | 8192           | 4  | 4  | 2  | 5  | 1533               | 738",
        seq_length=8192, **_LLAMA3_70B,
        gpus=64, tp=4, pp=4, cp=2, vp=5, micro_batch=1, global_batch=128, precision="fp8",
        tflops_per_gpu=738, tokens_per_sec_per_gpu=1533, flop_convention_id="nemo-full",
        notes="Same layout as the dgxc Llama 3.1 70B recipe (TP4 PP4 CP2 VP5), dp=2 => 64 microbatches."),
    # ------------------------------------------------------------ NeMo long sequence (FP8, nemo-full)
    _pt(name="nemo2403-llama2-7b-fp8-32gpu-seq32k-cp2", source=_NEMO2407_LONG, container="NeMo 24.03.01",
        quote="| 32                 | 32     | 128  | 1   | 2  | 1  | 2  | 1  | 8  | 6687               | 610",
        seq_length=32768, **_LLAMA2_7B,
        gpus=32, tp=2, pp=1, cp=2, dp=8, micro_batch=1, global_batch=128, precision="fp8",
        tflops_per_gpu=610, tokens_per_sec_per_gpu=6687, flop_convention_id="nemo-full",
        notes="Columns: SeqLen(K) | #-GPUs | GBS | MBS | TP | PP | CP | VP | DP | tok/s/GPU | TFLOP/s/GPU. "
              "performance_long_sequence.md: without CP the best was 595 TFLOP/s. Attention-heavy point "
              "(12*s/h = 96 vs 12+12+48+1.5 for the rest)."),
    _pt(name="nemo2403-llama2-7b-fp8-128gpu-seq128k-cp4", source=_NEMO2407_LONG, container="NeMo 24.03.01",
        quote="| 128                | 128    | 32   | 1   | 4  | 1  | 4  | 1  | 8  | 2260               | 555",
        seq_length=131072, **_LLAMA2_7B,
        gpus=128, tp=4, pp=1, cp=4, dp=8, micro_batch=1, global_batch=32, precision="fp8",
        tflops_per_gpu=555, tokens_per_sec_per_gpu=2260, flop_convention_id="nemo-full",
        notes="performance_long_sequence.md: without CP 424 TFLOP/s (speedup 1.31). FLOPs dominated by full "
              "(non-causal-counted) attention."),
    # ------------------------------------------------------------ dgxc-benchmarking (BF16 + FP8 pairs)
    _pt(name="dgxc-llama31-8b-bf16-8gpu-cp2",
        source="NVIDIA/dgxc-benchmarking llama3.1/README_8b.md @143b90dd91f9, table 'Llama 3.1 8b 24.09 BF16 "
               "(TP=1, PP=1, CP=2, MBS=1, GA=32)', column 'Throughput on 8x H100 GPUs (GBS=128)'",
        container="nvcr.io/nvidia/nemo:24.09 (NeMo launcher)",
        quote='| Llama 3.1 8b 24.09 BF16 (TP=1, PP=1, CP=2, MBS=1, GA=32) | Throughput on 8x H100 GPUs (GBS=128) / | Training step time (seconds per step) | 12.91 / | Throughput in tokens per second       | 81222 / | Model flops utilization               | 59.37%',
        seq_length=8192, **_LLAMA3_8B,
        gpus=8, tp=1, pp=1, cp=2, micro_batch=1, global_batch=128, precision="bf16",
        step_time_s=12.91, tokens_per_sec_total=81222, tokens_per_sec_per_gpu=81222 / 8, mfu=0.5937,
        tflops_per_gpu_derived=round(0.5937 * PEAK_TFLOPS["bf16"], 1), flop_convention_id="nemo-full",
        derived=("tokens_per_sec_per_gpu", "tflops_per_gpu_derived"),
        notes="MFU vs 989 TFLOP/s; README model flops 4.74e14 per 8192-token sequence (full attention). "
              "GA=32 => dp=4. Step time is the last logged step (README: 'last training step timing')."),
    _pt(name="dgxc-llama31-8b-fp8-8gpu-cp2",
        source="NVIDIA/dgxc-benchmarking llama3.1/README_8b.md @143b90dd91f9, table 'Llama 3.1 8b 24.09 FP8 "
               "(TP=1, PP=1, CP=2, MBS=1, GA=32)', column 'Throughput on 8x H100 GPUs (GBS=128)'",
        container="nvcr.io/nvidia/nemo:24.09 (NeMo launcher)",
        quote='| Llama 3.1 8b 24.09 FP8 (TP=1, PP=1, CP=2, MBS=1, GA=32) | Throughput on 8x H100 GPUs (GBS=128) / | Training step time (seconds per step) | 9.67 / | Throughput in tokens per second       | 108436 / | Model flops utilization               | 39.63%',
        seq_length=8192, **_LLAMA3_8B,
        gpus=8, tp=1, pp=1, cp=2, micro_batch=1, global_batch=128, precision="fp8",
        step_time_s=9.67, tokens_per_sec_total=108436, tokens_per_sec_per_gpu=108436 / 8, mfu=0.3963,
        tflops_per_gpu_derived=round(0.3963 * PEAK_TFLOPS["fp8"], 1), flop_convention_id="nemo-full",
        derived=("tokens_per_sec_per_gpu", "tflops_per_gpu_derived"),
        notes="MFU vs the FP8 peak 1979 TFLOP/s (so ~784 TFLOP/s). FP8/BF16 step-time ratio 0.749."),
    _pt(name="dgxc-llama31-70b-bf16-64gpu",
        source="NVIDIA/dgxc-benchmarking llama3.1/README_70b.md @8f5cbb3799ea, table 'Llama 3.1 70b BF16 "
               "(TP=4, PP=4, CP=2, VP=5, MBS=1, GA=64)', column 'Throughput on 64x H100 GPUs (GBS=128)'",
        container="nvcr.io/nvidia/nemo:24.12 (NeMo launcher)",
        quote='| Llama 3.1 70b BF16 (TP=4, PP=4, CP=2, VP=5, MBS=1, GA=64) | Throughput on 64x H100 GPUs (GBS=128) / | Training step time (seconds per step) | 14.61 / | Throughput in tokens per second       | 71756 / | Model flops utilization               | 54.52%',
        seq_length=8192, **_LLAMA3_70B,
        gpus=64, tp=4, pp=4, cp=2, vp=5, micro_batch=1, global_batch=128, precision="bf16",
        step_time_s=14.61, tokens_per_sec_total=71756, tokens_per_sec_per_gpu=71756 / 64, mfu=0.5452,
        tflops_per_gpu_derived=round(0.5452 * PEAK_TFLOPS["bf16"], 1), flop_convention_id="nemo-full",
        derived=("tokens_per_sec_per_gpu", "tflops_per_gpu_derived"),
        notes="README model flops 3.94e15 per sequence (full attention). dp=2, GA=64."),
    _pt(name="dgxc-llama31-70b-fp8-64gpu",
        source="NVIDIA/dgxc-benchmarking llama3.1/README_70b.md @8f5cbb3799ea, table 'Llama 3.1 70b FP8 "
               "(TP=4, PP=4, CP=2, VP=5, MBS=1, GA=64)', column 'Throughput on 64x H100 GPUs (GBS=128)'",
        container="nvcr.io/nvidia/nemo:24.12 (NeMo launcher)",
        quote='| Llama 3.1 70b FP8 (TP=4, PP=4, CP=2, VP=5, MBS=1, GA=64) | Throughput on 64x H100 GPUs (GBS=128) / | Training step time (seconds per step)   | 10.46 / | Throughput in tokens per second         | 100275 / | Model flops utilization                 | 38.08%',
        seq_length=8192, **_LLAMA3_70B,
        gpus=64, tp=4, pp=4, cp=2, vp=5, micro_batch=1, global_batch=128, precision="fp8",
        step_time_s=10.46, tokens_per_sec_total=100275, tokens_per_sec_per_gpu=100275 / 64, mfu=0.3808,
        tflops_per_gpu_derived=round(0.3808 * PEAK_TFLOPS["fp8"], 1), flop_convention_id="nemo-full",
        derived=("tokens_per_sec_per_gpu", "tflops_per_gpu_derived"),
        notes="FP8/BF16 step-time ratio 0.716. Comparable to nemo2407-llama3-70b-fp8-64gpu (same layout)."),
    _pt(name="dgxc-llama31-405b-bf16-576gpu",
        source="NVIDIA/dgxc-benchmarking llama3.1/README_405b.md @143b90dd91f9, table 'Llama 3.1 405b 24.09 BF16 "
               "(TP=8, PP=9, CP=2, VP=7, MBS=1, GA=63)', column 'Throughput on 576x H100 GPUs'",
        container="nvcr.io/nvidia/nemo:24.09 (NeMo launcher)",
        quote='| Training step time (seconds per step)  | 8.85   | 8.7  5 | 16.93  | 17.20 / | Throughput in tokens per second        | 116632 | 117965 | 121936 | 120022 / | Model flops utilization                | 58.63% | 56.17% | 57.25% | 55.78%',
        seq_length=8192, **_LLAMA31_405B,
        gpus=576, tp=8, pp=9, cp=2, vp=7, micro_batch=1, global_batch=252, precision="bf16",
        step_time_s=17.20, tokens_per_sec_total=120022, tokens_per_sec_per_gpu=120022 / 576, mfu=0.5578,
        tflops_per_gpu_derived=round(0.5578 * PEAK_TFLOPS["bf16"], 1), flop_convention_id="nemo-full",
        derived=("tokens_per_sec_per_gpu", "tflops_per_gpu_derived"),
        notes="Full 126-layer model (the 32/96/192-GPU columns are truncated-layer proxies). 126/(9*7) = 2 layers "
              "per virtual stage; dp=4, GA=63. Caveats in the README FLOP note: it uses 16/128 query groups "
              "(the model has 8) and multiplies by 8129 instead of 8192 (2.17e16/seq); and the run uses the "
              "GPT2BPETokenizer as a proxy, so the real logit layer is ~50k wide, not 128256."),
    _pt(name="dgxc-llama31-405b-fp8-576gpu",
        source="NVIDIA/dgxc-benchmarking llama3.1/README_405b.md @143b90dd91f9, table 'Llama 3.1 405b 24.09 FP8 "
               "(TP=8, PP=9, CP=2, VP=7, MBS=1, GA=63)', column 'Throughput on 576x H100 GPUs'",
        container="nvcr.io/nvidia/nemo:24.09 (NeMo launcher)",
        quote='| Training step time (seconds per step)  | 5.80   | 5.71   | 11.00  | 11.24 / | Throughput in tokens per second        | 178118 | 180674 | 187740 | 183664 / | Model flops utilization                | 44.77% | 43.01% | 44.07% | 42.71%',
        seq_length=8192, **_LLAMA31_405B,
        gpus=576, tp=8, pp=9, cp=2, vp=7, micro_batch=1, global_batch=252, precision="fp8",
        step_time_s=11.24, tokens_per_sec_total=183664, tokens_per_sec_per_gpu=183664 / 576, mfu=0.4271,
        tflops_per_gpu_derived=round(0.4271 * PEAK_TFLOPS["fp8"], 1), flop_convention_id="nemo-full",
        derived=("tokens_per_sec_per_gpu", "tflops_per_gpu_derived"),
        notes="Same caveats as the BF16 row (16 query groups and 8129 in the README FLOP count; GPT2 proxy "
              "tokenizer). FP8/BF16 step-time ratio 0.653."),
    _pt(name="dgxc-gpt3-175b-bf16-128gpu",
        source="NVIDIA/dgxc-benchmarking nemo_megatron/README_175b.md @0b71cfda5163, table 'NeMo Megatron BF16 "
               "(TP=4,PP=8, MBS=1, VP=12, SEQ=2048)', column '128x H100 GPUs (GBS=256)'",
        container="NeMo launcher (container tag not stated in this README version)",
        quote='| NeMo Megatron BF16 (TP=4,PP=8, MBS=1, VP=12, SEQ=2048) | 128x H100 GPUs (GBS=256) / | Training step time (seconds per step) | 8.309 / | Throughput in tokens per second | 63099 / | Model flops utilization | 53.54%',
        seq_length=2048, **_GPT3_175B,
        gpus=128, tp=4, pp=8, vp=12, micro_batch=1, global_batch=256, precision="bf16",
        step_time_s=8.309, tokens_per_sec_total=63099, tokens_per_sec_per_gpu=63099 / 128, mfu=0.5354,
        tflops_per_gpu_derived=round(0.5354 * PEAK_TFLOPS["bf16"], 1), flop_convention_id="nemo-full",
        derived=("tokens_per_sec_per_gpu", "tflops_per_gpu_derived"),
        notes="README model flops 2.20e15 per 2048-token sequence = Narayanan formula with V=51200. "
              "VP12 => 1 layer per virtual stage; dp=4 => 64 microbatches."),
    _pt(name="dgxc-gpt3-175b-fp8-128gpu",
        source="NVIDIA/dgxc-benchmarking nemo_megatron/README_175b.md @0b71cfda5163, table 'NeMo Megatron FP8 "
               "(TP=4,PP=8, MBS=1, VP=12, SEQ=2048)', column '128x H100 GPUs (GBS=256)'",
        container="NeMo launcher (container tag not stated in this README version)",
        quote='| NeMo Megatron FP8 (TP=4,PP=8, MBS=1, VP=12, SEQ=2048) | 128x H100 GPUs (GBS=256) / | Training step time (seconds per step) | 5.626 / | Throughput in tokens per second | 93190 / | Model flops utilization | 39.52%',
        seq_length=2048, **_GPT3_175B,
        gpus=128, tp=4, pp=8, vp=12, micro_batch=1, global_batch=256, precision="fp8",
        step_time_s=5.626, tokens_per_sec_total=93190, tokens_per_sec_per_gpu=93190 / 128, mfu=0.3952,
        tflops_per_gpu_derived=round(0.3952 * PEAK_TFLOPS["fp8"], 1), flop_convention_id="nemo-full",
        derived=("tokens_per_sec_per_gpu", "tflops_per_gpu_derived"),
        notes="FP8/BF16 step-time ratio 0.677. NeMo 24.07 row for the same model/GPUs/GBS (VP6): 782 TFLOP/s."),
    _pt(name="dgxc-grok1-314b-bf16-512gpu",
        source="NVIDIA/dgxc-benchmarking grok1/README_314b.md @143b90dd91f9, layout table row '512' and table "
               "'Grok 1 314b Dev BF16', column 'Throughput on 512 H100 GPUs'",
        container="nvcr.io/nvidia/nemo:dev (sha256:9c876dce...)",
        quote='| 512  | 8192   | 64     | 4   | 8   | 2   | 8   | 1   | 8   | 1   | 1024 | 128 | / | Training step time (seconds per step) | 24.03 | 21.52 | 10.64 | 20.64 | 20.64 | 20.7 | 20.83 / | Throughput in tokens per second       | 174544 | 194903 | 394202 | 406425 | 406425 | 405247 | 402718 / | Model flops utilization               | 45.4% | 44.9% | 45.4% | 44.5% | 43.0% | 42.1% | 41.5%',
        seq_length=8192, **_GROK1,
        gpus=512, tp=4, pp=8, cp=2, ep=8, vp=8, micro_batch=1, global_batch=1024, precision="bf16",
        step_time_s=20.83, tokens_per_sec_total=402718, tokens_per_sec_per_gpu=402718 / 512, mfu=0.415,
        tflops_per_gpu_derived=round(0.415 * PEAK_TFLOPS["bf16"], 1), flop_convention_id="dgxc-grok",
        derived=("tokens_per_sec_per_gpu", "tflops_per_gpu_derived"),
        notes="MoE 8 experts top-2. Layout table columns: GPUs|SeqLen|Layers|TP|PP|CP|EP|DP|VP|MBS|GBS|GA; its "
              "'DP 1' is the expert-data-parallel size: total dp = 512/(4*8*2) = 8 = EP, consistent with GA = "
              "1024/8 = 128. Smallest scale with the full 64 layers (smaller columns are proxies)."),
    _pt(name="dgxc-grok1-314b-fp8-512gpu",
        source="NVIDIA/dgxc-benchmarking grok1/README_314b.md @143b90dd91f9, layout table row '512' and table "
               "'Grok 1 314b Dev FP8', column 'Throughput on 512 H100 GPUs'",
        container="nvcr.io/nvidia/nemo:dev (sha256:9c876dce...)",
        quote='| Grok 1 314b Dev FP8 | Throughput on 8x H100 GPUs / | Training step time (seconds per step) | 19.89 | 17.08 | 8.3 | 16.21 | 16.48 | 16.55 | 16.69 / | Throughput in tokens per second       | 210875 | 245568 | 505338 | 517496 | 509017 | 506865 | 502613 / | Model flops utilization               | 27.4% | 28.3% | 29.1% | 28.3% | 26.9% | 26.3% | 25.9%',
        seq_length=8192, **_GROK1,
        gpus=512, tp=4, pp=8, cp=2, ep=8, vp=8, micro_batch=1, global_batch=1024, precision="fp8",
        step_time_s=16.69, tokens_per_sec_total=502613, tokens_per_sec_per_gpu=502613 / 512, mfu=0.259,
        tflops_per_gpu_derived=round(0.259 * PEAK_TFLOPS["fp8"], 1), flop_convention_id="dgxc-grok",
        derived=("tokens_per_sec_per_gpu", "tflops_per_gpu_derived"),
        notes="FP8/BF16 step-time ratio 0.801 (MoE gains less from FP8 than the dense recipes)."),
    # ------------------------------------------------------------ Megatron-Bridge (bridge-causal)
    _pt(name="bridge2511-llama3-8b-fp8cs-8gpu-fsdp",
        source=_BRIDGE + ", section '25.11 NeMo Container' > 'System: DGX-H100'",
        container="NeMo 25.11 (Megatron-Bridge)",
        quote="| LLAMA3_8B | 8 | FP8-CS | 128 | 1 | 8192 | 1 | 1 | 1 | 1 | n/a | 1 | 16 | 14451 | 744 |",
        seq_length=8192, **_LLAMA3_8B,
        gpus=8, tp=1, pp=1, micro_batch=1, global_batch=128, fsdp=True, precision="fp8",
        tflops_per_gpu=744, tokens_per_sec_per_gpu=14451, flop_convention_id="bridge-causal",
        notes="FSDP=1 (Megatron FSDP instead of DDP; archive file prints FSDP=8 = sharding group). FP8 current "
              "scaling (per-tensor). GA=16 => dp=8. Causal FLOP count: 744 TFLOP/s here is ~837 in nemo-full "
              "terms."),
    _pt(name="bridge2602-llama3-70b-fp8cs-64gpu",
        source=_BRIDGE + ", section '26.02 NeMo Container' > 'System: DGX-H100'",
        container="NeMo 26.02 (Megatron-Bridge)",
        quote="| LLAMA3_70B | 64 | FP8-CS | 256 | 1 | 8192 | 0 | 4 | 8 | 1 | 5 | n/a | 128 | 1621 | 728 |",
        seq_length=8192, **_LLAMA3_70B,
        gpus=64, tp=4, pp=8, vp=5, micro_batch=1, global_batch=256, precision="fp8",
        tflops_per_gpu=728, tokens_per_sec_per_gpu=1621, flop_convention_id="bridge-causal",
        notes="TP4 PP8 VP5 (2 layers per virtual stage), no CP; dp=2, GA=128."),
    _pt(name="bridge2602-llama31-405b-fp8cs-1024gpu",
        source=_BRIDGE + ", section '26.02 NeMo Container' > 'System: DGX-H100'",
        container="NeMo 26.02 (Megatron-Bridge)",
        quote="| LLAMA3.1_405B | 1024 | FP8-CS | 1536 | 1 | 8192 | 0 | 8 | 8 | 2 | 8 | n/a | 192 | 311 | 784 |",
        seq_length=8192, **_LLAMA31_405B,
        gpus=1024, tp=8, pp=8, cp=2, vp=8, micro_batch=1, global_batch=1536, precision="fp8",
        tflops_per_gpu=784, tokens_per_sec_per_gpu=311, flop_convention_id="bridge-causal",
        notes="126 layers over PP8*VP8 = 64 chunks is uneven (Bridge splits unevenly / accounts for embedding "
              "and loss in the pipeline split; exact split not stated). dp=8, GA=192."),
    _pt(name="bridge2602-gpt-oss-120b-bf16-64gpu",
        source=_BRIDGE + ", section '26.02 NeMo Container' > 'System: DGX-H100'",
        container="NeMo 26.02 (Megatron-Bridge)",
        quote="| GPT OSS 120B | 64 | BF16 | 1280 | 1 | 4096 | 0 | 1 | 4 | 1 | n/a | 8 | 80 | 5993 | 163 |",
        layers=36, hidden=2880, ffn_hidden=2880, gated_mlp=True, heads=64, kv_heads=8, kv_channels=64,
        vocab=201088, num_experts=128, top_k=4, moe_ffn_hidden=2880, moe_layer_freq=1,
        shape_source="NeMo gpt_oss.py @15253fa GPTOSSConfig/GPTOSSConfig120B (GLU experts, quick_gelu, "
                     "window_size (128,0) on alternate layers, learnable softmax sinks, biases)",
        seq_length=4096,
        gpus=64, tp=1, pp=4, ep=8, micro_batch=1, global_batch=1280, precision="bf16",
        tflops_per_gpu=163, tokens_per_sec_per_gpu=5993, flop_convention_id="bridge-causal",
        notes="MoE, all 36 layers MoE (128 experts, top-4), head dim 64 (q proj 4096 != hidden 2880). dp=16, "
              "EP8, GA=80. FLOP convention caveat: 163/5993 = 2.72e10 FLOPs/token reproduces the causal Bridge "
              "formula only if the expert MLP is counted as NON-gated (2 matmuls) and sliding-window layers "
              "as full causal; a GLU-correct count is ~1.26x higher (~206 TFLOP/s). Token-dropless with "
              "force-balanced routing (page footnote). Also in the archive: 5984 tok/s / 163 in another "
              "stored 26.02 version."),
    _pt(name="bridge2602-qwen3-30b-a3b-fp8-16gpu",
        source=_BRIDGE_ARCH + ", section '26.02 NeMo Container' > 'Model: Qwen3_30B_a3B'",
        container="NeMo 26.02 (Megatron-Bridge)",
        quote="| DGX-H100 | 16 | FP8 | 1024 | 1 | 4096 | 0 | 1 | 2 | 1 | 12 | 8 | 5113 | 118 |",
        layers=48, hidden=2048, ffn_hidden=6144, gated_mlp=True, heads=32, kv_heads=4, kv_channels=128,
        vocab=151936, num_experts=128, top_k=8, moe_ffn_hidden=768, moe_layer_freq=1,
        shape_source="NeMo qwen3.py @00558c4 Qwen3Config30B_A3B (ffn_hidden 6144 unused: every layer is MoE)",
        seq_length=4096,
        gpus=16, tp=1, pp=2, vp=12, ep=8, micro_batch=1, global_batch=1024, precision="fp8",
        tflops_per_gpu=118, tokens_per_sec_per_gpu=5113, flop_convention_id="bridge-causal",
        notes="Fine-grained MoE (128 experts, top-8, expert ffn 768), qk-layernorm. dp=8, EP8, GA=128, "
              "48/(2*12) = 2 layers per virtual stage. performance-summary.md @df0289c prints 2557 tok/s for "
              "the same row (same 118 TFLOP/s); 118e12/5113 = 2.31e10 FLOPs/token matches the causal formula, "
              "2557 does not, so 2557 looks like a typo. FP8 current scaling. Dropless, force-balanced routing."),
    _pt(name="bridge2602-qwen3-235b-a22b-fp8cs-256gpu",
        source=_BRIDGE + ", section '26.02 NeMo Container' > 'System: DGX-H100'",
        container="NeMo 26.02 (Megatron-Bridge)",
        quote="| Qwen3_235B_a22B | 256 | FP8-CS | 8192 | 1 | 4096 | 0 | 2 | 8 | 1 | 4 | 32 | 512 | 1633 | 242 |",
        layers=94, hidden=4096, ffn_hidden=12288, gated_mlp=True, heads=64, kv_heads=4, kv_channels=128,
        vocab=151936, num_experts=128, top_k=8, moe_ffn_hidden=1536, moe_layer_freq=1,
        shape_source="NeMo qwen3.py @00558c4 Qwen3Config235B_A22B (ffn_hidden 12288 unused: every layer is MoE)",
        seq_length=4096,
        gpus=256, tp=2, pp=8, vp=4, ep=32, micro_batch=1, global_batch=8192, precision="fp8",
        tflops_per_gpu=242, tokens_per_sec_per_gpu=1633, flop_convention_id="bridge-causal",
        notes="dp=16, EP32 (> dp: needs MoE parallel folding, EP spans TP*DP; expert TP not stated), GA=512. "
              "94 layers over PP8*VP4 is uneven (split not stated). Dropless, force-balanced routing."),
]

# Points whose numbers are published but cannot be tied to a complete layout (not used for calibration).
UNPAIRED_POINTS = [
    dict(name="megatron-lm-readme-gpt3-175b-strong-scaling",
         source="NVIDIA/Megatron-LM README.md @0010ab7484337 section 'Training Speed and Scalability' "
                "(text; figure images/strong_scaling.png and the layout table images/model_table.png are images)",
         quote="We also strong scaled the standard GPT-3 model (our version has slightly more than 175 billion "
               "parameters due to larger vocabulary size) from 96 H100 GPUs to 4608 GPUs, using the same batch "
               "size of 1152 sequences throughout. Communication becomes more exposed at larger scale, leading "
               "to a reduction in MFU from 47% to 42%.",
         layers=96, hidden=12288, ffn_hidden=49152, gated_mlp=False, heads=96, kv_heads=96, vocab=131072,
         seq_length=4096, global_batch=1152, gpus=(96, 4608), mfu=(0.47, 0.42),
         missing="tp/pp/vp/micro_batch (only in model_table.png), precision (text does not say; presumably "
                 "BF16) and the peak used for MFU",
         notes="Same README: all models use vocab 131,072 and seq 4096; DP/TP/PP comm overlap enabled; weak "
               "scaling MFU 41% (2B) to 47-48% (largest, up to 6144 H100)."),
    dict(name="mcore-moe-readme-mixtral-8x7b-bf16",
         source="NVIDIA/Megatron-LM megatron/core/transformer/moe/README.md @022bcb5afe88 (intro sentence and "
                "'Reference Best Parallel Mapping' table)",
         quote="With MCore v0.9, we've achieved remarkable performance of **468 TFLOPS** for Mixtral 8X7B bf16 "
               "training. | Mixtral 8x7B(Dropless)  |   32K     | All-to-All | BF16      | 64    | 4096    | 1  | 8 "
               " | 4  | 8  | 1   | 256 |",
         layers=32, hidden=4096, ffn_hidden=14336, gated_mlp=True, heads=32, kv_heads=8, vocab=32000,
         num_experts=8, top_k=2, seq_length=4096, gpus=64, tp=1, ep=8, pp=4, vp=8, micro_batch=1, global_batch=256,
         precision="bf16", tflops_per_gpu=468,
         missing="the README does not say the 468 TFLOPS run used this mapping (mapping is labelled 'MCore "
                 "v0.8', the 468 figure 'MCore v0.9'); FLOP convention unstated",
         notes="Shape from the same README's example script (num-layers 32, hidden 4096, ffn 14336, 32 heads, "
               "8 query groups, swiglu, 8 experts top-2). Benchmark server: 8xH100 80GB HBM3, IB 8x400 Gbit/s, "
               "PyTorch 24.09 + TE 1.11."),
    dict(name="bridge-verification-qwen3-30b-a3b-bf16-16gpu",
         source="NVIDIA-NeMo/Megatron-Bridge docs/model-verification/models/qwen3-30b-a3b.md @d5d8c1925dc6 "
                "('pretrain_performance · H100'); layout from perf_recipes/qwen h100 "
                "qwen3_30b_a3b_pretrain_16gpu_h100_bf16_config (TP1 PP1 EP16, GBS 1024)",
         quote="| `last_10_steps_tokens_per_second_per_gpu_avg` | `13011.378` | ... HybridEP permute fusion uses "
               "32 SMs ... Transformer Engine CUDA graph capture completes for all 48 graphable layers ... "
               "peak allocated memory remains below 65 GiB/GPU.",
         layers=48, hidden=2048, num_experts=128, top_k=8, moe_ffn_hidden=768, seq_length=4096, gpus=16, tp=1,
         pp=1, ep=16, global_batch=1024, precision="bf16", tokens_per_sec_per_gpu=13011,
         missing="nothing in the layout; left out because the run uses what mm1_megatron's stack does not "
                 "(CUDA graphs over every layer, HybridEP with EP-communication overlap, a precision-aware "
                 "optimizer), a 2026-07 stack against the planner's Megatron-Core 0.16 era",
         notes="The planner models 7,392 tok/s (0.57x): it charges the host overhead CUDA graphs remove and the "
               "exposed all-to-all HybridEP overlaps; without those two terms it gives ~14,000. Same model, "
               "same GPU count, FP8 on the 26.02 stack: 5,113 tok/s (the calibration point). 'Below 65 GiB' "
               "is a bound on allocated memory, not a measurement; the planner's 68.9 GiB counts fp32 Adam "
               "moments, which the precision-aware optimizer keeps in bf16."),
]


def _implied_flops_per_token(p):
    tf = p["tflops_per_gpu"] if p["tflops_per_gpu"] is not None else p["tflops_per_gpu_derived"]
    tok = p["tokens_per_sec_per_gpu"]
    return None if tf is None or not tok else tf * 1e12 / tok


for _p in POINTS:
    _p["implied_flops_per_token"] = _implied_flops_per_token(_p)

_names = [p["name"] for p in POINTS]
assert len(_names) == len(set(_names)), "duplicate point names"
assert all(p["gpu"] == "H100 SXM 80GB" for p in POINTS)
del _p, _names
