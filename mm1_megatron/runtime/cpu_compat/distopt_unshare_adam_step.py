"""After ``DistributedOptimizer.load_state_dict``: one ``step`` tensor per param.

Breaks (Megatron-Core 0.16.1): silently - ``DistributedOptimizer.load_state_dict``'s
torch-Adam branch (``if not HAVE_APEX_OR_TE``) assigns the *same* ``step`` tensor object to
every parameter's state (``s["step"] = step``); torch Adam increments ``step`` in place once
per parameter, so after resuming, one optimizer step advances the shared counter by the
number of parameters and Adam's bias correction is wrong from then on.
Error: none - wrong numbers (every param reports step = saved + n_params after one step).
Applies when: no fused Adam (``Backends.fused_adam`` is False: neither TE's nor apex's
``FusedAdam``, so Megatron-Core falls back to ``torch.optim.Adam``), CUDA or not.
Redirect: give each parameter its own copy of the restored value, as torch Adam itself
allocates them.
Drop when: ``load_state_dict``'s torch-Adam branch gives each param its own ``step`` tensor
(``step.detach().clone()``, as its ``HybridDeviceOptimizer`` branch already does).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ._registry import _once


@_once
def patch_distopt_unshare_adam_step() -> None:
    """After ``DistributedOptimizer.load_state_dict``: one ``step`` tensor per param
    (see the module docstring)."""
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    original = cls.load_state_dict

    @functools.wraps(original)
    def load_state_dict(self: Any, state_dict: Any) -> Any:
        result = original(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].detach().clone()
        return result

    cls.load_state_dict = load_state_dict
