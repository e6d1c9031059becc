"""``_set_main_param_and_optimizer_states`` copies torch Adam's ``step`` -> skip it.

Breaks (Megatron-Core 0.16.1): ``DistributedOptimizer.load_state_dict`` with
``fully_reshardable`` parameter state -> ``load_parameter_state_from_fully_reshardable``
builds per-param tensors without ``step`` (it skips that key on purpose: "Handle torch Adam
'step' state separately") and hands them to ``_set_main_param_and_optimizer_states``, which
copies every key of the torch-Adam state, ``step`` included
(``dst_tensors[key].copy_(tensors[key])``).
Error: ``KeyError: 'step'``.
Applies when: no fused Adam (``Backends.fused_adam`` is False: neither TE's nor apex's
``FusedAdam``, so Megatron-Core falls back to ``torch.optim.Adam``), CUDA or not.
Redirect: copy only the keys the loader supplied; ``step`` has already been restored from
the param groups by ``load_state_dict``.
Drop when: ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies only the keys
present in ``tensors`` (or skips ``step``, as the loader does).
"""

from __future__ import annotations

import functools
from typing import Any

from ._registry import _once


@_once
def patch_distopt_skip_adam_step_on_load() -> None:
    """``_set_main_param_and_optimizer_states`` copies torch Adam's ``step`` -> skip it
    (see the module docstring)."""
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def _set_main_param_and_optimizer_states(self: Any, model_param: Any,
                                             tensors: dict) -> None:
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        for key, destination in destinations.items():
            if key in tensors:
                destination.copy_(tensors[key])

    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
