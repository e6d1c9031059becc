"""A tiny Megatron-Core GPT for the runtime tests' cases: a gloo world and model-parallel
groups inside a case, a Llama-style config, the model, and language-model batches and loss.

Cases run in fresh processes through ``tests._procs.run_ranks``.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any, Iterator, Optional


# ---------------------------------------------------------------------------------------------
# Inside a case: gloo world, tiny Megatron-Core GPT, data
# ---------------------------------------------------------------------------------------------

VOCAB = 64
SEQ = 16


@contextlib.contextmanager
def gloo_world(tp: int = 1, pp: int = 1, ep: int = 1,
               expert_tp: Optional[int] = None) -> Iterator[None]:
    """torch.distributed (gloo, from the env set by ``run_ranks``) + Megatron parallel state.

    Deliberately not ``init_distributed``: cpu_compat cases choose which patches are on."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(minutes=4))
    try:
        set_model_parallel(tp=tp, pp=pp, ep=ep, expert_tp=expert_tp)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def set_model_parallel(tp: int = 1, pp: int = 1, ep: int = 1,
                       expert_tp: Optional[int] = None) -> None:
    """(Re)build Megatron's model-parallel groups inside the current world."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=expert_tp or tp)


def tiny_config(tp: int = 1, pp: int = 1, sp: bool = False, layers: int = 2,
                num_experts: Optional[int] = None, dispatcher: str = "alltoall",
                ep: int = 1, expert_tp: Optional[int] = None) -> Any:
    """Llama-style (RMSNorm, SwiGLU, no bias) fp32 config, CPU-initialised, no dropout."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe: dict = {}
    if num_experts:
        moe = dict(num_moe_experts=num_experts, moe_router_topk=2, moe_aux_loss_coeff=0.01,
                   moe_z_loss_coeff=0.001, moe_token_dispatcher_type=dispatcher,
                   moe_grouped_gemm=False, expert_model_parallel_size=ep,
                   expert_tensor_parallel_size=expert_tp or tp)
    return TransformerConfig(
        num_layers=layers, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        bf16=False, gradient_accumulation_fusion=False, add_bias_linear=False,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, sequence_parallel=sp, **moe)


def tiny_gpt(config: Any, seed: int = 1234) -> Any:
    """GPTModel with the local spec and RoPE; weights drawn from the CPU RNG at ``seed``."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)  # tracker states (expert init forks into them)
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                    normalization="RMSNorm")
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope",
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage())


def lm_batch(seed: int = 0, batch: int = 2) -> dict:
    """Same tokens on every rank for a given seed: ids, positions, causal mask, labels."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=generator)
    return {
        "input_ids": tokens[:, :-1],
        "position_ids": torch.arange(SEQ).unsqueeze(0).expand(batch, -1),
        "attention_mask": torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1),  # True = masked
        "labels": tokens[:, 1:],
    }


def lm_loss(model: Any, batch: dict) -> Any:
    """Mean next-token loss of a GPTModel (which returns per-token losses given labels)."""
    return model(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                 labels=batch["labels"]).float().mean()
