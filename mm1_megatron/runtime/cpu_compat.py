"""Megatron-Core 0.16.1 without CUDA (and without apex / Transformer Engine).

Megatron-Core assumes a GPU in a few dozen places and assumes TE or apex in a few more. Each
patch below redirects exactly one family of such calls; its docstring names the call that
breaks, the error it raises, and why the redirect keeps Megatron's semantics. Every patch has
a test in ``tests/runtime/test_cpu_compat.py`` that shows the call failing without it and
working with it, so a Megatron-Core upgrade that fixes (or moves) a call fails a named test.

Usage: ``apply_cpu_compat()`` once per process, before any Megatron model, optimizer or RNG
tracker is built (``init_distributed`` does it). Importing this module patches nothing.

Two kinds of condition decide what is applied (see ``PATCHES``):
- CUDA absent: device, stream, RNG and gloo redirects;
- TE (or apex) absent, CUDA or not: the plain-torch fallbacks Megatron-Core takes then
  (distributed-optimizer checkpoint loading with ``torch.optim.Adam``, the local layer spec's
  torch norms, the MoE router GEMM, the CLIP ViT default norm).
On a CUDA machine with TE and apex nothing is applied.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from mm1_megatron.runtime.backends import Backends

log = logging.getLogger(__name__)

# Names of the patches in effect in this process (patches are process-global).
_APPLIED: list[str] = []


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """Make a patch function idempotent: a second call (from anywhere) does nothing."""

    @functools.wraps(fn)
    def wrapper() -> None:
        if fn.__name__ in _APPLIED:
            return
        fn()
        _APPLIED.append(fn.__name__)

    return wrapper


# ---------------------------------------------------------------------------------------------
# CUDA absent
# ---------------------------------------------------------------------------------------------


class _NoOpEvent:
    """Stands in for torch.cuda.Event: CPU kernels run synchronously, so every event is done."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


class _NoOpStream:
    """Stands in for torch.cuda.Stream: on CPU there is one in-order stream of work."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NoOpEvent:
        return event if event is not None else _NoOpEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> "_NoOpStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


@_once
def patch_cuda_stubs() -> None:
    """``torch.cuda`` device, stream and event calls -> CPU no-ops.

    Breaks: Megatron-Core calls ``torch.cuda.current_device()`` to place new tensors (e.g.
    ``RotaryEmbedding.get_emb`` moves ``inv_freq`` to it on the first forward; tensor-parallel
    mappings allocate their gather outputs on it), ``torch.cuda.synchronize()`` in pipeline
    p2p communication and checkpointing, and CUDA streams to overlap host copies
    (``MoEAlltoAllTokenDispatcher``'s device-to-host stream, shared experts).
    Error: ``AssertionError: Torch not compiled with CUDA enabled`` (CPU torch build), or
    ``RuntimeError: Found no NVIDIA driver`` (CUDA build without a GPU).
    Redirect: ``current_device()`` returns ``"cpu"`` so ``device=torch.cuda.current_device()``
    means the CPU; streams and events are no-ops because CPU work (and gloo) already completes
    in program order, which is what the stream/event synchronisation establishes on a GPU.
    (``device_count``, ``empty_cache``, ``manual_seed`` already work on a CPU build.)
    """
    cuda = torch.cuda
    cpu_stream = _NoOpStream()  # one "current" stream, so identity comparisons behave
    cuda.current_device = lambda: "cpu"  # type: ignore[assignment, return-value]
    cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    cuda.Event = _NoOpEvent  # type: ignore[assignment, misc]
    cuda.Stream = _NoOpStream  # type: ignore[assignment, misc]
    cuda.current_stream = lambda device=None: cpu_stream  # type: ignore[assignment]
    cuda.default_stream = lambda device=None: cpu_stream  # type: ignore[assignment]
    cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]


@_once
def patch_cuda_rng_tracker() -> None:
    """Megatron's CUDA RNG tracker -> the CPU default generator.

    Breaks: ``tensor_parallel.model_parallel_cuda_manual_seed`` -> ``CudaRNGStatesTracker.add``
    calls ``torch.cuda.get_rng_state()``; ``tracker.fork()`` (dropout in tensor-parallel
    regions, GPU-side weight init) and activation recompute call ``_get_cuda_rng_state`` /
    ``_set_cuda_rng_state``.
    Error: ``AssertionError: Torch not compiled with CUDA enabled``.
    Redirect: on a CPU the kernels that would draw from the CUDA generator draw from the CPU
    default generator, so the tracker's named states must be CPU generator states: ``add``
    seeds a CPU state with the requested seed (so TP ranks still get distinct
    ``model-parallel-rng`` streams) and ``fork`` swaps it in and out of the CPU generator,
    leaving the caller's CPU stream untouched. ``fork`` is rewritten rather than wrapped
    because the original warns "CPU RNG state changed within GPU RNG context" whenever a
    random op runs inside it, which on a CPU is every time and by design.
    """
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


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CpuRedirectMode(TorchFunctionMode):
    """One torch-function hook that serves two patches (one hook is cheaper than two on
    every torch call); each patch switches on its own rule."""

    def __init__(self) -> None:
        super().__init__()
        self.redirect_devices = False
        self.cuda_type_names_for: tuple[str, ...] = ()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.type and self.cuda_type_names_for and len(args) == 1 \
                and not kwargs:
            name = func(*args)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(self.cuda_type_names_for):
                return _CUDA_TYPE_NAMES.get(name, name)
            return name
        if self.redirect_devices:
            if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
                return args[0]
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = {**kwargs, "device": torch.device("cpu")}
            if kwargs.get("pin_memory"):
                kwargs = {**kwargs, "pin_memory": False}
            if func is torch.Tensor.to and any(_is_cuda_device(a) for a in args[1:]):
                args = tuple(torch.device("cpu") if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


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
    """``device="cuda"``, ``Tensor.cuda()``, ``.to("cuda")``, ``pin_memory`` -> CPU.

    Breaks: Megatron-Core hard-codes the CUDA device in many places, e.g. the pipeline
    schedules (``total_num_tokens = torch.zeros([], device="cuda")`` in
    ``forward_backward_no_pipelining``), the optimizers' ``found_inf`` / grad scaler buffers,
    ``clip_grads.get_grad_norm_fp32``, DDP's grad buffers, dist-checkpointing exchange utils,
    ``CLIPViTModel.position_ids = ....cuda()``, pinned host buffers.
    Error: ``AssertionError: Torch not compiled with CUDA enabled`` / ``RuntimeError: ...
    no NVIDIA driver`` / ``RuntimeError: Cannot access accelerator device when none is
    available`` (pin_memory).
    Redirect: a torch-function mode rewrites only the device arguments: with no GPU "the
    device" is the CPU, the tensors are the same, and pinning has no meaning without a GPU.
    """
    _redirect_mode().redirect_devices = True


@_once
def patch_optimizer_cuda_type_check() -> None:
    """``param.type() == 'torch.cuda.FloatTensor'`` checks in Megatron's optimizers -> pass.

    Breaks: ``get_megatron_optimizer`` ->
    ``DistributedOptimizer._build_model_and_main_param_groups`` and
    ``Float16OptimizerWithFloat16Params.__init__`` classify parameters by their legacy
    type string; ``clip_grads.clip_grad_by_total_norm_fp32`` asserts it.
    Error: ``TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor,
    torch.cuda.HalfTensor, or torch.cuda.BFloat16Tensor. Received torch.FloatTensor``.
    Redirect: the checks are about dtype (fp32 vs half), not device, so ``Tensor.type()``
    answers with the CUDA spelling of the same dtype - only when called from
    ``megatron.core.optimizer`` code, everywhere else it tells the truth.
    """
    _redirect_mode().cuda_type_names_for = ("megatron.core.optimizer",)


@_once
def patch_moe_alltoall_split_sizes() -> None:
    """MoE all-to-all split sizes: CPU tensors -> numpy, as on GPU.

    Breaks: ``MoEAlltoAllTokenDispatcher.preprocess`` moves the per-rank token counts to the
    host with ``moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)``, which converts only
    CUDA tensors; on CPU they stay torch tensors and reach
    ``torch.distributed.all_to_all_single(output_split_sizes=<Tensor>)``.
    Error: ``TypeError: all_to_all_single(): incompatible function arguments``.
    Redirect: honour ``as_numpy`` for CPU tensors too, so the dispatcher gets exactly the
    numpy arrays it gets on a GPU (also what its later arithmetic expects).
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False,
                                 record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu  # imported by name


class _CompletedWork:
    """What ``all_gather(async_op=True)`` returns when we did the work synchronously."""

    def wait(self, timeout: Any = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


@_once
def patch_gloo_uneven_all_gather() -> None:
    """``torch.distributed.all_gather`` with uneven sizes on gloo -> pad, gather, slice.

    Breaks: ``tensor_parallel.mappings._gather_along_first_dim(output_split_sizes=...)``
    (``gather_from_sequence_parallel_region`` in the MoE all-to-all dispatcher with TP>1 and
    sequence parallelism) all-gathers tensors of different first-dim sizes; NCCL allows that,
    gloo does not.
    Error: ``RuntimeError: ProcessGroupGloo::allgather: invalid tensor size``.
    Redirect: pad every piece to the largest first dim, gather, copy each rank's true rows
    back into the caller's output views: the same result NCCL produces. Only uneven gathers
    on gloo groups are touched; everything else goes to the original function.
    """
    import torch.distributed as dist

    original = dist.all_gather

    @functools.wraps(original)
    def all_gather(tensor_list: list, tensor: torch.Tensor, group: Any = None,
                   async_op: bool = False) -> Any:
        rows = [t.shape[0] if t.dim() else -1 for t in tensor_list]
        uneven = tensor.dim() > 0 and len(set(rows)) > 1 and min(rows) >= 0 and all(
            t.shape[1:] == tensor.shape[1:] for t in tensor_list)
        if not uneven or dist.get_backend(group) != "gloo":
            return original(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(rows)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in tensor_list]
        original(pieces, padded, group=group)
        for out, piece, n in zip(tensor_list, pieces, rows, strict=True):
            out.copy_(piece[:n])
        return _CompletedWork() if async_op else None

    dist.all_gather = all_gather


# ---------------------------------------------------------------------------------------------
# Transformer Engine absent: the local layer spec, torch norms, torch router GEMM
# ---------------------------------------------------------------------------------------------


@_once
def patch_moe_te_gemm_placeholder() -> None:
    """``moe_utils.te_general_gemm`` undefined without TE -> ``None`` (torch GEMM fallback).

    Breaks: ``TopKRouter.forward`` -> ``router_gating_linear`` ->
    ``RouterGatingLinearFunction.forward`` tests ``if te_general_gemm is not None``, but
    ``moe_utils`` binds that name only inside its ``try: import transformer_engine`` block.
    Error: ``NameError: name 'te_general_gemm' is not defined``.
    Redirect: ``None`` is the value ``megatron.core.extensions.transformer_engine`` itself
    gives the name when TE's GEMM is missing; it selects the ``torch.mm`` path.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


@_once
def patch_torch_norm_sequence_parallel() -> None:
    """``WrappedTorchNorm`` with ``sequence_parallel=True`` -> build it, mark its params.

    Breaks: the local layer spec's norm (``WrappedTorchNorm``, used when TE is absent)
    asserts ``not config.sequence_parallel``; but SP is required for MoE with TP>1 and EP>1.
    Error: ``AssertionError: sequence parallel not supported by torch LayerNorm``.
    Redirect: the norm itself is the same with or without SP; what SP needs is that its
    weight gradients, computed on a sequence shard per TP rank, are summed across the TP
    group. ``finalize_model_grads`` does that for params tagged ``sequence_parallel=True``,
    the tag TE's and apex's norms set, so we build the torch norm and tag its params.
    """
    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    original_new = cls.__new__

    def __new__(klass: type, config: Any, hidden_size: int, eps: float = 1e-5,
                **kwargs: Any) -> torch.nn.Module:
        if not config.sequence_parallel:
            return original_new(klass, config, hidden_size, eps, **kwargs)
        shallow = copy.copy(config)  # a copy: no __post_init__ re-validation, caller untouched
        shallow.sequence_parallel = False
        norm = original_new(klass, shallow, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    cls.__new__ = staticmethod(__new__)  # type: ignore[assignment]


@_once
def patch_clip_vit_default_norm() -> None:
    """``CLIPViTModel`` default ``ln_pre_impl`` without TE -> ``WrappedTorchNorm``.

    Breaks: ``CLIPViTModel.__init__`` (also reached through ``LLaVAModel``, which cannot pass
    ``ln_pre_impl``) defaults its norms to ``NORM_IMPL``, which is ``torch.nn.LayerNorm``
    when TE is absent, and builds it with ``build_module(..., config=...)``.
    Error: ``TypeError: LayerNorm.__init__() got an unexpected keyword argument 'config'``.
    Redirect: ``WrappedTorchNorm`` is Megatron's own config-aware torch norm (what the local
    layer spec uses); it builds the same ``torch.nn.LayerNorm`` from the config.
    """
    from megatron.core.models.vision import clip_vit_model
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cls = clip_vit_model.CLIPViTModel
    original_init = cls.__init__
    signature = inspect.signature(original_init)

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for name in ("ln_pre_impl", "ln_post_impl"):
            if bound.arguments[name] is torch.nn.LayerNorm:
                bound.arguments[name] = WrappedTorchNorm
        original_init(*bound.args, **bound.kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------
# apex/TE FusedAdam absent: DistributedOptimizer over torch.optim.Adam, checkpoint loading
# ---------------------------------------------------------------------------------------------


@_once
def patch_distopt_init_adam_state_for_load() -> None:
    """Fresh ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` -> init Adam state.

    Breaks: building the load template for ``dist_checkpointing.load`` on an optimizer that
    has not stepped yet: ``sharded_state_dict`` calls ``self.state_dict()``, whose torch-Adam
    branch (``HAVE_APEX_OR_TE`` False) asserts exactly one distinct ``step`` over the
    per-param states - of which there are none yet.
    Error: bare ``AssertionError`` (``assert len(steps) == 1``).
    Redirect: allocate the state torch Adam would create on its first step (``step=0``,
    zero moments, one ``step`` tensor per param) - what Megatron's ``init_state_fn`` does
    for FusedAdam, plus the per-param ``step`` torch Adam keeps; the load overwrites it all.
    """
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


@_once
def patch_distopt_skip_adam_step_on_load() -> None:
    """``_set_main_param_and_optimizer_states`` copies torch Adam's ``step`` -> skip it.

    Breaks: ``DistributedOptimizer.load_state_dict`` with ``fully_reshardable`` parameter
    state -> ``load_parameter_state_from_fully_reshardable`` builds per-param tensors without
    ``step`` (it skips that key on purpose) and hands them to
    ``_set_main_param_and_optimizer_states``, which copies every key of the torch-Adam state,
    ``step`` included.
    Error: ``KeyError: 'step'``.
    Redirect: copy only the keys the loader supplied; ``step`` has already been restored from
    the param groups by ``load_state_dict`` ("Handle torch Adam 'step' state separately").
    """
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


@_once
def patch_distopt_unshare_adam_step() -> None:
    """After ``DistributedOptimizer.load_state_dict``: one ``step`` tensor per param.

    Breaks (silently): ``load_state_dict``'s torch-Adam branch assigns the *same* ``step``
    tensor object to every parameter's state; torch Adam increments ``step`` in place once
    per parameter, so after resuming, one optimizer step advances the shared counter by the
    number of parameters and Adam's bias correction is wrong from then on.
    Error: none - wrong numbers (every param reports step = saved + n_params after one step).
    Redirect: give each parameter its own copy of the restored value, as torch Adam itself
    allocates them.
    """
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


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


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


# Order matters only in that the device/stream redirects come before anything that might
# allocate while being patched.
PATCHES: tuple[CompatPatch, ...] = (
    CompatPatch("patch_cuda_stubs", _no_cuda, patch_cuda_stubs),
    CompatPatch("patch_cuda_device_to_cpu", _no_cuda, patch_cuda_device_to_cpu),
    CompatPatch("patch_optimizer_cuda_type_check", _no_cuda, patch_optimizer_cuda_type_check),
    CompatPatch("patch_cuda_rng_tracker", _no_cuda, patch_cuda_rng_tracker),
    CompatPatch("patch_moe_alltoall_split_sizes", _no_cuda, patch_moe_alltoall_split_sizes),
    CompatPatch("patch_gloo_uneven_all_gather", _no_cuda, patch_gloo_uneven_all_gather),
    CompatPatch("patch_moe_te_gemm_placeholder", _no_te, patch_moe_te_gemm_placeholder),
    CompatPatch("patch_torch_norm_sequence_parallel", _no_te, patch_torch_norm_sequence_parallel),
    CompatPatch("patch_clip_vit_default_norm", _no_te, patch_clip_vit_default_norm),
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


def apply_cpu_compat(backends: Optional["Backends"] = None, *,
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


__all__ = [
    "PATCHES",
    "CompatPatch",
    "applied_patches",
    "apply_cpu_compat",
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
