"""TP=2 (with and without sequence parallelism) computes what TP=1 computes, on gloo.

Identical weights come from ``use_cpu_initialization=True``: Megatron-Core's
``_initialize_affine_weight_cpu`` draws the *full* master weight from the CPU RNG (no
tracker fork, so the draw does not depend on the TP rank or size) and keeps this rank's
slices, ``[rank::tp]`` of chunks of ``per_partition / stride`` along ``partition_dim``; the
gated MLP's fc1 uses stride 2, so each rank gets matching gate and up halves. The test
re-slices the TP=1 weights and gradients the same way and compares them shard by shard.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest


from tests._helpers.tiny_gpt import (
    lm_batch,
    lm_loss,
    set_model_parallel,
    tiny_config,
    tiny_gpt,
)
from tests._procs import run_ranks

pytestmark = [pytest.mark.mcore, pytest.mark.multirank]

SEED = 1234


def _shard_like_megatron(full: Any, param: Any, rank: int, world: int) -> Any:
    """This TP rank's slice of a full tensor, as _initialize_affine_weight_cpu slices it."""
    import torch

    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = torch.split(full, full.shape[dim] // (world * stride), dim=dim)
    return torch.cat(pieces[rank::world], dim=dim)


def case_tp_parity() -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from mm1_megatron.runtime import init_distributed, shutdown_distributed

    init_distributed(SimpleNamespace(tp=1, pp=1, cp=1, ep=1), seed=SEED)
    batch = lm_batch(seed=0, batch=2)

    # TP=1 reference, computed on every rank (DP replicas; no communication needed).
    reference = tiny_gpt(tiny_config(tp=1), seed=SEED)
    ref_loss = lm_loss(reference, batch)
    ref_loss.backward()
    ref = {n: (p.detach().clone(), p.grad.clone()) for n, p in reference.named_parameters()}

    results = {"ref_loss": ref_loss.item()}
    for sp in (False, True):
        set_model_parallel(tp=2)
        rank, world = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        config = tiny_config(tp=2, sp=sp)
        gpt = tiny_gpt(config, seed=SEED)
        # DDP gives the main_grad buffers finalize_model_grads works on; with SP it sums the
        # norm grads (each rank saw half the sequence) over TP - the torch-norm patch's job.
        model = DistributedDataParallel(config=config, module=gpt,
                                        ddp_config=DistributedDataParallelConfig())
        model.zero_grad_buffer()
        loss = lm_loss(model, batch)
        loss.backward()
        finalize_model_grads([model])

        weight_diff, grad_err, worst = 0.0, 0.0, ""
        for name, param in gpt.named_parameters():
            full_w, full_g = ref[name]
            w = _shard_like_megatron(full_w, param, rank, world)
            g = _shard_like_megatron(full_g, param, rank, world)
            weight_diff = max(weight_diff, (param.detach() - w).abs().max().item())
            err = ((param.main_grad - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
            if err > grad_err:
                grad_err, worst = err, name
        results[f"sp={sp}"] = {"loss": loss.item(), "weight_diff": weight_diff,
                               "grad_rel_err": grad_err, "worst_grad": worst,
                               "params": len(ref)}
    shutdown_distributed()
    return results


@pytest.fixture(scope="module")
def parity() -> list:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU/gloo parity test (init_distributed would pick NCCL here)")
    return run_ranks(__file__, "case_tp_parity", nprocs=2, timeout=300)


@pytest.mark.parametrize("sp", [False, True])
def test_tp2_matches_tp1(parity: list, sp: bool) -> None:
    for r in parity:
        tp2 = r[f"sp={sp}"]
        assert tp2["weight_diff"] == 0.0, "TP=2 shards are not slices of the TP=1 weights"
        assert tp2["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
        assert tp2["grad_rel_err"] < 1e-4, tp2
