"""The preset registry: `PRESETS` and `get_preset`, built in code from the schema.

Presets derived from others change fields with `replace` (dataclasses.replace), never by
assignment: a misspelled field name raises instead of adding an attribute nobody reads."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Callable, Optional

from mm1_megatron.config.schema import (CheckpointConfig, Config, ConfigError, ConnectorConfig,
                                        DataConfig, Fp8Format, LLMConfig, LoggingConfig,
                                        MoEConfig, ParallelConfig, Recompute, TrainConfig,
                                        VisionConfig)


# --------------------------------------------------------------------------------------------
# Presets: one registry. Shapes and their parameter counts are tabulated in README.md and
# checked against the built Megatron-Core modules in tests/model/test_params.py.
# --------------------------------------------------------------------------------------------

# Full-scale runs: bf16 on 8-GPU H100 nodes, the paper's batch and sequence. Each MM1 preset's
# layout is the one `tools/plan.py --search` picked for its node count (`planned_nodes`) with
# >= 15% memory margin; dp follows from the launcher's world size.
_GPU_RUN = dict(gpus_per_node=8, sequence_parallel=True, overlap_grad_reduce=True,
                overlap_param_gather=True)


# A step of these presets takes seconds (the planner's step times: 2-15 s); ten minutes
# without one is a hang (a stuck collective, a dead reader). The first step (NCCL set-up on
# 256 GPUs, TE initialisation) and saves get half an hour.
_GPU_WATCHDOG = dict(hang_timeout_s=600.0, hang_timeout_slow_s=1800.0)


def _tiny() -> Config:
    """Seconds-fast model for tests: 84 px images (6x6 patches) -> 9 tokens."""
    return Config(
        preset="tiny",
        run_dir="runs/tiny",
        vision=VisionConfig(image_size=84, hidden_size=32, num_layers=2, num_attention_heads=2,
                            ffn_hidden_size=64),
        connector=ConnectorConfig(num_tokens=9, hidden_size=32, depth=1),
        llm=LLMConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                      vocab_size=512),
        data=DataConfig(seq_length=128, max_images_per_sequence=4),
        train=TrainConfig(global_batch_size=4, micro_batch_size=2, train_steps=20, lr=1e-3,
                          warmup_steps=2, precision="fp32"),
        checkpoint=CheckpointConfig(save_interval=10),
        logging=LoggingConfig(log_interval=1),
    )


def _demo() -> Config:
    """The README's CPU demo: ViT + C-Abstractor + a small MoE decoder, minutes on 2 cores."""
    return Config(
        preset="demo",
        run_dir="runs/demo",
        vision=VisionConfig(image_size=112, hidden_size=128, num_layers=4, num_attention_heads=4,
                            ffn_hidden_size=512),
        connector=ConnectorConfig(num_tokens=16, hidden_size=128, depth=2),
        llm=LLMConfig(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512,
                      vocab_size=2048, moe=MoEConfig(num_experts=4, layer_freq=2)),
        # 256 tokens with up to 8 images packs the demo data at ~90% (512 / 4 images: ~50%).
        data=DataConfig(seq_length=256, max_images_per_sequence=8, path="demo_data",
                        tokenizer_model="demo_data/tokenizer.model"),
        train=TrainConfig(global_batch_size=8, micro_batch_size=2, train_steps=100, lr=1e-3,
                          warmup_steps=10, precision="fp32"),
        checkpoint=CheckpointConfig(save_interval=50),
        logging=LoggingConfig(log_interval=10),
    )


def _mm1(name: str, llm: LLMConfig, nodes: int, micro_batch: int = 1,
         vision_recompute: Recompute = "none", fp8: Optional[Fp8Format] = None,
         **parallel: Any) -> Config:
    return Config(preset=name, run_dir=f"runs/{name}", llm=llm,
                  vision=VisionConfig(recompute=vision_recompute),
                  parallel=ParallelConfig(**_GPU_RUN, planned_nodes=nodes,
                                          tp_comm_overlap=parallel.get("tp", 1) > 1, **parallel),
                  train=TrainConfig(micro_batch_size=micro_batch, fp8=fp8, **_GPU_WATCHDOG),
                  checkpoint=CheckpointConfig(async_save=True))


# Llama-style decoders; vocabulary 32k (our sentencepiece model), untied embeddings.
_LLM_3B = LLMConfig(num_layers=32, hidden_size=2560, num_attention_heads=32,
                    ffn_hidden_size=7680)
_LLM_7B = LLMConfig(num_layers=32, hidden_size=4096, num_attention_heads=32,
                    ffn_hidden_size=12800)
_LLM_30B = LLMConfig(num_layers=52, hidden_size=7168, num_attention_heads=56,
                     num_query_groups=8, ffn_hidden_size=20480)


def _with_moe(llm: LLMConfig, num_experts: int, layer_freq: int) -> LLMConfig:
    return replace(llm, moe=MoEConfig(num_experts=num_experts, layer_freq=layer_freq))


PRESETS: dict[str, Callable[[], Config]] = {
    "tiny": _tiny,
    "demo": _demo,
    # 8 nodes: pure DP (dp=64).
    "mm1-3b": lambda: _mm1("mm1-3b", _LLM_3B, nodes=8),
    # 16 nodes: tp=2, dp=64, two sequences per micro-batch (7% faster than one in the
    # calibrated planner, 61.6 of 72.3 GiB).
    "mm1-7b": lambda: _mm1("mm1-7b", _LLM_7B, nodes=16, micro_batch=2, tp=2),
    # 32 nodes x 8 H100, FP8: tp=2, pp=4 with 7 decoder layers next to the ViT on stage 0 (15
    # on the others), dp=32, ViT fully recomputed.
    "mm1-30b": lambda: _mm1("mm1-30b", _LLM_30B, nodes=32, fp8="hybrid", vision_recompute="full",
                            tp=2, pp=4, first_stage_layers=7),
    # 16 nodes: ep=64 (one expert per GPU), dp=128.
    "mm1-3b-moe64": lambda: _mm1("mm1-3b-moe64", _with_moe(_LLM_3B, 64, 2), nodes=16, ep=64),
    # 16 nodes: tp=2, ep=32 (expert_tp = tp), dp=64.
    "mm1-7b-moe32": lambda: _mm1("mm1-7b-moe32", _with_moe(_LLM_7B, 32, 4), nodes=16, tp=2,
                                 ep=32),
}


# Supervised fine-tuning (MM1 §5: encoder and LLM both unfrozen, LLaVA-style conversations).
# The paper gives no SFT optimiser settings here, so these are LLaVA-1.5's fine-tuning defaults:
# lr 2e-5, batch 128, 2048 tokens, one epoch of its 665k conversations (5,200 steps), 3%
# warmup, cosine to 0, no weight decay. The data is the `sft` source alone; the weights come
# from a pre-training run (checkpoint.init_from, a run dir or a checkpoint).
def _sft(base: str, **train: Any) -> Config:
    cfg = PRESETS[base]()
    train = {**dict(global_batch_size=128, train_steps=5200, lr=2e-5, warmup_steps=156,
                    min_lr_ratio=0.0, weight_decay_ratio=0.0), **train}
    return replace(
        cfg, preset=f"{base}-sft", run_dir=f"runs/{base}-sft",
        # 1344 px as a 672 px overview + 2 x 2 672 px tiles: 720 tokens per image (MM1 §5),
        # so two images per 2048-token row.
        vision=replace(cfg.vision, tiling="sphinx", image_size=672),
        data=replace(cfg.data, weight_interleaved=0.0, weight_caption=0.0, weight_text=0.0,
                     weight_sft=1.0, seq_length=2048, max_images_per_sequence=2),
        train=replace(cfg.train, **train),
        checkpoint=replace(cfg.checkpoint, init_from=f"runs/{base}"),
        eval=replace(cfg.eval, chat=True, shots="0"))  # eval.tasks, when given, as chats


def _with_layout(cfg: Config, vision_recompute: Recompute, **parallel: Any) -> Config:
    return replace(cfg, parallel=replace(cfg.parallel, **parallel),
                   vision=replace(cfg.vision, recompute=vision_recompute))


def _demo_sft() -> Config:
    """`demo-sft`: the demo model fine-tuned on demo_data/sft from runs/demo (minutes on CPU)."""
    cfg = _sft("demo", global_batch_size=8, train_steps=40, lr=2e-4, warmup_steps=4)
    # MM1's high resolution at demo scale: 168 px tiles (the 112 px ViT's position tables
    # interpolated, as 378 -> 672 in MM1), overview + 2 x 2 of the 336 px resize, 5 x 16 = 80
    # tokens per image, two images per 256-token row; 256 tokens, the demo model's own (its
    # conversations are short).
    return replace(cfg, vision=replace(cfg.vision, image_size=168),
                   data=replace(cfg.data, seq_length=256),
                   checkpoint=replace(cfg.checkpoint, save_interval=20))


PRESETS.update({
    "demo-sft": _demo_sft,
    **{f"{base}-sft": (lambda base=base: _sft(base))
       for base in ("mm1-3b", "mm1-3b-moe64", "mm1-7b-moe32")},
    # one sequence per micro-batch: two (its pre-training layout) leave 2% memory margin
    "mm1-7b-sft": lambda: _sft("mm1-7b", micro_batch_size=1),
    # batch 128 leaves 4 micro-batches per pipeline: PP=4 would idle 43% of a step. TP=8
    # without PP, two sequences per micro-batch: the search's fastest with 15% margin
    # (0.98 s vs 1.70 s modelled, 57.4 GiB).
    "mm1-30b-sft": lambda: _with_layout(_sft("mm1-30b", micro_batch_size=2), tp=8, pp=1,
                                        first_stage_layers=None, vision_recompute="none"),
})


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name]())  # presets share section objects; never alias them
