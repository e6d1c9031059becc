"""Launcher environment parsing (torchrun, Slurm, single process) and a real 2-rank gloo init."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


from mm1_megatron.runtime.distributed import (
    DEFAULT_MASTER_PORT,
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    DistEnv,
    dist_env_from_environ,
    expand_slurm_nodelist,
)
from tests._procs import run_ranks

pytestmark = pytest.mark.mcore

# ---------------------------------------------------------------------------------------------
# Environment parsing
# ---------------------------------------------------------------------------------------------


def test_torchrun_env() -> None:
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
           "MASTER_PORT": "29555"}
    assert dist_env_from_environ(env) == DistEnv(5, 16, 1, "node7", 29555)


def test_torchrun_env_defaults() -> None:
    assert dist_env_from_environ({"RANK": "0", "WORLD_SIZE": "2"}) == \
        DistEnv(0, 2, 0, "127.0.0.1", DEFAULT_MASTER_PORT)


def test_torchrun_inside_slurm_allocation_wins() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
           "SLURM_JOB_NODELIST": "gpu[1-2]"}
    assert dist_env_from_environ(env) == DistEnv(3, 4, 3, "h", 1234)


def _slurm(**extra: str) -> dict:
    return {"SLURM_PROCID": "9", "SLURM_NTASKS": "32", "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "123456", **extra}


def test_slurm_env() -> None:
    env = dist_env_from_environ(_slurm(SLURM_JOB_NODELIST="gpu[001-004,010],login7"))
    assert env == DistEnv(9, 32, 1, "gpu001", SLURM_PORT_BASE + 123456 % SLURM_PORT_SPAN)
    assert SLURM_PORT_BASE <= env.master_port < SLURM_PORT_BASE + SLURM_PORT_SPAN


def test_slurm_env_overrides_and_fallbacks() -> None:
    env = dist_env_from_environ(_slurm(SLURM_NODELIST="n[3-4]", MASTER_PORT="40000",
                                       MASTER_ADDR="10.0.0.1"))
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 40000)
    env = dist_env_from_environ(_slurm(SLURM_NODELIST="n[3-4]"))  # older variable name
    assert env.master_addr == "n3"
    # same job id -> same port on every task, different jobs -> (usually) different ports
    a = dist_env_from_environ(_slurm(SLURM_JOB_NODELIST="x", SLURM_JOB_ID="1000"))
    b = dist_env_from_environ(_slurm(SLURM_JOB_NODELIST="x", SLURM_JOB_ID="1001"))
    assert a.master_port != b.master_port


def test_single_process_default() -> None:
    assert dist_env_from_environ({}) == DistEnv(0, 1, 0, "127.0.0.1", DEFAULT_MASTER_PORT)


def test_bad_integer_is_named() -> None:
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        dist_env_from_environ({"RANK": "0", "WORLD_SIZE": "two"})


@pytest.mark.parametrize("host_list, hosts", [
    ("node1", ["node1"]),
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
    ("a[1-2],b5", ["a1", "a2", "b5"]),
    ("rack[1-2]-n[3-4]", ["rack1-n3", "rack1-n4", "rack2-n3", "rack2-n4"]),
    ("gpu[001-004,010],login7", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "login7"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("x[09-10]", ["x09", "x10"]),
    ("h-1,h-2", ["h-1", "h-2"]),
])
def test_expand_slurm_nodelist(host_list: str, hosts: list) -> None:
    assert expand_slurm_nodelist(host_list) == hosts


@pytest.mark.parametrize("host_list", ["gpu[1-", "gpu1]", "gpu[a-b]", "gpu[3-1]", ""])
def test_expand_slurm_nodelist_rejects(host_list: str) -> None:
    with pytest.raises(ValueError):
        expand_slurm_nodelist(host_list)


# ---------------------------------------------------------------------------------------------
# Real 2-rank gloo initialisation
# ---------------------------------------------------------------------------------------------


def case_init_distributed(tp: int, pp: int, ep: int, seed: int) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mm1_megatron.runtime import (
        applied_patches,
        init_distributed,
        process_groups,
        shutdown_distributed,
    )

    parallel = SimpleNamespace(tp=tp, pp=pp, cp=1, ep=ep, expert_tp=None, first_stage_layers=None)
    env = init_distributed(parallel, seed=seed)
    rng_state = torch.get_rng_state()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed + 100 * pp_rank)
    groups = process_groups()
    facts = {
        "env": [env.rank, env.world_size, env.local_rank],
        "backend": dist.get_backend(),
        "tp": [ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()],
        "pp": [ps.get_pipeline_model_parallel_world_size(), pp_rank],
        "dp": ps.get_data_parallel_world_size(),
        "ep": [ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()],
        "expert_tp": ps.get_expert_tensor_parallel_world_size(),
        "pg_tp_size": groups.tp.size(),
        "patched": "patch_cuda_rng_tracker" in applied_patches(),
        "seeded": torch.equal(rng_state, torch.get_rng_state()),
    }
    shutdown_distributed()
    facts["after_shutdown"] = [dist.is_initialized(), ps.model_parallel_is_initialized()]
    shutdown_distributed()  # idempotent
    return facts


@pytest.mark.parametrize("tp, pp, ep", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_init_distributed_two_ranks(tp: int, pp: int, ep: int) -> None:
    import torch

    from mm1_megatron.runtime import needed_patches

    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < 2:
        pytest.skip("two ranks on CUDA need two GPUs")
    results = run_ranks(__file__, "case_init_distributed", nprocs=2,
                        kwargs={"tp": tp, "pp": pp, "ep": ep, "seed": 42})
    for rank, r in enumerate(results):
        assert r["env"] == [rank, 2, rank]
        assert r["backend"] == ("nccl" if cuda else "gloo") and r["seeded"]
        assert r["patched"] == ("patch_cuda_rng_tracker" in needed_patches())
        # Megatron's default order tp-cp-ep-dp-pp: consecutive ranks share a TP group
        assert r["tp"] == ([2, rank] if tp == 2 else [1, 0])
        assert r["pp"] == ([2, rank] if pp == 2 else [1, 0])
        assert r["dp"] == 2 // (tp * pp)
        assert r["ep"] == ([2, rank] if ep == 2 else [1, 0])
        assert r["expert_tp"] == tp  # expert_tp=None means "same as tp"
        assert r["pg_tp_size"] == tp
        assert r["after_shutdown"] == [False, False]
