"""``torch.cuda`` device, stream and event calls -> CPU no-ops.

Breaks (Megatron-Core 0.16.1): Megatron-Core calls ``torch.cuda.current_device()`` to place
new tensors (``RotaryEmbedding.get_emb`` moves ``inv_freq`` to it on the first forward;
``tensor_parallel.mappings._gather_along_first_dim`` and friends allocate their outputs with
``device=torch.cuda.current_device()``), ``torch.cuda.synchronize()`` in pipeline p2p
communication (``P2PCommunicator._communicate_shapes`` / ``_communicate``), and CUDA streams to overlap host copies
(``MoEAlltoAllTokenDispatcher.__init__`` creates ``torch.cuda.Stream()`` and its
``_maybe_dtoh_and_synchronize`` enters ``torch.cuda.stream(...)``).
Error: ``AssertionError: Torch not compiled with CUDA enabled`` (CPU torch build), or
``RuntimeError: Found no NVIDIA driver`` (CUDA build without a GPU).
Applies when: no CUDA (``Backends.cuda_available`` is False).
Redirect: ``current_device()`` returns ``"cpu"`` so ``device=torch.cuda.current_device()``
means the CPU; streams and events are no-ops because CPU work (and gloo) already completes
in program order, which is what the stream/event synchronisation establishes on a GPU.
(``device_count``, ``empty_cache``, ``manual_seed`` already work on a CPU build.)
Drop when: Megatron-Core stops calling ``torch.cuda.current_device()``, ``Stream``,
``stream()`` and ``synchronize()`` unconditionally - e.g. places tensors through a device
helper that can answer "cpu" and guards its streams with ``torch.cuda.is_available()`` -
so that ``test_patch_cuda_stubs``'s "without" half passes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ._registry import STAND_IN, _once


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
    """``torch.cuda`` device, stream and event calls -> CPU no-ops (see the module docstring)."""
    cuda = torch.cuda
    cpu_stream = _NoOpStream()  # one "current" stream, so identity comparisons behave
    cuda.current_device = lambda: STAND_IN.device.type  # type: ignore[assignment, return-value]
    cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    cuda.Event = _NoOpEvent  # type: ignore[assignment, misc]
    cuda.Stream = _NoOpStream  # type: ignore[assignment, misc]
    cuda.current_stream = lambda device=None: cpu_stream  # type: ignore[assignment]
    cuda.default_stream = lambda device=None: cpu_stream  # type: ignore[assignment]
    cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]
