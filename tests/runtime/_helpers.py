"""Run test cases in fresh processes, optionally as the ranks of one gloo world.

Megatron-Core's parallel state and our compatibility patches are process-global, so every case
runs in new interpreters: ``run_ranks(__file__, "case_name", nprocs=2)`` starts ``nprocs``
copies of this file as a script, each loads the test module by path and calls
``case_name(**kwargs)`` with the torchrun variables set (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). Each returns a JSON-able value; ``run_ranks`` returns them by rank.
A hang fails the test at ``timeout`` (all ranks are killed) instead of stalling the suite.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

REPO = Path(__file__).resolve().parents[2]
_RESULT = "@@CASE_RESULT@@"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(module_file: str, case: str, nprocs: int = 1, timeout: float = 300.0,
              kwargs: Optional[dict] = None, env: Optional[dict] = None) -> list[Any]:
    """Run ``case`` from ``module_file`` in ``nprocs`` fresh processes; return their results."""
    port = free_port()
    base = {**os.environ, **(env or {})}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH")) if p)
    base.setdefault("OMP_NUM_THREADS", "1")  # ranks share 2 cores; oversubscription is slow
    base["PYTHONWARNINGS"] = "ignore"  # Megatron's import-time warnings drown real errors
    procs, logs = [], []
    for rank in range(nprocs):
        rank_env = {**base, "RANK": str(rank), "WORLD_SIZE": str(nprocs),
                    "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port)}
        out = tempfile.TemporaryFile(mode="w+")
        procs.append(subprocess.Popen(
            [sys.executable, __file__, str(module_file), case, json.dumps(kwargs or {})],
            env=rank_env, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT, text=True))
        logs.append(out)
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise AssertionError(f"{case}: timed out after {timeout:.0f}s\n"
                                     + _tails(logs))
            if any(p.returncode not in (None, 0) for p in procs):
                # One rank died: the others would wait on it in a collective until timeout.
                time.sleep(2.0)
                if any(p.poll() is None for p in procs):
                    raise AssertionError(f"{case}: a rank failed\n" + _tails(logs))
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs):
        raise AssertionError(f"{case}: exit codes {[p.returncode for p in procs]}\n"
                             + _tails(logs))
    results = []
    for rank, out in enumerate(logs):
        out.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith(_RESULT)]
        if not lines:
            raise AssertionError(f"{case}: rank {rank} returned no result\n" + _tails(logs))
        results.append(json.loads(lines[-1][len(_RESULT):]))
    return results


def _tails(logs: list, chars: int = 4000) -> str:
    parts = []
    for rank, out in enumerate(logs):
        out.seek(0)
        parts.append(f"--- rank {rank} output (tail) ---\n{out.read()[-chars:]}")
    return "\n".join(parts)


def outcome(fn: Any, *args: Any, **kwargs: Any) -> dict:
    """Call ``fn`` and describe how it ended, for a case's JSON result."""
    try:
        value = fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the test asserts on type and message
        return {"ok": False, "error": type(err).__name__, "message": str(err)[:500]}
    return {"ok": True, "value": value}


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


def _main() -> None:
    module_file, case, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("_runtime_case_module", module_file)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = getattr(module, case)(**kwargs)
    print(_RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    # The guard matters: dist_checkpointing.save starts a spawn-context Manager whose child
    # re-imports the main module.
    _main()
