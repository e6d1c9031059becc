"""Fresh ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` -> init Adam state.

Breaks (Megatron-Core 0.16.1): building the load template for ``dist_checkpointing.load``
on an optimizer that has not stepped yet: ``DistributedOptimizer.sharded_state_dict`` calls
``self.state_dict()``, whose torch-Adam branch (``distrib_optimizer.HAVE_APEX_OR_TE`` False)
asserts exactly one distinct ``step`` over the per-param states - of which there are none
yet.
Error: bare ``AssertionError`` (``assert len(steps) == 1`` in ``state_dict``).
Applies when: no fused Adam (``Backends.fused_adam`` is False: neither TE's nor apex's
``FusedAdam``, so Megatron-Core falls back to ``torch.optim.Adam``), CUDA or not.
Redirect: allocate the state torch Adam would create on its first step (``step=0``,
zero moments, one ``step`` tensor per param) - what Megatron's ``init_state_fn`` does
for FusedAdam, plus the per-param ``step`` torch Adam keeps; the load overwrites it all.
Drop when: ``DistributedOptimizer.state_dict()`` tolerates an empty torch-Adam state (as
its ``HybridDeviceOptimizer`` branch already does by skipping optimizers whose state is
empty) or ``sharded_state_dict(is_loading=True)`` initialises the state first.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ._registry import _once


@_once
def patch_distopt_init_adam_state_for_load() -> None:
    """Fresh ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` -> init Adam state
    (see the module docstring)."""
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    original = cls.sharded_state_dict

    @functools.wraps(original)
    def sharded_state_dict(self: Any, model_sharded_state_dict: Any = None,
                           is_loading: bool = False, *args: Any, **kwargs: Any) -> Any:
        if model_sharded_state_dict is None:
            model_sharded_state_dict = {}
        torch_adam = isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW))
        if is_loading and torch_adam and len(self.optimizer.state) == 0:
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    state = self.optimizer.state[param]
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
        return original(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    cls.sharded_state_dict = sharded_state_dict
