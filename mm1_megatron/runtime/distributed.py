"""Process-group setup: launcher environment -> torch.distributed -> Megatron-Core parallel state.

The same code path serves torchrun (RANK/WORLD_SIZE/...), Slurm's srun (SLURM_PROCID/...) and
a plain ``python`` single process; NCCL on GPUs, gloo (plus the CPU compatibility layer) on CPUs.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Optional, Protocol

import torch
import torch.distributed as dist

from mm1_megatron.runtime.backends import detect_backends
from mm1_megatron.runtime.cpu_compat import apply_cpu_compat

log = logging.getLogger(__name__)

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# Slurm without MASTER_PORT: derive the port from the job id so every task of a job agrees
# on it without talking, and concurrent jobs on a node rarely collide. Kept below Linux's
# ephemeral range (32768-60999) so an outgoing connection does not hold it.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 15000
# Pipeline stages must not draw identical initial weights: offset the seed per stage
# (Megatron-LM's convention). TP ranks keep the same seed, so CPU-initialised master
# weights are identical across TP layouts.
PIPELINE_SEED_STRIDE = 100


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


class ParallelLayout(Protocol):
    """What ``init_distributed`` reads from a parallel config (``config.ParallelConfig``);
    ``expert_tp`` (None: same as ``tp``) is optional."""

    tp: int
    pp: int
    cp: int
    ep: int


# ---------------------------------------------------------------------------------------------
# Launcher environment
# ---------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1-2,5],b' -> ['a[1-2,5]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm host list {text!r}")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def _expand_range_set(ranges: str, host_list: str) -> list[str]:
    """'001-003,010' -> ['001', '002', '003', '010'] (zero padding kept, as Slurm does)."""
    out: list[str] = []
    for item in ranges.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not m:
            raise ValueError(f"bad range {item!r} in Slurm host list {host_list!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in Slurm host list {host_list!r}")
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_host(pattern: str, host_list: str) -> list[str]:
    """'rack[1-2]-n[3-4]' -> rack1-n3, rack1-n4, rack2-n3, rack2-n4 (Slurm's order)."""
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [head + value + rest
            for value in _expand_range_set(m.group(1), host_list)
            for rest in _expand_host(tail, host_list)]


def expand_slurm_nodelist(host_list: str) -> list[str]:
    """Expand Slurm's compressed host list, e.g. ``gpu[001-004,010],login7``."""
    hosts: list[str] = []
    for part in _split_top_level(host_list):
        hosts.extend(_expand_host(part, host_list))
    if not hosts:
        raise ValueError(f"empty Slurm host list {host_list!r}")
    return hosts


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise ValueError(f"{key}={environ[key]!r} is not an integer") from None


def dist_env_from_environ(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Rank layout from torchrun's variables, else Slurm's, else a single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:  # torchrun, or set by hand
        return DistEnv(
            rank=_int(environ, "RANK"),
            world_size=_int(environ, "WORLD_SIZE"),
            local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
            master_addr=environ.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
            master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ
            else DEFAULT_MASTER_PORT,
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:  # srun
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if "MASTER_ADDR" in environ:
            master_addr = environ["MASTER_ADDR"]
        elif nodelist:
            master_addr = expand_slurm_nodelist(nodelist)[0]
        else:
            master_addr = DEFAULT_MASTER_ADDR
        if "MASTER_PORT" in environ:
            master_port = _int(environ, "MASTER_PORT")
        elif "SLURM_JOB_ID" in environ:
            master_port = SLURM_PORT_BASE + _int(environ, "SLURM_JOB_ID") % SLURM_PORT_SPAN
        else:
            master_port = DEFAULT_MASTER_PORT
        return DistEnv(
            rank=_int(environ, "SLURM_PROCID"),
            world_size=_int(environ, "SLURM_NTASKS"),
            local_rank=_int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
            master_addr=master_addr,
            master_port=master_port,
        )
    return DistEnv(rank=0, world_size=1, local_rank=0,
                   master_addr=environ.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
                   master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ
                   else DEFAULT_MASTER_PORT)


# ---------------------------------------------------------------------------------------------
# Initialisation and teardown
# ---------------------------------------------------------------------------------------------


def subgroup_timeout_minutes(timeout: timedelta) -> int:
    """Megatron-Core's TP / DP / PP / EP groups take their timeout in whole minutes: rounded
    up, so no collective of theirs times out (an abort, under NCCL) before `timeout`, which
    the hang watchdog's margin is measured against (`runtime.watchdog.collective_timeout`)."""
    return max(1, math.ceil(timeout.total_seconds() / 60))


def init_distributed(parallel: ParallelLayout, seed: int, *,
                     timeout: timedelta = timedelta(minutes=10),
                     environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Start torch.distributed and Megatron-Core's model-parallel groups; seed the RNGs.

    ``parallel`` has int attributes ``tp``, ``pp``, ``cp``, ``ep`` and optionally ``expert_tp``
    (None: same as ``tp``). Call before building any model: on a CPU this also applies the
    Megatron-Core compatibility patches. Pair with ``shutdown_distributed()``.
    """
    env = dist_env_from_environ(os.environ if environ is None else environ)
    # torch's env:// rendezvous reads these; under torchrun they are already set (and
    # MASTER_PORT is the agent's store, which env:// then joins instead of re-binding).
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
                      LOCAL_RANK=str(env.local_rank), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))

    backends = detect_backends()
    if backends.cuda_available:
        torch.cuda.set_device(env.local_rank)
    # Before Megatron-Core builds anything (RNG tracker included).
    patches = apply_cpu_compat(backends)

    if not dist.is_initialized():
        if env.world_size == 1:
            # Nobody to rendezvous with: an in-memory store, so concurrent single-process
            # runs (tests, tools) never fight over MASTER_PORT.
            dist.init_process_group(backend=backends.comm_backend, store=dist.HashStore(),
                                    rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend=backends.comm_backend, init_method="env://",
                                    rank=env.rank, world_size=env.world_size, timeout=timeout)
    elif dist.get_world_size() != env.world_size:
        raise RuntimeError(f"torch.distributed already initialised with world size "
                           f"{dist.get_world_size()}, the environment says {env.world_size}")

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    expert_tp = getattr(parallel, "expert_tp", None) or parallel.tp
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=getattr(parallel, "virtual_stages", None),
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=expert_tp,
        distributed_timeout_minutes=subgroup_timeout_minutes(timeout),
    )

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    stage_seed = seed + PIPELINE_SEED_STRIDE * pp_rank
    # Megatron's CPU initialisation (use_cpu_initialization=True) and every other CPU draw
    # use the CPU generator; Megatron's seeding only touches the (CUDA) tracker states.
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)

    if env.rank == 0:
        log.info("distributed: %s world=%d tp=%d pp=%d cp=%d ep=%d expert_tp=%d, "
                 "%d compatibility patches", backends.comm_backend, env.world_size, parallel.tp,
                 parallel.pp, parallel.cp, parallel.ep, expert_tp, len(patches))
    return env


def process_groups() -> Any:
    """Megatron-Core's process groups as a ``ProcessGroupCollection``, to pass explicitly
    (``pg_collection=``) to models, DDP and optimizers instead of relying on globals."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def shutdown_distributed() -> None:
    """Destroy Megatron's groups, then the default group. Safe to call when not initialised.

    Needed: without it, runs that built a Megatron optimizer abort at interpreter exit
    ("terminate called without an active exception")."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "DistEnv",
    "ParallelLayout",
    "dist_env_from_environ",
    "expand_slurm_nodelist",
    "init_distributed",
    "process_groups",
    "shutdown_distributed",
]

