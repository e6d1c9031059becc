"""Megatron's CUDA RNG tracker -> the CPU default generator.

Breaks (Megatron-Core 0.16.1): ``tensor_parallel.model_parallel_cuda_manual_seed`` ->
``CudaRNGStatesTracker.add`` calls ``torch.cuda.get_rng_state()`` / ``torch.cuda.manual_seed``;
``tracker.fork()`` (dropout in tensor-parallel regions, GPU-side weight init) and activation
recompute call ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``, which
read and write the CUDA generator (``torch.cuda.random.get_rng_state(device="cuda")``).
Error: ``AssertionError: Torch not compiled with CUDA enabled``.
Applies when: no CUDA (``Backends.cuda_available`` is False).
Redirect: on a CPU the kernels that would draw from the CUDA generator draw from the CPU
default generator, so the tracker's named states must be CPU generator states: ``add``
seeds a CPU state with the requested seed (so TP ranks still get distinct
``model-parallel-rng`` streams) and ``fork`` swaps it in and out of the CPU generator,
leaving the caller's CPU stream untouched. ``fork`` is rewritten rather than wrapped
because the original warns "CPU RNG state changed within GPU RNG context" whenever a
random op runs inside it, which on a CPU is every time and by design.
Drop when: Megatron-Core's ``CudaRNGStatesTracker`` keeps its named states on the current
device's generator (CPU included) instead of hard-coding the CUDA generator in ``add``,
``fork`` and ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ._registry import _once


@_once
def patch_cuda_rng_tracker() -> None:
    """Megatron's CUDA RNG tracker -> the CPU default generator (see the module docstring)."""
    from megatron.core.tensor_parallel import random as mrandom

    def _get_cuda_rng_state(device: Any = "cuda", clone: bool = False,
                            graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def _set_cuda_rng_state(new_state: torch.Tensor, device: Any = -1,
                            graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    tracker_cls = mrandom.CudaRNGStatesTracker

    def add(self: Any, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        caller_state = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(caller_state)

    @contextlib.contextmanager
    def fork(self: Any, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        outer_name = self._current_state_name
        outer_state = torch.get_rng_state()
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name

    mrandom._get_cuda_rng_state = _get_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_cuda_rng_state
    tracker_cls.add = add
    tracker_cls.fork = fork
