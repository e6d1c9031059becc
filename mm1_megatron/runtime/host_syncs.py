"""Count the host synchronisations our own code asks for.

On a GPU every read of a device value by the host (`.item()`, `bool(t)`, `.tolist()`,
`nonzero`, `masked_select`, boolean-mask indexing, copies to the host) waits for the device to
drain its queue. On a CPU run nothing waits, but the same calls happen, so a test can count
them here and hold the GPU path to a budget.

`HostSyncCounter` is a TorchFunctionMode (thread-local: only the thread that enters it is
watched) that records each such call whose direct Python caller is a file of this package,
except the data layer, which works on host memory before a batch moves to the device. Calls
made inside Megatron-Core or torch are theirs, not ours, and are not counted.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_PACKAGE = Path(__file__).resolve().parents[1]
_NOT_OURS = (_PACKAGE / "data", _PACKAGE / "runtime" / "host_syncs.py",
             _PACKAGE / "runtime" / "cpu_compat")  # not on the GPU path

# Tensor methods / torch functions that read device memory from the host (a `.to("cpu")` of a
# device tensor too; on a CPU run such copies cannot be told from no-ops and are not counted).
SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero",
           "masked_select", "cpu", "numpy", "argwhere", "unique", "repeat_interleave"}


def _is_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


def _ours(filename: str) -> bool:
    path = Path(filename)
    if not path.is_relative_to(_PACKAGE):
        return False
    return not any(path == n or path.is_relative_to(n) for n in _NOT_OURS)


class HostSyncCounter(TorchFunctionMode):
    """`with HostSyncCounter() as syncs: ...`; then `syncs.total`, `syncs.sites` (a Counter
    of "file:line name")."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def reset(self) -> None:
        self.sites.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        syncing = name in SYNCING or (name == "__getitem__" and len(args) > 1
                                      and _is_bool_index(args[1]))
        if name == "to" and args and torch.is_tensor(args[0]) and args[0].device.type != "cpu" \
                and (kwargs or {}).get("device", args[1] if len(args) > 1 else None) \
                in ("cpu", torch.device("cpu")):
            syncing = True  # a copy from the device to the host
        if syncing:
            caller = sys._getframe(1)
            # Skip torch's own wrappers (e.g. Tensor.__format__) and other torch-function
            # modes stacked above this one (the CPU compatibility layer's).
            while caller is not None and (caller.f_code.co_filename.startswith(torch.__path__[0])
                                          or caller.f_code.co_name == "__torch_function__"):
                caller = caller.f_back
            if caller is not None and _ours(caller.f_code.co_filename):
                where = Path(caller.f_code.co_filename).relative_to(_PACKAGE.parent)
                self.sites[f"{where}:{caller.f_lineno} {name}"] += 1
        return func(*args, **(kwargs or {}))
