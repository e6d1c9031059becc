"""Megatron-Core 0.16.1 without CUDA (and without apex / Transformer Engine).

Megatron-Core assumes a GPU in a few dozen places and assumes TE or apex in a few more. Each
module of this package redirects exactly one family of such calls; its docstring names the
call that breaks, the error it raises, when the patch applies, why the redirect keeps
Megatron's semantics, and when the patch can be dropped. Every patch has a test in
``tests/runtime/test_cpu_compat.py`` that shows the call failing without it and working with
it, so a Megatron-Core upgrade that fixes (or moves) a call fails a named test.

Usage: ``install()`` (alias ``apply_cpu_compat()``) once per process, before any Megatron
model, optimizer or RNG tracker is built (``init_distributed`` does it). Importing this
package patches nothing.

Two kinds of condition decide what is applied (see ``PATCHES``):
- CUDA absent: device, stream, RNG and gloo redirects;
- TE (or apex) absent, CUDA or not: the plain-torch fallbacks Megatron-Core takes then
  (distributed-optimizer checkpoint loading with ``torch.optim.Adam``, the local layer spec's
  torch norms, the MoE router GEMM, the CLIP ViT default norm).
On a CUDA machine with TE and apex nothing is applied.

Layout: one module per patch, named after its patch function without the ``patch_`` prefix;
``_registry`` holds what they share (the ``_once`` guard and the record of applied patches).
Patch modules import only from sibling modules, never from this ``__init__``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Iterator, Optional

import torch

from ._registry import _APPLIED, STAND_IN
from .clip_vit_default_norm import patch_clip_vit_default_norm
from .cuda_device_to_cpu import patch_cuda_device_to_cpu
from .cuda_rng_tracker import patch_cuda_rng_tracker
from .cuda_stubs import patch_cuda_stubs
from .distopt_init_adam_state_for_load import patch_distopt_init_adam_state_for_load
from .distopt_skip_adam_step_on_load import patch_distopt_skip_adam_step_on_load
from .distopt_unshare_adam_step import patch_distopt_unshare_adam_step
from .gloo_uneven_all_gather import patch_gloo_uneven_all_gather
from .moe_alltoall_split_sizes import patch_moe_alltoall_split_sizes
from .moe_te_gemm_placeholder import patch_moe_te_gemm_placeholder
from .optimizer_cuda_type_check import patch_optimizer_cuda_type_check
from .torch_norm_sequence_parallel import patch_torch_norm_sequence_parallel

if TYPE_CHECKING:
    from mm1_megatron.runtime.backends import Backends

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompatPatch:
    name: str
    condition: Callable[["Backends"], bool]  # True: this machine needs the patch
    apply: Callable[[], None]


def _no_cuda(b: "Backends") -> bool:
    return not b.cuda_available


def _no_te(b: "Backends") -> bool:
    return not b.transformer_engine


def _no_fused_adam(b: "Backends") -> bool:
    return not b.fused_adam


def _no_te_and_moe_utils_unbound(b: "Backends") -> bool:
    from mm1_megatron.runtime.mcore_version import MOE_UTILS_BINDS_TE_GEMM

    return _no_te(b) and not MOE_UTILS_BINDS_TE_GEMM


# Order matters only in that the device/stream redirects come before anything that might
# allocate while being patched.
PATCHES: tuple[CompatPatch, ...] = (
    # CUDA absent
    CompatPatch("patch_cuda_stubs", _no_cuda, patch_cuda_stubs),
    CompatPatch("patch_cuda_device_to_cpu", _no_cuda, patch_cuda_device_to_cpu),
    CompatPatch("patch_optimizer_cuda_type_check", _no_cuda, patch_optimizer_cuda_type_check),
    CompatPatch("patch_cuda_rng_tracker", _no_cuda, patch_cuda_rng_tracker),
    CompatPatch("patch_moe_alltoall_split_sizes", _no_cuda, patch_moe_alltoall_split_sizes),
    CompatPatch("patch_gloo_uneven_all_gather", _no_cuda, patch_gloo_uneven_all_gather),
    # Transformer Engine absent: the local layer spec, torch norms, torch router GEMM
    CompatPatch("patch_moe_te_gemm_placeholder", _no_te_and_moe_utils_unbound,
                patch_moe_te_gemm_placeholder),
    CompatPatch("patch_torch_norm_sequence_parallel", _no_te, patch_torch_norm_sequence_parallel),
    CompatPatch("patch_clip_vit_default_norm", _no_te, patch_clip_vit_default_norm),
    # apex/TE FusedAdam absent: DistributedOptimizer over torch.optim.Adam, checkpoint loading
    CompatPatch("patch_distopt_init_adam_state_for_load", _no_fused_adam,
                patch_distopt_init_adam_state_for_load),
    CompatPatch("patch_distopt_skip_adam_step_on_load", _no_fused_adam,
                patch_distopt_skip_adam_step_on_load),
    CompatPatch("patch_distopt_unshare_adam_step", _no_fused_adam,
                patch_distopt_unshare_adam_step),
)


def needed_patches(backends: Optional["Backends"] = None) -> list[str]:
    """Names of the patches this machine needs, in application order. Patches nothing."""
    if backends is None:
        from mm1_megatron.runtime.backends import detect_backends

        backends = detect_backends()
    return [p.name for p in PATCHES if p.condition(backends)]


def applied_patches() -> list[str]:
    """Names of the patches in effect in this process, in the order they were applied."""
    return list(_APPLIED)


def install(backends: Optional["Backends"] = None, *,
            exclude: Collection[str] = ()) -> list[str]:
    """Apply the patches this machine needs (idempotent) and return their names.

    Call once per process before any Megatron-Core model, optimizer or RNG tracker is built.
    ``backends`` defaults to ``detect_backends()``; ``exclude`` leaves named patches out (the
    tests use it to show each patch is still needed). The result lists every needed,
    non-excluded patch, including ones an earlier call applied.
    """
    unknown = set(exclude) - {p.name for p in PATCHES}
    if unknown:
        raise ValueError(f"unknown cpu_compat patches: {sorted(unknown)}")
    names = [n for n in needed_patches(backends) if n not in exclude]
    by_name = {p.name: p for p in PATCHES}
    for name in names:
        by_name[name].apply()
    if names:
        log.info("Megatron-Core compatibility patches in effect: %s", ", ".join(names))
    return names


apply_cpu_compat = install  # the name the rest of the project (and its tests) use


def stand_in_device() -> torch.device:
    """The device that stands in for the GPU here: the host, or `meta` in a device audit."""
    return STAND_IN.device


@contextlib.contextmanager
def device_audit() -> Iterator[None]:
    """Within: what Megatron-Core (and our code, through `runtime.device`) puts on "the GPU"
    goes to the `meta` device instead of the host, so any tensor left on the host meets a meta
    tensor and raises a device mismatch, as it would on a GPU; values the host reads from meta
    tensors (`item`, `tolist`, `bool`, ...) read as zeros. Needs the CUDA-absent patches
    (`install()`); build the model inside the audit."""
    if "patch_cuda_device_to_cpu" not in _APPLIED:
        raise RuntimeError("device_audit needs the CPU compatibility patches (install())")
    from megatron.core.distributed import param_and_grad_buffer

    previous = STAND_IN.device, STAND_IN.auditing, param_and_grad_buffer._coalescing_manager
    STAND_IN.device, STAND_IN.auditing = torch.device("meta"), True
    # torch has no meta kernels for the *coalesced* c10d ops DDP's buffers use; issued one by
    # one (as gloo would run them anyway) each has one.
    param_and_grad_buffer._coalescing_manager = _one_by_one
    try:
        yield
    finally:
        (STAND_IN.device, STAND_IN.auditing,
         param_and_grad_buffer._coalescing_manager) = previous


class _Done:
    def wait(self) -> None: ...


@contextlib.contextmanager
def _one_by_one(group=None, device=None, async_ops: bool = False) -> Iterator[_Done]:
    yield _Done()


__all__ = [
    "PATCHES",
    "CompatPatch",
    "applied_patches",
    "apply_cpu_compat",
    "device_audit",
    "stand_in_device",
    "install",
    "needed_patches",
    "patch_clip_vit_default_norm",
    "patch_cuda_device_to_cpu",
    "patch_cuda_rng_tracker",
    "patch_cuda_stubs",
    "patch_distopt_init_adam_state_for_load",
    "patch_distopt_skip_adam_step_on_load",
    "patch_distopt_unshare_adam_step",
    "patch_gloo_uneven_all_gather",
    "patch_moe_alltoall_split_sizes",
    "patch_moe_te_gemm_placeholder",
    "patch_optimizer_cuda_type_check",
    "patch_torch_norm_sequence_parallel",
]
