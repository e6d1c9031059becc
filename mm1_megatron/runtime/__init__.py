"""Runtime: backend detection (CUDA/TE/apex/FP8), Megatron-Core on CPU, distributed init."""

from mm1_megatron.runtime.backends import Backends, describe_backends, detect_backends
from mm1_megatron.runtime.cpu_compat import (
    PATCHES,
    CompatPatch,
    applied_patches,
    apply_cpu_compat,
    device_audit,
    needed_patches,
)
from mm1_megatron.runtime.device import comm_device, pin_batch, to_device, training_device
from mm1_megatron.runtime.distributed import (
    DistEnv,
    dist_env_from_environ,
    expand_slurm_nodelist,
    init_distributed,
    process_groups,
    shutdown_distributed,
)

__all__ = [
    "PATCHES",
    "Backends",
    "CompatPatch",
    "DistEnv",
    "applied_patches",
    "apply_cpu_compat",
    "comm_device",
    "describe_backends",
    "detect_backends",
    "device_audit",
    "dist_env_from_environ",
    "expand_slurm_nodelist",
    "init_distributed",
    "needed_patches",
    "pin_batch",
    "process_groups",
    "shutdown_distributed",
    "to_device",
    "training_device",
]
