"""What this machine offers Megatron-Core: CUDA, Transformer Engine, apex, FP8.

Detection mirrors Megatron-Core's own import probes, because what matters is which code path
Megatron-Core takes, not what is "really" installed: Megatron-Core's layer specs switch to
apex norms as soon as ``import apex`` succeeds - which any folder named ``apex`` on
``sys.path`` makes true - while its optimizers need ``apex.optimizers.FusedAdam``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Optional

import torch

# FP8 GEMMs (Transformer Engine) need Ada (sm_89) or Hopper (sm_90) and newer.
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Backends:
    cuda_available: bool
    device_name: str  # GPU name, or "cpu"
    compute_capability: Optional[tuple[int, int]]
    transformer_engine: bool  # `import transformer_engine` works (Megatron's HAVE_TE probes)
    transformer_engine_version: Optional[str]
    apex: bool  # `import apex` works: Megatron-Core's layer specs then use apex norms
    apex_fused_adam: bool  # `from apex.optimizers import FusedAdam` works
    fp8_capable: bool  # hardware: compute capability >= 8.9 (Ada, Hopper and newer)

    @property
    def fused_adam(self) -> bool:
        """Megatron's ``distrib_optimizer.HAVE_APEX_OR_TE``: a fused Adam replaces torch Adam."""
        return self.transformer_engine or self.apex_fused_adam

    @property
    def fp8_available(self) -> bool:
        """FP8 training needs both the hardware and Transformer Engine."""
        return self.fp8_capable and self.transformer_engine

    @property
    def layer_spec(self) -> str:
        """Which Megatron-Core layer spec the project builds: "transformer_engine" or "local"."""
        return "transformer_engine" if self.transformer_engine else "local"

    @property
    def comm_backend(self) -> str:
        return "nccl" if self.cuda_available else "gloo"

    @property
    def stray_apex(self) -> bool:
        """``import apex`` works but apex's kernels do not: likely a folder named ``apex``
        on ``sys.path``, which flips Megatron-Core's layer specs into apex mode and breaks."""
        return self.apex and not self.apex_fused_adam


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or a broken install raising anything at import time
        return False
    return True


def _te_version() -> Optional[str]:
    for dist_name in ("transformer-engine", "transformer_engine", "transformer-engine-cu12"):
        try:
            return importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
    te = importlib.import_module("transformer_engine")
    return getattr(te, "__version__", None)


@functools.lru_cache(maxsize=1)
def detect_backends() -> Backends:
    """Probe once per process (imports are cached by Python anyway)."""
    cuda = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if cuda else None
    te = _importable("transformer_engine")
    apex_fused_adam = False
    apex = _importable("apex")
    if apex:
        try:
            from apex.optimizers import FusedAdam  # noqa: F401  (Megatron's optimizer probe)

            apex_fused_adam = True
        except Exception:
            apex_fused_adam = False
    return Backends(
        cuda_available=cuda,
        device_name=torch.cuda.get_device_name() if cuda else "cpu",
        compute_capability=capability,
        transformer_engine=te,
        transformer_engine_version=_te_version() if te else None,
        apex=apex,
        apex_fused_adam=apex_fused_adam,
        fp8_capable=bool(capability and capability >= FP8_MIN_COMPUTE_CAPABILITY),
    )


def describe_backends(precision: str, fp8: Optional[str] = None,
                      backends: Optional[Backends] = None) -> str:
    """One log line: layer implementation, communication backend, precision (and device)."""
    b = backends or detect_backends()
    if b.transformer_engine:
        layers = f"Transformer Engine spec (TE {b.transformer_engine_version or '?'})"
    else:
        norms = "apex norms" if b.apex else "torch norms"
        layers = f"Megatron-Core local spec ({norms}, no TE)"
    if b.cuda_available:
        cc = b.compute_capability
        device = f"{b.device_name} (sm_{cc[0]}{cc[1]})" if cc else b.device_name
    else:
        device = "cpu (Megatron-Core CPU compat patches)"
    prec = precision
    if fp8:
        prec += f" + fp8 {fp8}" + ("" if b.fp8_available else " UNAVAILABLE (needs TE, sm_89+)")
    line = f"backends: layers={layers} | comm={b.comm_backend} | precision={prec} | device={device}"
    if b.stray_apex:
        line += " | WARNING: `import apex` works but apex.optimizers does not: a folder named " \
                "'apex' on sys.path? Megatron-Core will pick apex norms and fail"
    return line


__all__ = ["Backends", "FP8_MIN_COMPUTE_CAPABILITY", "describe_backends", "detect_backends"]
