"""``param.type() == 'torch.cuda.FloatTensor'`` checks in Megatron's optimizers -> pass.

Breaks (Megatron-Core 0.16.1): ``get_megatron_optimizer`` ->
``DistributedOptimizer._build_model_and_main_param_groups`` and
``Float16OptimizerWithFloat16Params.__init__`` classify parameters by their legacy
type string (``'torch.cuda.HalfTensor'`` / ``'torch.cuda.BFloat16Tensor'`` /
``'torch.cuda.FloatTensor'``); ``clip_grads.clip_grad_by_total_norm_fp32`` asserts
``param.grad.type() == 'torch.cuda.FloatTensor'``.
Error: ``TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor,
torch.cuda.HalfTensor, or torch.cuda.BFloat16Tensor. Received torch.FloatTensor``.
Applies when: no CUDA (``Backends.cuda_available`` is False).
Redirect: the checks are about dtype (fp32 vs half), not device, so ``Tensor.type()``
answers with the CUDA spelling of the same dtype - only when called from
``megatron.core.optimizer`` code, everywhere else it tells the truth. The rule runs in the
torch-function mode of ``cuda_device_to_cpu`` (one hook per process for both patches).
Drop when: Megatron-Core's optimizers and ``clip_grads`` classify parameters by
``param.dtype`` (or accept ``torch.FloatTensor`` etc.) instead of comparing
``param.type()`` with the ``torch.cuda.*Tensor`` names.
"""

from __future__ import annotations

from ._registry import _once
from .cuda_device_to_cpu import _redirect_mode

# CPU (and, in a device audit, meta) type name -> the name the same dtype has on a GPU
_CUDA_TYPE_NAMES = {f"torch.{prefix}{kind}": f"torch.cuda.{kind}"
                    for prefix in ("", "meta.")
                    for kind in ("FloatTensor", "HalfTensor", "BFloat16Tensor")}


@_once
def patch_optimizer_cuda_type_check() -> None:
    """``param.type() == 'torch.cuda.FloatTensor'`` checks in Megatron's optimizers -> pass
    (see the module docstring)."""
    mode = _redirect_mode()
    mode.cuda_type_names = _CUDA_TYPE_NAMES
    mode.cuda_type_names_for = ("megatron.core.optimizer",)
