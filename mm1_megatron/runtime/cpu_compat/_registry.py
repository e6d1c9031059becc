"""What every patch module shares: the record of applied patches and the ``_once`` guard.

Patches are process-global, so the record is too. Patch modules import from here (never
from the package ``__init__``), which keeps the package free of import cycles.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

# Names of the patches in effect in this process, in the order they were applied.
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


class StandIn:
    """What stands in for the GPU while CUDA is absent: the host, or the `meta` device during
    a device audit (`cpu_compat.device_audit`), where a tensor our code leaves on the host
    meets the model's tensors on `meta` and raises a device mismatch, as it would on a GPU."""

    device = torch.device("cpu")
    auditing = False


STAND_IN = StandIn()
