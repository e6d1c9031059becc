"""``device="cuda"``, ``Tensor.cuda()``, ``.to("cuda")``, ``pin_memory`` -> CPU.

Breaks (Megatron-Core 0.16.1): Megatron-Core hard-codes the CUDA device in many places, e.g.
the pipeline schedules (``total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")``
in ``forward_backward_no_pipelining`` and both pipelined schedules), the optimizers'
``found_inf`` / ``_scale_one`` buffers (``MixedPrecisionOptimizer``, ``FP32Optimizer``) and
``grad_scaler``, ``clip_grads.get_grad_norm_fp32`` / ``count_zeros_fp32``, DDP's grad buffers,
dist-checkpointing exchange utils, ``CLIPViTModel.position_ids = ....cuda()``, pinned host
buffers.
Error: ``AssertionError: Torch not compiled with CUDA enabled`` / ``RuntimeError: ...
no NVIDIA driver`` / ``RuntimeError: Cannot access accelerator device when none is
available`` (pin_memory).
Applies when: no CUDA (``Backends.cuda_available`` is False).
Redirect: a torch-function mode rewrites only the device arguments: with no GPU "the
device" is the CPU, the tensors are the same, and pinning has no meaning without a GPU.
During a device audit (``cpu_compat.device_audit``) "the device" is ``meta`` instead, and
host reads of meta tensors return zeros.
Drop when: Megatron-Core allocates on the current / configured device instead of the
literal ``"cuda"`` and ``.cuda()`` (in the schedules, optimizers, ``clip_grads``, DDP and
``CLIPViTModel``) and pins memory only when an accelerator is present.

The torch-function mode defined here is the one hook per process that also serves
``optimizer_cuda_type_check`` (one hook is cheaper than two on every torch call); if this
patch is dropped while that one is still needed, move the mode there.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

from ._registry import STAND_IN, _once


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _CpuRedirectMode(TorchFunctionMode):
    """One torch-function hook that serves two patches (one hook is cheaper than two on
    every torch call); each patch switches on its own rule."""

    def __init__(self) -> None:
        super().__init__()
        # patch_cuda_device_to_cpu
        self.redirect_devices = False
        # patch_optimizer_cuda_type_check: callers (module-name prefixes) that are told the
        # CUDA spelling of Tensor.type(), and the spelling for each CPU type name
        self.cuda_type_names_for: tuple[str, ...] = ()
        self.cuda_type_names: dict[str, str] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.type and self.cuda_type_names_for and len(args) == 1 \
                and not kwargs:
            name = func(*args)
            frame = sys._getframe(1)
            while frame.f_code.co_name == "__torch_function__":  # other modes stacked above
                frame = frame.f_back
            caller = frame.f_globals.get("__name__", "")
            if caller.startswith(self.cuda_type_names_for):
                return self.cuda_type_names.get(name, name)
            return name
        if self.redirect_devices:
            target = STAND_IN.device
            if func is torch.Tensor.pin_memory:
                return args[0]
            if func is torch.Tensor.cuda:  # (a tensor built on meta stays there)
                return args[0] if args[0].is_meta else args[0].to(target)
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = {**kwargs, "device": target}
            if kwargs.get("pin_memory"):
                kwargs = {**kwargs, "pin_memory": False}
            if func is torch.Tensor.to and any(_is_cuda_device(a) for a in args[1:]):
                args = tuple(target if _is_cuda_device(a) else a for a in args)
            if STAND_IN.auditing and func in _HOST_READS and args and \
                    isinstance(args[0], torch.Tensor) and args[0].is_meta:
                return _HOST_READS[func](args[0])
            if STAND_IN.auditing and func is torch.tensor and args and \
                    isinstance(args[0], (list, tuple)):  # e.g. torch.tensor([norms...])
                args = (_meta_as_zeros(args[0]),) + tuple(args[1:])
        return func(*args, **kwargs)


def _meta_as_zeros(data: Any) -> Any:
    if isinstance(data, torch.Tensor) and data.is_meta:
        return _zeros_on_host(data).tolist()
    if isinstance(data, (list, tuple)):
        return type(data)(_meta_as_zeros(d) for d in data)
    return data


def _zeros_on_host(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(t.shape, dtype=t.dtype)


# During a device audit a meta tensor read by the host reads as zeros, so a whole step (the
# optimizer's grad norm, our loss sums) runs through with shapes and devices checked.
_HOST_READS = {
    torch.Tensor.item: lambda t: _zeros_on_host(t).item(),
    torch.Tensor.tolist: lambda t: _zeros_on_host(t).tolist(),
    torch.Tensor.__bool__: lambda t: False,
    torch.Tensor.__float__: lambda t: 0.0,
    torch.Tensor.__int__: lambda t: 0,
    torch.Tensor.__index__: lambda t: 0,
    torch.Tensor.cpu: _zeros_on_host,
    torch.Tensor.numpy: lambda t: _zeros_on_host(t).numpy(),
}


_MODE: Optional[_CpuRedirectMode] = None


def _redirect_mode() -> _CpuRedirectMode:
    """The process's redirect mode, pushed on first use and never popped.

    Torch-function modes are thread-local: Megatron calls made from threads other than the
    one that applied the patches are not redirected (none in the paths we use)."""
    global _MODE
    if _MODE is None:
        _MODE = _CpuRedirectMode()
        _MODE.__enter__()
    return _MODE


@_once
def patch_cuda_device_to_cpu() -> None:
    """``device="cuda"``, ``Tensor.cuda()``, ``.to("cuda")``, ``pin_memory`` -> CPU
    (see the module docstring)."""
    _redirect_mode().redirect_devices = True
