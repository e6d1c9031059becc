"""Which Megatron-Core is installed, and every behaviour that differs between the releases we
support, in one place.

Tested: 0.16.1 (the newest for Python 3.11: CI's first leg) and 0.19.2 (what NGC containers
and `pip install` on Python 3.12 give clusters: CI's second leg runs its Python code on 3.11).
Each flag below names the release that changed the behaviour and what we do about it; code
elsewhere asks these flags, never the version itself.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import Any, Optional

from packaging.version import Version

TESTED = ("0.16.1", "0.19.2")
SUPPORTED_BELOW = Version("0.20")  # setup.py's upper bound


def _installed() -> Version:
    try:  # the dist-info first on sys.path: an overlay folder on PYTHONPATH wins, as imports do
        return Version(importlib.metadata.version("megatron-core"))
    except importlib.metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH
        from megatron.core import package_info

        return Version(package_info.__version__)


MCORE = _installed()
MCORE_RELEASE = Version(MCORE.base_version)  # NGC's "0.19.0+nv25.10" compares as 0.19.0

# 0.19: `TopKRouter` multiplies the per-token aux and z-loss by the TP x CP group size
# (`transformer/moe/router.py`, "pre-multiplying aux_loss by num_local_tokens *
# tp_cp_group.size()"). Before, their gradients shrank by TP x CP under SP / CP with
# `calculate_per_token_loss`, and `model.language` scales the coefficients back itself.
ROUTER_SCALES_AUX_LOSS_BY_TP_CP = MCORE_RELEASE >= Version("0.19")

# 0.17: `moe_utils` binds `te_general_gemm = None` without Transformer Engine (its NameError
# is what `cpu_compat.patch_moe_te_gemm_placeholder` mends on 0.16).
MOE_UTILS_BINDS_TE_GEMM = MCORE_RELEASE >= Version("0.17")

# 0.18: MoE router losses are recorded in `moe_logging.get_moe_metrics_tracker()`;
# `moe_utils`' tracker functions are deprecated since 0.16 (removal announced for 0.18,
# still present in 0.19.2). 0.16/0.17 have only the `moe_utils` ones.
HAS_MOE_METRICS_TRACKER = MCORE_RELEASE >= Version("0.18")


def async_checkpoint_machinery() -> tuple[Any, dict[str, str], str]:
    """(the AsyncCallsQueue class, extra `dist_checkpointing.save` arguments, its name) for
    background checkpoint writes, the machinery the installed release recommends. A request
    must be scheduled on the queue of the machinery that made it.

    From 0.17 (`save(..., async_strategy=)`, default "nvrx"): its own chooser,
    `strategies.torch.get_async_strategy`, asked for nvidia-resiliency-ext's async
    checkpointing (>= 0.6, as NGC containers ship it; see `environment_problem`) and, where
    that is not installed, for Megatron-Core's own ("mcore", deprecated there). Before:
    Megatron-Core's own, the only one."""
    from megatron.core import dist_checkpointing

    if "async_strategy" not in inspect.signature(dist_checkpointing.save).parameters:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        return AsyncCallsQueue, {}, "megatron-core"
    from megatron.core.dist_checkpointing.strategies.torch import get_async_strategy

    try:
        strategy, modules = get_async_strategy("nvrx")
        name = "nvidia-resiliency-ext"
    except ModuleNotFoundError:
        strategy, modules = get_async_strategy("mcore")
        name = "megatron-core (deprecated from 0.17 for nvidia-resiliency-ext)"
    return modules["AsyncCallsQueue"], {"async_strategy": strategy}, name


# 0.19 imports nvidia-resiliency-ext's async checkpointing inside `dist_checkpointing`
# (`strategies/nvrx.py`, NVRX_MIN_VERSION = "0.6.0") and fails to import with an older one
# installed (0.4.1, PyPI's newest for Python 3.11 on 2026-12-06: AttributeError on its
# `__version__`). Before 0.19 it is not imported there.
NVRX_MIN_FOR_DIST_CHECKPOINTING = Version("0.6.0")


def environment_problem(mcore: Version = MCORE_RELEASE, nvrx: Optional[str] = None
                        ) -> Optional[str]:
    """One line naming an installed package that breaks this Megatron-Core, or None. `nvrx`:
    nvidia-resiliency-ext's version (default: the installed one, if any)."""
    if nvrx is None:
        try:
            nvrx = importlib.metadata.version("nvidia-resiliency-ext")
        except importlib.metadata.PackageNotFoundError:
            return None
    if mcore >= Version("0.19") and Version(nvrx) < NVRX_MIN_FOR_DIST_CHECKPOINTING:
        return (f"nvidia-resiliency-ext {nvrx} is installed, but Megatron-Core {mcore} needs "
                f">= {NVRX_MIN_FOR_DIST_CHECKPOINTING} or none (with an older one its "
                "dist_checkpointing fails to import): upgrade it, or pip uninstall "
                "nvidia-resiliency-ext")
    return None


def format_newer_than_installed(written_by: str) -> bool:
    """A checkpoint written by a later minor release than the installed one: its format may
    hold what this release cannot read (0.19 writes no `common.pt`, which 0.16 loads first)."""
    saved = Version(Version(written_by).base_version)
    return (saved.major, saved.minor) > (MCORE_RELEASE.major, MCORE_RELEASE.minor)


@dataclass(frozen=True)
class TrackedLoss:
    """One router loss as Megatron-Core recorded it this step: a value per layer (summed over
    micro-batches) and the groups its partial values are summed / averaged over."""

    values: Any  # torch.Tensor [num_layers]
    reduce_group: Optional[Any]  # summed over it (the load-balancing loss's TP x CP shares)
    needs_dp_average: bool  # reduce_group does not hold DP: average over DP ourselves


def moe_tracked_losses() -> dict[str, TrackedLoss]:
    """The router losses recorded since the last `clear_moe_tracker()`."""
    if HAS_MOE_METRICS_TRACKER:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        return {name: TrackedLoss(e.values, e.reduce_group,
                                  needs_dp_average=e.reduce_group is not None and e.needs_dp_avg)
                for name, e in get_moe_metrics_tracker().metrics.items()}
    from megatron.core.transformer.moe import moe_utils

    return {name: TrackedLoss(e["values"], e.get("reduce_group"),
                              needs_dp_average=e.get("reduce_group") is not None
                              and not e.get("reduce_group_has_dp", False))
            for name, e in moe_utils.get_moe_layer_wise_logging_tracker().items()}


def clear_moe_tracker() -> None:
    if HAS_MOE_METRICS_TRACKER:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        get_moe_metrics_tracker().clear()
    else:
        from megatron.core.transformer.moe import moe_utils

        moe_utils.clear_aux_losses_tracker()
